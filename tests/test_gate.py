"""The admission rules of zswarm/gate.py (pure: no socket)."""

from zswarm.gate import Admission, Limits


def adm(per_socket=4, per_source=2, window_s=3.0) -> Admission:
    return Admission(Limits(per_socket=per_socket, per_source=per_source, window_s=window_s))


def test_a_source_past_its_cap_is_refused_and_others_still_fit():
    a = adm()
    assert a.admit(10, "10.0.0.1", 0.0) == ""
    assert a.admit(11, "10.0.0.1", 0.1) == ""
    assert a.admit(12, "10.0.0.1", 0.2) == "source"
    assert a.admit(13, "10.0.0.2", 0.3) == ""
    assert set(a.young) == {10, 11, 13}


def test_the_socket_cap_holds_whatever_the_sources():
    a = adm(per_socket=3, per_source=3)
    for i, src in enumerate(["a", "b", "c"]):
        assert a.admit(i, src, 0.0) == ""
    assert a.full()
    assert a.admit(9, "d", 0.5) == "socket"
    assert not a.relaxed()


def test_connections_older_than_the_handshake_limit_are_proven_and_free_their_place():
    a = adm(per_source=1)
    assert a.admit(10, "x", 0.0) == ""
    assert a.admit(11, "x", 2.9) == "source"
    assert a.admit(11, "x", 3.0) == ""  # fd 10 outlived the handshake limit: it authenticated
    assert set(a.young) == {11}


def test_a_closed_connection_frees_its_place_and_a_reused_number_is_a_new_connection():
    a = adm(per_source=1)
    assert a.admit(10, "x", 0.0) == ""
    a.gone(10)
    assert a.admit(11, "x", 0.1) == ""
    assert a.admit(11, "y", 0.2) == ""  # libzmq closed 11 and reused the number: the old entry goes
    assert a.young[11][0] == "y" and a.sources() == {"y": 1}


def test_the_door_reopens_at_half_the_cap():
    a = adm(per_socket=4, per_source=4)
    for fd in range(4):
        a.admit(fd, "s", 0.0)
    assert a.full() and not a.relaxed()
    a.gone(0)
    assert not a.full() and not a.relaxed()
    a.gone(1)
    assert a.relaxed()
