import jax
import pytest


@pytest.fixture
def getkey():
    """A fresh PRNG key on each call, deterministic per test."""
    keys = iter(jax.random.split(jax.random.key(5678), 1000))
    return lambda: next(keys)


@pytest.fixture
def x64():
    """Run the test with 64-bit floats enabled."""
    with jax.enable_x64(True):
        yield
