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


def removed(m, clock, node="x"):
    """Let ``node`` (a member) go silent until it is removed."""
    for _ in range(80):
        clock.t += 0.5
        m.sweep()
    assert node not in m.members


def test_direct_beat_after_removal_is_believed_at_once():
    # a partition: both sides removed each other; the first beat across the healed link counts
    m, clock = make()
    m.on_records([rec("x", ver=3)])
    m.on_beat(Beat("x", 1, 3, 7, "tcp://127.0.0.1:1120"))
    removed(m, clock)
    ch = m.on_beat(Beat("x", 1, 3, 90, "tcp://127.0.0.1:1120"))
    assert ("x", "removed", ALIVE) in ch.transitions and ch.updated == ["x"]
    x = m.members["x"]
    assert x.state == ALIVE and x.heartbeat == 90 and x.record.name == "x"  # routable again: no Want round trip
    assert ch.wants == {} and m.peers()[0]["state"] == ALIVE
    # a newer version than the buried record: still believed, and the new record is asked for
    removed(m, clock)
    assert m.on_beat(Beat("x", 1, 5, 200, "tcp://127.0.0.1:1120")).wants == {"x": "x"}
    assert m.members["x"].record.version == 3  # the old record routes meanwhile
    # its own entry in a digest it sent is direct too
    removed(m, clock)
    assert ("x", "removed", ALIVE) in m.on_digest("x", [DigestEntry("x", 1, 5, 300)]).transitions


def test_relayed_news_of_a_removed_node_is_still_refused():
    m, clock = make()
    m.on_records([rec("x")])
    m.on_beat(Beat("x", 1, 0, 10, ""))
    removed(m, clock)
    # y heard x a little later than we did (or relays what it heard before it buried x too)
    assert not m.on_digest("y", [DigestEntry("x", 1, 0, 12)])
    assert not m.on_records([rec("x", ver=1)])
    assert "x" not in m.members
    # a beat of an older incarnation than the buried one is no proof the buried one lives
    m.on_beat(Beat("x", 0, 0, 99, ""))
    assert "x" not in m.members
    # once the tombstone is gone, relays are news again
    clock.t += Timing().tombstone_s
    m.sweep()
    assert m.on_digest("y", [DigestEntry("x", 1, 0, 13)]).wants == {"x": "y"}


def test_a_node_removed_for_silence_stays_dialed_and_one_that_left_does_not():
    m, clock = make()
    m.on_records([rec("x"), rec("y")])
    ch = m.sweep()
    for _ in range(80):
        clock.t += 0.5
        ch = m.sweep()
        assert "tcp://127.0.0.1:1120" not in ch.disconnect  # x stays dialed through a partition
    assert m.redialing() == {"x": "tcp://127.0.0.1:1120", "y": "tcp://127.0.0.1:1121"}
    # a Leave heard after all (it left during the partition) ends the redial at once
    assert m.on_leave("y", 1).disconnect == {"tcp://127.0.0.1:1121"}
    # the redial ends after redial_s
    clock.t += Timing().redial_s
    assert m.sweep().disconnect == {"tcp://127.0.0.1:1120"} and m.redialing() == {}


def test_a_removed_node_back_elsewhere_is_no_longer_dialed_where_it_was():
    m, clock = make()
    m.on_records([rec("x")])
    removed(m, clock)
    ch = m.on_beat(Beat("x", 2, 0, 1, "tcp://127.0.0.1:9"))  # restarted on another port
    assert ch.disconnect == {"tcp://127.0.0.1:1120"} and ch.connect == {"tcp://127.0.0.1:9"}
    assert m.redialing() == {}
    # back at the same place, learnt by relay: its old endpoint is kept, not dialed twice
    m2, clock2 = make()
    m2.on_records([rec("x")])
    removed(m2, clock2)
    clock2.t += Timing().tombstone_s
    m2.sweep()
    ch = m2.on_digest("y", [DigestEntry("x", 1, 0, 500)])
    assert ch.disconnect == set() and m2.members["x"].gossip == "tcp://127.0.0.1:1120"
    assert m2.redialing() == {}
