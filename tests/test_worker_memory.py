"""A worker that claims memory its RPC server cannot allocate is left out of the next split
(issue 13, outcome 4), instead of the server's engine failing on it for ever.

The worker is real and honest about its claim (--mem 2GiB); its RPC server process is held to
an address-space limit (prlimit, as root) just above what it uses, so llama.cpp's allocation of
its share really fails there, as it would on a machine that has less than it claimed."""

import signal
import subprocess
import time
from pathlib import Path

import openai
import pytest

from cluster import Cluster, child_state, rpc_child, shard, split_is, wait_for
from zswarm.token import Token

pytestmark = pytest.mark.slow

MODEL = "smollm2-135m-instruct"
HEADROOM = 20 << 20  # bytes of address space left to the RPC server: less than its share (~30-60 MB)


def starve(pid):
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    vm = int(next(line for line in status if line.startswith("VmSize")).split()[1]) * 1024
    subprocess.run(["prlimit", "--pid", str(pid), f"--as={vm + HEADROOM}"], check=True)


def test_a_worker_that_cannot_allocate_its_share_is_left_out(tmp_path):
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        w1 = c.node("w1", "worker", extra=["--mem", "2GiB", "--threads", "1"])
        w2 = c.node("w2", "worker", bootstrap=[w1], extra=["--mem", "2GiB", "--threads", "1"])
        # its libraries loaded and serving (a limit set before that fails the load itself)
        wait_for(lambda: child_state(w2.admin("status"), "rpc") == "ready", 30, what="w2's RPC server")
        starve(rpc_child(w2))
        s = c.node("s", "server", bootstrap=[w1],
                   extra=["--p2p", "--threads", "1", "--reshard-settle", "1", "--no-local-layers"])
        wait_for(lambda: split_is(s, ["w1"]), 90, 0.2, what="the split on w1 alone, w2 left out")
        w2id = w2.node_id()
        assert [x["id"] for x in shard(s)["left_out"]] == [w2id]
        assert s.admin("status")["counters"].get("workers_failed_to_allocate") == 1
        assert "could not allocate its share" in s.log()
        out = openai.OpenAI(base_url="http://" + s.args[s.args.index("--address") + 1] + "/v1", api_key="x",
                            max_retries=0, timeout=120).chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4)
        assert out.choices[0].message.content is not None
        # the engine is not restarted again and again: the split stays on w1
        reshards = shard(s)["reshards"]
        time.sleep(3)
        assert shard(s)["reshards"] == reshards and split_is(s, ["w1"])

        # restarted (a new incarnation, its memory back), w2 gets another chance
        w2.signal(signal.SIGTERM)
        w2.wait(15)
        w2.start()
        wait_for(lambda: split_is(s, ["w1", "w2"]), 90, 0.2, what="w2 back in the split after its restart")
        assert shard(s)["left_out"] == []
    finally:
        c.close()
