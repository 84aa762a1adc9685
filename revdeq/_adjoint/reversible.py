import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal, NamedTuple, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree

from .._custom_types import Args, Fn, Y
from .._iterate import Iteration, iterate, resolve_unroll
from .._solution import RESULTS
from .._solver.base import AbstractSolver
from .._solver.reversible import Reversible, ReversiblePair
from .._tree import tree_scale, tree_zeros_for_none
from .base import AbstractAdjoint, report_failure


class ReversibleAdjoint(AbstractAdjoint):
    """Exact gradients by running the reversible iteration backwards.

    The backward pass rebuilds each state `(yₙ, zₙ)` from `(yₙ₊₁, zₙ₊₁)` instead of
    storing it, so memory stays constant in the number of steps. Each reverse step
    takes two vector-Jacobian products of `f`, at `yₙ₊₁` and at the rebuilt `zₙ`, and
    their primal outputs are exactly the values the reconstruction needs: the
    backward evaluates `f` twice per step and no more. Gradients are exact with
    respect to `fn`'s parameters, `args` and `z0`. Only valid with
    [`revdeq.Reversible`][].

    **The reconstruction certificate.** The backward pass ends at a rebuilt `z₀` and
    compares it with the true one. The relative drift `rms(rebuilt − true) /
    rms(output)` above `drift_tolerance` means the gradient is not exact: it raises
    under `throw=True` and warns otherwise. With the default
    [`revdeq.ExactState`][] precision the drift is exactly zero whenever `fn`'s
    evaluations in the two passes agree within its guard radius, whatever XLA
    makes of them (see "What exactness assumes" in the precision guide); a forward
    state that left the precision's range is reported the same way.

    **Arguments:**

    - `drift_tolerance`: the largest tolerated relative drift; `None` means 0 for
        a bit-exact precision such as `ExactState` (any drift means the exactness
        it promises failed) and the square root of the machine epsilon of `z0`'s
        dtype otherwise, and `float("inf")` turns the check off (a NaN drift fails
        any finite tolerance).

    !!! Example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=8, hidden=16, key=jax.random.key(0))
        x = jnp.ones(8)


        def loss(cell, x):
            sol = revdeq.solve(cell, jnp.zeros(8), x, solver=revdeq.Reversible(),
                               adjoint=revdeq.ReversibleAdjoint(), max_steps=16)
            return jnp.sum(sol.value ** 2)


        grads = eqx.filter_grad(loss)(cell, x)
        ```
    """

    drift_tolerance: float | None = None

    def apply(
        self,
        fn: Fn,
        solver: AbstractSolver,
        z0: Y,
        args: Args,
        *,
        max_steps: int,
        unroll: bool,
        throw: bool,
    ) -> Iteration:
        if not isinstance(solver, Reversible):
            raise ValueError(
                "`ReversibleAdjoint` needs `solver=revdeq.Reversible(...)`, got "
                f"`{type(solver).__name__}`. For other solvers use `ImplicitAdjoint`, "
                "`PhantomAdjoint` or `UnrolledAdjoint`."
            )
        tolerance = self.drift_tolerance
        if tolerance is None and solver.precision.bit_exact:
            tolerance = 0.0
        elif tolerance is None:
            dtype = jnp.result_type(*jtu.tree_leaves(z0))
            tolerance = math.sqrt(float(jnp.finfo(dtype).eps))
        steps = (max_steps, unroll)
        return _reversible_solve((fn, z0, args), solver, steps, tolerance, throw)


