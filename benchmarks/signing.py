"""Signed membership (issue 13): what signing and verifying gossip costs, and convergence beside the
unsigned protocol.

One run measures, side by side:

1. Per message, in this process (zswarm.identity / zswarm.trust directly, no socket): microseconds
   to sign and to verify one Beat, one NodeRecord (a worker's, with its endpoints) and one Digest
   of N entries (as a node's ``Membership.digest()`` builds it: one signature of its own, the
   others relayed as their nodes signed them), beside the cost of encoding and decoding the same
   message (``wire.encode``/``wire.decode``), which every node paid before signatures. Each figure
   is the best of ``REPEATS`` timings of ``--iterations`` operations (timeit's rule: the rest is
   noise from other work). From these and the ledger's rates (``membership.Timing``: a Beat to
   everyone every heartbeat, a Digest every sync interval) the extra CPU one node spends per second
   at N: it signs every Beat and its own digest entry, verifies every Beat it receives, and of a
   received digest only the entries that say something new (``Trust.entries``): "low" counts none
   (a steady cluster on one host, where every node hears each Beat before anyone relays it), "high"
   all of them.
2. Convergence, as ``membership.py`` measures it (its ``converge`` and ``quiet_window``), of N
   ``zswarm worker`` processes on 127.0.0.1 with mDNS off, running either this checkout (signed,
   protocol 2) or a ``git worktree`` of ``--before`` (default 1fc5052, the unsigned protocol 1:
   the parent of the commit that signed membership). Each node process imports its own tree
   (its working directory and PYTHONPATH). Rounds alternate the order (before/after, then
   after/before), so background load hits both. The protocol every node lists for its peers is
   checked, so a node of the wrong tree cannot pass unnoticed. The worktree is removed at the end.

Run from the repository root:
    .venv/bin/python benchmarks/signing.py --sizes 16,32 --rounds 2 [--write]
``--write`` replaces this benchmark's section of docs/BENCHMARKS.md (between its markers).
"""

from __future__ import annotations

import argparse
import datetime
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, DOC, command_line, exit_on_sigterm, replace_in_doc  # noqa: E402
import membership  # noqa: E402
from membership import Cluster, Timeout, converge, fmt, quiet_window  # noqa: E402

from zswarm import trust, wire  # noqa: E402
from zswarm.identity import Identity  # noqa: E402
from zswarm.membership import Membership, Timing  # noqa: E402

START, END = "<!-- signing:start -->", "<!-- signing:end -->"
REPEATS = 5
BEFORE = "1fc5052"  # the parent of 62e9882 ("Every node speaks only for itself"): protocol 1, unsigned
WORKTREE = "/tmp/zs_before"


# --- 1. per message ---

def worker_record(ident: Identity, name: str, port: int) -> wire.NodeRecord:
    """A record as a worker's node makes it (node.py), signed by it."""
    rec = wire.NodeRecord(
        id=ident.node_id, name=name, role="worker", incarnation=time.time_ns() // 1000, version=3,
        endpoints={"gossip": f"tcp://127.0.0.1:{port}", "tunnel": f"tcp://127.0.0.1:{port + 1}"},
        mem_total=16 << 30, mem_free=9 << 30, software="0.1.0", started_at=time.time(), flags=["rpc"],
        key=ident.public, curve=ident.curve_public.decode())
    rec.sig = ident.sign(wire.record_statement(rec))
    return rec


def per_op_us(fn, number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=REPEATS)) / number * 1e6


def codec_us(net: str, sender: str, body: wire.Body, number: int) -> float:
    """Encoding and decoding one message: what a node did per message before signatures."""
    return per_op_us(lambda: wire.decode(wire.encode(net, sender, body), net), number)


