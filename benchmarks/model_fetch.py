"""Models travel: how fast a node fetches a model file from its peers, and what sharing costs the
peer that serves it.

Side by side in one run, on 127.0.0.1:

- *tcp copy*: the file sent over one plain loopback TCP connection into a file (``sendfile``),
  then its SHA-256 checked: an ``scp``-like copy without the encryption, and the ceiling;
- *one peer*: ``zswarm admin pull`` on a fresh server, one holder (``--share-rate 0``);
- *two peers*: the same with two holders at once.
  Timed from the pull to the file whole, verified and renamed into place (manifest, every
  piece checked as it arrives, the whole file's SHA-256 at the end);
- *tokens/s of the serving peer*: streamed completions on a holder with the real engine and
  model, idle and while a peer fetches from it, at the default share rate (64 MiB/s) and with
  no limit.

The file is random bytes of ``--mb`` MB placed in the holders' models directories, where a
node shares every whole file it holds; holders in the throughput part run the stand-in engine
(``fake_engine.py``; the depot, the gateway and CURVE are the real ones).

Run from the repository root:
    .venv/bin/python benchmarks/model_fetch.py [--mb 512] [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Nodes, command_line, loadavg, machine, now_utc, publish, stream_completion,  # noqa: E402
                    wait_for)

KEY = "model-fetch"  # its section of docs/BENCHMARKS.md
NAME = "bench-blob"
MODEL = "smollm2-135m-instruct"
PROMPT = "1, 2, 3, 4, 5, 6,"  # greedy decoding keeps counting: never stops by itself


def make_blob(path: Path, mb: int) -> str:
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(mb):
            block = os.urandom(1 << 20)
            h.update(block)
            f.write(block)
    return h.hexdigest()


def seed(nodes: Nodes, name: str, blob: Path, sha: str) -> None:
    """Put the file in node ``name``'s models directory before it starts (a hard link: no copy)."""
    folder = nodes.tmp / name / "models" / sha
    folder.mkdir(parents=True, exist_ok=True)
    os.link(blob, folder / f"{NAME}.gguf")


