"""bfloat16 cells and states under XLA's excess precision: bit-exact reversal with
`revdeq.cast_exactly`. Run once, with x64 off: no float64 path is involved."""

import functools
import textwrap
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq
from revdeq.testing import TanhCell, plain_reversible_loop, relative_error

from .helpers import batch_grad, float32_problem, run_script, solve_grad


class _Bfloat16Cell(eqx.Module):
    """Computes in bfloat16 on a float32 state, casting with `cast`."""

    inner: TanhCell
    cast: Callable = eqx.field(static=True, default=revdeq.cast_exactly)

    def __call__(self, z, x):
        low = jax.tree.map(lambda a: self.cast(a, jnp.bfloat16), (self.inner, z, x))
        return self.cast(low[0](low[1], low[2]), z.dtype)


def _astype(x, dtype):
    return x.astype(dtype)


@pytest.mark.slow
def test_bfloat16_compute(getkey):
    cell, z0s, xs = float32_problem(getkey())
    cell = _Bfloat16Cell(cell)
    solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)

    # The states are rebuilt bit for bit, so both adjoints differentiate the same
    # forward computation. Each VJP of the cell then runs in bfloat16, and the two
    # adjoints sum their cotangents in different orders before casting them down: they
    # agree to bfloat16 resolution (2^-8 ≈ 4e-3), not beyond.
    grad = functools.partial(solve_grad, cell, z0s, xs, solver=solver, max_steps=12)
    reversible = grad(adjoint=revdeq.ReversibleAdjoint())
    unrolled = grad(adjoint=revdeq.UnrolledAdjoint())
    assert relative_error(reversible, unrolled) <= 1e-2
    # Against the plain float32 loop with the same bfloat16 cell, the two forward
    # computations round differently in bfloat16, so only agreement to bf16 level.
    loop = functools.partial(plain_reversible_loop, beta=0.8, steps=12)
    assert relative_error(reversible, batch_grad(loop, cell, z0s, xs)) <= 5e-2
    drift = revdeq.reconstruction_error(
        cell, z0s[0], xs[0], solver=solver, max_steps=12
    )
    assert drift == 0


@pytest.mark.parametrize("beta", [pytest.param(0.8, marks=pytest.mark.slow), 1.5])
def test_cast_exactly_keeps_a_bfloat16_cell_reversible(getkey, beta):
    # By default XLA computes bfloat16 arithmetic in float32 and may skip the
    # rounding of a cast pair, depending on where its fusions and loop bodies end:
    # with plain casts the two passes evaluate different functions and the
    # reconstruction drifts. `cast_exactly` rounds where it is written.
    inner, z0s, xs = float32_problem(getkey())
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)

    def drift(cast):
        cell = _Bfloat16Cell(inner, cast)
        return revdeq.reconstruction_error(
            cell, z0s[0], xs[0], solver=solver, max_steps=12, unroll=False
        )

    assert drift(_astype) > 0
    assert drift(revdeq.cast_exactly) == 0

    # Its derivative is that of `astype`.
    def grad(cast):
        return jax.grad(lambda a: jnp.sum(cast(a, jnp.bfloat16).astype(a.dtype) ** 2))

    assert jnp.array_equal(grad(revdeq.cast_exactly)(xs[0]), grad(_astype)(xs[0]))


def test_bfloat16_state_reconstructs_bit_for_bit(getkey):
    # A state in bfloat16 itself: the exact state's own casts to and from its
    # float32 arithmetic must round where they are written too.
    cell = TanhCell(8, key=getkey(), dtype=jnp.bfloat16)
    x = jax.random.normal(getkey(), (8,), jnp.bfloat16)
    solver = revdeq.Reversible(beta=1.5, rtol=0, atol=0)
    # With plain `astype` in those casts, the loop path drifted by 0.13.
    for unroll in (False, True):
        drift = revdeq.reconstruction_error(
            cell, x, x, solver=solver, max_steps=4, unroll=unroll
        )
        assert drift == 0, unroll


def test_deq_compute_dtype_is_reversible_bit_for_bit(getkey):
    cell = revdeq.nn.MLPCell(dim=16, hidden=32, key=getkey())
    deq = revdeq.nn.DEQ(
        cell, (16,), solver=revdeq.Reversible(beta=0.8, rtol=0, atol=0),
        adjoint=revdeq.ReversibleAdjoint(), max_steps=12, compute_dtype=jnp.bfloat16,
    )  # fmt: skip
    x = jax.random.normal(getkey(), (16,))
    drift = revdeq.reconstruction_error(
        deq.fn, jnp.zeros(16), x, solver=deq.solver, max_steps=12
    )
    assert drift == 0


_BFLOAT16_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    import equinox as eqx
    import revdeq
    from helpers import TanhCell

    class Bfloat16Cell(eqx.Module):
        inner: TanhCell

        def __call__(self, z, x):
            low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), (self.inner, z, x))
            return low[0](low[1], low[2]).astype(z.dtype)

    k1, k2 = jax.random.split(jax.random.key(0))
    cell = Bfloat16Cell(TanhCell(32, key=k1, dtype=jnp.float32))
    x = jax.random.normal(k2, (32,), jnp.float32)
    drifts = [
        float(revdeq.reconstruction_error(
            cell, jnp.zeros(32, jnp.float32), x, max_steps=steps,
            solver=revdeq.Reversible(beta=beta, rtol=0, atol=0),
        ))
        for beta in (0.5, 0.9) for steps in (12, 40)
    ]
    print(json.dumps(drifts))
    """
)


@pytest.mark.slow  # a fresh Python; CI runs it after `make test`
def test_bfloat16_compute_reverses_bit_for_bit_without_excess_precision():
    # The other way out for plain casts: with XLA's excess precision off, every
    # bfloat16 operation rounds where it is written, in both passes alike.
    drifts = run_script(_BFLOAT16_SCRIPT, "--xla_allow_excess_precision=false")
    assert drifts == [0.0] * 4


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_cast_exactly_rounds_as_numpy_does(dtype):
    # The truth is ml_dtypes' conversion in numpy, outside XLA: ties to even,
    # signed zeros, subnormals, infinities and NaN.
    bits = np.random.default_rng(0).integers(0, 2**32, 20_000, dtype=np.uint32)
    specials = [0, -0.0, 1 + 2**-8, 1 + 3 * 2**-8, 1e-40, -1e-45, 65519, np.inf, np.nan]
    x = np.concatenate([bits.view(np.float32), np.array(specials, np.float32)])
    got = np.asarray(revdeq.cast_exactly(jnp.asarray(x), dtype))
    with np.errstate(all="ignore"):  # overflow to infinity is part of the truth
        want = x.astype(dtype)
    assert got.dtype == want.dtype
    same = (got == want) | (np.isnan(got) & np.isnan(want))
    assert same.all(), x[~same][:5]
