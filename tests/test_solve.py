"""The public contract of `revdeq.solve`: results, statistics, errors, interop."""

import functools
import textwrap

import equinox as eqx
import jax
import jax.flatten_util
import jax.numpy as jnp
import optimistix as optx
import pytest

import revdeq
import revdeq._adjoint.base as adjoint_base
from revdeq.testing import TanhCell, plain_reversible_loop, relative_error

from .helpers import PytreeCell, array_problem, default_float, run_script


pytestmark = pytest.mark.usefixtures("x64_on_and_off")

SOLVERS = [
    revdeq.Reversible(beta=0.8),
    revdeq.Reversible(beta=0.5, precision=revdeq.FloatState()),
    revdeq.FixedPointIteration(damping=0.9),
    revdeq.Anderson(history=4),
    revdeq.Broyden(history=6),
]


def _problem(key, dim=5):
    return array_problem(key, default_float(), dim=dim, scale=0.6, start=0.0)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_converges_to_a_fixed_point(getkey, solver):
    cell, z0, x = _problem(getkey())
    sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=100)
    assert sol.result == revdeq.RESULTS.successful
    assert jnp.max(jnp.abs(cell(sol.value, x) - sol.value)) < 1e-3
    assert sol.stats["residual"] < 1e-3
    assert 1 <= sol.stats["num_steps"] < 100
    assert sol.stats["num_fn_evals"] >= sol.stats["num_steps"]


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_zero_tolerance_runs_exactly_max_steps(getkey, solver):
    cell, z0, x = _problem(getkey())
    solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver, (0.0, 0.0))
    sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=7)
    assert sol.stats["num_steps"] == 7
    # The budget is the whole plan: completing it is a success.
    assert sol.result == revdeq.RESULTS.successful


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_unconverged_solve_reports_max_steps(getkey, solver):
    cell, z0, x = _problem(getkey())
    solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver, (1e-12, 0.0))
    sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=2)
    # Reported, never raised, and the advice fits: more steps would help.
    assert sol.result == revdeq.RESULTS.max_steps_reached
    assert "increasing `max_steps`" in revdeq.RESULTS[sol.result]


def test_fn_evals_per_solver(getkey):
    cell, z0, x = _problem(getkey())
    steps = 6

    def evals(solver):
        solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver, (0.0, 0.0))
        sol = revdeq.solve(cell, z0, x, solver=solver, max_steps=steps)
        return int(sol.stats["num_fn_evals"])

    assert evals(revdeq.FixedPointIteration()) == steps
    assert evals(revdeq.Anderson()) == steps  # no wasted evaluation
    assert evals(revdeq.Broyden()) == steps + 1
    assert evals(revdeq.Reversible()) == 2 * steps + 1


def test_anderson_is_faster_than_plain_iteration(getkey):
    cell, z0, x = _problem(getkey(), dim=20)
    tight = dict(rtol=1e-6, atol=1e-7)
    plain = revdeq.solve(
        cell, z0, x, solver=revdeq.FixedPointIteration(**tight), max_steps=200
    )
    anderson = revdeq.solve(cell, z0, x, solver=revdeq.Anderson(**tight), max_steps=200)
    assert anderson.stats["num_steps"] < plain.stats["num_steps"]


def test_vmap_statistics_are_per_sample(getkey):
    cell, z0, _ = _problem(getkey())
    # Inputs of very different size need different numbers of steps.
    xs = jnp.stack([jnp.zeros(5), 3.0 * jnp.ones(5)])
    solve = jax.vmap(
        lambda x: revdeq.solve(
            cell, z0, x, solver=revdeq.FixedPointIteration(), max_steps=100
        )
    )
    sol = solve(xs)
    assert sol.stats["num_steps"].shape == (2,)
    assert sol.stats["num_steps"][0] != sol.stats["num_steps"][1]
    single = revdeq.solve(
        cell, z0, xs[1], solver=revdeq.FixedPointIteration(), max_steps=100
    )
    assert sol.stats["num_steps"][1] == single.stats["num_steps"]
    assert jnp.allclose(sol.value[1], single.value)


