import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # A different, reproducible stream per test.
    return np.random.default_rng(abs(hash(request.node.nodeid)) % (2**32))


def random_keys(rng, n):
    return [rng.bytes(16) for _ in range(n)]
