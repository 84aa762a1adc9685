"""Every adjoint's gradient against an independent truth."""

import warnings

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
import pytest

import revdeq
from revdeq.testing import plain_reversible_loop, relative_error

from .helpers import (
    array_problem,
    dense_implicit_gradient,
    finite_difference_jvp,
    plain_damped_loop,
    pytree_problem,
)


def _loss_grads(adjoint, solver, cell, z0, x, max_steps):
    def loss(cell, z0, x):
        sol = revdeq.solve(
            cell, z0, x, solver=solver, adjoint=adjoint, max_steps=max_steps
        )
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jtu.tree_leaves(sol.value))

    return eqx.filter_grad(loss)(cell, z0, x), jax.grad(loss, argnums=(1, 2))(
        cell, z0, x
    )


def _truth_grads(loop, cell, z0, x):
    def loss(cell, z0, x):
        out = loop(cell, z0, x)
        return sum(jnp.sum(jnp.sin(leaf)) for leaf in jtu.tree_leaves(out))

    return eqx.filter_grad(loss)(cell, z0, x), jax.grad(loss, argnums=(1, 2))(
        cell, z0, x
    )


@pytest.mark.parametrize(
    "problem", [array_problem, pytest.param(pytree_problem, marks=pytest.mark.slow)]
)
@pytest.mark.parametrize(
    "solver, loop",
    [
        (
            revdeq.Reversible(beta=0.7, rtol=0, atol=0, precision=revdeq.FloatState()),
            lambda c, z, x: plain_reversible_loop(c, z, x, 0.7, 6),
        ),
        (
            revdeq.FixedPointIteration(damping=0.6, rtol=0, atol=0),
            lambda c, z, x: plain_damped_loop(c, z, x, 0.6, 6),
        ),
    ],
)
def test_unrolled_matches_plain_loop(x64, getkey, problem, solver, loop):
    cell, z0, x = problem(getkey())
    got = _loss_grads(revdeq.UnrolledAdjoint(), solver, cell, z0, x, 6)
    truth = _truth_grads(loop, cell, z0, x)
    assert relative_error(got, truth) <= 1e-10


