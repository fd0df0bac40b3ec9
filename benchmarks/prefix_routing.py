"""Prefix-affinity routing against p2c and random, with the real engine and model.

Three ``zswarm server --p2p --federated --threads 1`` nodes and a model-less entry point
(``zswarm federated``, restarted with each ``--policy``) on this machine; every request goes
through the entry point's API, streamed, temperature 0, ``--tokens`` completion tokens.

- Workload A: ``--conversations`` conversations, each with its own system prompt of about 700
  tokens, ``--turns`` turns each, arriving interleaved from 4 clients (each client takes two
  conversations and alternates between them, sending its next turn when the last is answered).
- Workload B: as many requests, each with a system prompt of the same size that nothing else
  shares.
- Heterogeneous: one node's processes in a CPU cgroup held to a quarter of a core (cgroup v1
  ``cpu.cfs_quota_us`` or v2 ``cpu.max``), workload B, speed-aware (the ``prefix`` policy with
  nothing to share falls back to it) against p2c. It needs root; without a CPU cgroup it is skipped
  and says so.
Each run uses prompts of its own, so no run finds another's prefixes in the engines' caches.

Figures: time to first token p50/p90/p99 (from the request to the first streamed token), the
cluster's tokens/s (completion tokens of the run over its wall time), prefix hits (share of
prompt tokens the serving engine had cached, ``usage.prompt_tokens_details.cached_tokens``),
requests per node.

Run from the repository root:
    .venv/bin/python benchmarks/prefix_routing.py [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (Nodes, command_line, loadavg, machine, now_utc, percentile, publish,  # noqa: E402
                    wait_for)

KEY = "prefix-routing"  # its section of docs/BENCHMARKS.md
MODEL = "smollm2-135m-instruct"
CLIENTS = 4
WORDS = ("tide harbour mooring ferry lantern rope anchor gull pier keel sail dock buoy chart compass "
         "storm calm fog shell reef net oar hull mast deck crew cargo bay cove beacon").split()
QUESTIONS = ["When is the next high tide?", "Can I moor here tonight?", "Is the ferry running?",
             "What is the forecast?", "Where can I buy rope?", "How deep is the channel?"]


def system_prompt(rng: random.Random) -> str:
    """About 700 tokens of instructions nobody else has (random words from a small vocabulary)."""
    words = " ".join(rng.choice(WORDS) for _ in range(520))
    return f"You are the harbour assistant. Keep these notes in mind: {words}. Answer in one sentence."


def ask(api, messages: list[dict], tokens: int) -> dict:
    t0 = time.perf_counter()
    raw = api.chat.completions.with_raw_response.create(
        model=MODEL, messages=messages, temperature=0, max_tokens=tokens, stream=True,
        stream_options={"include_usage": True})
    first, text, usage = None, [], None
    for ch in raw.parse():
        if ch.choices and ch.choices[0].delta.content:
            if first is None:
                first = time.perf_counter()
            text.append(ch.choices[0].delta.content)
        if ch.usage:
            usage = ch.usage
    end = time.perf_counter()
    return {"ttft": (first or end) - t0, "seconds": end - t0, "node": raw.headers["x-zswarm-node"],
            "text": "".join(text), "completion": usage.completion_tokens, "prompt": usage.prompt_tokens,
            "cached": usage.prompt_tokens_details.cached_tokens}


def workload(kind: str, seed: int, conversations: int, turns: int) -> list[list[list[dict]]]:
    """Per client, its scripts: each a list of conversations, each conversation a list of user turns
    (A) or of single-turn requests (B); returns [client][conversation] -> system + questions."""
    rng = random.Random(seed)
    convs = []
    for _ in range(conversations):
        if kind == "A":
            convs.append([system_prompt(rng)] + [rng.choice(QUESTIONS) for _ in range(turns)])
        else:
            for _ in range(turns):
                convs.append([system_prompt(rng), rng.choice(QUESTIONS)])
    return [convs[i::CLIENTS] for i in range(CLIENTS)]


def run(api_factory, scripts, tokens: int) -> tuple[list[dict], float]:
    results: list[dict] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client(convs: list[list[str]]) -> None:
        api = api_factory()
        histories = [[{"role": "system", "content": c[0]}] for c in convs]
        pending = [list(c[1:]) for c in convs]
        try:
            while any(pending):  # alternate between this client's conversations
                for i, questions in enumerate(pending):
                    if not questions:
                        continue
                    histories[i].append({"role": "user", "content": questions.pop(0)})
                    r = ask(api, histories[i], tokens)
                    histories[i].append({"role": "assistant", "content": r["text"]})
                    with lock:
                        results.append(r)
        except BaseException as e:  # noqa: BLE001 (reported by the main thread)
            errors.append(e)
    threads = [threading.Thread(target=client, args=(s,)) for s in scripts]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results, time.perf_counter() - t0


def summary(results: list[dict], wall: float, names: dict[str, str]) -> dict:
    ttft = [r["ttft"] for r in results]
    per_node: dict[str, int] = {}
    for r in results:
        per_node[names.get(r["node"], r["node"][:6])] = per_node.get(names.get(r["node"], r["node"][:6]), 0) + 1
    return {"n": len(results), "p50": percentile(ttft, 50), "p90": percentile(ttft, 90), "p99": percentile(ttft, 99),
            "tps": sum(r["completion"] for r in results) / wall, "wall": wall,
            "hit": sum(r["cached"] for r in results) / max(1, sum(r["prompt"] for r in results)),
            "per_node": dict(sorted(per_node.items()))}


class SlowCgroup:
    """A CPU cgroup held to ``quota`` of one core, for the processes of one node."""

    def __init__(self, quota: float):
        self.path = None
        for base, v2 in ((Path("/sys/fs/cgroup/cpu"), False), (Path("/sys/fs/cgroup"), True)):
            try:
                if v2 and not (base / "cgroup.controllers").exists():
                    continue
                if not v2 and not base.is_dir():
                    continue
                path = base / f"zswarm-bench-{os.getpid()}"
                path.mkdir(exist_ok=True)
                if v2:
                    (path / "cpu.max").write_text(f"{int(quota * 100000)} 100000")
                else:
                    (path / "cpu.cfs_period_us").write_text("100000")
                    (path / "cpu.cfs_quota_us").write_text(str(int(quota * 100000)))
                self.path = path
                break
            except OSError:
                continue

    def add(self, pids: list[int]) -> None:
        for pid in pids:
            try:
                (self.path / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass  # gone meanwhile

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def main() -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=24, help="completion tokens per request [default: 24]")
    ap.add_argument("--write", action="store_true", help="write the results into docs/BENCHMARKS.md")
    args = ap.parse_args()
    load_before = loadavg()
    nodes = Nodes()
    rows: list[tuple[str, str, dict]] = []
    hetero: list[tuple[str, dict]] = []
    hetero_note = ""
    slow = None
    try:
        servers: list = []
        for i in range(3):
            servers.append(nodes.start("server", f"s{i}", ["--p2p", "--federated", "--threads", "1"],
                                       bootstrap=servers[0] if servers else None, stand_in=False))
        for s in servers:
            nodes.wait_http(s, MODEL, 180)
        names = {s.admin("status")["id"]: s.name for s in servers}

        def entry(policy: str):
            e = nodes.start("federated", f"entry-{policy}-{len(rows)}-{len(hetero)}", ["--policy", policy],
                            bootstrap=servers[0], stand_in=False)
            nodes.wait_routes(e, MODEL, 3, 60)
            nodes.wait_http(e, MODEL, 60)
            return e, lambda: openai.OpenAI(base_url=f"http://{e.http}/v1", api_key="none", max_retries=0,
                                            timeout=300)
        # warm every engine once (first-request costs are not the policy's)
        e, factory = entry("random")
        for _ in range(6):
            ask(factory(), [{"role": "user", "content": "Hello"}], 4)
        nodes.stop(e)
        seed = 1
        for kind in ("A", "B"):
            for policy in ("prefix", "p2c", "random"):
                e, factory = entry(policy)
                seed += 1
                results, wall = run(factory, workload(kind, seed, args.conversations, args.turns), args.tokens)
                rows.append((kind, policy, summary(results, wall, names)))
                print(kind, policy, rows[-1][2], flush=True)
                nodes.stop(e)
        slow = SlowCgroup(0.25)
        if slow.path is None:
            hetero_note = "skipped: no CPU cgroup could be made here (it needs root and a cpu controller)"
        else:
            slow.add(servers[2].pids())
            # the slow node's speed shows once it has served: a few requests through a p2c entry first
            e, factory = entry("p2c")
            for _ in range(6):
                ask(factory(), [{"role": "user", "content": "Hello there, how are you?"}], 8)
            nodes.stop(e)
            wait_for(lambda: all(p.get("decode_tps", 0) > 0 for p in servers[0].admin("peers")
                                 if p["role"] == "server"), 30, what="every server's speed announced")
            for policy in ("prefix", "p2c"):
                e, factory = entry(policy)
                seed += 1
                results, wall = run(factory, workload("B", seed, args.conversations, args.turns), args.tokens)
                hetero.append((policy, summary(results, wall, names)))
                print("hetero", policy, hetero[-1][1], flush=True)
                nodes.stop(e)
            speeds = {p["name"]: p.get("decode_tps", 0) for p in servers[0].admin("peers") if p["role"] == "server"}
            speeds[servers[0].name] = servers[0].admin("ledger")[0].get("decode_tps", 0)
            hetero_note = ("s2's processes held to 1/4 of a core (CPU cgroup); decode speed each node announced "
                           "after the runs: " + ", ".join(f"{k} {v:.0f} tok/s" for k, v in sorted(speeds.items())))
    finally:
        nodes.close()
        if slow is not None:
            slow.close()

    def line(label: str, s: dict) -> str:
        per = ", ".join(f"{k} {v}" for k, v in s["per_node"].items())
        return (f"| {label} | {s['p50']:.2f} | {s['p90']:.2f} | {s['p99']:.2f} | {s['tps']:.1f} | "
                f"{100 * s['hit']:.0f}% | {per} |")
    by = {(k, p): s for k, p, s in rows}
    lines = ["## Prefix-affinity routing (issue 15)", "",
             f"Command (repository root): `{command_line()}`",
             f"Date: {now_utc()}. Machine: {machine()}.", f"Load average (1 min) before the run: {load_before.split()[0]}.",
             "", f"Three servers (`--threads 1`, the embedded model) and an entry point on this machine's 2 cores; "
             f"{CLIENTS} clients, streamed chat, {args.tokens} completion tokens. A: {args.conversations} "
             f"conversations x {args.turns} turns, each with its own ~700-token system prompt, interleaved. "
             f"B: as many requests, none sharing a prefix. TTFT in seconds; hits: prompt tokens the serving "
             f"engine had cached. See `benchmarks/prefix_routing.py`.", "",
             "| workload, policy | TTFT p50 | p90 | p99 | cluster tok/s | prefix hits | requests per node |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for (kind, policy), s in by.items():
        lines.append(line(f"{kind}, {policy}", s))
    a, ap2c, b, bp2c = by[("A", "prefix")], by[("A", "p2c")], by[("B", "prefix")], by[("B", "p2c")]
    lines += ["", f"Ratios, prefix / p2c: A TTFT p50 {a['p50'] / ap2c['p50']:.2f} (aim <= 0.3), "
              f"A tokens/s {a['tps'] / ap2c['tps']:.2f} (aim >= 1.3); B TTFT p50 {b['p50'] / bp2c['p50']:.2f}, "
              f"B tokens/s {b['tps'] / bp2c['tps']:.2f} (aim: within 10%)."]
    lines += ["", f"Heterogeneous ({hetero_note}), workload B:", ""]
    if hetero:
        lines += ["| policy | TTFT p50 | p90 | p99 | cluster tok/s | prefix hits | requests per node |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for policy, s in hetero:
            lines.append(line("speed-aware (prefix)" if policy == "prefix" else policy, s))
        hs = dict(hetero)
        lines += ["", f"p99 TTFT speed-aware / p2c: {hs['prefix']['p99'] / hs['p2c']['p99']:.2f} (aim <= 0.7)."]
    text = "\n".join(lines)
    publish(KEY, text, text, args.write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
