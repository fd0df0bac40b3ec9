import pytest

from cluster import Cluster
from zswarm import install
from zswarm.token import Token


def pytest_sessionstart(session):
    """Preflight: a llama.cpp that cannot run here (a stale or foreign wheel, no RPC backend)
    would fail half the suite with crash loops; say so once, with the fix, and run nothing."""
    result = install.check()
    if not result["ok"]:
        pytest.exit(f"preflight: {result['problem']}", returncode=3)


@pytest.fixture
def token() -> str:
    return Token.generate().encode()


@pytest.fixture
def cluster(tmp_path, token):
    c = Cluster(tmp_path, token)
    try:
        yield c
    finally:
        c.close()
