"""The one driver loop that every solve runs, whichever adjoint differentiates it."""

from collections.abc import Callable
from typing import NamedTuple

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optimistix as optx
from jaxtyping import Array, Bool, Int, PyTree

from ._custom_types import Args, Fn, Y
from ._solution import RESULTS
from ._solver.base import AbstractSegmentedSolver, AbstractSolver


class AuxFn(eqx.Module):
    """`fn(z, args) -> z` in optimistix's `fn(z, args) -> (z, aux)` convention."""

    fn: Fn

    def __call__(self, z: Y, args: Args) -> tuple[Y, None]:
        return self.fn(z, args), None


class Iteration(eqx.Module):
    """What the driver loop returns."""

    value: Y
    state: PyTree  # the solver's state: an `AbstractSolverState`
    num_steps: Int[Array, ""]
    result: RESULTS
    # Evaluations of `fn` made outside the loop, by the adjoint.
    extra_fn_evals: int = eqx.field(static=True, default=0)

    def stats(self) -> dict[str, Array]:
        progress = self.state.progress
        return {
            "num_steps": self.num_steps,
            "num_fn_evals": progress.num_fn_evals + self.extra_fn_evals,
            "residual": progress.residual,
        }


# A fixed-step solve (`rtol = atol = 0`) of at most this many steps is unrolled
# unless the caller says otherwise: the paper's 2 to 4 steps. Compile time grows
# faster than the steps unrolled.
UNROLL_MAX_STEPS = 4


def resolve_unroll(unroll: bool | None, solver: AbstractSolver, max_steps: int) -> bool:
    """Whether the loop of a solve runs as straight-line code.

    XLA:CPU compiles a convolution inside a loop body far less well than the same
    convolution in straight-line code (jax-ml/jax#12868), so `unroll=None` unrolls
    a fixed-step solve (`rtol = atol = 0`) of at most `UNROLL_MAX_STEPS` steps. An
    unrolled loop evaluates every step, holding the state still once the solve
    terminates, so a solve that can stop early computes all `max_steps` steps.
    """
    _check_max_steps(max_steps)
    if unroll is None:
        return solver.fixed_steps and max_steps <= UNROLL_MAX_STEPS
    if not isinstance(unroll, bool):
        raise ValueError(f"`unroll` must be True, False or None, got {unroll!r}.")
    return unroll


def _check_max_steps(max_steps: object) -> None:
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}.")


def iterate(
    fn: Fn,
    solver: AbstractSolver,
    z0: Y,
    args: Args,
    *,
    max_steps: int,
    unroll: bool = False,
    checkpoints: int | None = None,
    differentiable: bool = False,
) -> Iteration:
    """Run `solver` on `fn` from `z0` until it terminates or takes `max_steps` steps.

    For an [`revdeq.internal.AbstractSegmentedSolver`][] the loop runs in segments of
    `solver.segment_length(max_steps)` steps; after each, whatever the solver
    archives is stacked outside the carry and handed back to it at the end.

    With `unroll=True` the loop is straight-line code: every step is evaluated, and
    a step after the solve has terminated leaves the carry unchanged, so the result
    is that of the loop (see `resolve_unroll`). Otherwise it is a `lax.while_loop`.

    With `differentiable=True` the loop supports reverse-mode autodiff, in one
    segment and with nothing archived: unrolled, autodiff stores every step;
    otherwise `equinox.internal.while_loop` recomputes from `checkpoints`
    checkpoints. Solvers see the flag as `options["differentiable"]`: one built to
    be reversed keeps what autodiff needs only when it is needed.
    """
    _check_max_steps(max_steps)
    aux_fn = AuxFn(fn)
    options = {"max_steps": max_steps, "differentiable": differentiable}
    tags = frozenset()
    f_struct = jax.eval_shape(lambda: z0)
    state = solver.init(aux_fn, z0, args, options, f_struct, None, tags)
    start = (jnp.array(0), z0, state, jnp.array(False), RESULTS.successful)
    init = _Carry(*start)  # pyright: ignore[reportArgumentType]

    def step(carry: _Carry) -> _Carry:
        z, state, _ = solver.step(aux_fn, carry.z, args, options, carry.state, tags)
        done, result = solver.terminate(aux_fn, z, args, options, state, tags)
        return _Carry(carry.num_steps + 1, z, state, done, _with_advice(result))

    if isinstance(solver, AbstractSegmentedSolver) and not differentiable:
        final, archived = _segmented(solver, step, init, max_steps, unroll)
    elif unroll:
        (final, _), archived = _unrolled(step, init, max_steps), None
    elif differentiable:
        final = eqxi.while_loop(
            _below(max_steps),
            step,
            init,
            max_steps=max_steps,
            kind="checkpointed",
            checkpoints=checkpoints,
        )
        archived = None
    else:
        final, archived = jax.lax.while_loop(_below(max_steps), step, init), None
    result = final.result
    if not solver.fixed_steps:
        out_of_steps = RESULTS.max_steps_reached
        result = RESULTS.where(final.done, result, out_of_steps)  # pyright: ignore[reportArgumentType]
    state = final.state
    if isinstance(solver, AbstractSegmentedSolver):
        state, result = solver.finish(state, archived, result)
    return Iteration(final.z, state, final.num_steps, result)


