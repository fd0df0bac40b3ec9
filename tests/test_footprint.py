"""The memory estimate against what llama.cpp allocates: the real model, loaded, its log read.

zswarm/footprint.py reckons each device's weights, KV cache and compute buffers from the GGUF
header; these tests load the embedded model (alone, and split over two real RPC server
children) and hold the estimate to within 10% of the buffers llama.cpp logs.
"""

import subprocess
import sys

import pytest

from zswarm.engine.gguf import read_header
from zswarm.engine.model import default_model_path
from zswarm.footprint import MIB, footprint

pytestmark = pytest.mark.slow


def test_header_tensor_sizes_add_up_to_the_data():
    path = default_model_path()
    h = read_header(path)
    assert h.keys["general.architecture"] == "llama" and h.arch_key("block_count") == 30
    assert h.keys["tokenizer.ggml.tokens"] == 49152  # a long array: its length
    fp = footprint(path, 256)
    assert len(fp.layer_weights) == 30 and all(w > 0 for w in fp.layer_weights)
    # sizes from the offsets agree with ggml's type sizes: the q8_0 embedding (34 bytes per 32
    # values) and the f32 output norm, padded to the 32-byte alignment
    sizes = {t.name: t.nbytes for t in h.tensors}
    assert sizes["token_embd.weight"] == 49152 * 576 // 32 * 34
    assert sizes["output_norm.weight"] == 576 * 4
    assert all(sizes[f"blk.{i}.attn_norm.weight"] == 576 * 4 for i in range(30))


def test_a_file_that_is_not_gguf_is_a_value_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 16)  # a tensor count no file has
    with pytest.raises(ValueError):
        footprint(str(bad), 256)
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError):
        footprint(str(bad), 256)
    # a key whose length says 2^62 bytes: refused, never allocated
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + (1).to_bytes(8, "little") * 2 + (1 << 62).to_bytes(8, "little"))
    with pytest.raises(ValueError, match="cut short or corrupt"):
        footprint(str(bad), 256)
    # the real header, cut in the middle of its tokenizer arrays
    bad.write_bytes(open(default_model_path(), "rb").read(200_000))
    with pytest.raises(ValueError):
        footprint(str(bad), 256)


@pytest.mark.parametrize("ctx", [256, 2048, 8192])
def test_single_node_estimate_within_ten_percent(ctx):
    from llama_cpp import Llama

    from zswarm.engine.loading import LlamaLog

    with LlamaLog() as llama_log:
        llm = Llama(model_path=default_model_path(), n_ctx=ctx, n_threads=1, verbose=False)
    del llm
    allocated = sum(llama_log.buffers().values())
    estimate = footprint(default_model_path(), ctx).single()
    assert allocated > 90 * MIB  # the log was read: at least the weights
    assert abs(estimate - allocated) <= 0.10 * allocated, (ctx, estimate / MIB, allocated / MIB)


def _rpc_servers(n):
    procs, endpoints = [], []
    for _ in range(n):
        p = subprocess.Popen([sys.executable, "-m", "zswarm.engine.rpc_server", "--port", "0", "--threads", "1"],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(p)
        line = ""
        while not line.startswith("READY"):
            line = p.stdout.readline()
            assert line, "the RPC server exited before READY"
        endpoints.append(line.split()[1])
    return procs, endpoints


@pytest.mark.parametrize("ctx", [256, 2048])
def test_split_estimate_per_worker_within_ten_percent(ctx):
    """Two RPC servers, no local layers: what each worker holds (its 15 layers' weights and KV
    cache, its compute buffer) against the estimate the Sharder plans with."""
    from zswarm.engine.loading import LoadSpec, load_model

    procs, endpoints = _rpc_servers(2)
    try:
        model = load_model(LoadSpec(default_model_path(), ctx, 1, rpc_servers=tuple(endpoints),
                                    tensor_split=(0.5, 0.5), local_layers=False))
        buffers, layers = dict(model.buffers), dict(model.layers)
        del model
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    fp = footprint(default_model_path(), ctx)
    first = 0
    for e in endpoints:
        estimate = fp.layers_bytes(first, layers[e]) + fp.device_compute()
        first += layers[e]
        assert abs(estimate - buffers[e]) <= 0.10 * buffers[e], (ctx, e, estimate / MIB, buffers[e] / MIB)