def test_pytree_state_and_closure(getkey):
    weight = 0.5 * jax.random.normal(getkey(), (3, 3)) / 3

    def fn(z, args):  # closes over `weight`
        return {"u": jnp.tanh(weight @ z["v"] + args), "v": 0.5 * z["u"]}

    z0 = {"u": jnp.zeros(3), "v": jnp.zeros(3)}
    sol = revdeq.solve(fn, z0, jnp.ones(3), max_steps=40)
    assert sol.value["u"].shape == (3,)
    grad = jax.grad(
        lambda w: jnp.sum(
            revdeq.solve(
                lambda z, a: {"u": jnp.tanh(w @ z["v"] + a), "v": 0.5 * z["u"]},
                z0,
                jnp.ones(3),
                max_steps=40,
            ).value["u"]
        )
    )(weight)
    assert jnp.all(jnp.isfinite(grad)) and jnp.any(grad != 0)


def test_nonfinite_raises_or_reports():
    def fn(z, x):
        return z + jnp.nan * x

    z0, x = jnp.zeros(2), jnp.ones(2)
    sol = revdeq.solve(
        fn, z0, x, solver=revdeq.FixedPointIteration(), max_steps=5, throw=False
    )
    assert sol.result == revdeq.RESULTS.nonfinite_value
    with pytest.raises(Exception, match="non-finite value"):
        revdeq.solve(fn, z0, x, solver=revdeq.FixedPointIteration(), max_steps=5)


def test_divergence_is_reported():
    sol = revdeq.solve(
        lambda z, x: 3.0 * z + x,
        jnp.zeros(2),
        jnp.ones(2),
        solver=revdeq.FixedPointIteration(),
        max_steps=60,
        throw=False,
    )
    assert sol.result == revdeq.RESULTS.diverged
    # ~3^9 growth of the error from its best is enough to call it.
    assert sol.stats["num_steps"] < 15


def test_exact_state_out_of_range_is_reported():
    # The state grows far beyond the bound set from z₀ and f(z₀).
    sol = revdeq.solve(
        lambda z, x: 4.0 * z + x,
        jnp.zeros(2),
        jnp.ones(2),
        solver=revdeq.Reversible(rtol=0, atol=0),
        max_steps=20,
        throw=False,
    )
    # A lost state stays lost, so the residual stops growing and the loss, not a
    # divergence, is what the result names.
    assert sol.result == revdeq.RESULTS.state_out_of_range


def _jumping_cell(jump):
    """f(z₀) sets the exact state's scale; once the state moves, f jumps to
    `jump · x`, far beyond it."""

    def cell(z, x):
        return jnp.where(jnp.sum(jnp.abs(z)) > 0.1, jump * x, x)

    return cell


@pytest.mark.parametrize(
    "jump, expected",
    [
        (1e6, revdeq.RESULTS.state_out_of_range),
        (jnp.nan, revdeq.RESULTS.nonfinite_value),
    ],
)
def test_exact_state_tells_range_errors_from_nonfinite_cells(jump, expected):
    sol = revdeq.solve(
        _jumping_cell(jump),
        jnp.zeros(2),
        jnp.ones(2),
        solver=revdeq.Reversible(rtol=0, atol=0),
        max_steps=20,
        throw=False,
    )
    assert sol.result == expected


def test_gradient_of_a_lost_exact_state_warns():
    # Under throw=False the forward only reports the loss in its result code; the
    # backward pass must not return the meaningless gradient silently.
    def loss(x):
        solver = revdeq.Reversible(rtol=0, atol=0)
        sol = revdeq.solve(
            _jumping_cell(1e6), jnp.zeros(2), x, solver=solver, max_steps=8, throw=False
        )
        return jnp.sum(sol.value)

    with pytest.warns(RuntimeWarning, match="left the range"):
        jax.block_until_ready(jax.grad(loss)(jnp.ones(2)))


