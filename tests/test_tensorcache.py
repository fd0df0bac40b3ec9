"""A worker's tensor cache: on by default in its state directory, trimmed to --cache-max."""

import os
import subprocess
import sys
import time
from pathlib import Path

from cluster import Cluster, child_state, free_port, wait_for
from zswarm.tensorcache import prepare
from zswarm.token import Token

REPO = Path(__file__).resolve().parent.parent


def test_prepare_keeps_the_newest_files_within_the_bound(tmp_path):
    cache = tmp_path / "cache"
    assert prepare(cache, 100) == 0 and cache.is_dir()  # made
    now = time.time()
    for i, size in enumerate([40, 40, 40]):  # oldest first
        f = cache / f"{i:016x}"
        f.write_bytes(b"x" * size)
        os.utime(f, (now - 100 + i, now - 100 + i))
    (cache / "sub").mkdir()  # not a file: left alone
    (cache / "notes.txt").write_bytes(b"y" * 500)  # not llama.cpp's (a folder given by --cache-dir)
    assert prepare(cache, 100) == 80
    assert sorted(p.name for p in cache.iterdir()) == ["0000000000000001", "0000000000000002", "notes.txt", "sub"]
    assert prepare(cache, 10) == 0 and sorted(p.name for p in cache.iterdir()) == ["notes.txt", "sub"]


def test_a_worker_caches_tensors_in_its_state_dir_by_default(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w = c.node("w", "worker", extra=["--threads", "1"])
        wait_for(lambda: child_state(w.admin("status"), "rpc") == "ready", 60, 0.2, what="the RPC server")
        cache = w.state_dir / "tensor-cache"
        assert cache.is_dir()
        # the node trimmed it, and the RPC server child was given it (its own serving line)
        wait_for(lambda: "; tensor cache in " + str(cache) in w.log(), 10, 0.2, what="the RPC server's cache line")
        assert "tensor cache in " + str(cache) + " (0 MiB kept" in w.log()
        off = c.node("off", "worker", bootstrap=[w], extra=["--threads", "1", "--cache-max", "0"])
        wait_for(lambda: child_state(off.admin("status"), "rpc") == "ready", 60, 0.2, what="the RPC server")
        assert not (off.state_dir / "tensor-cache").exists() and "tensor cache in" not in off.log()
    finally:
        c.close()


def test_a_cache_folder_that_cannot_be_made_is_one_line_at_start(tmp_path):
    out = subprocess.run([sys.executable, "-m", "zswarm", "worker", "--no-mdns", "--token", Token.generate().encode(),
                          "--cache-dir", "/proc/no-such-dir", "--state-dir", str(tmp_path / "w"),
                          "--p2p-listen", f"127.0.0.1:{free_port(2)}"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and "--cache-dir" in errors[0], out.stderr
    assert "Traceback" not in out.stderr