def reverse_pass(
    fn: Fn,
    args: Args,
    solver: Reversible,
    final_pair: ReversiblePair,
    num_steps: Int[Array, ""],
    cotangent: Y,
    z0: Y,
    *,
    max_steps: int,
    unroll: bool,
    wrt: PyTree[bool] | Callable[[Any], bool] = True,
) -> tuple[ReversiblePair, Y, PyTree]:
    """Walk `num_steps` reversible steps back from `final_pair`, accumulating the
    cotangents of `(fn, args)` and of the state.

    Each reverse step takes two VJPs of `fn`, whose primal outputs rebuild the
    previous state (by [`revdeq.Reversible`][]'s `undo_z` and `undo_y`). The last
    one is taken at the true `z0`, the point the forward pass evaluated. Under
    `vmap` the loop runs batched, with the cotangents of unbatched parameters summed
    over the batch inside each step rather than kept per sample. With `unroll=True`
    the loop is straight-line code over the `max_steps` steps the forward pass may
    have taken, each one masked by `num_steps`.

    `wrt` is an [`equinox.partition`][] filter on `(fn, args)`: of the
    floating-point arrays, those it selects are differentiated and the others held
    constant, so that no work goes into cotangents that are not wanted.

    Returns the rebuilt initial pair, the cotangent of `z0` and that of the
    floating-point arrays of `(fn, args)` that `wrt` selects (`None` elsewhere).
    """
    selected, rest = eqx.partition((fn, args), wrt)
    diff, constant = eqx.partition(selected, eqx.is_inexact_array)
    inputs = _ReverseInputs(
        diff,
        eqx.combine(constant, rest),
        _ReverseStart(final_pair, num_steps, cotangent, z0),
    )
    dynamic, static = eqx.partition(inputs, eqx.is_array)
    reverse = functools.partial(_reverse_loop, solver, static, max_steps, unroll)

    @jax.custom_batching.custom_vmap
    def run(dynamic: _ReverseInputs) -> tuple[ReversiblePair, Y, PyTree]:
        return reverse(dynamic, axis_size=None, batched=None)

    @run.def_vmap
    def _(
        axis_size: int, in_batched: Sequence[_ReverseInputs], dynamic: _ReverseInputs
    ):
        (batched,) = in_batched
        out = reverse(dynamic, axis_size, batched)
        pair, z0_grad, grads = out
        every = jtu.tree_map(lambda _: True, (pair, z0_grad))
        return out, (*every, _axes(grads, batched.diff, True, False))

    return run(dynamic)


class _ReverseStart(NamedTuple):
    """Where the reverse loop starts, and the true `z0` where it ends."""

    final_pair: ReversiblePair
    num_steps: Int[Array, ""]
    cotangent: Y
    z0: Y


class _ReverseInputs(NamedTuple):
    """What the reverse loop reads: `(fn, args)` split into the arrays it
    differentiates, `diff`, and the rest, held constant."""

    diff: PyTree
    rest: PyTree
    start: _ReverseStart


_A = TypeVar("_A")


def _axes(tree: PyTree, batched: PyTree[bool], yes: _A, no: _A) -> PyTree[_A | None]:
    """`yes` at the leaves of `tree` whose input was batched, `no` elsewhere, and
    `None` where `tree` has no leaf."""
    return jtu.tree_map(
        lambda x, b: None if x is None else (yes if b else no),
        tree,
        batched,
        is_leaf=lambda x: x is None,
    )


class _ReverseCarry(eqx.Module):
    """The reverse loop's carry: the pair being rebuilt and the cotangents so far."""

    pair: ReversiblePair
    ybar: PyTree
    zbar: PyTree
    grads: PyTree


