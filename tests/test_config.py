import argparse

import pytest

from zswarm.config import NODE_OPTIONS, SERVER_OPTIONS, ConfigError, add_options, parse_hostport, resolve


def parse(argv, env):
    p = argparse.ArgumentParser()
    add_options(p, NODE_OPTIONS + SERVER_OPTIONS)
    return resolve(p.parse_args(argv), NODE_OPTIONS + SERVER_OPTIONS, env)


def test_flag_beats_env_beats_default():
    assert parse([], {})["p2p_listen"] == "0.0.0.0:7340"
    assert parse([], {"ZSWARM_P2P_LISTEN": "127.0.0.1:1"})["p2p_listen"] == "127.0.0.1:1"
    assert parse(["--p2p-listen", "127.0.0.1:2"], {"ZSWARM_P2P_LISTEN": "127.0.0.1:1"})["p2p_listen"] == "127.0.0.1:2"


def test_localai_names_are_accepted():
    cfg = parse([], {"LOCALAI_P2P_TOKEN": "t1", "LOCALAI_P2P": "true", "LOCALAI_FEDERATED": "1",
                     "LOCALAI_P2P_DISABLE_DHT": "yes", "LOCALAI_P2P_LOGLEVEL": "DEBUG",
                     "LOCALAI_P2P_BOOTSTRAP_PEERS_MADDRS": "/ip4/10.1.2.3/tcp/4001,10.1.2.4:5",
                     "LOCALAI_P2P_LISTEN_MADDRS": "/ip4/0.0.0.0/tcp/4002"})
    assert cfg["token"] == "t1" and cfg["p2p"] and cfg["federated"] and cfg["local_only"]
    assert cfg["log_level"] == "debug" and cfg["bootstrap"] == ["10.1.2.3:4001", "10.1.2.4:5"]
    assert cfg["p2p_listen"] == "0.0.0.0:4002"
    assert parse([], {"TOKEN": "t3", "P2P_TOKEN": "t2"})["token"] == "t2"  # documented order


def test_bad_values_name_their_source():
    with pytest.raises(ConfigError, match="ZSWARM_NO_MDNS"):
        parse([], {"ZSWARM_NO_MDNS": "maybe"})
    with pytest.raises(ConfigError, match="--bootstrap"):
        parse(["--bootstrap", "host-without-port"], {})
    assert parse_hostport("/ip6/::1/tcp/9") == "[::1]:9"


def test_help_documents_defaults_and_env():
    p = argparse.ArgumentParser()
    add_options(p, NODE_OPTIONS)
    text = p.format_help()
    for o in NODE_OPTIONS:
        assert o.flags[0] in text and o.envs[0] in text
    assert "default: 0.0.0.0:7340" in text


def test_rpc_listen_must_be_ipv4_and_loopback_is_one_rule():
    from zswarm.config import is_loopback, parse_rpc_listen

    assert parse_rpc_listen("localhost:5") == "127.0.0.1:5"
    assert parse_rpc_listen("10.0.0.2:5") == "10.0.0.2:5"
    with pytest.raises(ConfigError, match="IPv4"):
        parse_rpc_listen("[::1]:5")  # llama.cpp would refuse it in its child, again and again
    with pytest.raises(ConfigError, match="IPv4"):
        parse_rpc_listen("rpc.example:5")
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.3.4.5", "localhost", "[::1]", "::1"))
    assert not any(is_loopback(h) for h in ("10.0.0.2", "0.0.0.0", "example.org", "[fe80::1]"))