@pytest.mark.parametrize("beta", [0.5, pytest.param(0.8, marks=pytest.mark.slow), 1.2])
@pytest.mark.parametrize(
    "steps",
    [
        1,
        pytest.param(2, marks=pytest.mark.slow),
        5,
        pytest.param(8, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("problem", [array_problem, pytree_problem])
def test_reversible_matches_plain_loop(x64, getkey, beta, steps, problem):
    cell, z0, x = problem(getkey())
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)
    got = jax.jit(
        lambda c, z, x: _loss_grads(revdeq.ReversibleAdjoint(), solver, c, z, x, steps)
    )(cell, z0, x)
    truth = _truth_grads(
        lambda c, z, x: plain_reversible_loop(c, z, x, beta, steps), cell, z0, x
    )
    # Gradients with respect to the cell's parameters, `z0` and `args`, each alone.
    for got_part, truth_part in zip(jtu.tree_leaves(got), jtu.tree_leaves(truth)):
        assert relative_error(got_part, truth_part) <= 1e-8


@pytest.mark.parametrize("beta", [0.5, 1.2])
def test_reversible_under_vmap(x64, getkey, beta):
    cell, _, _ = array_problem(getkey())
    z0s = 0.3 * jax.random.normal(getkey(), (4, 6))
    xs = jax.random.normal(getkey(), (4, 6))
    solver = revdeq.Reversible(beta=beta, rtol=0, atol=0)

    def batch_loss(cell, z0s, xs, solve_one):
        return jnp.sum(
            jnp.sin(jax.vmap(solve_one, in_axes=(None, 0, 0))(cell, z0s, xs))
        )

    def ours(c, z, x):
        return revdeq.solve(c, z, x, solver=solver, max_steps=5).value

    def truth(c, z, x):
        return plain_reversible_loop(c, z, x, beta, 5)

    got = eqx.filter_jit(eqx.filter_grad(batch_loss))(cell, z0s, xs, ours)
    want = eqx.filter_grad(batch_loss)(cell, z0s, xs, truth)
    assert relative_error(got, want) <= 1e-8
    got_x = jax.grad(batch_loss, argnums=(1, 2))(cell, z0s, xs, ours)
    want_x = jax.grad(batch_loss, argnums=(1, 2))(cell, z0s, xs, truth)
    assert relative_error(got_x, want_x) <= 1e-8


def test_reversible_against_finite_differences(x64, getkey):
    cell, z0, x = array_problem(getkey())
    solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)
    direction = jax.random.normal(getkey(), x.shape)

    def out(x):
        return revdeq.solve(cell, z0, x, solver=solver, max_steps=4).value

    _, jvp_vjp = jax.vjp(out, x)
    cot = jax.random.normal(getkey(), z0.shape)
    (grad_x,) = jvp_vjp(cot)
    fd = finite_difference_jvp(out, x, direction)
    assert abs(jnp.dot(grad_x, direction) - jnp.dot(cot, fd)) <= 1e-7 * jnp.abs(
        jnp.dot(cot, fd)
    )


@pytest.mark.parametrize(
    "solver",
    [
        revdeq.FixedPointIteration(rtol=1e-13, atol=1e-13),
        revdeq.Anderson(history=5, rtol=1e-13, atol=1e-13),
        revdeq.Broyden(history=10, rtol=1e-13, atol=1e-13),
    ],
)
def test_implicit_matches_dense_ift(x64, getkey, solver):
    cell, z0, x = array_problem(getkey())
    cot = jax.random.normal(getkey(), z0.shape)
    adjoint = revdeq.ImplicitAdjoint(linear_solver=revdeq_gmres_tight())

    def out(cell, x):
        sol = revdeq.solve(cell, z0, x, solver=solver, adjoint=adjoint, max_steps=300)
        return sol.value

    z_star, vjp = eqx.filter_vjp(out, cell, x)
    got = vjp(cot)
    truth = dense_implicit_gradient(cell, z_star, x, cot)
    assert relative_error(got, truth) <= 1e-6


def revdeq_gmres_tight():
    import lineax as lx

    return lx.GMRES(rtol=1e-12, atol=1e-12, restart=20, max_steps=500)


def test_implicit_gradient_wrt_z0_is_zero(getkey):
    cell, z0, x = array_problem(getkey(), jnp.float32)
    grad = jax.grad(
        lambda z0: jnp.sum(
            revdeq.solve(cell, z0, x, solver=revdeq.Anderson(), max_steps=50).value
        )
    )(z0)
    assert jnp.array_equal(grad, jnp.zeros_like(z0))


@pytest.mark.slow
def test_phantom_tends_to_implicit(x64, getkey):
    cell, z0, x = array_problem(getkey())
    cot = jax.random.normal(getkey(), z0.shape)
    solver = revdeq.FixedPointIteration(rtol=1e-13, atol=1e-13)

    def grads(adjoint):
        _, vjp = eqx.filter_vjp(
            lambda c, xx: (
                revdeq.solve(
                    c, z0, xx, solver=solver, adjoint=adjoint, max_steps=300
                ).value
            ),
            cell,
            x,
        )
        return vjp(cot)

    implicit = grads(revdeq.ImplicitAdjoint(linear_solver=revdeq_gmres_tight()))
    one = relative_error(grads(revdeq.PhantomAdjoint(steps=1)), implicit)
    many = relative_error(grads(revdeq.PhantomAdjoint(steps=60, damping=0.8)), implicit)
    assert many <= 1e-8
    assert one > 1e-3  # a single step is a genuinely different (cheaper) gradient


def test_reversible_backward_evaluates_f_twice_per_step(getkey):
    cell, z0, x = array_problem(getkey(), jnp.float32)
    count = []

    def counted(z, x):
        jax.debug.callback(lambda: count.append(1))
        return cell(z, x)

    steps = 5
    solver = revdeq.Reversible(rtol=0, atol=0)

    def solve(x):
        sol = revdeq.solve(counted, z0, x, solver=solver, max_steps=steps)
        return sol.value, sol.stats["num_fn_evals"]

    (value, evals), vjp = jax.vjp(solve, x, has_aux=False)
    jax.block_until_ready(value)
    forward = len(count)
    jax.block_until_ready(vjp((jnp.ones_like(value), jnp.zeros_like(evals))))
    # One evaluation at z₀, two per step.
    assert forward == evals == 2 * steps + 1
    assert len(count) - forward == 2 * steps


@pytest.mark.parametrize("unroll", [False, True])
def test_reversible_backward_skips_cotangents_not_asked_for(getkey, unroll):
    # A probe on `x` counts each cotangent taken through it: none when only `z0` is
    # differentiated, one per evaluation of `f` in the backward pass when `x` is.
    cell, z0, x = array_problem(getkey(), jnp.float32)
    count = []

    @jax.custom_vjp
    def probe(x):
        return x

    def probe_bwd(_, g):
        jax.debug.callback(lambda: count.append(1))
        return (g,)

    probe.defvjp(lambda x: (x, None), probe_bwd)
    steps = 3
    solver = revdeq.Reversible(rtol=0, atol=0)

    def loss(z0, x):
        sol = revdeq.solve(
            lambda z, x: cell(z, probe(x)),
            z0,
            x,
            solver=solver,
            max_steps=steps,
            unroll=unroll,
        )
        return jnp.sum(jnp.sin(sol.value))

    def plain(z0, x):
        return jnp.sum(jnp.sin(plain_reversible_loop(cell, z0, x, 0.8, steps)))

    z0_grad = jax.block_until_ready(jax.grad(loss)(z0, x))
    assert count == []
    assert relative_error(z0_grad, jax.grad(plain)(z0, x)) <= 1e-5
    x_grad = jax.block_until_ready(jax.grad(loss, argnums=1)(z0, x))
    assert len(count) == 2 * steps
    assert relative_error(x_grad, jax.grad(plain, argnums=1)(z0, x)) <= 1e-5


@pytest.mark.parametrize(
    "solver, adjoint, unroll",
    [
        (revdeq.Reversible(), None, None),
        pytest.param(
            revdeq.Reversible(rtol=0, atol=0), None, True, marks=pytest.mark.slow
        ),
        (
            revdeq.Reversible(beta=0.5, rtol=0, atol=0, precision=revdeq.FloatState()),
            None,
            None,
        ),
        (revdeq.Reversible(rtol=0, atol=0), revdeq.UnrolledAdjoint(), None),
        (revdeq.Anderson(), None, None),
        (revdeq.Broyden(), revdeq.PhantomAdjoint(), None),
    ],
    ids=["reversible", "line", "float-state", "autodiff", "anderson", "phantom"],
)
def test_no_nan_is_created_and_masked(x64, getkey, solver, adjoint, unroll):
    # Under `jax_debug_nans` any NaN raises where it is made, even if a `where` or a
    # frozen step would discard it later. The batch stops at different steps.
    cell, z0, _ = array_problem(getkey())
    xs = jax.random.normal(getkey(), (3, 6)) * jnp.array([[0.1], [1.0], [4.0]])

    def loss(cell):
        def one(x):
            sol = revdeq.solve(
                cell, z0, x, solver=solver, adjoint=adjoint, max_steps=10, unroll=unroll
            )
            return sol.value

        return jnp.sum(jnp.sin(jax.vmap(one)(xs)))

    with jax.debug_nans(True):
        grads = eqx.filter_jit(eqx.filter_grad(loss))(cell)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jtu.tree_leaves(grads))


