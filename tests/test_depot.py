"""The depot's pure parts: content names, the fetch plan, the models directory, the holder's shelf."""

import hashlib
import os

import pytest

from zswarm import wire
from zswarm.depot.digest import (MAX_PIECES, MIN_PIECE_BYTES, DigestCache, Fingerprint, fingerprint,
                                 piece_bytes_for)
from zswarm.depot.plan import CORRUPT, OK, UNEXPECTED, FetchPlan
from zswarm.depot.shelf import BURST_S, Shelf
from zswarm.depot.store import ModelsDir, StoreFull
from zswarm.depot.target import fetch_target


def _file(tmp_path, size, name="m.gguf"):
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


def test_fingerprint_is_the_files_sha256_and_its_pieces(tmp_path):
    path = _file(tmp_path, 2 * MIN_PIECE_BYTES + 5)
    fp = fingerprint(str(path))
    data = path.read_bytes()
    assert fp.sha256 == hashlib.sha256(data).hexdigest()
    assert fp.count == 3 and fp.piece_range(2) == (2 * MIN_PIECE_BYTES, 5)
    assert fp.pieces[1] == hashlib.sha256(data[MIN_PIECE_BYTES:2 * MIN_PIECE_BYTES]).digest()
    assert fp.consistent() and Fingerprint.from_json(fp.to_json()) == fp


def test_piece_size_keeps_a_manifest_bounded():
    assert piece_bytes_for(10) == MIN_PIECE_BYTES
    huge = 200 << 30
    assert (huge + piece_bytes_for(huge) - 1) // piece_bytes_for(huge) <= MAX_PIECES


def test_a_manifest_that_does_not_add_up_is_not_consistent(tmp_path):
    fp = fingerprint(str(_file(tmp_path, MIN_PIECE_BYTES + 1)))
    assert not Fingerprint(fp.sha256, fp.size, fp.piece_bytes, fp.pieces[:1]).consistent()
    assert not Fingerprint(fp.sha256, fp.size * 10, fp.piece_bytes, fp.pieces).consistent()
    assert not Fingerprint("x" * 64, fp.size, fp.piece_bytes, fp.pieces).consistent()


def test_digest_cache_reads_a_file_once_and_again_when_it_changes(tmp_path):
    path = _file(tmp_path, 1000)
    cache = DigestCache(tmp_path / "digests.json")
    first = cache.get(str(path))
    os.chmod(path, 0)  # a cached answer does not read the file
    try:
        assert cache.get(str(path)) == first
    finally:
        os.chmod(path, 0o644)
    path.write_bytes(b"other content")
    assert cache.get(str(path)).sha256 == hashlib.sha256(b"other content").hexdigest()


def _plan(tmp_path, pieces=5, **kw):
    fp = fingerprint(str(_file(tmp_path, pieces * MIN_PIECE_BYTES - 7)))
    data = (tmp_path / "m.gguf").read_bytes()
    return FetchPlan(fp, **kw), lambda i: data[i * MIN_PIECE_BYTES:(i + 1) * MIN_PIECE_BYTES]


def test_plan_spreads_pieces_over_peers_within_their_windows(tmp_path):
    plan, piece = _plan(tmp_path, pieces=5, window=2)
    plan.add_peer("a")
    plan.add_peer("b")
    assert [plan.next("a", 0), plan.next("a", 0), plan.next("a", 0)] == [0, 1, None]
    assert [plan.next("b", 0), plan.next("b", 0)] == [2, 3]
    for peer, i in (("a", 0), ("a", 1), ("b", 2), ("b", 3)):
        assert plan.arrived(peer, i, piece(i)) == OK
    assert plan.next("b", 0) == 4 and plan.arrived("b", 4, piece(4)) == OK
    assert plan.complete and plan.have_bytes == plan.fp.size
    assert plan.arrived("a", 4, piece(4)) == UNEXPECTED  # nobody asked a for it


def test_a_corrupt_piece_is_a_strike_and_goes_to_another_peer(tmp_path):
    plan, piece = _plan(tmp_path, pieces=3, window=1, max_strikes=2)
    plan.add_peer("liar")
    plan.add_peer("honest")
    i = plan.next("liar", 0)
    bad = bytes([piece(i)[0] ^ 1]) + piece(i)[1:]
    assert plan.arrived("liar", i, bad) == CORRUPT
    assert i not in plan.done
    assert plan.next("honest", 0) == i  # the liar is not asked for it again, the other peer is
    assert plan.next("liar", 0) != i
    assert plan.arrived("liar", 1, piece(1)[:10]) == CORRUPT  # truncated: second strike, dropped
    assert "liar" in plan.dropped and "liar" not in plan.peers
    plan.add_peer("liar")  # a dropped peer is not taken back in this fetch
    assert "liar" not in plan.peers


