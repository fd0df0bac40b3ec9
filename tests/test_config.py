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
    from zswarm.config import SHARD_OPTIONS
    q = argparse.ArgumentParser()
    add_options(q, SHARD_OPTIONS)
    shard_help = " ".join(q.format_help().split())
    # a default that no one may pass is not shown as one (--mem 0 is refused)
    assert "default: what is available" in shard_help and "default: 0;" not in shard_help
    assert "default: 1TiB" in shard_help


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


# --- secrets by file (--token-file, --api-key-file) ---

def resolve_secrets(argv, env, opts=None):
    from zswarm.config import HTTP_OPTIONS, apply_secret_files

    opts = opts or NODE_OPTIONS + HTTP_OPTIONS
    p = argparse.ArgumentParser()
    add_options(p, opts)
    ns = p.parse_args(argv)
    cfg = resolve(ns, opts, env)
    return cfg, apply_secret_files(ns, cfg, env)


def secret_file(tmp_path, name, text, mode=0o600):
    path = tmp_path / name
    path.write_text(text)
    path.chmod(mode)
    return str(path)


def test_the_token_comes_from_a_file_by_flag_or_env(tmp_path):
    from zswarm.token import Token

    tok = Token.generate().encode()
    path = secret_file(tmp_path, "token", f"\n  {tok}\n")
    for argv, env in ((["--token-file", path], {}), ([], {"ZSWARM_TOKEN_FILE": path})):
        cfg, warnings = resolve_secrets(argv, env)
        assert cfg["token"] == tok and path in cfg["token_source"] and warnings == []
    # a flag beats the environment, whichever way each gives the token
    other = Token.generate().encode()
    cfg, warnings = resolve_secrets(["--token-file", path], {"ZSWARM_TOKEN": other})
    assert cfg["token"] == tok
    cfg, warnings = resolve_secrets(["--token", other], {"ZSWARM_TOKEN_FILE": path})
    assert cfg["token"] == other and len(warnings) == 1  # the argv warning
    cfg, warnings = resolve_secrets([], {"LOCALAI_P2P_TOKEN": other})
    assert cfg["token"] == other and cfg["token_source"] == "LOCALAI_P2P_TOKEN" and warnings == []


def test_a_token_file_that_cannot_be_used_is_one_line_naming_the_file_never_the_content(tmp_path):
    bad = "zs1-not-really-a-token-SECRETISH"
    cases = {
        str(tmp_path / "missing"): "cannot read the token file",
        secret_file(tmp_path, "empty", " \n\n"): "is empty",
        secret_file(tmp_path, "bad", bad + "\n"): "holds no valid token",
        str(tmp_path): "cannot read the token file",  # a directory
    }
    for path, words in cases.items():
        with pytest.raises(ConfigError) as e:
            resolve_secrets(["--token-file", path], {})
        msg = str(e.value)
        assert words in msg and path in msg and "\n" not in msg and bad not in msg, msg


def test_the_token_is_given_one_way(tmp_path):
    from zswarm.token import Token

    tok = Token.generate().encode()
    path = secret_file(tmp_path, "token", tok)
    with pytest.raises(ConfigError, match="--token and --token-file both give the token"):
        resolve_secrets(["--token", tok, "--token-file", path], {})
    with pytest.raises(ConfigError, match="TOKEN and ZSWARM_TOKEN_FILE both give the token"):
        resolve_secrets([], {"TOKEN": tok, "ZSWARM_TOKEN_FILE": path})


def test_warnings_for_a_file_open_to_others_and_a_secret_in_argv(tmp_path):
    from zswarm.token import Token

    tok = Token.generate().encode()
    path = secret_file(tmp_path, "token", tok, mode=0o644)
    cfg, warnings = resolve_secrets(["--token-file", path], {})
    assert len(warnings) == 1 and "open to other users (mode 0644)" in warnings[0]
    assert f"chmod 600 {path}" in warnings[0]
    cfg, warnings = resolve_secrets(["--token", tok], {})
    assert len(warnings) == 1 and "process list" in warnings[0] and "ZSWARM_TOKEN" in warnings[0]
    assert "--token-file" in warnings[0] and tok not in warnings[0]
    cfg, warnings = resolve_secrets(["--api-key", "k1"], {})
    assert len(warnings) == 1 and "--api-key" in warnings[0] and "k1" not in warnings[0]


def test_api_keys_from_a_file_join_those_given_otherwise(tmp_path):
    path = secret_file(tmp_path, "keys", "# the API keys\n\nk-one\n   k-two  \n# k-old\nk-one\n")
    cfg, warnings = resolve_secrets(["--api-key-file", path], {})
    assert cfg["api_keys"] == ["k-one", "k-two"] and warnings == []
    cfg, _ = resolve_secrets([], {"ZSWARM_API_KEY_FILE": path, "ZSWARM_API_KEYS": "k-env"})
    assert cfg["api_keys"] == ["k-env", "k-one", "k-two"]
    for text, words in (("# nothing\n\n", "holds no key"), ("ok\nk with space\n", "line 2"),
                        ("a,b\n", "line 1")):
        with pytest.raises(ConfigError, match=words) as e:
            resolve_secrets(["--api-key-file", secret_file(tmp_path, "k", text)], {})
        assert "k with space" not in str(e.value) and "a,b" not in str(e.value)
    with pytest.raises(ConfigError, match="cannot read the API key file"):
        resolve_secrets(["--api-key-file", str(tmp_path / "nope")], {})


def test_every_variable_of_a_secret_option_is_stripped_from_children():
    from zswarm.config import ALL_OPTIONS, SECRET_ENVS

    names = {"ZSWARM_TOKEN", "LOCALAI_P2P_TOKEN", "P2P_TOKEN", "TOKEN", "ZSWARM_TOKEN_FILE",
             "ZSWARM_API_KEYS", "LOCALAI_API_KEY", "API_KEY", "ZSWARM_API_KEY_FILE"}
    assert names <= SECRET_ENVS
    assert {o.dest for o in ALL_OPTIONS if o.secret} == {"token", "token_file", "api_keys", "api_key_file"}
    assert "ZSWARM_STATE_DIR" not in SECRET_ENVS and "ZSWARM_ADDRESS" not in SECRET_ENVS


def test_children_inherit_the_environment_less_the_secrets(monkeypatch):
    from zswarm.actors.supervisor import inherited_env

    monkeypatch.setenv("P2P_TOKEN", "t")
    monkeypatch.setenv("API_KEY", "k")
    monkeypatch.setenv("ZSWARM_LOG_LEVEL", "debug")
    env = inherited_env()
    assert "P2P_TOKEN" not in env and "API_KEY" not in env and env["ZSWARM_LOG_LEVEL"] == "debug"
