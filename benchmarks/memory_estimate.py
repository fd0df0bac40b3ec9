"""Worker mode's memory estimate (issue 14) against what llama.cpp allocates, side by side.

For each context size, the embedded model is loaded (1) on this CPU alone and (2) split over two
real RPC server children with no local layers (what ``--no-local-layers`` does), and every buffer
llama.cpp logs (weights, KV cache, compute, output) is added up per device. Beside each figure:
zswarm.footprint's estimate from the GGUF header, the one the Sharder plans splits with, and the
old rule it replaced (1.2 x file + 64 MiB + 32 KiB per token, for the whole model).

Run from the repository root:
    .venv/bin/python benchmarks/memory_estimate.py [--contexts 256,2048,8192] [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import command_line, publish  # noqa: E402

from zswarm.engine.model import default_model_path  # noqa: E402
from zswarm.footprint import MIB, footprint  # noqa: E402

KEY = "memory-estimate"


def old_rule(path: str, ctx: int) -> int:
    return int(os.path.getsize(path) * 1.2) + 64 * MIB + ctx * 32 * 1024


def single(path: str, ctx: int) -> int:
    from llama_cpp import Llama

    from zswarm.engine.loading import LlamaLog

    with LlamaLog() as llama_log:
        llm = Llama(model_path=path, n_ctx=ctx, n_threads=1, verbose=False)
    del llm
    return sum(llama_log.buffers().values())


def split(path: str, ctx: int) -> list[tuple[int, int]]:
    """(layers, bytes allocated) for each of two RPC servers."""
    from zswarm.engine.loading import LoadSpec, load_model

    procs, endpoints = [], []
    try:
        for _ in range(2):
            p = subprocess.Popen([sys.executable, "-m", "zswarm.engine.rpc_server", "--port", "0", "--threads", "1"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            procs.append(p)
            line = ""
            while not line.startswith("READY"):
                line = p.stdout.readline()
                if not line:
                    raise SystemExit("an RPC server exited before READY")
            endpoints.append(line.split()[1])
        model = load_model(LoadSpec(path, ctx, 1, rpc_servers=tuple(endpoints), tensor_split=(0.5, 0.5),
                                    local_layers=False))
        out = [(model.layers[e], model.buffers[e]) for e in endpoints]
        del model
        return out
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--contexts", default="256,2048,8192")
    p.add_argument("--write", action="store_true", help="write the figures into docs/BENCHMARKS.md")
    args = p.parse_args()
    path = default_model_path()
    rows = []
    for ctx in (int(c) for c in args.contexts.split(",")):
        fp = footprint(path, ctx)
        alone = single(path, ctx)
        workers = split(path, ctx)
        first, per = 0, []
        for layers, got in workers:
            est = fp.layers_bytes(first, layers) + fp.device_compute()
            first += layers
            per.append((layers, got, est))
        rows.append((ctx, alone, fp.single(), old_rule(path, ctx), per))
    lines = ["| context | one CPU: llama.cpp | estimate | ratio | old rule | each of 2 workers: llama.cpp | estimate"
             " | ratio |", "|---|---|---|---|---|---|---|---|"]
    for ctx, alone, est, old, per in rows:
        w = " / ".join(f"{g / MIB:.1f}" for _, g, _ in per)
        e = " / ".join(f"{x / MIB:.1f}" for _, _, x in per)
        r = " / ".join(f"{x / g:.2f}" for _, g, x in per)
        lines.append(f"| {ctx} | {alone / MIB:.1f} MiB | {est / MIB:.1f} MiB | {est / alone:.2f} | {old / MIB:.1f} MiB"
                     f" ({old / alone:.2f}) | {w} MiB | {e} MiB | {r} |")
    table = "\n".join(lines)
    doc = (f"## Worker mode's memory estimate (issue 14)\n\n`{command_line()}`\n\n"
           "The embedded model (92 MiB file), every buffer llama.cpp logs added up: on one CPU, and on each of two "
           "RPC servers holding 15 layers with no local layers. The estimate is `zswarm/footprint.py`'s, from the "
           "GGUF header; the old rule (1.2 x file + 64 MiB + 32 KiB per token) was for the whole model and was all "
           "the split checked, so two 64 MiB workers were refused at context 256.\n\n" + table + "\n")
    publish(KEY, table, doc, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
