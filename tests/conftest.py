import pytest

from cluster import Cluster
from zswarm.token import Token


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
