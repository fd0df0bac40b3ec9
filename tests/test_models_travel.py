"""Models travel: a node started with a model's name fetches the file from the peers that hold it.

Real node processes on 127.0.0.1, the real model (a copy of the embedded GGUF under another
name), the official openai client. A holder is a federated server (its gateway answers peers'
piece queries); the fetching node need not be.
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import urllib.request

import openai
import pytest

from cluster import REPO, Cluster, descendants, free_port, wait_for
from zswarm.engine.model import default_model_path
from zswarm.token import Token

pytestmark = pytest.mark.slow

NAME = "travelling-smol"  # the copy's wire name: its file stem
HOLDER = ["--p2p", "--federated", "--threads", "1"]
FETCHER = ["--p2p", "--threads", "1"]
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def model_copy(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / f"{NAME}.Q4_1.gguf"
    shutil.copyfile(default_model_path(), path)
    return path, hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_size


def api(node):
    address = node.args[node.args.index("--address") + 1]
    return openai.OpenAI(base_url=f"http://{address}/v1", api_key="none", max_retries=0, timeout=120)


def greedy(node):
    r = api(node).chat.completions.with_raw_response.create(model=NAME, messages=MESSAGES, temperature=0,
                                                             max_tokens=16)
    return r.parse().choices[0].message.content, r.headers["x-zswarm-node"]


def fetch(node):
    return node.admin("status").get("fetch", {})


def served_model(node):
    return NAME in [m for r in node.admin("status")["gateway"]["routes"] if r["local"] for m in r["models"]]


def fetched_file(node, sha):
    return next((node.state_dir / "models" / sha).glob("*.gguf"))


def assert_bit_identical(node, sha):
    """The file the node fetched is the holder's, byte for byte."""
    assert hashlib.sha256(fetched_file(node, sha).read_bytes()).hexdigest() == sha


def kill_service(node):
    """The node and its children die at once, as systemd's cgroup kill (or a power cut) leaves them
    (a lone SIGKILL of the node leaves gunicorn draining its connections, holding the port)."""
    for pid in [node.proc.pid, *descendants(node.proc.pid)]:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    node.proc.wait(10)


def counter(node, name):
    return node.admin("status")["counters"].get(name, 0)