class _Carry(NamedTuple):
    """The driver loop's carry."""

    num_steps: Int[Array, ""]
    z: Y
    state: PyTree
    done: Bool[Array, ""]
    result: RESULTS


def _below(limit: int | Int[Array, ""]) -> Callable[[_Carry], Bool[Array, ""]]:
    """The loop condition: not terminated, and fewer than `limit` steps taken."""

    def cond(carry: _Carry) -> Bool[Array, ""]:
        return ~carry.done & (carry.num_steps < limit)

    return cond


def _unrolled(
    step: Callable[[_Carry], _Carry], init: _Carry, max_steps: int
) -> tuple[_Carry, list[_Carry]]:
    """The loop as straight-line code, and the carry after every step."""
    carry, carries = init, []
    for index in range(max_steps):
        stepped = step(carry)
        carry = stepped if index == 0 else _unless(carry.done, carry, stepped)
        # One carry per step, as a loop has: fused into the next step's
        # consumers, each step would be computed again for each of them.
        carry = jax.lax.optimization_barrier(carry)
        carries.append(carry)
    return carry, carries


def _segmented(
    solver: AbstractSegmentedSolver,
    step: Callable[[_Carry], _Carry],
    init: _Carry,
    max_steps: int,
    unroll: bool,
) -> tuple[_Carry, PyTree]:
    """The loop in segments, and what the solver archived after each, stacked: as
    straight-line code, or as a scan over `while_loop` segments."""
    length = solver.segment_length(max_steps)
    if unroll:
        final, carries = _unrolled(step, init, max_steps)
        ends = [
            carries[min(i + length, max_steps) - 1] for i in range(0, max_steps, length)
        ]
        return final, jtu.tree_map(_stack, *(solver.archive(c.state) for c in ends))

    def segment(carry: _Carry, index: Int[Array, ""]) -> tuple[_Carry, PyTree]:
        limit = jnp.minimum((index + 1) * length, max_steps)
        carry = jax.lax.while_loop(_below(limit), step, carry)
        return carry, solver.archive(carry.state)

    num_segments = -(-max_steps // length)
    return jax.lax.scan(segment, init, jnp.arange(num_segments))


def _with_advice(result: optx.RESULTS) -> RESULTS:
    """A solver's `optimistix.RESULTS` code, with optimistix's generic failures
    replaced by revdeq's, whose messages say what to do."""
    result = RESULTS.promote(result)
    for generic, ours in (
        (RESULTS.nonlinear_divergence, RESULTS.diverged),
        (RESULTS.nonfinite, RESULTS.nonfinite_value),
    ):
        result = RESULTS.where(result == generic, ours, result)
    return result


def _unless(done: Bool[Array, ""], old: PyTree, new: PyTree) -> PyTree:
    """`old` where the loop is `done`, else `new`: an unrolled loop's termination."""
    return jtu.tree_map(lambda o, n: jnp.where(done, o, n), old, new)


def _stack(*leaves: Array) -> Array:
    return jnp.stack(leaves)
