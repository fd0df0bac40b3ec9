"""The ledger's merge and liveness rules, with a fake clock (no sockets)."""

from zswarm.membership import ALIVE, DEAD, SUSPECT, Membership, Timing
from zswarm.wire import Beat, DigestEntry, NodeRecord


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def rec(i, inc=1, ver=0, name=None):
    return NodeRecord(id=i, name=name or i, role="server", incarnation=inc, version=ver,
                      endpoints={"gossip": f"tcp://127.0.0.1:{1000 + ord(i[0])}"})


def make():
    clock = Clock()
    return Membership(rec("me"), Timing(), clock), clock


def test_beat_from_stranger_dials_back_and_asks_for_record():
    m, _ = make()
    ch = m.on_beat(Beat("b", 1, 3, 1, "tcp://127.0.0.1:5"))
    assert ch.connect == {"tcp://127.0.0.1:5"} and ch.wants == {"b": "b"}
    assert m.on_records([rec("b", 1, 3)]).updated == ["b"]
    assert m.on_beat(Beat("b", 1, 3, 2, "tcp://127.0.0.1:5")).wants == {}


def test_last_writer_wins_by_incarnation_then_version():
    m, _ = make()
    m.on_records([rec("b", 1, 5, name="new")])
    assert m.on_records([rec("b", 1, 4, name="old")]).updated == []
    assert m.members["b"].record.name == "new"
    m.on_records([rec("b", 2, 0, name="restarted")])
    assert m.members["b"].record.name == "restarted" and m.members["b"].incarnation == 2


def test_digest_relays_liveness_and_pulls_missing_records():
    m, clock = make()
    m.on_records([rec("x")])
    m.on_beat(Beat("x", 1, 0, 10, ""))
    clock.t += 3
    assert m.sweep().transitions == [("x", ALIVE, SUSPECT)]
    # y heard x more recently than we did: x is alive again, and we learn of z from y
    ch = m.on_digest("y", [DigestEntry("x", 1, 0, 11), DigestEntry("z", 1, 2, 4)])
    assert ("x", SUSPECT, ALIVE) in ch.transitions and ch.wants == {"z": "y"}
    # an old heartbeat relayed again is no news
    clock.t += 3
    m.sweep()
    assert m.on_digest("y", [DigestEntry("x", 1, 0, 11)]).transitions == []


def test_states_progress_then_removal_and_tombstone():
    m, clock = make()
    m.on_records([rec("x")])
    m.on_beat(Beat("x", 1, 0, 1, ""))
    seen = []
    for _ in range(80):
        clock.t += 0.5
        seen += [t[2] for t in m.sweep().transitions]
    assert seen == [SUSPECT, DEAD, "removed"] and "x" not in m.members
    # a stale relay cannot resurrect it; a restart (higher incarnation) can
    m.on_digest("y", [DigestEntry("x", 1, 0, 1)])
    assert "x" not in m.members
    m.on_beat(Beat("x", 2, 0, 1, "tcp://127.0.0.1:9"))
    assert m.members["x"].state == ALIVE


def test_leave_removes_at_once():
    m, _ = make()
    m.on_records([rec("x")])
    ch = m.on_leave("x", 1)
    assert ch.transitions == [("x", ALIVE, "left")] and "tcp://127.0.0.1:1120" in ch.disconnect
    assert m.on_records([rec("x")]).updated == []
    assert m.peers() == []


def test_own_record_is_never_overwritten_by_peers():
    m, _ = make()
    m.on_records([rec("me", inc=99, ver=99, name="impostor")])
    m.on_beat(Beat("me", 99, 99, 99, "tcp://x:1"))
    assert m.own.name == "me" and m.members == {}
