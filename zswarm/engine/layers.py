"""Layer planning for worker mode: which device holds how many of a model's repeating layers.

Owns the model of llama.cpp's layer assignment (:func:`assign_layers`, :func:`output_device`),
the largest-remainder rounding of requested proportions (:func:`layer_targets`) and its inverse,
the tensor split that yields given counts (:func:`split_for_counts`). Pure arithmetic on lists
of numbers: it must never import llama_cpp or ggml, touch a file or log anything.
"""

from __future__ import annotations

import math
from typing import Sequence

def assign_layers(n_layer: int, weights: Sequence[float]) -> list[int]:
    """Repeating layers per device as llama.cpp 0c1e570 assigns them (llama_model::load_tensors)
    when every layer is offloaded: layer ``il`` goes to the first device whose cumulative share
    exceeds ``il / (n_layer + 1)`` (the output layer counts as one more, and is left out here).
    """
    total = sum(weights)
    edges, acc = [], 0.0
    for w in weights:
        acc += w
        edges.append(acc / total)
    counts = [0] * len(weights)
    for il in range(n_layer):
        counts[_device_of(il, n_layer, edges)] += 1
    return counts


def output_device(n_layer: int, weights: Sequence[float]) -> int:
    """The device (an index into ``weights``) that llama.cpp gives the output layer, as
    :func:`assign_layers` does the repeating ones: the slot ``il == n_layer``."""
    total = sum(weights)
    edges, acc = [], 0.0
    for w in weights:
        acc += w
        edges.append(acc / total)
    return _device_of(n_layer, n_layer, edges)


def _device_of(il: int, n_layer: int, edges: Sequence[float]) -> int:
    # llama.cpp: std::upper_bound(splits, il / (n_layer + 1)) over the normalized cumulative
    # splits; past the end (float noise in the last edge) it would index out of range, here: the last
    x = il / (n_layer + 1)
    return next((i for i, e in enumerate(edges) if e > x), len(edges) - 1)


def layer_targets(n_layer: int, weights: Sequence[float]) -> list[int]:
    """Repeating layers per device for ``weights`` (proportions; only devices with weight > 0 get
    any): the largest-remainder rounding of each exact share, so every count is the share rounded
    down or up and they sum to ``n_layer``. Ties go to the larger weight, then the earlier device.
    """
    total = float(sum(weights))
    if n_layer < 0 or not total > 0 or any(not w >= 0 for w in weights):
        raise ValueError(f"cannot split {n_layer} layers by {list(weights)}")
    shares = [w * n_layer / total for w in weights]
    counts = [math.floor(q) for q in shares]
    # The remainders are rounded so that float noise (7.4999999 vs 7.5) cannot break a tie.
    order = sorted((i for i, w in enumerate(weights) if w > 0),
                   key=lambda i: (-round(shares[i] - counts[i], 9), -weights[i], i))
    for i in order[:n_layer - sum(counts)]:
        counts[i] += 1
    return counts


def split_for_counts(counts: Sequence[int], output: int | None = None) -> list[float]:
    """The llama.cpp tensor split (one weight per device) that gives device ``k`` exactly
    ``counts[k]`` repeating layers, the inverse of :func:`assign_layers`, and the output layer to
    device ``output`` (default: the last device with a repeating layer; else a later device).

    llama.cpp puts layer ``il`` (0..n_layer, the last one being the output layer) on the first
    device whose normalized cumulative split exceeds ``il / (n_layer + 1)``. Device ``k``'s
    cumulative split point is set half a slot below the first layer that belongs to the next
    device, ``(C_k - 0.5) / (n_layer + 1)`` where ``C_k`` is the count up to and including ``k``,
    far from any float rounding; 0 while no layer has been placed yet, and 1 from the device that
    takes the output layer on (for every device before it, after the last repeating layer, that
    is ``(n_layer - 0.5) / (n_layer + 1)``: the output slot alone is left past it). The weights are
    the points' differences (0 for a device with no layers, which llama.cpp then never picks).
    """
    n_layer = sum(counts)
    if n_layer < 1 or any(c < 0 for c in counts):
        raise ValueError(f"no split gives {list(counts)} layers")
    last = max(i for i, c in enumerate(counts) if c > 0)
    if output is None:
        output = last
    if not last <= output < len(counts):
        raise ValueError(f"the output layer cannot go to device {output} after {list(counts)} layers")
    points, acc = [], 0
    for i, c in enumerate(counts):
        acc += c
        points.append(1.0 if i >= output else (acc - 0.5) / (n_layer + 1) if acc else 0.0)
    return [b - a for a, b in zip([0.0, *points], points)]