def test_deferred_and_late_pieces_go_back_without_a_strike(tmp_path):
    plan, _ = _plan(tmp_path, pieces=2, window=1)
    plan.add_peer("a")
    i = plan.next("a", 0.0)
    plan.deferred("a", i, 0.5, now=0.0)
    assert plan.next("a", 0.2) is None and plan.next("a", 0.6) == i
    late = plan.expire(now=100.0, timeout_s=10.0)
    assert late == [("a", i)] and plan.peers["a"].strikes == 0
    assert plan.next("a", 100.0) is None  # paused a moment after a timeout


def test_plan_resumes_from_pieces_on_disk(tmp_path):
    plan, piece = _plan(tmp_path, pieces=3)
    resumed = FetchPlan(plan.fp, done={0, 2, 99})
    resumed.add_peer("a")
    assert resumed.next("a", 0) == 1 and resumed.next("a", 0) is None
    assert resumed.done == {0, 2}


def test_models_dir_finds_whole_files_by_name_or_digest_and_keeps_progress(tmp_path):
    models = ModelsDir(tmp_path / "models")
    models.ensure()
    sha = "ab" * 32
    models.folder(sha).mkdir()
    models.part_path(sha, "tiny").write_bytes(b"x" * 10)
    assert models.find("tiny") is None  # a partial file is never served
    fp = Fingerprint(sha, 3 * MIN_PIECE_BYTES, MIN_PIECE_BYTES, (b"\0" * 32,) * 3)
    models.save_progress(fp, {0, 2})
    assert models.load_progress(sha) == (fp, {0, 2})
    assert models.load_progress("cd" * 32) == (None, set())
    models.final_path(sha, "tiny").write_bytes(b"y" * 10)
    assert models.find("tiny").sha256 == sha and models.find(sha).name == "tiny"


def test_models_dir_cap(tmp_path):
    models = ModelsDir(tmp_path / "models", max_bytes=100)
    models.ensure()
    (models.root / ("ab" * 32)).mkdir()
    (models.root / ("ab" * 32) / "a.gguf").write_bytes(b"x" * 60)
    models.check_room(40)
    with pytest.raises(StoreFull, match="over its cap of 100"):
        models.check_room(41)


def test_shelf_serves_whole_files_only_and_at_its_rate(tmp_path):
    path = _file(tmp_path, 3 * MIN_PIECE_BYTES)
    fp = fingerprint(str(path))
    now = [0.0]
    shelf = Shelf(rate=MIN_PIECE_BYTES * 40, clock=lambda: now[0])  # a piece books 25 ms
    assert isinstance(shelf.answer("n", wire.ManifestQuery("1", fp.sha256)), wire.Fail)
    shelf.offer({fp.sha256: (str(path), fp)})
    m = shelf.answer("n", wire.ManifestQuery("1", fp.sha256))
    assert m.pieces == list(fp.pieces) and m.size == fp.size
    first = shelf.answer("n", wire.PieceQuery("2", fp.sha256, 1))
    assert hashlib.sha256(first.data).digest() == fp.pieces[1]
    served = 1
    while (reply := shelf.answer("n", wire.PieceQuery("3", fp.sha256, served % 3))).data:
        served += 1  # booked within the burst
    assert served == int(BURST_S / 0.025) + 1
    assert reply.wait_s == pytest.approx(served * 0.025 - BURST_S)
    now[0] = 1.0
    assert shelf.answer("n", wire.PieceQuery("5", fp.sha256, 2)).data
    assert shelf.answer("n", wire.PieceQuery("6", fp.sha256, 3)).code == "bad_request"


def test_model_argument_is_a_file_or_a_name_to_fetch(tmp_path):
    real = _file(tmp_path, 10, "here.gguf")
    assert fetch_target(None) is None and fetch_target(str(real)) is None
    assert fetch_target("missing/path.gguf") is None  # a mistyped path stays a path: "no such file"
    assert fetch_target("other.gguf") is None
    assert fetch_target("SmolLM2-custom") == "smollm2-custom"
    assert fetch_target("sha256:" + "AB" * 32) == "ab" * 32
