"""Exact reversal at working precision: `ExactState` against float64 truths."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import revdeq
from revdeq._precision.fixed_point import times_fraction, undo_times_fraction
from revdeq.testing import TanhCell, relative_error

from .helpers import batch_grad, float32_problem, float64_loop_grad, solve_grad


pytestmark = pytest.mark.usefixtures("x64_on_and_off")


@pytest.mark.parametrize(
    "beta",
    [
        0.5,
        pytest.param(0.8, marks=pytest.mark.slow),
        pytest.param(0.9, marks=pytest.mark.slow),
        1.2,
        0.123,  # 1 − β = 164/187: the multiplication pops digits in base 164
    ],
)
@pytest.mark.parametrize("steps", [16, 64])
def test_exact_state_matches_float64_truth(getkey, beta, steps):
    cell, z0s, xs = float32_problem(getkey())
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)

    got = solve_grad(cell, z0s, xs, solver=solver, max_steps=steps)
    beta = solver.effective_beta  # the nearest reversible one
    truth = float64_loop_grad(cell, z0s, xs, beta=beta, steps=steps)
    assert relative_error(got, truth) <= 1e-5


@pytest.mark.parametrize("n, d", [(1, 5), (7, 8), (43, 50), (104, 121), (164, 187)])
def test_times_fraction_is_within_one_unit_and_invertible(n, d):
    bits = 30
    rng = np.random.default_rng(0)
    edges = [-(2**bits) + 1, -d, -1, 0, 1, d, 2**bits - 1]
    ints = np.concatenate([edges, rng.integers(-(2**bits) + 1, 2**bits, 2000)])
    ints, popped = np.meshgrid(ints, np.arange(n))
    ints, popped = ints.ravel(), popped.ravel()

    product, remainder = times_fraction(
        jnp.asarray(ints, jnp.int32), jnp.asarray(popped, jnp.uint32), n, d, bits
    )
    # The truth in Python's unbounded integers.
    numerator = [int(i) * n + int(p) for i, p in zip(ints, popped)]
    np.testing.assert_array_equal(product, [a // d for a in numerator])
    np.testing.assert_array_equal(remainder, [a % d for a in numerator])
    assert np.all(np.abs(np.asarray(product) - ints * (n / d)) < 1)

    back, back_popped = undo_times_fraction(product, remainder, n, d, bits)
    np.testing.assert_array_equal(back, ints)
    np.testing.assert_array_equal(back_popped, popped)


class _ConvCell(eqx.Module):
    """`tanh(conv(z) + x)` on one `(C, H, W)` image."""

    conv: eqx.nn.Conv2d

    def __call__(self, z, x):
        return jnp.tanh(self.conv(z) + x)


@pytest.mark.parametrize("beta", [0.5, pytest.param(0.8, marks=pytest.mark.slow)])
def test_exact_state_conv_cell_matches_float64_truth(getkey, beta):
    conv = eqx.nn.Conv2d(4, 4, 3, padding=1, key=getkey(), dtype=jnp.float32)
    cell = _ConvCell(eqx.tree_at(lambda c: c.weight, conv, 0.5 * conv.weight))
    xs = jax.random.normal(getkey(), (3, 4, 8, 8), jnp.float32)
    z0s = jnp.zeros_like(xs)
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)

    got = solve_grad(cell, z0s, xs, solver=solver, max_steps=32)
    truth = float64_loop_grad(cell, z0s, xs, beta=beta, steps=32)
    assert relative_error(got, truth) <= 1e-5


@pytest.mark.parametrize("beta", [0.5, 0.9, 1.2, 0.123])
def test_exact_state_reconstructs_bit_for_bit(getkey, beta):
    cell, z0s, xs = float32_problem(getkey())
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)
    drift = revdeq.reconstruction_error(
        cell, z0s[0], xs[0], solver=solver, max_steps=100
    )
    assert drift == 0


def _steps_per_word(beta: float) -> int:
    return revdeq.ExactState().segment_length(beta, max_steps=10**6)


@pytest.mark.parametrize(
    "beta, word_offset",
    # End on the first step, inside a word, on its last step, on the first step of
    # the next, and after three words.
    [
        (0.9, (0, 1)),
        (0.8, (1, -1)),
        (0.9, (1, 0)),
        (0.9, (1, 1)),
        (0.9, (3, 0)),
        (0.8, (1, 0)),
        (0.8, (1, 1)),
        (0.5, (2, 1)),
    ],
)
def test_exact_state_reconstructs_across_buffer_words(getkey, beta, word_offset):
    words, offset = word_offset
    steps = words * _steps_per_word(beta) + offset
    cell, z0s, xs = float32_problem(getkey())
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)
    drift = revdeq.reconstruction_error(
        cell, z0s[0], xs[0], solver=solver, max_steps=steps
    )
    assert drift == 0


def test_batched_samples_stopping_at_different_steps(getkey):
    # Inputs of different sizes converge after different numbers of steps, spread
    # over several buffer words; the batched reverse loop must undo each sample's
    # own steps only.
    cell, z0s, xs = float32_problem(getkey(), batch=6)
    xs = xs * jnp.array([0.1, 0.5, 1.0, 2.0, 4.0, 8.0], jnp.float32)[:, None]
    solver = revdeq.Reversible(beta=0.9, rtol=1e-5, atol=0)
    max_steps = 60  # many buffer words

    sols = jax.vmap(
        lambda z0, x: revdeq.solve(cell, z0, x, solver=solver, max_steps=max_steps)
    )(z0s, xs)
    num_steps = np.asarray(sols.stats["num_steps"])
    assert len(set(num_steps.tolist())) >= 4 and num_steps.max() < max_steps

    drift = jax.vmap(
        lambda z0, x: revdeq.reconstruction_error(
            cell, z0, x, solver=solver, max_steps=max_steps
        )
    )(z0s, xs)
    assert np.all(np.asarray(drift) == 0)

    grad = functools.partial(solve_grad, cell, z0s, xs, solver=solver)
    reversible = grad(max_steps=max_steps, adjoint=revdeq.ReversibleAdjoint())
    unrolled = grad(max_steps=max_steps, adjoint=revdeq.UnrolledAdjoint())
    assert relative_error(reversible, unrolled) <= 1e-5


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _tanh_off_when_differentiated(a, offset):
    return jnp.tanh(a)


@_tanh_off_when_differentiated.defjvp
def _tanh_off_jvp(offset, primals, tangents):
    (a,), (a_dot,) = primals, tangents
    out = jnp.tanh(a)
    return out + offset, (1 - out**2) * a_dot


class _IrreproducibleCell(eqx.Module):
    """A `TanhCell` whose VJPs see `tanh + offset` and whose plain calls see `tanh`:
    the backward pass evaluates another function than the forward pass, as when XLA
    compiles `f` differently in the two (see docs/concepts/precision.md)."""

    inner: TanhCell
    offset: float = eqx.field(static=True)

    def __call__(self, z, x):
        pre = self.inner.weight @ z + self.inner.inject @ x + self.inner.bias
        return _tanh_off_when_differentiated(pre, self.offset)


def _quantum(cell, z0, x, beta, headroom_bits=6):
    """`ExactState`'s resolution `2^−e` on this float32 problem, from its documented
    rule: `e = 29 − headroom_bits − ceil(log2 max(|z0|, bound·|f(z0)|))`."""
    bound = max(1.0, beta / (1 - abs(1 - beta)))
    magnitude = max(
        float(jnp.max(jnp.abs(z0))), bound * float(jnp.max(jnp.abs(cell(z0, x))))
    )
    return 2.0 ** -(29 - headroom_bits - np.ceil(np.log2(magnitude)))


@pytest.mark.parametrize(
    ("guard_bits", "quanta", "exact"),
    # Within the radius `2^(k − 1)` (truncation adds up to one quantum), beyond it,
    # and the control without guard bits.
    [(4, 6, True), (4, 12, False), (8, 100, True), (0, 2, False)],
)
@pytest.mark.parametrize("beta", [0.5, pytest.param(0.8, marks=pytest.mark.slow)])
def test_reversal_is_exact_within_the_guard_radius(
    getkey, guard_bits, quanta, exact, beta
):
    inner, z0s, xs = float32_problem(getkey())
    offset = float(quanta * _quantum(inner, z0s[0], xs[0], beta) / beta)
    cell = _IrreproducibleCell(inner, offset)
    precision = revdeq.ExactState(guard_bits=guard_bits)
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=precision)
    steps = 12
    drift = revdeq.reconstruction_error(
        cell, z0s[0], xs[0], solver=solver, max_steps=steps
    )
    assert (drift == 0) == exact
    if exact:
        # Exact up to the VJPs' own offset in the cotangents, far below 1e-5.
        got = solve_grad(cell, z0s, xs, solver=solver, max_steps=steps)
        truth = float64_loop_grad(inner, z0s, xs, beta=beta, steps=steps)
        assert relative_error(got.inner, truth) <= 1e-5


@pytest.mark.parametrize(
    ("guard_bits", "quanta", "steps", "above_sqrt_eps"),
    # Far beyond the radius, and just beyond it over two steps, where the drift
    # stays below sqrt(eps) ≈ 3e-4 but the gradient is still not the exact one.
    [(8, None, 8, True), (4, 12, 2, False)],
)
def test_a_disagreement_beyond_the_radius_is_caught(
    getkey, guard_bits, quanta, steps, above_sqrt_eps
):
    # Any drift of an ExactState reversal raises at the default tolerance rather
    # than return a gradient that is not exact.
    inner, z0s, xs = float32_problem(getkey())
    beta = 0.5
    offset = 1e-3
    if quanta is not None:
        offset = float(quanta * _quantum(inner, z0s[0], xs[0], beta) / beta)
    cell = _IrreproducibleCell(inner, offset)
    precision = revdeq.ExactState(guard_bits=guard_bits)
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0, precision=precision)
    drift = revdeq.reconstruction_error(
        cell, z0s[0], xs[0], solver=solver, max_steps=steps
    )
    assert drift > 0
    assert (drift > np.sqrt(np.finfo(np.float32).eps)) == above_sqrt_eps
    with pytest.raises(Exception, match="drifted.*other bits in the backward"):
        grads = solve_grad(cell, z0s, xs, solver=solver, max_steps=steps)
        jax.block_until_ready(grads)


def test_float32_state_drifts_where_exact_state_does_not(getkey):
    cell, z0s, xs = float32_problem(getkey())
    naive = revdeq.Reversible(beta=0.9, rtol=0, atol=0, precision=revdeq.FloatState())
    drift = revdeq.reconstruction_error(cell, z0s[0], xs[0], solver=naive, max_steps=16)
    assert drift > 1e-3


def test_no_nan_far_past_convergence(getkey):
    # The residual reaches the float32 floor long before 200 steps.
    cell, z0s, xs = float32_problem(getkey())
    solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)

    def ours(c, z0, x):
        return revdeq.solve(c, z0, x, solver=solver, max_steps=200).value

    grads = batch_grad(ours, cell, z0s, xs)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.slow
def test_unusual_beta_uses_the_nearest_reversible_one(getkey):
    # 1 - 0.123 = 877/1000 needs n·d > 2^15: the iteration uses 1 - 164/187.
    solver = revdeq.Reversible(beta=0.123, rtol=0, atol=0)
    assert solver.effective_beta == pytest.approx(0.123, abs=1e-4)
    assert revdeq.Reversible(beta=0.8).effective_beta == 0.8
    cell, z0s, xs = float32_problem(getkey())

    grad = functools.partial(solve_grad, cell, z0s, xs, solver=solver, max_steps=10)
    reversible = grad(adjoint=revdeq.ReversibleAdjoint())
    unrolled = grad(adjoint=revdeq.UnrolledAdjoint())
    assert relative_error(reversible, unrolled) <= 1e-5


def _causal_cell(z, x):
    """Row i of the output depends on rows <= i of `z` and row i of `x` only."""
    return jnp.tanh(0.5 * jnp.cumsum(z, axis=0)) + x


@pytest.mark.parametrize("rowwise", [False, True])
def test_rowwise_exponents_keep_rows_independent(getkey, rowwise):
    x = jax.random.normal(getkey(), (6, 4), jnp.float32)
    precision = revdeq.ExactState(rowwise=rowwise)
    solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0, precision=precision)

    @jax.jit
    def solve(x):
        return revdeq.solve(
            _causal_cell, jnp.zeros_like(x), x, solver=solver, max_steps=8
        ).value

    before = solve(x)
    after = solve(x.at[4].multiply(2.0**20))  # a later row, far larger
    # A shared exponent rounds the earlier rows more coarsely; one per row does not.
    assert bool(jnp.array_equal(before[:4], after[:4])) == rowwise
    err = revdeq.reconstruction_error(
        _causal_cell, jnp.zeros_like(x), x, solver=solver, max_steps=8
    )
    assert err == 0


def test_rowwise_needs_a_shared_leading_axis():
    solver = revdeq.Reversible(beta=0.8, precision=revdeq.ExactState(rowwise=True))
    z0 = {"a": jnp.zeros((3, 2)), "b": jnp.zeros((4,))}
    with pytest.raises(ValueError, match="`z0`.*same leading size"):
        revdeq.solve(lambda z, x: z, z0, None, solver=solver, max_steps=2)