def test_backward_warnings_call_the_host_only_on_failure(monkeypatch):
    # Under throw=False the backward pass warns from a host callback. It must be
    # called only when a check fails: called at every step, it made a small
    # training step eight times slower.
    calls = []
    warn_if = adjoint_base._warn_if

    def counted(*args):
        calls.append(args)
        return warn_if(*args)

    monkeypatch.setattr(adjoint_base, "_warn_if", counted)

    def loss(xs, jump):
        def one(x):
            solver = revdeq.Reversible(rtol=0, atol=0)
            sol = revdeq.solve(
                _jumping_cell(jump),
                jnp.zeros(2),
                x,
                solver=solver,
                max_steps=8,
                throw=False,
            )
            return jnp.sum(sol.value)

        return jnp.sum(jax.vmap(one)(xs))

    xs = jnp.array([[1.0, 1.0], [0.5, -0.5]])
    jax.block_until_ready(jax.grad(functools.partial(loss, jump=1.0))(xs))
    assert calls == []
    with pytest.warns(RuntimeWarning, match="left the range"):
        jax.block_until_ready(jax.grad(functools.partial(loss, jump=1e6))(xs))
    assert calls


def test_exact_state_loss_is_reported_per_sample():
    # Under vmap, the sample whose cell jumps out of range reports it; the others
    # are solved exactly as when alone.
    def cell(z, x):
        return jnp.where(jnp.sum(jnp.abs(z)) > 0.1, x[0] * x, jnp.tanh(0.5 * z + x))

    solver = revdeq.Reversible(rtol=0, atol=0)
    xs = jnp.array([[1e6, 1.0], [0.3, -0.2], [0.05, 0.01]])

    def solve(x):
        return revdeq.solve(
            cell, jnp.zeros(2), x, solver=solver, max_steps=12, throw=False
        )

    batched = jax.vmap(solve)(xs)
    lost = batched.result == revdeq.RESULTS.state_out_of_range
    ran = batched.result == revdeq.RESULTS.successful
    assert lost.tolist() == [True, False, False]
    assert ran.tolist() == [False, True, True]
    for i in (1, 2):
        alone = solve(xs[i])
        assert jnp.array_equal(batched.value[i], alone.value)
        assert batched.stats["num_steps"][i] == alone.stats["num_steps"] == 12


@pytest.mark.parametrize("beta", [0.0, 1.0, 2.0, -0.5, 2.5])
def test_bad_beta(beta):
    with pytest.raises(ValueError, match="`beta`"):
        revdeq.Reversible(beta=beta)


@pytest.mark.parametrize(
    "make",
    [
        lambda: revdeq.Anderson(rtol=-1.0),
        lambda: revdeq.Broyden(atol=-1e-3),
        # Every solver's tolerances are checked by their common base.
        lambda: revdeq.Reversible(rtol=-1e-4),
        lambda: revdeq.FixedPointIteration(atol=-1.0),
        lambda: revdeq.FixedPointIteration(damping=0.0),
        lambda: revdeq.Anderson(history=0),
        lambda: revdeq.PhantomAdjoint(steps=0),
        lambda: revdeq.PhantomAdjoint(damping=1.5),
    ],
)
def test_bad_configuration(make):
    with pytest.raises(ValueError, match="`(rtol|atol|damping|history|steps)`"):
        make()


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: revdeq.FloatState(jnp.int32), "dtype"),
        (lambda: revdeq.FloatState(jnp.float64), "dtype"),
        (lambda: _deq(state_dtype=jnp.float64), "state_dtype"),
        (lambda: _deq(compute_dtype=jnp.int8), "compute_dtype"),
    ],
)
def test_bad_dtype(make, argument):
    # float64 without x64 would silently compute in float32: refused, by name.
    with jax.enable_x64(False), pytest.raises(ValueError, match=f"`{argument}"):
        make()


def _deq(**dtypes):
    cell = revdeq.nn.MLPCell(dim=4, hidden=8, key=jax.random.key(0))
    solver, adjoint = revdeq.Reversible(), revdeq.ReversibleAdjoint()
    return revdeq.nn.DEQ(
        cell, (4,), solver=solver, adjoint=adjoint, max_steps=2, **dtypes
    )


@pytest.mark.parametrize("max_steps", [0, -3, True])
def test_bad_max_steps(max_steps):
    with pytest.raises(ValueError, match="`max_steps`"):
        revdeq.solve(lambda z, x: z, jnp.zeros(2), None, max_steps=max_steps)
    with pytest.raises(ValueError, match="`max_steps`"):
        revdeq.reconstruction_error(
            lambda z, x: z,
            jnp.zeros(2),
            None,
            solver=revdeq.Reversible(),
            max_steps=max_steps,
        )