def test_bounded_implicit_solve_reports_its_residual(x64, getkey):
    """A linear solve with zero tolerances runs its budget without warning, and
    `on_backward_residual` gets its true residual: tiny once GMRES spans the space,
    larger (and matching a larger gradient error) when it cannot."""
    import lineax as lx

    cell, z0, x = array_problem(getkey())
    cot = jax.random.normal(getkey(), z0.shape)
    solver = revdeq.Anderson(rtol=1e-13, atol=1e-13)
    truth, errors, residuals = None, [], []
    for restart in (1, z0.size):
        reported = []
        bounded = lx.GMRES(rtol=0, atol=0, restart=restart, max_steps=2)
        adjoint = revdeq.ImplicitAdjoint(bounded, on_backward_residual=reported.append)

        def out(cell, x):
            sol = revdeq.solve(
                cell, z0, x, solver=solver, adjoint=adjoint, max_steps=100
            )
            return sol.value

        z_star, vjp = eqx.filter_vjp(out, cell, x)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            got = vjp(cot)
            jax.effects_barrier()
        truth = dense_implicit_gradient(cell, z_star, x, cot)
        errors.append(relative_error(got, truth))
        (residual,) = reported
        residuals.append(float(residual))
    assert residuals[1] < 1e-10 and errors[1] < 1e-8
    assert 1e-4 < residuals[0] <= 1 and errors[0] > 1e-4


