import subprocess
import sys

import pytest

from cluster import REPO
from zswarm.token import Token, TokenError


def test_round_trip_and_derivation_is_stable():
    t = Token.generate(["10.0.0.1:7340", "[::1]:9"])
    again = Token.parse(t.encode())
    assert again == t and again.bootstrap == ("10.0.0.1:7340", "[::1]:9")
    k1, k2 = t.derive(), again.derive()
    assert k1 == k2 and len(k1.curve_public) == 40 and len(k1.network_id) == 16
    assert Token.generate().derive().curve_public != k1.curve_public
    assert len({k1.curve_secret, k1.discovery_key, k1.network_id.encode()}) == 3


@pytest.mark.parametrize("mangle", [
    lambda s: s[:-1], lambda s: s[:20], lambda s: s[:-5] + ("A" if s[-5] != "A" else "B") + s[-4:],
    lambda s: "zs2" + s[3:], lambda s: s + "!!", lambda s: "", lambda s: "   ",
])
def test_malformed_tokens_are_refused(mangle):
    with pytest.raises(TokenError):
        Token.parse(mangle(Token.generate().encode()))


def test_bad_bootstrap_is_refused():
    with pytest.raises(TokenError):
        Token.generate(["no-port"])


def test_cli_never_prints_the_secret():
    new = subprocess.run([sys.executable, "-m", "zswarm", "token", "new", "--bootstrap", "192.0.2.1:7340"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout.strip()
    secret_b64 = new[3:][4:20]  # a slice of the secret's encoding
    out = subprocess.run([sys.executable, "-m", "zswarm", "token", "inspect", new, "--json"],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "192.0.2.1:7340" in out and Token.parse(new).derive().network_id in out
    assert secret_b64 not in out and Token.parse(new).secret.hex() not in out


LOCALAI_TOKEN_YAML = (b"otp:\n  dht:\n    interval: 360\n    key: 9bF2kQ\n    length: 43\n"
                      b"  crypto:\n    interval: 9000\n    key: Zx81pP\n    length: 43\n"
                      b"room: f4e1c2\nrendezvous: 77a0b3\nmdns: 5c9d21\nmax_message_size: 20971520\n")


def test_a_localai_token_is_named_with_what_to_do_instead(tmp_path):
    import base64

    token = base64.b64encode(LOCALAI_TOKEN_YAML).decode()
    with pytest.raises(TokenError, match="LocalAI token.*zswarm token new"):
        Token.parse(token)
    out = subprocess.run([sys.executable, "-m", "zswarm", "worker", "--no-mdns", "--state-dir", str(tmp_path)],
                         env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "LOCALAI_P2P_TOKEN": token},
                         capture_output=True, text=True, cwd=REPO, timeout=60)
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert "LOCALAI_P2P_TOKEN" in out.stderr and "LocalAI token" in out.stderr and token not in out.stderr