@pytest.mark.parametrize(
    "fn, match",
    [
        (lambda z, x: jnp.zeros(3), "shapes and dtypes"),
        (lambda z, x: z.astype(jnp.float16), "shapes and dtypes"),
        (lambda z, x: (z, z), "same structure"),
    ],
)
def test_bad_fn_output(fn, match):
    with pytest.raises(ValueError, match=match):
        revdeq.solve(fn, jnp.zeros(2), None, max_steps=3)


def test_integer_z0():
    with pytest.raises(ValueError, match="`z0`"):
        revdeq.solve(lambda z, x: z, jnp.zeros(2, jnp.int32), None, max_steps=3)


def test_complex_z0_is_refused():
    # The exact state and the reversible reconstruction are defined on reals.
    z0 = {"w": jnp.zeros(2), "c": jnp.zeros(2, complex)}
    with pytest.raises(ValueError, match=r"`z0` must be real.*`z0\['c'\]`"):
        revdeq.solve(lambda z, x: z, z0, None, max_steps=3)


def test_reversible_adjoint_needs_reversible_solver():
    with pytest.raises(ValueError, match="ReversibleAdjoint"):
        revdeq.solve(
            lambda z, x: 0.5 * z,
            jnp.zeros(2),
            None,
            solver=revdeq.Anderson(),
            adjoint=revdeq.ReversibleAdjoint(),
            max_steps=3,
        )


def test_float64_state_needs_x64():
    with jax.enable_x64(False), pytest.raises(ValueError, match="jax_enable_x64"):
        revdeq.FloatState(jnp.float64)


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_optimistix_interop(getkey, solver):
    cell, z0, x = _problem(getkey())
    ours = revdeq.solve(cell, z0, x, solver=solver, max_steps=100)
    theirs = optx.fixed_point(cell, solver, z0, x, max_steps=100)
    assert jnp.allclose(ours.value, theirs.value, atol=1e-5)
    assert jnp.max(jnp.abs(cell(theirs.value, x) - theirs.value)) < 1e-3


@pytest.mark.parametrize("norm", [None, optx.rms_norm], ids=["default", "rms"])
def test_tolerances_stop_where_optimistix_stops(norm):
    # One element near zero converges slowly relative to itself: optimistix's
    # elementwise test waits for it, a whole-state test would not.
    dtype = default_float()
    x = {"a": jnp.array([1e-3, 2.0, -2.0, 3.0], dtype), "b": jnp.full((3,), 2.0, dtype)}
    z0 = jax.tree.map(jnp.zeros_like, x)

    def cell(z, x):
        return jax.tree.map(lambda zi, xi: jnp.tanh(0.5 * zi + xi), z, x)

    tolerances = dict(rtol=1e-3, atol=1e-6)
    norms = {} if norm is None else dict(norm=norm)
    ours = revdeq.solve(
        cell, z0, x, solver=revdeq.FixedPointIteration(**tolerances, **norms),
        adjoint=revdeq.ImplicitAdjoint(), max_steps=100,
    )  # fmt: skip
    theirs = optx.fixed_point(
        cell, optx.FixedPointIteration(**tolerances, **norms), z0, x, max_steps=100
    )
    assert ours.stats["num_steps"] == theirs.stats["num_steps"]
    assert eqx.tree_equal(ours.value, theirs.value)

    def rms(tree):
        return jnp.sqrt(jnp.mean(jax.flatten_util.ravel_pytree(tree)[0] ** 2))

    def whole_state_steps():  # the other rule: one rms over the whole state
        z = z0
        for step in range(1, 101):
            fz = cell(z, x)
            diff = jax.tree.map(jnp.subtract, fz, z)
            if rms(diff) < tolerances["atol"] + tolerances["rtol"] * rms(fz):
                return step
            z = fz

    if norm is None:
        assert whole_state_steps() < theirs.stats["num_steps"]


def test_an_element_exactly_at_zero_converges_without_atol():
    # Its scale `rtol · |f(z)|` is zero, and so is its difference: converged, and
    # no 0/0 is ever formed (optimistix's own test would be NaN there).
    def cell(z, x):
        return jnp.tanh(0.5 * z + x)

    x = jnp.array([0.0, 1.0], default_float())
    solver = revdeq.FixedPointIteration(rtol=1e-4, atol=0)
    with jax.debug_nans(True):
        sol = revdeq.solve(
            cell, jnp.zeros_like(x), x, solver=solver,
            adjoint=revdeq.ImplicitAdjoint(), max_steps=100,
        )  # fmt: skip
    assert sol.result == revdeq.RESULTS.successful
    assert sol.stats["num_steps"] < 100