# optimistix's fixed-point JVP cases (its tests/test_fixed_point.py): the problems
# `cos(c·z)` and `exp(−c·z)` on a pytree state, solved to 1e-6 by `optx.fixed_point`
# with `optx.ImplicitAdjoint`, its JVP against a forward finite difference with
# `ε = √eps · scale`, at its tolerances (1e-3).
_OPTX_PROBLEMS = {
    "cos": lambda tree, c: jtu.tree_map(lambda z: jnp.cos(c * z), tree),
    "exponential": lambda tree, c: jtu.tree_map(lambda z: jnp.exp(-c * z), tree),
}
_OPTX_SOLVERS = {
    "FixedPointIteration": revdeq.FixedPointIteration(rtol=1e-6, atol=1e-6),
    "Anderson": revdeq.Anderson(rtol=1e-6, atol=1e-6),
    "Broyden": revdeq.Broyden(rtol=1e-6, atol=1e-6),
}


def _optx_jvp(problem, solver, init, c, t_init, t_c):
    def fixed_point(init, c):
        return optx.fixed_point(
            problem,
            solver,
            init,
            args=c,
            max_steps=10_000,
            adjoint=optx.ImplicitAdjoint(),
            throw=False,
        ).value

    # optimistix's finite difference: forward, with ε = √eps · the largest primal.
    scale = max([1.0] + [float(jnp.max(jnp.abs(p))) for p in jtu.tree_leaves(init)])
    eps = float(jnp.sqrt(jnp.finfo(jnp.float64).eps)) * max(scale, abs(float(c)))
    out = fixed_point(init, c)
    moved = fixed_point(
        jtu.tree_map(lambda p, t: p + eps * t, init, t_init), c + eps * t_c
    )
    t_expected = jtu.tree_map(lambda a, b: (a - b) / eps, moved, out)
    _, t_out = eqx.filter_jvp(fixed_point, (init, c), (t_init, t_c))
    return t_out, t_expected


@pytest.mark.parametrize("problem", _OPTX_PROBLEMS)
@pytest.mark.parametrize(
    "solver",
    # The solvers that passed optimistix's suite as it stands run in the slow set.
    [
        pytest.param(name, marks=[] if name == "Broyden" else [pytest.mark.slow])
        for name in _OPTX_SOLVERS
    ],
)
@pytest.mark.parametrize("start", ["optimistix", "generic"])
def test_optimistix_fixed_point_jvp(x64, getkey, problem, solver, start):
    # optimistix's start is uniform, 0.5 everywhere. From it, Broyden's secant
    # updates learn the Jacobian only along the uniform direction and converge there
    # in 4 steps; the finite difference's tangent lies mostly across it, where the
    # iterate moves at the plain iteration's rate (|f'| ≈ 0.67) and, at 1e-8 below
    # the tolerance, is never seen by the stopping test. The solve's output then
    # depends on its start by about 1e-2, so the finite difference in the start is
    # not the fixed point's (whose derivative in the start is 0). The derivative in
    # `c` is checked there, and the whole JVP from a generic start.
    init = ({"a": 0.5 * jnp.ones((3, 2, 4))}, 0.5 * jnp.ones(4))
    if start == "generic":
        init = jtu.tree_map(lambda p: jax.random.uniform(getkey(), p.shape), init)
    t_init = jtu.tree_map(lambda p: jax.random.normal(getkey(), p.shape), init)
    if start == "optimistix" and solver == "Broyden":
        t_init = jtu.tree_map(jnp.zeros_like, t_init)
    t_c = jax.random.normal(getkey(), ())
    t_out, t_expected = _optx_jvp(
        _OPTX_PROBLEMS[problem], _OPTX_SOLVERS[solver], init, 1.0, t_init, t_c
    )
    assert bool(eqx.tree_equal(t_out, t_expected, rtol=1e-3, atol=1e-3))