def _reverse_loop(
    solver: Reversible,
    static: _ReverseInputs,
    max_steps: int,
    unroll: bool,
    dynamic: _ReverseInputs,
    axis_size: int | None,
    batched: _ReverseInputs | None,
) -> tuple[ReversiblePair, Y, PyTree]:
    """The reverse loop, on one example (`batched=None`) or on a batch whose
    batched leaves are flagged in `batched`."""
    start = dynamic.start
    if batched is None:
        lift = _identity
    else:
        # The state, step counts, cotangent and z₀ all become batched.
        start = jtu.tree_map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size, *x.shape)),
            start,
            batched.start,
        )
        lift = jax.vmap
    start = eqx.combine(start, static.start)
    vjp_at = _vjp_at(static.rest, dynamic, batched, axis_size, unroll)
    undo = functools.partial(_undo, solver, vjp_at, lift, start.z0)

    grads = jtu.tree_map(jnp.zeros_like, dynamic.diff)
    ybar = jtu.tree_map(jnp.zeros_like, start.cotangent)
    carry = _ReverseCarry(start.final_pair, ybar, start.cotangent, grads)
    if unroll:
        for step in range(max_steps - 1, 0, -1):
            # One carry per step, as in the loop (see `iterate`).
            active = step < start.num_steps
            carry = jax.lax.optimization_barrier(undo(step, carry, active))
    else:

        def body(k_carry: tuple[Int[Array, ""], _ReverseCarry]):
            # One counter for the whole batch: sample `i` undoes step `k − 1` once
            # `k ≤ num_steps[i]`, so every sample addresses its buffers alike.
            k, carry = k_carry
            # Unbatched, the loop condition already says the step is active.
            active = True if axis_size is None else k - 1 < start.num_steps
            return k - 1, undo(k - 1, carry, active)

        init = (jnp.max(start.num_steps), carry)
        _, carry = jax.lax.while_loop(lambda k_carry: k_carry[0] > 1, body, init)
    # Every sample takes at least one step, and all end on the first: it is undone
    # last, where no select is needed to put back the true z₀.
    carry = undo(0, carry, True, first_step=True)
    z0_grad = jtu.tree_map(jnp.add, carry.ybar, carry.zbar)
    return carry.pair, z0_grad, carry.grads


def _undo(
    solver: Reversible,
    vjp_at: Callable,
    lift: Callable[[Callable], Callable],
    z0: Y,
    step: int | Int[Array, ""],
    carry: _ReverseCarry,
    active: Literal[True] | Bool[Array, "*batch"],
    first_step: bool = False,
) -> _ReverseCarry:
    """Undo forward step `step` where `active`, accumulating its cotangents."""
    beta = solver.effective_beta
    decode = lift(solver.decode)
    pair, ybar, zbar, grads = carry.pair, carry.ybar, carry.zbar, carry.grads
    # zₙ₊₁ = c·zₙ + β·f(yₙ₊₁)
    undo_z = lift(lambda p, f: solver.undo_z(p, f, step))
    half = _undo_half(
        vjp_at, undo_z, decode(pair.y), pair, grads, zbar, ybar, active, beta
    )
    pair, grads, zbar, ybar = half
    # yₙ₊₁ = c·yₙ + β·f(zₙ); at the first step, zₙ is the true z₀ that f saw.
    undo_y = lift(lambda p, f: solver.undo_y(p, f, step))
    point = z0 if first_step else decode(pair.z)
    half = _undo_half(vjp_at, undo_y, point, pair, grads, ybar, zbar, active, beta)
    pair, grads, ybar, zbar = half
    return _ReverseCarry(pair, ybar, zbar, grads)


def _undo_half(
    vjp_at: Callable,
    undo: Callable[[ReversiblePair, Y], ReversiblePair],
    point: Y,
    pair: ReversiblePair,
    grads: PyTree,
    bar: Y,
    other_bar: Y,
    active: Literal[True] | Bool[Array, "*batch"],
    beta: float,
) -> tuple[ReversiblePair, PyTree, Y, Y]:
    """Undo the half-step `s ← (1 − β)·s + β·f(point)` where `active`: `f(point)`
    rebuilds the pair by `undo`, and the cotangent `bar` of `s` flows through `f`
    into the parameters' `grads` and the cotangent `other_bar` of `point`."""
    f, vjp = vjp_at(point, grads)
    rebuilt = undo(pair, f)
    dgrads, dpoint = vjp(_select(active, tree_scale(beta, bar), None))
    other_bar = jtu.tree_map(jnp.add, other_bar, dpoint)
    grads = jtu.tree_map(jnp.add, grads, dgrads)
    pair = _select(active, rebuilt, pair)
    bar = _select(active, tree_scale(1 - beta, bar), bar)
    return pair, grads, bar, other_bar


