"""The straight-line path (`unroll=True`) against the loop path: same values,
statistics and gradients, and the same stops."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest

import revdeq
from revdeq.testing import TanhCell, plain_reversible_loop, relative_error

from .helpers import array_problem, pytree_problem


_float32_array_problem = functools.partial(array_problem, dtype=jnp.float32)
_float32_pytree_problem = functools.partial(pytree_problem, dtype=jnp.float32)
FIXED = dict(rtol=0, atol=0)
SOLVERS = {
    "exact-0.5": revdeq.Reversible(beta=0.5, **FIXED),
    "exact-0.9": revdeq.Reversible(beta=0.9, **FIXED),
    "exact-1.2": revdeq.Reversible(beta=1.2, **FIXED),
    "float-0.5": revdeq.Reversible(beta=0.5, precision=revdeq.FloatState(), **FIXED),
    "fixed-point": revdeq.FixedPointIteration(damping=0.7, **FIXED),
    "anderson": revdeq.Anderson(history=3, **FIXED),
}


def _solve_and_grad(solver, unroll, cell, z0, x, max_steps, adjoint=None):
    """The solution and the gradient of a loss of its value with respect to the
    cell, `z0` and `x`, for a batch vmapped over its first axis."""

    def solve(cell, z0, x):
        return revdeq.solve(
            cell,
            z0,
            x,
            solver=solver,
            adjoint=adjoint,
            max_steps=max_steps,
            unroll=unroll,
            throw=False,
        )

    @eqx.filter_jit
    @eqx.filter_grad(has_aux=True)
    def grads_and_solution(inputs):
        sol = jax.vmap(solve, in_axes=(None, 0, 0))(*inputs)
        loss = sum(jnp.sum(jnp.sin(v)) for v in jtu.tree_leaves(sol.value))
        return loss, sol

    grads, sol = grads_and_solution((cell, z0, x))
    return sol, grads


def _batch(tree, scales):
    return jtu.tree_map(lambda a: a[None] * scales.reshape(-1, *[1] * a.ndim), tree)


@pytest.mark.parametrize(
    "name, steps, problem",
    [(name, 3, _float32_array_problem) for name in SOLVERS if name != "exact-0.5"]
    + [("float-0.5", 1, _float32_pytree_problem)]
    + [
        pytest.param("exact-0.5", 3, _float32_array_problem, marks=pytest.mark.slow),
        # Across words of the exact state's buffer (2 steps each at β = 0.9).
        pytest.param("exact-0.9", 10, _float32_array_problem, marks=pytest.mark.slow),
        pytest.param("exact-0.9", 10, _float32_pytree_problem, marks=pytest.mark.slow),
        pytest.param("anderson", 10, _float32_pytree_problem, marks=pytest.mark.slow),
    ],
)
def test_unrolled_matches_loop(getkey, name, steps, problem):
    cell, z0, x = problem(getkey())
    scales = jnp.array([0.5, 1.0, 2.0])
    z0s, xs = _batch(z0, 1 + scales), _batch(x, scales)
    solver = SOLVERS[name]
    # A float state drifts by 10 steps; both paths must drift alike.
    adjoint = revdeq.ReversibleAdjoint(drift_tolerance=float("inf"))
    adjoint = adjoint if name.startswith("float") else None
    loop, loop_grads = _solve_and_grad(solver, False, cell, z0s, xs, steps, adjoint)
    line, line_grads = _solve_and_grad(solver, True, cell, z0s, xs, steps, adjoint)
    assert np.array_equal(line.result._value, loop.result._value)
    for key in ("num_steps", "num_fn_evals"):
        assert np.array_equal(line.stats[key], loop.stats[key])
    # The residual is relative: float32 round-off in `z` moves it by ~1e-7.
    residuals = line.stats["residual"], loop.stats["residual"]
    assert np.allclose(*residuals, rtol=0, atol=1e-6)
    assert relative_error(line.value, loop.value) <= 1e-6
    assert relative_error(line_grads, loop_grads) <= 1e-5


def _diverging(z, x):
    return 30.0 * z + x


def _nonfinite(z, x):
    return jnp.where(z[0] > 0.5, jnp.nan, z + x)


# An exact state that diverges leaves its range instead, which does not stop the
# loop: it stays lost and is reported at the end.
@pytest.mark.parametrize(
    "cell, precision",
    [
        (_diverging, revdeq.FloatState()),
        (_nonfinite, revdeq.FloatState()),
        pytest.param(_nonfinite, revdeq.ExactState(), marks=pytest.mark.slow),
    ],
)
def test_unrolled_stops_where_the_loop_stops(cell, precision):
    # Each cell fails within a few of the 8 steps; the unrolled solve holds its
    # state from there, as the loop does by stopping.
    solver = revdeq.Reversible(beta=0.5, precision=precision, **FIXED)
    z0, x = jnp.zeros(2), jnp.full(2, 0.4)
    loop, line = [
        revdeq.solve(cell, z0, x, solver=solver, max_steps=8, unroll=u, throw=False)
        for u in (False, True)
    ]
    assert loop.result != revdeq.RESULTS.successful
    assert line.result == loop.result
    assert int(loop.stats["num_steps"]) < 8
    assert int(line.stats["num_steps"]) == int(loop.stats["num_steps"])
    assert np.array_equal(line.value, loop.value, equal_nan=True)


@pytest.mark.slow  # about 55 s; CI runs it after `make test`
def test_unrolled_batched_samples_stopping_at_different_steps(getkey):
    # With tolerances, samples stop after different numbers of steps, across buffer
    # words; the straight-line reverse pass undoes each sample's own steps only.
    cell = TanhCell(8, key=getkey(), dtype=jnp.float32)
    xs = jax.random.normal(getkey(), (5, 8)) * jnp.array([0.1, 0.5, 1, 2, 4])[:, None]
    z0s = jnp.zeros((5, 8))
    solver = revdeq.Reversible(beta=0.9, rtol=1e-2, atol=0)
    loop, loop_grads = _solve_and_grad(solver, False, cell, z0s, xs, 12)
    line, line_grads = _solve_and_grad(solver, True, cell, z0s, xs, 12)
    num_steps = np.asarray(line.stats["num_steps"])
    assert len(set(num_steps.tolist())) >= 3
    assert np.array_equal(num_steps, loop.stats["num_steps"])
    assert relative_error(line.value, loop.value) <= 1e-6
    assert relative_error(line_grads, loop_grads) <= 1e-5
    drift = jax.vmap(
        lambda z0, x: revdeq.reconstruction_error(
            cell, z0, x, solver=solver, max_steps=12, unroll=True
        )
    )(z0s, xs)
    assert np.all(np.asarray(drift) == 0)


FLOAT = revdeq.Reversible(precision=revdeq.FloatState(), **FIXED)


def _has_loop(fn, *args) -> bool:
    jaxpr = str(jax.make_jaxpr(fn)(*args))
    return "while[" in jaxpr or "scan[" in jaxpr


@pytest.mark.parametrize(
    "solver, max_steps, unroll, expected",
    [
        (FLOAT, 4, None, False),
        (FLOAT, 5, None, True),
        (revdeq.Reversible(), 4, None, True),  # tolerances: the loop can stop early
        (revdeq.Reversible(**FIXED), 4, None, False),  # ExactState too
        (revdeq.Reversible(**FIXED), 5, None, True),
        (FLOAT, 4, False, True),
        (revdeq.Anderson(**FIXED), 4, None, False),
    ],
)
def test_which_solves_unroll(solver, max_steps, unroll, expected):
    cell = TanhCell(4, key=jax.random.key(0), dtype=jnp.float32)

    def value_and_grad(x):
        def loss(x):
            sol = revdeq.solve(
                cell, jnp.zeros(4), x, solver=solver, max_steps=max_steps, unroll=unroll
            )
            return jnp.sum(sol.value)

        return jax.value_and_grad(loss)(x)

    assert _has_loop(value_and_grad, jnp.ones(4)) == expected


@pytest.mark.parametrize("unroll", [1, "yes"])
def test_bad_unroll(unroll):
    # Under the tests' runtime type checks, the hint rejects it first.
    with pytest.raises((ValueError, TypeError), match="unroll"):
        revdeq.solve(lambda z, x: z, jnp.zeros(2), None, unroll=unroll)


@pytest.mark.slow  # compile-heavy; CI runs it after `make test`
def test_unrolled_reverse_pass_keeps_no_states_alive():
    # Compiled memory of a batched value_and_grad with a float state: the
    # straight-line reverse pass rebuilds each state and accumulates each step's
    # cotangents before the next, as the loop does, rather than keeping them all
    # as store-all backprop does.
    cell = TanhCell(128, key=jax.random.key(0), dtype=jnp.float32)
    zs, xs = jnp.zeros((32, 128)), jnp.ones((32, 128))
    solver = revdeq.Reversible(precision=revdeq.FloatState(), **FIXED)

    def memory(steps, adjoint, unroll):
        def solve(cell, z0, x):
            return revdeq.solve(
                cell,
                z0,
                x,
                solver=solver,
                adjoint=adjoint,
                max_steps=steps,
                unroll=unroll,
            ).value

        def loss(cell):
            return jnp.sum(jax.vmap(solve, in_axes=(None, 0, 0))(cell, zs, xs) ** 2)

        compiled = jax.jit(jax.grad(loss)).lower(cell).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    reversible = revdeq.ReversibleAdjoint()
    loop = memory(4, reversible, False)
    assert memory(16, reversible, False) <= 1.05 * loop
    store_all = memory(4, revdeq.UnrolledAdjoint(), True)
    assert memory(4, reversible, True) <= min(1.05 * loop, 0.5 * store_all)


def _tanh_cell(z, _):
    return jnp.tanh(0.5 * z + 1.0)


@pytest.mark.slow  # compile-heavy; CI runs it after `make test`
def test_unrolled_gradient_of_a_cell_without_parameters():
    def loss(z0):
        sol = revdeq.solve(_tanh_cell, z0, None, solver=FLOAT, max_steps=4)
        return jnp.sum(sol.value)

    def plain(z0):
        return jnp.sum(plain_reversible_loop(_tanh_cell, z0, None, 0.8, 4))

    z0 = jnp.array([0.3, -0.2])
    assert relative_error(jax.grad(loss)(z0), jax.grad(plain)(z0)) <= 1e-6


@pytest.mark.parametrize("precision", [revdeq.ExactState(), revdeq.FloatState()])
def test_unrolled_gradient_matches_plain_loop(x64, getkey, precision):
    # Against the independent truth: autodiff of a plain float64 Python loop.
    cell = TanhCell(6, key=getkey(), dtype=jnp.float64)
    z0 = 0.3 * jax.random.normal(getkey(), (6,))
    x = jax.random.normal(getkey(), (6,))
    solver = revdeq.Reversible(beta=0.8, precision=precision, **FIXED)

    def ours(cell, z0, x):
        sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=4, unroll=True)
        return jnp.sum(jnp.sin(sol.value))

    def plain(cell, z0, x):
        return jnp.sum(jnp.sin(plain_reversible_loop(cell, z0, x, 0.8, 4)))

    def grads(loss):
        return eqx.filter_grad(loss)(cell, z0, x), jax.grad(loss, (1, 2))(cell, z0, x)

    assert relative_error(grads(ours), grads(plain)) <= 1e-8
