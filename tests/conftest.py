import jax
import pytest


@pytest.fixture(autouse=True)
def strict_promotion(request):
    """The settings of careful JAX users: no implicit dtype promotion (an int meeting
    a float, float32 meeting float64) and no implicit rank promotion. Tests marked
    `standard_promotion` opt out: optax's Adam (0.2.8) raises a float to an integer
    step count, which strict promotion refuses."""
    if request.node.get_closest_marker("standard_promotion"):
        yield
        return
    with jax.numpy_dtype_promotion("strict"), jax.numpy_rank_promotion("raise"):
        yield


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


@pytest.fixture(
    params=[False, pytest.param(True, marks=pytest.mark.slow)], ids=["x32", "x64"]
)
def x64_on_and_off(request):
    """Run the test twice: with 64-bit types disabled (JAX's default) and, in the
    slow set, enabled.

    Use it on a whole module with `pytestmark = pytest.mark.usefixtures(...)`.
    """
    with jax.enable_x64(request.param):
        yield
