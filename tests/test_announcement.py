"""The signed mDNS announcement (zswarm/announcement.py): signing, verification and replay memory,
without sockets or zeroconf; and the mDNS thread's bounded resolve queue. The network-namespace
tests in test_mdns.py drive the same code through real nodes."""

import hashlib
import hmac

import pytest

from zswarm import announcement as ann
from zswarm.actors import discovery
from zswarm.token import Token
from zswarm.transport import Stats

KEYS = Token.generate().derive()
NOW_S = 1_700_000_000.0
NOW_MS = int(NOW_S * 1000)
ADDRS = ["10.0.0.5", "192.168.1.7"]


def signed(t_ms=NOW_MS, nonce="00112233aabbccdd", addrs=ADDRS, port=7340, keys=KEYS, node_id="n1", role="worker"):
    """What a node's TXT record carries, as zeroconf hands it to a receiver (bytes keys and values)."""
    props = ann.properties(keys, node_id, role, port, ann.fit_addresses(addrs), t_ms, nonce)
    return {k.encode(): v.encode() for k, v in props.items()}


def check(props, port=7340, resolved=ADDRS, now_s=NOW_S):
    return ann.verify(KEYS, props, port, list(resolved), now_s)


def reason(result):
    assert isinstance(result, ann.Ignored), result
    return result.reason


def test_a_fresh_announcement_verifies_and_dials_its_signed_addresses():
    got = check(signed())
    assert got == ann.Announcement("n1", "worker", 7340, NOW_MS, "00112233aabbccdd", tuple(ADDRS))


def test_the_signature_covers_every_field_and_the_port():
    props = signed()
    for key, value in [(b"id", b"n2"), (b"role", b"server"), (b"a", b"10.0.0.6"), (b"t", str(NOW_MS + 1).encode()),
                       (b"n", b"ffffffffffffffff"), (b"sig", b"0" * 32)]:
        assert reason(check({**props, key: value})) == ann.BAD_SIGNATURE, key
    assert reason(check(props, port=7341)) == ann.BAD_SIGNATURE
    assert reason(ann.verify(Token.generate().derive(), props, 7340, ADDRS, NOW_S)) == ann.OTHER_NETWORK


def test_readdressed_announcement_is_refused_and_unsigned_addresses_are_never_dialled():
    assert reason(check(signed(), resolved=["10.9.9.9"])) == ann.READDRESSED
    assert reason(check(signed(), resolved=[])) == ann.READDRESSED
    mixed = check(signed(), resolved=["10.9.9.9", "192.168.1.7"])
    assert mixed.dial == ("192.168.1.7",) and mixed.unsigned == ("10.9.9.9",)


def test_addresses_are_compared_in_one_spelling_and_ipv6_works():
    props = signed(addrs=["fe80:0:0:0::1", "10.0.0.5"])
    assert props[b"a"] == b"fe80::1,10.0.0.5"
    assert check(props, resolved=["10.0.0.5", "FE80::1"]).dial == ("fe80::1", "10.0.0.5")


def test_addresses_past_one_txt_string_are_left_out():
    many = [f"10.0.{i // 250}.{i % 250 + 1}" for i in range(40)]
    fitted = ann.fit_addresses(many + many[:3])
    assert len(",".join(fitted)) <= ann.ADDRESSES_MAX_CHARS and fitted == many[:len(fitted)]
    with pytest.raises(ValueError):
        ann.fit_addresses(["eth0"])


def test_the_time_window_allows_clock_skew_and_no_more():
    assert isinstance(check(signed(), now_s=NOW_S + ann.MAX_AGE_S - 1), ann.Announcement)
    assert reason(check(signed(), now_s=NOW_S + ann.MAX_AGE_S + 1)) == ann.STALE
    assert isinstance(check(signed(), now_s=NOW_S - ann.MAX_AHEAD_S + 1), ann.Announcement)
    assert reason(check(signed(), now_s=NOW_S - ann.MAX_AHEAD_S - 1)) == ann.FUTURE
    assert ann.REFRESH_S * 2 < ann.MAX_AGE_S  # a live node re-signs well before its announcement is stale