def _vjp_at(
    static_rest: PyTree,
    dynamic: _ReverseInputs,
    batched: _ReverseInputs | None,
    axis_size: int | None,
    unroll: bool,
) -> Callable[[Y, PyTree], tuple[Y, Callable]]:
    """`vjp_at(point, grads)`: `f(point)` and its VJP in `(dynamic.diff, point)`,
    batched like the reverse loop."""
    diff, rest = dynamic.diff, dynamic.rest

    def apply(diff: PyTree, point: Y, rest: PyTree) -> Y:
        fn, args = eqx.combine(diff, rest, static_rest)
        return fn(point, args)

    if batched is None:
        evaluate = apply
    else:
        in_axes = (
            _axes(diff, batched.diff, 0, None),
            0,
            _axes(rest, batched.rest, 0, None),
        )
        evaluate = jax.vmap(apply, in_axes=in_axes, axis_size=axis_size)

    def vjp_at(point: Y, grads: PyTree) -> tuple[Y, Callable]:
        leaves = jtu.tree_leaves(grads)
        if unroll and leaves:
            # Straight-line code has no loop to order the steps: without this
            # dependency XLA runs every step's VJP before accumulating any of
            # their parameter cotangents, and keeps them all alive. (An
            # `optimization_barrier` on `(point, grads)` does not order them.)
            tie = sum(
                (0 * jnp.sum(g.reshape(-1)[:1]).astype(jnp.float32) for g in leaves),
                start=jnp.zeros((), jnp.float32),
            )
            point = jtu.tree_map(lambda p: p + tie.astype(p.dtype), point)
        return jax.vjp(lambda d, p: evaluate(d, p, rest), diff, point)

    return vjp_at


def _identity(f: Callable) -> Callable:
    return f


def _select(
    pred: Literal[True] | Bool[Array, "*batch"],
    on_true: PyTree,
    on_false: PyTree | None,
) -> PyTree:
    """`on_true` where `pred`, else `on_false` (`None` means zeros): per sample along
    the leading axis for a batched `pred`. A Python `True` (an always-active step)
    selects without work."""
    if pred is True:
        return on_true
    if on_false is None:
        on_false = jtu.tree_map(jnp.zeros_like, on_true)

    def leaf(t: Array, f: Array) -> Array:
        mask = pred.reshape(pred.shape + (1,) * (t.ndim - pred.ndim))
        return jnp.where(mask, t, f)

    return jtu.tree_map(leaf, on_true, on_false)


_DRIFTED = (
    "ReversibleAdjoint: the backward pass rebuilt an initial state that drifted from "
    "the true one, so this gradient is not exact. "
)
_DRIFTED_FLOAT = _DRIFTED + (
    "A `FloatState` loses bits at every step: use the default "
    "`precision=ExactState()`, a float64 `FloatState`, fewer steps or a `beta` "
    "further from 1 (or raise `drift_tolerance` knowingly)."
)
_DRIFTED_EXACT = _DRIFTED + (
    "The cell gave other bits in the backward pass than in the forward pass, by more "
    "than `ExactState`'s guard radius (XLA may compile it differently in the two; "
    "see 'What exactness assumes' in the precision guide), and each reversed step "
    "amplifies the difference: raise `ExactState(guard_bits=...)`, or use fewer "
    "steps or a `beta` further from 1 (or raise `drift_tolerance` knowingly)."
)


_LOST = (
    "ReversibleAdjoint: the forward state left the range of its precision or took "
    "in a non-finite value (see the solve's result code), so this gradient is "
    "meaningless. Start from a smaller `z0`, or fix the cell's non-finite output."
)


@eqx.filter_custom_vjp
def _reversible_solve(
    fn_z0_args: tuple[Fn, Y, Args],
    solver: Reversible,
    steps: tuple[int, bool],
    tolerance: float,
    throw: bool,
) -> Iteration:
    fn, z0, args = fn_z0_args
    max_steps, unroll = steps
    return iterate(fn, solver, z0, args, max_steps=max_steps, unroll=unroll)