def micro(sizes: list[int], number: int) -> dict:
    net = "5dcd951e13182174"
    me = Identity.generate()
    rec = worker_record(me, "n00", 61000)
    o = rec
    hb = 12345
    beat = wire.Beat(o.id, o.incarnation, o.version, hb, o.endpoints["gossip"],
                     me.sign(wire.beat_statement(o.id, o.incarnation, o.version, hb)))
    out: dict = {
        "beat": {"sign": per_op_us(lambda: me.sign(wire.beat_statement(o.id, o.incarnation, o.version, hb)), number),
                 "verify": per_op_us(lambda: trust.beat_ok(o.key, o.id, o.incarnation, o.version, hb, beat.sig),
                                     number),
                 "codec": codec_us(net, o.id, beat, number)},
        "record": {"sign": per_op_us(lambda: me.sign(wire.record_statement(rec)), number),
                   "verify": per_op_us(lambda: trust.record_ok(rec), number),
                   "codec": codec_us(net, o.id, wire.Records([rec]), number)},
        "digest": {},
    }
    assert trust.record_ok(rec) and trust.beat_ok(o.key, o.id, o.incarnation, o.version, hb, beat.sig)
    for n in sizes:
        # the sender holds n-1 members, each with its own signed heartbeat; the receiver is one of them
        idents = [Identity.generate() for _ in range(n - 1)]
        records = [worker_record(i, f"n{k + 1:02d}", 61002 + 2 * k) for k, i in enumerate(idents)]
        signed, unsigned = Membership(rec, signer=me.sign), Membership(rec)
        for m in (signed, unsigned):
            for i, r in zip(idents, records):
                m.on_beat(wire.Beat(r.id, r.incarnation, r.version, 7, r.endpoints["gossip"],
                                    i.sign(wire.beat_statement(r.id, r.incarnation, r.version, 7))))
                m.on_records([r])
            m.heartbeat = hb
        entries = signed.digest()
        assert len(entries) == n and all(e.sig for e in entries)
        receiver = records[0]
        keys = {r.id: r.key for r in [rec, *records]}
        t = trust.Trust(receiver.id, keys.get, lambda name: None)
        held = {e.id: (e.incarnation, e.version, e.heartbeat) for e in entries}
        older = {i: (inc, v, h - 1) for i, (inc, v, h) in held.items()}
        assert len(t.entries(entries, "k", older.get)) == n - 1  # all verified (the receiver's own is skipped)
        n_verified = n - 1
        out["digest"][n] = {
            # building the digest with its one signature, minus building the same digest unsigned
            "sign": per_op_us(signed.digest, number) - per_op_us(unsigned.digest, number),
            "verify_new": per_op_us(lambda: t.entries(entries, "k", older.get), max(1, number // n)),
            "verify_old": per_op_us(lambda: t.entries(entries, "k", held.get), number),
            "codec": codec_us(net, o.id, wire.Digest(entries), max(1, number // 4)),
            "verified": n_verified,
        }
    return out


def per_second(m: dict, n: int, timing: Timing = Timing()) -> dict:
    """Extra CPU (ms per second, one core = 1000) a node spends on signatures at N = n."""
    beats_s, digests_s = 1 / timing.heartbeat_interval_s, 1 / timing.sync_interval_s
    d = m["digest"][n]
    sign = (beats_s + digests_s) * m["beat"]["sign"]  # its Beat; its own digest entry (one signature each)
    beats_in = (n - 1) * beats_s * m["beat"]["verify"]
    entry = d["verify_new"] / d["verified"]
    entries_in = (n - 1) * digests_s * d["verified"] * entry  # every entry of every digest new
    return {"signs_s": beats_s + digests_s, "verifies_low": (n - 1) * beats_s,
            "verifies_high": (n - 1) * beats_s + (n - 1) * digests_s * d["verified"],
            "low_ms": (sign + beats_in) / 1000, "high_ms": (sign + beats_in + entries_in) / 1000}


# --- 2. convergence, before and after ---

def protocol_of(tree: Path) -> int:
    return int(re.search(r"^PROTOCOL = (\d+)", (tree / "zswarm" / "wire.py").read_text(), re.M).group(1))


def converge_once(tree: Path, size: int, deadline_s: float) -> dict:
    row: dict = {"N": size}
    expected = protocol_of(tree)
    with tempfile.TemporaryDirectory(prefix="zswarm-signing-") as tmp:
        cluster = Cluster(tmp, deadline_s, "worker", root=tree)
        try:
            nodes = converge(cluster, size, row)
            row["cpu_conv_s"] = membership.tree_cpu_s([n.proc.pid for n in nodes])  # start-up included
            seen = {p["protocol"] for p in nodes[0].ask("peers") or []}
            if seen != {expected}:
                raise RuntimeError(f"peers speak protocol {sorted(seen)}, not {expected}: a node ran the wrong tree")
            quiet_window(nodes, row)
        except (Timeout, RuntimeError) as e:
            row["note"] = str(e)
        finally:
            cluster.stop()
    return row


def add_worktree(commit: str, path: str) -> Path:
    if os.path.exists(path):
        raise SystemExit(f"{path} exists; remove it (git worktree remove --force {path}) or pass --before-tree")
    subprocess.run(["git", "worktree", "add", "--detach", path, commit], cwd=ROOT, check=True,
                   capture_output=True, text=True, timeout=60)
    return Path(path)


def remove_worktree(path: str) -> None:
    subprocess.run(["git", "worktree", "remove", "--force", path], cwd=ROOT, capture_output=True, timeout=60)


def head(tree: Path) -> str:
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def dirty(tree: Path) -> bool:
    return bool(subprocess.run(["git", "status", "--porcelain", "--", "zswarm"], cwd=tree, capture_output=True,
                               text=True, timeout=30).stdout.strip())


# --- reporting ---

def micro_tables(m: dict, sizes: list[int]) -> str:
    us = lambda v: f"{v:.1f}" if v < 100 else f"{v:.0f}"  # noqa: E731
    lines = ["| message | sign (µs) | verify (µs) | encode + decode, as before (µs) |", "|---|---:|---:|---:|",
             f"| Beat | {us(m['beat']['sign'])} | {us(m['beat']['verify'])} | {us(m['beat']['codec'])} |",
             f"| NodeRecord (a worker's, in Records) | {us(m['record']['sign'])} | {us(m['record']['verify'])} "
             f"| {us(m['record']['codec'])} |"]
    for n in sizes:
        d = m["digest"][n]
        lines.append(f"| Digest of {n} entries | {us(d['sign'])} | {us(d['verify_new'])} all {d['verified']} new; "
                     f"{us(d['verify_old'])} none new | {us(d['codec'])} |")
    lines += ["", "| N | signatures made / s | verified / s, low-high | extra CPU per node (ms/s), low-high "
              "| same, % of one core |", "|---:|---:|---:|---:|---:|"]
    for n in sizes:
        p = per_second(m, n)
        lines.append(f"| {n} | {p['signs_s']:.1f} | {p['verifies_low']:.0f}-{p['verifies_high']:.0f} "
                     f"| {p['low_ms']:.1f}-{p['high_ms']:.1f} | {p['low_ms'] / 10:.2f}-{p['high_ms'] / 10:.2f} |")
    return "\n".join(lines)


def med(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.median(values) if values and len(values) == len(rows) else None


def conv_table(results: dict, sizes: list[int], labels: dict[str, str]) -> str:
    lines = ["| N | protocol | conv from last spawn (s), each round | median | conv from 1st spawn (s), median "
             "| N-1 up (s), median | CPU s of the nodes until converged | CPU % nodes, quiet 5 s | CPU % host "
             "| poll (ms) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in sizes:
        for side in ("before", "after"):
            rows = results[side][n]
            each = ", ".join(fmt(r.get("conv_last")) for r in rows)
            lines.append(f"| {n} | {labels[side]} | {each} | {fmt(med(rows, 'conv_last'))} "
                         f"| {fmt(med(rows, 'conv_first'))} | {fmt(med(rows, 'up'))} | {fmt(med(rows, 'cpu_conv_s'))} "
                         f"| {fmt(med(rows, 'cpu'))} "
                         f"| {fmt(med(rows, 'host_cpu'))} | {fmt(med(rows, 'poll_ms'))} |")
    return "\n".join(lines)


def measured_extra(results: dict, sizes: list[int]) -> str:
    """The quiet window's CPU, signed minus unsigned (medians), per node: the estimate above, observed."""
    out = []
    for n in sizes:
        a, b = med(results["after"][n], "cpu"), med(results["before"][n], "cpu")
        if a is not None and b is not None:
            out.append(f"N = {n}: {a - b:+.1f}% of one core for all {n} nodes, {10 * (a - b) / n:+.1f} ms/s per node")
    return ("Observed in the quiet windows (signed minus unsigned, medians): " + "; ".join(out) + ".") if out else ""


def section(m: dict, results: dict, sizes: list[int], labels: dict[str, str], rounds: int, started: str) -> str:
    kind = {"before": "unsigned", "after": "signed"}
    notes = "".join(f"- {kind[side]}, N = {n}, round {k + 1}: {r['note']}\n" for side in ("before", "after")
                    for n in sizes for k, r in enumerate(results[side][n]) if r.get("note"))
    r16 = results["after"].get(16)
    verdict = ""
    if r16:
        each = [r.get("conv_last") for r in r16]
        met = sum(1 for v in each if v is not None and v < 2)
        verdict = (f"At N = 16, signed: converged {', '.join(fmt(v) for v in each)} s after the last spawn, median "
                   f"{fmt(med(r16, 'conv_last'))} s (aim < 2 s: met in {met} of {len(each)} rounds).")
    beats, digests = 1 / Timing().heartbeat_interval_s, 1 / Timing().sync_interval_s
    notes += "\n" if notes else ""
    return f"""{START}
## Signed membership (issue 13)

Command (repository root): `{command_line()}`
Date: {started}. Machine: {membership.machine()}.

Per message (this process, `zswarm.identity`/`zswarm.trust` called directly, best of {REPEATS} timings):
sign and verify one message, beside encoding and decoding it (`wire.encode`/`wire.decode`), the
work every message cost before signatures. A Digest carries one new signature (the sender's own
entry; *sign*: building it signed minus building it unsigned); the others are relayed as their
nodes signed them, and a receiver verifies only the entries that say something new. Extra CPU per
node at the ledger's rates: it signs {beats:.0f} Beats and {digests:.1f} digest entries a second and verifies
every Beat it receives ((N-1) x {beats:.0f}/s); *low* counts no digest entry as new, *high* every one
((N-1) digests of N-1 entries every {Timing().sync_interval_s:.0f} s).

{micro_tables(m, sizes)}

Convergence: N `zswarm worker` processes on 127.0.0.1 (mDNS off), as *Membership at scale* starts
them (`benchmarks/membership.py`: each bootstrapped to one random earlier node, the last spawned
once the others answer; converged: every node lists all N-1 others alive with their full record),
running {labels['before']} or {labels['after']},
{rounds} rounds in alternating order. CPU: a 5 s quiet window after convergence (100% = one core;
*host*: the whole machine, other work included).
*CPU s until converged*: user + system seconds of all N nodes and their children from their
spawn to convergence (Python's start and imports included).

{conv_table(results, sizes, labels)}

{notes}{measured_extra(results, sizes)}
{verdict}
{END}
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--sizes", default="16,32", help="cluster sizes, comma-separated [16,32]")
    p.add_argument("--rounds", type=int, default=2, help="convergence runs per size and protocol [2]")
    p.add_argument("--iterations", type=int, default=2000, help="operations per timing [2000]")
    p.add_argument("--before", default=BEFORE, help=f"the commit to compare with [{BEFORE}]")
    p.add_argument("--before-tree", help="an existing checkout of --before (else a git worktree at "
                                         f"{WORKTREE}, removed at the end)")
    p.add_argument("--deadline", type=float, default=60.0, help="seconds any one wait may take [60]")
    p.add_argument("--seed", type=int, help="seed for the random bootstrap choices")
    p.add_argument("--write", action="store_true", help="replace this benchmark's section of docs/BENCHMARKS.md")
    args = p.parse_args()
    exit_on_sigterm()
    random.seed(args.seed)
    sizes = [int(s) for s in args.sizes.split(",")]
    started = f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    t0 = time.monotonic()
    print("per message ...", file=sys.stderr, flush=True)
    m = micro(sizes, args.iterations)
    print(micro_tables(m, sizes), flush=True)
    before = Path(args.before_tree) if args.before_tree else add_worktree(args.before, WORKTREE)
    try:
        trees = {"before": before, "after": ROOT}
        labels = {"before": f"{head(before)} (protocol {protocol_of(before)}, unsigned)",
                  "after": f"{head(ROOT)}{' + uncommitted changes' if dirty(ROOT) else ''} "
                           f"(protocol {protocol_of(ROOT)}, signed)"}
        results: dict = {side: {n: [] for n in sizes} for side in trees}
        for r in range(args.rounds):
            for i, n in enumerate(sizes):
                order = ("before", "after") if (r + i) % 2 == 0 else ("after", "before")
                for side in order:
                    print(f"round {r + 1}, N = {n}, {side} ({time.monotonic() - t0:.0f} s) ...", file=sys.stderr,
                          flush=True)
                    row = converge_once(trees[side], n, args.deadline)
                    results[side][n].append(row)
                    print(f"  conv from last spawn {fmt(row.get('conv_last'))} s, up {fmt(row.get('up'))} s, "
                          f"CPU nodes {fmt(row.get('cpu'))}%{'; ' + row['note'] if row.get('note') else ''}",
                          file=sys.stderr, flush=True)
    finally:
        if not args.before_tree:
            remove_worktree(WORKTREE)
    print(conv_table(results, sizes, labels))
    print(measured_extra(results, sizes))
    print(f"took {time.monotonic() - t0:.0f} s", file=sys.stderr)
    if args.write:
        replace_in_doc(START, END, section(m, results, sizes, labels, args.rounds, started).rstrip("\n"))
        print(f"wrote {DOC.relative_to(ROOT)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
