"""The one driver loop that every solve runs, whichever adjoint differentiates it."""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Int, PyTree

from ._custom_types import Args, Fn, Y
from ._solution import RESULTS
from ._solver.base import AbstractSolver


class AuxFn(eqx.Module):
    """`fn(z, args) -> z` in optimistix's `fn(z, args) -> (z, aux)` convention."""

    fn: Fn

    def __call__(self, z, args):
        return self.fn(z, args), None


class Iteration(eqx.Module):
    """What the driver loop returns."""

    value: Y
    state: PyTree
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


def _check_max_steps(max_steps) -> None:
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

    The loop runs in segments of `solver.segment_length(max_steps)` steps; after
    each, whatever the solver archives is stacked outside the carry and handed back
    to it at the end (see [`revdeq.AbstractSolver`][]).

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
    init = (jnp.array(0), z0, state, jnp.array(False), RESULTS.successful)

    def body(carry):
        step, z, state, _, _ = carry
        z, state, _ = solver.step(aux_fn, z, args, options, state, tags)
        done, result = solver.terminate(aux_fn, z, args, options, state, tags)
        return step + 1, z, state, done, _with_advice(result)

    def below(limit):
        def cond(carry):
            step, _, _, done, _ = carry
            return ~done & (step < limit)

        return cond

    if unroll:
        length = solver.segment_length(max_steps)
        final, archives = init, []
        for index in range(max_steps):
            stepped = body(final)
            final = stepped if index == 0 else _unless(final[3], final, stepped)
            # One carry per step, as a loop has: fused into the next step's
            # consumers, each step would be computed again for each of them.
            final = jax.lax.optimization_barrier(final)
            end_of_segment = (index + 1) % length == 0 or index + 1 == max_steps
            if end_of_segment and not differentiable:
                archives.append(solver.archive(final[2]))
        archived = jtu.tree_map(_stack, *archives) if archives else None
    elif differentiable:
        final = eqxi.while_loop(
            below(max_steps),
            body,
            init,
            max_steps=max_steps,
            kind="checkpointed",
            checkpoints=checkpoints,
        )
        archived = None
    else:
        length = solver.segment_length(max_steps)

        def segment(carry, index):
            limit = jnp.minimum((index + 1) * length, max_steps)
            carry = jax.lax.while_loop(below(limit), body, carry)
            return carry, solver.archive(carry[2])

        num_segments = -(-max_steps // length)
        final, archived = jax.lax.scan(segment, init, jnp.arange(num_segments))
    num_steps, z, state, done, result = final
    if not solver.fixed_steps:
        result = RESULTS.where(done, result, RESULTS.max_steps_reached)
    state, result = solver.finish(state, archived, result)
    return Iteration(z, state, num_steps, result)


def _with_advice(result) -> RESULTS:
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