def test_other_formats_are_refused_cleanly_both_ways():
    def v1_sign(node_id, port):  # what a format-1 node sent and checked
        msg = f"{KEYS.network_id}|{node_id}|{port}".encode()
        return hmac.new(KEYS.discovery_key, msg, hashlib.sha256).hexdigest()[:32]

    old = {b"net": KEYS.network_id.encode(), b"id": b"n1", b"role": b"worker", b"sig": v1_sign("n1", 7340).encode()}
    got = check(old)
    assert reason(got) == ann.VERSION_MISMATCH and got.detail == "format 1"
    assert reason(check({**signed(), b"v": b"3"})) == ann.VERSION_MISMATCH
    # a format-1 node checks "sig" against its own signature: a format-2 announcement fails it
    assert not hmac.compare_digest(signed()[b"sig"].decode(), v1_sign("n1", 7340))


@pytest.mark.parametrize("props", [
    {}, {b"net": None}, {b"v": b"2", b"net": KEYS.network_id.encode()},
    {b"\xff": b"\xfe", b"net": b"\xff\xfe"},
])
def test_garbage_is_ignored_without_raising(props):
    assert isinstance(check(props), ann.Ignored)


def test_malformed_fields_are_ignored_without_raising():
    for key, value in [(b"t", b"soon"), (b"t", "١٢".encode()), (b"t", None), (b"a", b""), (b"n", None)]:
        assert reason(check({**signed(), key: value})) == ann.MALFORMED, (key, value)
    assert reason(check(signed(), port=0)) == ann.MALFORMED
    # a token holder that signs a non-address is still refused, not a crash
    bad = ann.properties(KEYS, "n1", "worker", 7340, ["not-an-ip"], NOW_MS, "aa")
    assert reason(check({k.encode(): v.encode() for k, v in bad.items()})) == ann.MALFORMED


def test_repeats_are_accepted_and_only_older_or_different_ones_are_replays():
    guard = ann.ReplayGuard()
    first, later = check(signed(NOW_MS)), check(signed(NOW_MS + 60_000, nonce="ab"), now_s=NOW_S + 60)
    assert guard.check(first, NOW_S) == "new"
    for _ in range(3):  # zeroconf's re-announcements, cache answers and browser updates
        assert guard.check(first, NOW_S + 1) == "repeat"
    assert guard.check(later, NOW_S + 60) == "new"  # a refresh
    assert guard.check(later, NOW_S + 61) == "repeat"
    assert guard.check(first, NOW_S + 61) == ann.REPLAYED  # older than the latest seen
    same_time_other_nonce = check(signed(NOW_MS + 60_000, nonce="cd"), now_s=NOW_S + 60)
    assert guard.check(same_time_other_nonce, NOW_S + 61) == ann.REPLAYED
    other_node = check(signed(NOW_MS, node_id="n2"))
    assert guard.check(other_node, NOW_S + 61) == "new"


def test_the_replay_memory_forgets_what_would_be_stale_anyway():
    guard = ann.ReplayGuard()
    for i in range(100):
        guard.check(check(signed(NOW_MS, node_id=f"n{i}")), NOW_S)
    assert len(guard) == 100
    guard.check(check(signed(NOW_MS + 400_000, node_id="late"), now_s=NOW_S + 400), NOW_S + 400)
    assert len(guard) == 1


def test_a_flood_of_service_names_is_bounded_dropped_and_counted():
    class Actor:  # what the mDNS thread reads of its actor before it starts
        actor_ref = None
        _stats = Stats()

    class Added:
        name = "Added"

    worker = discovery._MdnsWorker(Actor())  # never started: _on_change is called as zeroconf's loop would
    for i in range(discovery.MDNS_QUEUE_MAX + 50):
        worker._on_change(None, discovery.SERVICE_TYPE, f"n{i}.{discovery.SERVICE_TYPE}", Added)
    for _ in range(10):  # updates of a service already waiting take no place and are not drops
        worker._on_change(None, discovery.SERVICE_TYPE, f"n0.{discovery.SERVICE_TYPE}", Added)
    assert worker._q.qsize() == discovery.MDNS_QUEUE_MAX
    assert Actor._stats.snapshot() == {"mdns_queue_dropped": 50}