def test_a_node_fetches_a_model_by_name_verifies_it_and_serves_it(tmp_path, model_copy):
    path, sha, size = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        a = c.node("a", "server", extra=[*HOLDER, "--model", str(path)])
        wait_for(lambda: served_model(a), 60, 0.2, what="a serving its copy")
        wait_for(lambda: any(h["sha256"] == sha and h["have"] == size
                             for h in a.admin("ledger")[0].get("holdings", [])), 30, 0.2,
                 what="a announcing its file by content")
        b = c.node("b", "server", bootstrap=[a], extra=[*FETCHER, "--model", NAME])
        wait_for(lambda: fetch(b).get("state") == "whole", 60, 0.2, what="b to fetch the model")
        assert_bit_identical(b, sha)
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving the fetched model")
        text_b, node_b = greedy(b)
        text_a, node_a = greedy(a)
        assert node_b == b.node_id() and node_a == a.node_id()  # each answered itself
        assert text_b == text_a and text_b
        assert counter(a, "depot_bytes_served") == size == counter(b, "depot_bytes_fetched")
        # where the model is, seen from either node: two whole copies
        models = {(f["name"], f["sha256"]): f for f in b.admin("models")}
        copies = {cp["node_name"]: cp for cp in models[(NAME, sha)]["copies"]}
        assert set(copies) == {"a", "b"} and all(cp["have"] == size for cp in copies.values())
        out = subprocess.run([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(a.state_dir), "models"],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
        assert out.returncode == 0 and NAME in out.stdout and "whole" in out.stdout, out.stdout + out.stderr
        # a restart serves the fetched file from the models directory, with no fetch
        b.signal(signal.SIGTERM)
        assert b.wait(10) == 0
        before = counter(a, "depot_bytes_served")
        b.start()
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving again after a restart")
        assert counter(a, "depot_bytes_served") == before
        assert fetch(b).get("state") == "none"
    finally:
        c.close()


def test_a_fetch_killed_half_way_resumes_after_a_restart(tmp_path, model_copy):
    path, sha, size = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        # slow enough to stop half-way: about 12 s for the whole file
        a = c.node("a", "server", extra=[*HOLDER, "--model", str(path), "--share-rate", "8MiB"])
        wait_for(lambda: served_model(a), 60, 0.2, what="a serving its copy")
        # b is federated: while it fetches, its API sends requests to a, and nobody routes to b
        b = c.node("b", "server", bootstrap=[a], extra=[*HOLDER, "--model", NAME])
        wait_for(lambda: 10 <= fetch(b).get("percent", 0), 60, 0.1, what="b fetching")
        wait_for(lambda: any(r["node"] == a.node_id() for r in b.admin("status")["gateway"]["routes"]), 30, 0.1,
                 what="b routing to a")
        text, node = greedy(b)
        assert node == a.node_id() and text  # a, sharing its file, still serves requests
        assert not any(r["node"] == b.node_id() for r in a.admin("status")["gateway"]["routes"])
        view = json.loads(urllib.request.urlopen(f"http://{b.args[b.args.index('--address') + 1]}/api/p2p",
                                                 timeout=10).read())
        me = next(n for n in view["federated"] if n["self"])
        assert me["fetching"] and me["fetching"][0]["name"] == NAME and 0 < me["fetching"][0]["percent"] < 100
        wait_for(lambda: 35 <= fetch(b).get("percent", 0), 60, 0.1, what="b half-way")
        assert fetch(b)["percent"] < 90, "the fetch went too fast to stop half-way"
        kill_service(b)
        part = next((b.state_dir / "models" / sha).glob("*.part"))
        assert part.exists()
        b.start()
        wait_for(lambda: fetch(b).get("state") == "whole", 60, 0.2, what="b to finish the fetch")
        assert "resuming a fetch" in b.log()
        assert_bit_identical(b, sha)
        served = counter(a, "depot_bytes_served")
        assert size <= served <= 1.2 * size, f"{served} bytes sent for a {size}-byte file"
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving the fetched model")
    finally:
        c.close()


def test_a_holder_that_vanishes_mid_fetch_leaves_the_rest_to_the_others(tmp_path, model_copy):
    path, sha, size = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        h1 = c.node("h1", "server", extra=[*HOLDER, "--model", str(path), "--share-rate", "8MiB"])
        h2 = c.node("h2", "server", bootstrap=[h1], extra=[*HOLDER, "--model", str(path), "--share-rate", "8MiB"])
        for n in (h1, h2):
            wait_for(lambda n=n: served_model(n), 60, 0.2, what=f"{n.name} serving its copy")
        b = c.node("b", "server", bootstrap=[h1, h2], extra=[*FETCHER, "--model", NAME])
        wait_for(lambda: len([p for p, count in fetch(b).get("peers", {}).items() if count]) == 2, 60, 0.1,
                 what="b fetching from both holders")
        kill_service(h2)  # gone without a word, pieces in flight
        wait_for(lambda: fetch(b).get("state") == "whole", 90, 0.2, what="b to finish from h1 alone")
        assert_bit_identical(b, sha)
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving the fetched model")
    finally:
        c.close()


def test_a_holder_that_serves_corrupt_pieces_is_found_out(tmp_path, model_copy):
    path, sha, size = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        honest = c.node("honest", "server", extra=[*HOLDER, "--model", str(path), "--share-rate", "16MiB"])
        liar = c.node("liar", "server", bootstrap=[honest], extra=[*HOLDER, "--model", str(path)],
                      env={"ZSWARM_TEST_CORRUPT_PIECES": "all"})
        for n in (honest, liar):
            wait_for(lambda n=n: served_model(n), 60, 0.2, what=f"{n.name} serving its copy")
        wait_for(lambda: {"honest", "liar"} <= {h["node_name"] for f in honest.admin("models")
                                                for h in f["copies"]}, 30, 0.2, what="both copies known")
        b = c.node("b", "server", bootstrap=[honest, liar], extra=[*FETCHER, "--model", NAME])
        wait_for(lambda: fetch(b).get("state") == "whole", 90, 0.2, what="b to fetch the model")
        assert counter(liar, "depot_pieces_served") > 0  # it was asked, and lied
        assert counter(b, "depot_pieces_corrupt") > 0
        assert liar.node_id() in fetch(b).get("not_asked", {})
        assert_bit_identical(b, sha)
        assert "does not match the manifest" in b.log()
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving the fetched model")
    finally:
        c.close()


def test_a_manifest_that_lies_is_found_out_by_the_digest(tmp_path, model_copy):
    """The liar's manifest matches the two pieces it spoils, so every piece passes its check: only
    the whole file's SHA-256 shows the lie. The pieces that match the honest manifest are kept."""
    path, sha, size = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        liar = c.node("liar", "server", extra=[*HOLDER, "--model", str(path), "--share-rate", "16MiB"],
                      env={"ZSWARM_TEST_CORRUPT_PIECES": "manifest:0,5"})
        wait_for(lambda: served_model(liar), 60, 0.2, what="the liar serving its copy")
        b = c.node("b", "server", bootstrap=[liar], extra=[*FETCHER, "--model", NAME])
        wait_for(lambda: fetch(b).get("percent", 0) > 0, 60, 0.1, what="b fetching from the liar alone")
        honest = c.node("honest", "server", bootstrap=[liar], extra=[*HOLDER, "--model", str(path)])
        wait_for(lambda: fetch(b).get("state") == "whole", 90, 0.2, what="b to fetch the model")
        assert "add up to the digest" in fetch(b).get("not_asked", {}).get(liar.node_id(), "")
        assert_bit_identical(b, sha)
        assert counter(b, "depot_pieces_corrupt") == 0  # each piece matched the manifest it was checked against
        fetched = counter(b, "depot_bytes_fetched")
        assert size < fetched <= size + (4 << 20), f"{fetched} bytes fetched for a {size}-byte file"
        assert counter(honest, "depot_bytes_served") > 0
        wait_for(lambda: served_model(b), 60, 0.2, what="b serving the fetched model")
    finally:
        c.close()


def test_a_model_nobody_holds_waits_and_says_so(tmp_path, model_copy):
    path, sha, _ = model_copy
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        a = c.node("a", "server", extra=[*HOLDER, "--model", str(path)])
        b = c.node("b", "server", bootstrap=[a], extra=[*FETCHER, "--model", "no-such-model"])
        wait_for(lambda: "no peer holds model no-such-model" in fetch(b).get("problem", ""), 30, 0.2,
                 what="b to say nobody holds it")
        with pytest.raises(openai.APIStatusError) as e:
            api(b).chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=4)
        assert e.value.status_code == 503 and "no-such-model" in str(e.value)
        assert "traceback" not in b.log().lower()
        # one fetch at a time: pulling another model while b waits for its own is one line, no fetch
        out = subprocess.run([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(b.state_dir), "pull", NAME],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
        assert out.returncode == 1 and "already fetching no-such-model" in out.stderr, out.stdout + out.stderr
        assert "traceback" not in b.log().lower()
        # a node that serves the embedded model pulls the copy into its models directory, to keep
        e = c.node("e", "server", bootstrap=[a], extra=FETCHER)
        wait_for(lambda: NAME in {f["name"] for f in e.admin("models")}, 30, 0.2, what="e to see a's copy")
        out = subprocess.run([sys.executable, "-m", "zswarm", "admin", "--state-dir", str(e.state_dir), "pull", NAME],
                             capture_output=True, text=True, cwd=REPO, timeout=30)
        assert out.returncode == 0 and "fetching" in out.stdout, out.stdout + out.stderr
        wait_for(lambda: fetch(e).get("state") == "whole", 60, 0.2, what="e to pull the model")
        assert_bit_identical(e, sha)
        assert e.admin("pull", model="another-model")["state"] == "waiting"  # a finished fetch holds nothing up
    finally:
        c.close()
    # without a cluster there is nobody to fetch from: one line, before anything starts
    port = free_port()
    out = subprocess.run([sys.executable, "-m", "zswarm", "server", "--model", "no-such-model", "--state-dir",
                          str(tmp_path / "solo"), "--address", f"127.0.0.1:{port}"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    assert out.returncode == 2 and "--p2p" in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr
    # a models directory that cannot be made: one line too, before anything binds
    out = subprocess.run([sys.executable, "-m", "zswarm", "server", "--p2p", "--no-mdns", "--models-dir",
                          "/proc/no-such-dir", "--state-dir", str(tmp_path / "solo2"), "--address",
                          f"127.0.0.1:{free_port()}", "--p2p-listen", f"127.0.0.1:{free_port(2)}"],
                         capture_output=True, text=True, cwd=REPO, timeout=30)
    errors = [line for line in out.stderr.splitlines() if "error:" in line]
    assert out.returncode == 2 and len(errors) == 1 and "--models-dir" in errors[0], out.stderr
    assert "Traceback" not in out.stderr


def test_a_fetch_that_cannot_fit_says_so(tmp_path, model_copy):
    """Over --models-max the fetch is refused before a byte moves; on a disk that fills up it stops
    with the reason. Either way the node stays up, and its API says why it serves nothing."""
    path, _, size = model_copy
    small = tmp_path / "small"
    small.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(small)],
                             capture_output=True, text=True)
    assert mounted.returncode == 0, f"this test mounts a 40 MiB tmpfs (as root, like CI): {mounted.stderr}"
    c = Cluster(tmp_path, Token.generate().encode())
    try:
        a = c.node("a", "server", extra=[*HOLDER, "--model", str(path)])
        capped = c.node("capped", "server", bootstrap=[a], extra=[*FETCHER, "--model", NAME, "--models-max", "50MiB"])
        full = c.node("full", "server", bootstrap=[a], extra=[*FETCHER, "--model", NAME, "--models-dir", str(small)])
        wait_for(lambda: fetch(capped).get("state") == "failed", 60, 0.2, what="the capped fetch refused")
        assert "over its cap" in fetch(capped)["problem"] and counter(a, "depot_bytes_served") < size
        wait_for(lambda: fetch(full).get("state") == "failed", 60, 0.2, what="the fetch onto a full disk to stop")
        assert "No space left on device" in fetch(full)["problem"], fetch(full)
        for n in (capped, full):
            with pytest.raises(openai.APIStatusError) as e:
                api(n).chat.completions.create(model=NAME, messages=MESSAGES, max_tokens=4)
            assert e.value.status_code == 503 and "cannot fetch model" in str(e.value)
            assert n.running() and "traceback" not in n.log().lower()
    finally:
        c.close()
        subprocess.run(["umount", str(small)], capture_output=True)
