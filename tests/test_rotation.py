"""The operator's statement (rotation.py), the token that names the operator, and what a node
keeps of rotations (tokenstore.py): pure logic, no socket."""

import msgspec
import pytest

from zswarm import rotation, tokenstore, wire
from zswarm.identity import Identity
from zswarm.operator import OperatorKey, OperatorKeyError
from zswarm.token import Token, TokenError


def cluster(n=3):
    op = OperatorKey.generate()
    token = Token.generate(["10.0.0.1:7340"], op.public)
    ids = [Identity.generate() for _ in range(n)]
    return op, token, ids


def members(ids):
    return [rotation.Member(i.node_id, i.curve_public.decode()) for i in ids]


def revoked(ident, name="lost"):
    return wire.Revoked(ident.node_id, ident.public, ident.curve_public.decode(), name, 1.0)


def net(token):
    return token.derive().network_id


def test_a_token_carries_its_operator_and_old_tokens_still_read():
    op, token, _ = cluster()
    again = Token.parse(token.encode())
    assert again == token and again.operator == op.public and again.bootstrap == ("10.0.0.1:7340",)
    plain = Token.generate()
    assert plain.operator == b"" and Token.parse(plain.encode()) == plain
    with pytest.raises(TokenError):
        Token.parse(token.encode()[:-8])


def test_the_new_token_opens_only_for_the_members_left():
    op, token, ids = cluster()
    rot, new = rotation.make(op, token, members(ids), [], [revoked(ids[2])], 0, 5.0)
    assert new != token and new.operator == token.operator and new.bootstrap == token.bootstrap
    assert rotation.open_box(rot, ids[0].node_id, ids[0].curve_secret) == new
    assert rotation.open_box(rot, ids[1].node_id, ids[1].curve_secret) == new
    assert rotation.open_box(rot, ids[2].node_id, ids[2].curve_secret) is None  # revoked: no box
    # a box opened with another member's key, or a box moved to another id, opens nothing
    assert rotation.open_box(rot, ids[0].node_id, ids[1].curve_secret) is None
    moved = msgspec.structs.replace(rot, boxes=[wire.SealedToken(ids[1].node_id, rot.boxes[0].box)])
    assert rotation.open_box(moved, ids[1].node_id, ids[1].curve_secret) is None
    assert [r.id for r in rot.revoked] == [ids[2].node_id] and rot.epoch == 1


def test_a_node_believes_only_its_operator_about_its_own_network():
    op, token, ids = cluster()
    rot, new = rotation.make(op, token, members(ids), [], [revoked(ids[2])], 0, 5.0)
    assert rotation.judge(rot, op.public, net(token), 0) == rotation.SWITCH
    assert rotation.judge(rot, op.public, net(new), 0) == rotation.LEARN  # a newcomer on the new token
    assert rotation.judge(rot, op.public, net(new), 1) == rotation.STALE  # seen it
    # replacing our network is new by that alone, whatever epoch we saw (the operator's node may lag)
    assert rotation.judge(rot, op.public, net(token), 5) == rotation.SWITCH
    assert rotation.judge(rot, op.public, "0" * 16, 0) == rotation.FOREIGN
    assert rotation.judge(rot, b"", net(token), 0) == rotation.FOREIGN  # a token without operator
    # a member (token, no operator key) signs its own: refused
    mallory = OperatorKey.generate()
    forged = msgspec.structs.replace(rot, sig=mallory.sign(wire.rotation_statement(rot)))
    assert rotation.judge(forged, op.public, net(token), 0) == rotation.FORGED
    claimed = msgspec.structs.replace(rot, operator=mallory.public, sig=mallory.sign(wire.rotation_statement(rot)))
    assert rotation.judge(claimed, op.public, net(token), 0) == rotation.FOREIGN
    # the revoked list or the boxes changed after signing
    assert rotation.judge(msgspec.structs.replace(rot, revoked=[]), op.public, net(token), 0) == rotation.FORGED
    swapped = msgspec.structs.replace(rot, boxes=rot.boxes[:1])
    assert rotation.judge(swapped, op.public, net(token), 0) == rotation.FORGED
    # without its boxes it still proves the revoked list to a newcomer, but cannot switch anyone
    bare = rotation.without_boxes(rot)
    assert rotation.judge(bare, op.public, net(new), 0) == rotation.LEARN
    assert rotation.judge(bare, op.public, net(token), 0) == rotation.BARE