@_reversible_solve.def_fwd
def _reversible_solve_fwd(
    perturbed: Any,
    fn_z0_args: tuple[Fn, Y, Args],
    solver: Reversible,
    steps: tuple[int, bool],
    tolerance: float,
    throw: bool,
) -> tuple[Iteration, tuple[PyTree, Int[Array, ""]]]:
    del perturbed
    out = _reversible_solve.fn(fn_z0_args, solver, steps, tolerance, throw)
    return out, (out.state, out.num_steps)


@_reversible_solve.def_bwd
def _reversible_solve_bwd(
    saved: tuple[PyTree, Int[Array, ""]],
    grad_obj: Any,
    perturbed: PyTree[bool],
    fn_z0_args: tuple[Fn, Y, Args],
    solver: Reversible,
    steps: tuple[int, bool],
    tolerance: float,
    throw: bool,
) -> tuple[PyTree, Y, PyTree]:
    max_steps, unroll = steps
    final_state, num_steps = saved
    fn, true_z0, args = fn_z0_args
    fn_perturbed, _, args_perturbed = perturbed
    final_pair = solver.final_pair(final_state)
    cotangent = tree_zeros_for_none(grad_obj.value, solver.decode(final_pair.z))
    rebuilt, z0_grad, (fn_grad, args_grad) = reverse_pass(
        fn,
        args,
        solver,
        final_pair,
        num_steps,
        cotangent,
        true_z0,
        max_steps=max_steps,
        unroll=unroll,
        wrt=(fn_perturbed, args_perturbed),
    )
    grads = (fn_grad, z0_grad, args_grad)
    lost = solver.representation_status(final_state) != RESULTS.successful
    failures = [(lost, _LOST)]
    if math.isfinite(tolerance):  # an infinite tolerance turns the check off
        # Written so that a NaN drift counts as drifted.
        drifted = ~(solver.reconstruction_drift(final_state, rebuilt) <= tolerance)
        message = _DRIFTED_EXACT if solver.precision.bit_exact else _DRIFTED_FLOAT
        failures.append((drifted, message))
    return report_failure(grads, failures, throw)


def reconstruction_error(
    fn: Fn,
    z0: Y,
    args: Args,
    *,
    solver: Reversible,
    max_steps: int,
    unroll: bool | None = None,
) -> Float[Array, ""]:
    """Run a reversible solve forward and backward, and measure the reconstruction.

    `unroll` is as in [`revdeq.solve`][].

    **Returns:** the relative drift `rms(rebuilt z₀ − z₀) / rms(output)` that
    [`revdeq.ReversibleAdjoint`][] certifies: exactly 0 with
    [`revdeq.ExactState`][] whenever `fn`'s evaluations in the two passes agree
    within its guard radius, and growing like `|1 − β|^(−steps)` times the state's
    rounding with [`revdeq.FloatState`][] (or times the difference, when `fn` does
    not reproduce itself). XLA compiles `fn` differently in different programs, so
    measure it as the training step runs: under `jax.jit`, batched alike.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=8, hidden=16, key=jax.random.key(0))
        x = jnp.ones(8)

        err = revdeq.reconstruction_error(cell, jnp.zeros(8), x, max_steps=16,
                                          solver=revdeq.Reversible(beta=0.9))
        ```
    """
    unrolled = resolve_unroll(unroll, solver, max_steps)
    fn = eqx.filter_closure_convert(fn, z0, args)
    out = iterate(fn, solver, z0, args, max_steps=max_steps, unroll=unrolled)
    final_pair = solver.final_pair(out.state)
    zero = jtu.tree_map(jnp.zeros_like, out.value)
    rebuilt, _, _ = reverse_pass(
        fn,
        args,
        solver,
        final_pair,
        out.num_steps,
        zero,
        z0,
        max_steps=max_steps,
        unroll=unrolled,
        wrt=False,  # the states alone: no cotangent is wanted
    )
    return solver.reconstruction_drift(out.state, rebuilt)