@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_optimistix_implicit_jvp_with_aux_on_a_pytree(getkey, solver):
    # optimistix differentiates the solution, not the solver's path, so even a
    # quasi-Newton path that jumps gives the implicit-function derivative, accurate
    # to the tolerance of the solve.
    dtype = default_float()
    tol = 1e-11 if dtype == jnp.float64 else 1e-6
    solver = eqx.tree_at(lambda s: (s.rtol, s.atol), solver, (tol, tol))
    cell = PytreeCell(3, 2, key=getkey(), dtype=dtype)
    z0 = {"a": jnp.zeros(3, dtype), "b": jnp.zeros((2, 2), dtype)}

    def solve(x):
        def fn(z, x):
            return cell(z, x), jnp.sum(z["a"])

        return optx.fixed_point(
            fn, solver, z0, x, has_aux=True, max_steps=300,
            adjoint=optx.ImplicitAdjoint(),
        )  # fmt: skip

    x = {"a": jnp.ones(3, dtype), "b": jnp.full((2, 2), 0.1, dtype)}
    dx = jax.tree.map(lambda a: jax.random.normal(getkey(), a.shape, dtype), x)
    sol, dsol = jax.jvp(solve, (x,), (dx,))
    z, dz = sol.value, dsol.value
    # As with optimistix's own solvers, `aux` is of the last evaluation of `fn`,
    # which may be at the iterate before the returned one.
    assert relative_error(sol.aux, jnp.sum(z["a"])) < 10 * tol
    assert relative_error(cell(z, x), z) < 10 * tol
    # The truth: dz = (I − ∂f/∂z)⁻¹ ∂f/∂x dx by a dense solve at the solution.
    flat, unravel = jax.flatten_util.ravel_pytree(z)
    jac = jax.jacfwd(lambda v: jax.flatten_util.ravel_pytree(cell(unravel(v), x))[0])
    rhs, _ = jax.flatten_util.ravel_pytree(
        jax.jvp(lambda a: cell(z, a), (x,), (dx,))[1]
    )
    truth = unravel(jnp.linalg.solve(jnp.eye(flat.size, dtype=dtype) - jac(flat), rhs))
    assert relative_error(dz, truth) < 100 * tol


def test_optimistix_can_differentiate_through_the_exact_state(getkey):
    # optimistix's drivers do not say whether they differentiate the loop, so the
    # exact state keeps its straight-through value: the gradient is not lost.
    cell, z0, x = _problem(getkey())
    solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)

    def theirs(x):
        adjoint = optx.RecursiveCheckpointAdjoint()
        sol = optx.fixed_point(
            cell, solver, z0, x, max_steps=6, adjoint=adjoint, throw=False
        )
        return jnp.sum(sol.value**2)

    def truth(x):
        return jnp.sum(plain_reversible_loop(cell, z0, x, 0.8, 6) ** 2)

    got, want = jax.grad(theirs)(x), jax.grad(truth)(x)
    assert jnp.linalg.norm(got - want) <= 1e-5 * jnp.linalg.norm(want)


_CALLBACKS_SCRIPT = textwrap.dedent(
    """
    import json
    import jax, jax.numpy as jnp
    import revdeq

    def loss(x):
        cell = lambda z, x: jnp.tanh(0.5 * z + x)
        return jnp.sum(revdeq.solve(cell, jnp.zeros(4), x, max_steps=6).value ** 2)

    grad = jax.value_and_grad(lambda xs: jnp.sum(jax.vmap(loss)(xs)))
    text = str(jax.make_jaxpr(grad)(jnp.ones((3, 4))))
    kinds = ("pure_callback", "debug_callback", "io_callback")
    print(json.dumps([kind for kind in kinds if kind in text]))
    """
)