def test_the_wrong_operator_key_and_an_old_token_cannot_make_a_rotation():
    op, token, ids = cluster()
    with pytest.raises(rotation.RotationError, match="not the one"):
        rotation.make(OperatorKey.generate(), token, members(ids), [], [], 0, 1.0)
    with pytest.raises(rotation.RotationError, match="no operator key"):
        rotation.make(op, Token.generate(), members(ids), [], [], 0, 1.0)


def test_rotations_chain_and_the_revoked_list_accumulates():
    op, token, ids = cluster(4)
    rot1, t1 = rotation.make(op, token, members(ids), [], [revoked(ids[3])], 0, 1.0)
    rot2, t2 = rotation.make(op, t1, members(ids), rot1.revoked, [revoked(ids[2])], rot1.epoch, 2.0)
    assert rot2.epoch == 2 and rot2.replaces == net(t1) and rot2.network == net(t2)
    assert {r.id for r in rot2.revoked} == {ids[2].node_id, ids[3].node_id}
    assert [b.id for b in rot2.boxes] == [ids[0].node_id, ids[1].node_id]
    # a replay of the first rotation to a node on t1 changes nothing
    assert rotation.judge(rot1, op.public, net(t1), 2) == rotation.STALE
    assert rotation.judge(rot2, op.public, net(t1), 1) == rotation.SWITCH


def test_a_rotation_travels_in_a_gossip_frame():
    op, token, ids = cluster()
    rot, _ = rotation.make(op, token, members(ids), [], [], 0, 1.0)
    msg = wire.decode(wire.encode(net(token), ids[0].node_id, rot), net(token))
    assert msg.body == rot


def test_a_restart_with_the_replaced_token_resumes_with_the_current_one(tmp_path):
    op, token, ids = cluster()
    rot, new = rotation.make(op, token, members(ids), [], [revoked(ids[2])], 0, 1.0)
    assert tokenstore.resolve(tmp_path, token) == (tokenstore.ClusterState(token), "")
    tokenstore.save(tmp_path, tokenstore.ClusterState(new, 1, [net(token)], rotation.without_boxes(rot)))
    assert (tmp_path / tokenstore.FILE).stat().st_mode & 0o777 == 0o600
    cs, note = tokenstore.resolve(tmp_path, token)
    assert cs.token == new and cs.epoch == 1 and [r.id for r in cs.revoked] == [ids[2].node_id]
    assert "replaced by a rotation" in note and new.encode() not in note
    cs, note = tokenstore.resolve(tmp_path, new)
    assert cs.token == new and note == ""
    other = Token.generate()  # another cluster: what was kept is not its
    assert tokenstore.resolve(tmp_path, other) == (tokenstore.ClusterState(other), "")
    (tmp_path / tokenstore.FILE).write_text("{not json")
    assert tokenstore.resolve(tmp_path, token)[0].token == token


def test_the_operator_key_file(tmp_path):
    key = OperatorKey.generate()
    path = key.save(tmp_path / "op.key")
    assert path.stat().st_mode & 0o777 == 0o600
    assert OperatorKey.load(path).public == key.public
    with pytest.raises(OperatorKeyError, match="exists"):
        OperatorKey.generate().save(path)
    (tmp_path / "bad.key").write_text("hello")
    with pytest.raises(OperatorKeyError, match="not a zswarm operator key"):
        OperatorKey.load(tmp_path / "bad.key")
    with pytest.raises(OperatorKeyError, match="no operator key"):
        OperatorKey.load(tmp_path / "missing.key")