def tcp_copy(blob: Path, out: Path) -> float:
    """Seconds to send ``blob`` over loopback TCP into ``out`` and check its SHA-256."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def send() -> None:
        conn, _ = server.accept()
        with conn, open(blob, "rb") as f:
            conn.sendfile(f)
    t = threading.Thread(target=send, daemon=True)
    t.start()
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with socket.create_connection(("127.0.0.1", port)) as c, open(out, "wb") as f:
        while data := c.recv(1 << 20):
            f.write(data)
            h.update(data)
    seconds = time.perf_counter() - t0
    t.join()
    server.close()
    return seconds


def holds(node, sha: str) -> bool:
    return any(h["sha256"] == sha and h["have"] == h["size"] for h in node.admin("ledger")[0].get("holdings", []))


def knows(fetcher, holders: list, sha: str) -> bool:
    """Does ``fetcher`` see a whole copy of the file on each of ``holders``?"""
    whole = {c["node_name"] for f in fetcher.admin("models") if f["sha256"] == sha
             for c in f["copies"] if c["have"] == f["size"]}
    return {h.name for h in holders} <= whole


def pull_seconds(nodes: Nodes, fetcher, holders: list, sha: str) -> float:
    wait_for(lambda: knows(fetcher, holders, sha), 60, what=f"{fetcher.name} to know {len(holders)} holder(s)",
             check=lambda: nodes.check(fetcher))
    t0 = time.perf_counter()
    fetcher.admin("pull", model=NAME)
    wait_for(lambda: fetcher.admin("status")["fetch"]["state"] == "whole", 300, interval_s=0.02,
             what=f"{fetcher.name} to fetch the file", check=lambda: nodes.check(fetcher))
    return time.perf_counter() - t0


def tokens_per_s(address: str, runs: int) -> list[float]:
    out = []
    for _ in range(runs):
        r = stream_completion(address, MODEL, PROMPT, 48, 120)
        if r["tokens"] != 48:
            raise RuntimeError(f"a completion of {r['tokens']} tokens, not 48: {r}")
        out.append(r["tokens"] / r["seconds"])
    return out


def while_fetching(nodes: Nodes, holder, sha: str, name: str) -> tuple[list[float], float]:
    """tokens/s on ``holder`` while a fresh server fetches the file from it, and the fetch's seconds."""
    fetcher = nodes.start("server", name, ["--p2p", "--threads", "1"], bootstrap=holder)
    wait_for(lambda: knows(fetcher, [holder], sha), 60, what=f"{name} to know the holder",
             check=lambda: nodes.check(fetcher))
    t0 = time.perf_counter()
    fetcher.admin("pull", model=NAME)
    rates = []
    while fetcher.admin("status")["fetch"]["state"] != "whole":
        rates += tokens_per_s(holder.http, 1)
    seconds = time.perf_counter() - t0
    nodes.stop(fetcher)
    return rates, seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=512, help="size of the file in MiB [default: 512]")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    load_before = loadavg()
    nodes = Nodes()
    try:
        blob = nodes.tmp / "blob.gguf"
        sha = make_blob(blob, args.mb)
        size = blob.stat().st_size
        mb = size / 1e6
        copy_s = statistics.median(tcp_copy(blob, nodes.tmp / f"copy{i}") for i in range(3))
        for i in range(3):
            (nodes.tmp / f"copy{i}").unlink()

        holder_args = ["--p2p", "--federated", "--share-rate", "0"]
        seed(nodes, "h1", blob, sha)
        h1 = nodes.start("server", "h1", holder_args)
        wait_for(lambda: holds(h1, sha), 120, what="h1 to share the file", check=lambda: nodes.check(h1))
        f1 = nodes.start("server", "f1", ["--p2p"], bootstrap=h1)
        one_s = pull_seconds(nodes, f1, [h1], sha)
        nodes.stop(f1)
        seed(nodes, "h2", blob, sha)
        h2 = nodes.start("server", "h2", holder_args, bootstrap=h1)
        wait_for(lambda: holds(h2, sha), 120, what="h2 to share the file", check=lambda: nodes.check(h2))
        f2 = nodes.start("server", "f2", ["--p2p"], bootstrap=h1)
        two_s = pull_seconds(nodes, f2, [h1, h2], sha)
        peers_f2 = f2.admin("status")["fetch"]["peers"]
        nodes.stop(f2)
        nodes.stop(h2)
        nodes.stop(h1)

        impact = {}
        for label, rate in (("64MiB", None), ("none", "0")):
            name = f"r{len(impact)}"
            seed(nodes, name, blob, sha)
            extra = ["--p2p", "--federated", "--threads", "1"] + (["--share-rate", rate] if rate else [])
            r = nodes.start("server", name, extra, stand_in=False)
            nodes.wait_http(r, MODEL, 120)
            wait_for(lambda: holds(r, sha), 120, what=f"{name} to share the file", check=lambda: nodes.check(r))
            idle = tokens_per_s(r.http, 7)[1:]  # the first warms the engine
            busy, fetch_s = while_fetching(nodes, r, sha, f"{name}-fetcher")
            impact[label] = (statistics.median(idle), statistics.median(busy), len(busy), fetch_s)
            nodes.stop(r)
    finally:
        nodes.close()

    rows = [("tcp copy (plain loopback, then SHA-256)", copy_s), ("zswarm, one peer", one_s),
            ("zswarm, two peers", two_s)]
    lines = ["## Models travel: fetching a model file from peers", "",
             f"Command (repository root): `{command_line()}`",
             f"Date: {now_utc()}. Machine: {machine()}.", f"Load average (1 min) before the run: {load_before.split()[0]}.",
             "", f"A {mb:.0f} MB file, fetched whole and verified (see `benchmarks/model_fetch.py`). Fetches with",
             "no share-rate limit on the holders; fetcher and holders share this machine's cores.", "",
             "| path | seconds | MB/s | / tcp copy |", "|---|---:|---:|---:|"]
    for label, s in rows:
        lines.append(f"| {label} | {s:.2f} | {mb / s:.0f} | {copy_s / s:.2f} |")
    lines += ["", f"Two peers: pieces per holder {peers_f2}.", "",
              "Tokens/s of a holder's engine (real model, 1 thread, 48-token streamed completions), idle and while "
              "a peer fetches the file from it. Each row is its own holder process, and idle figures vary by a "
              "third between runs here: compare within a row. On this 2-core machine the fetcher's decryption "
              "and hashing share the cores with the holder's engine; between two machines only the holder's "
              "encryption and reads do.", "",
              "| share rate | idle tok/s | during the fetch tok/s | ratio | completions | fetch s | fetch MB/s |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for label, (idle, busy, n, fetch_s) in impact.items():
        ratio = busy / idle if idle else float("nan")
        lines.append(f"| {label} | {idle:.1f} | {busy:.1f} | {ratio:.2f} | {n} | {fetch_s:.1f} | {mb / fetch_s:.0f} |")
    text = "\n".join(lines)
    publish(KEY, text, text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
