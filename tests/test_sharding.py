import pytest

from zswarm.sharding import MIB, Device, ShortOfMemory, make_plan, parse_size


def dev(i, mem_mib, local=False):
    return Device("local" if local else i, i, "" if local else f"127.0.0.1:{5000 + len(i)}", mem_mib * MIB)


def test_split_follows_memory_and_local_goes_last():
    p = make_plan([dev("b", 300), dev("a", 100)], dev("me", 400, local=True), 100 * MIB)
    assert [d.id for d in p.devices] == ["a", "b", "local"]
    assert p.weights == pytest.approx((0.125, 0.375, 0.5))
    assert p.has_local and [d.id for d in p.remote] == ["a", "b"]


def test_shortfall_is_named():
    with pytest.raises(ShortOfMemory, match=r"short by 50 MiB"):
        make_plan([dev("a", 100)], None, 150 * MIB)
    with pytest.raises(ShortOfMemory, match="no device"):
        make_plan([], None, 1)


@pytest.mark.parametrize("text,value", [("2GiB", 2 << 30), ("512MiB", 512 << 20), ("1.5G", 1_500_000_000),
                                        ("100", 100), ("3 gb", 3_000_000_000)])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "lots", "2XB", "-1G"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)