@pytest.mark.slow  # compiles and inspects a whole training step
def test_eqx_on_error_nan_leaves_no_host_callback():
    # On CPU a program with a host callback runs synchronously. The run-time checks
    # are callbacks by default; `EQX_ON_ERROR=nan`, the way out the README gives,
    # must leave none in a reversible solve and its gradient.
    assert run_script(_CALLBACKS_SCRIPT, env={"EQX_ON_ERROR": "raise"}) == [
        "pure_callback"
    ]
    assert run_script(_CALLBACKS_SCRIPT, env={"EQX_ON_ERROR": "nan"}) == []


def test_throw_false_reports_reconstruction_drift(getkey):
    # A float32 state cannot reverse 30 steps at beta = 0.9: the certificate says so.
    cell, z0, x = _problem(getkey())
    solver = revdeq.Reversible(beta=0.9, rtol=0, atol=0, precision=revdeq.FloatState())
    drift = revdeq.reconstruction_error(cell, z0, x, solver=solver, max_steps=30)
    assert drift > 1e-3

    def loss(x):
        return jnp.sum(revdeq.solve(cell, z0, x, solver=solver, max_steps=30).value)

    with pytest.raises(Exception, match="drifted.*loses bits at every step"):
        jax.block_until_ready(jax.grad(loss)(x))
    exact = revdeq.Reversible(beta=0.9, rtol=0, atol=0)
    assert revdeq.reconstruction_error(cell, z0, x, solver=exact, max_steps=30) == 0


@pytest.mark.parametrize(
    "solver",
    [revdeq.Anderson(rtol=0, atol=0), revdeq.Broyden(rtol=0, atol=0)],
    ids=lambda s: type(s).__name__,
)
def test_rowwise_solver_solves_each_row_on_its_own(getkey, solver):
    """On a cell that acts on each row separately, a rowwise solve of the whole state
    equals separate solves of its rows."""
    dtype = default_float()
    cell = TanhCell(4, key=getkey(), dtype=dtype)
    x = {
        "a": jax.random.normal(getkey(), (5, 4), dtype),
        "b": jax.random.normal(getkey(), (5,), dtype),
    }

    def rows_cell(z, x):
        return {"a": jax.vmap(cell)(z["a"], x["a"]), "b": jnp.tanh(z["b"] + x["b"])}

    def solve(s, fn, x):
        z0 = jax.tree.map(jnp.zeros_like, x)
        return revdeq.solve(
            fn, z0, x, solver=s, adjoint=revdeq.ImplicitAdjoint(), max_steps=8
        ).value

    rowwise = solve(eqx.tree_at(lambda s: s.rowwise, solver, True), rows_cell, x)
    separate = jax.vmap(
        lambda x: solve(
            solver,
            lambda z, x: {"a": cell(z["a"], x["a"]), "b": jnp.tanh(z["b"] + x["b"])},
            x,
        )
    )(x)
    # Equal up to rounding, which the least squares amplifies.
    tol = 1e-5 if dtype == jnp.float32 else 1e-12
    assert relative_error(rowwise, separate) < tol
    joint = solve(solver, rows_cell, x)  # one least-squares problem: different
    assert relative_error(joint, separate) > 100 * tol


def test_converged_solve_does_not_report_divergence(getkey):
    """Long past convergence, the error wanders at rounding level: not divergence."""
    cell = TanhCell(6, key=getkey(), dtype=default_float())
    xs = jax.random.normal(getkey(), (8, 6), default_float())
    solver = revdeq.Anderson(rtol=0, atol=0)
    sol = jax.vmap(
        lambda x: revdeq.solve(
            cell, jnp.zeros_like(x), x, solver=solver, max_steps=200, throw=False
        )
    )(xs)
    assert jnp.all(sol.result == revdeq.RESULTS.successful)


def test_anderson_handles_states_whose_squares_overflow():
    """Residuals near 1e25 square past float32's range; Anderson's Gram matrix is
    built from scaled residuals, so the solve still converges."""
    target = jnp.array([3e25, -1e25, 2e25], jnp.float32)

    def cell(z, x):
        return 0.5 * z + x

    solver = revdeq.Anderson(rtol=1e-5, atol=0)
    sol = revdeq.solve(
        cell, jnp.zeros(3, jnp.float32), 0.5 * target, solver=solver, max_steps=20
    )
    assert sol.result == revdeq.RESULTS.successful
    assert relative_error(sol.value, target) < 1e-5
