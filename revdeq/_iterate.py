"""The one driver loop that every solve runs, whichever adjoint differentiates it."""

import equinox as eqx
import equinox.internal as eqxi
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree

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


def iterate(
    fn: Fn,
    solver: AbstractSolver,
    z0: Y,
    args: Args,
    *,
    max_steps: int,
    checkpoints: int | None = None,
    differentiable: bool = False,
) -> Iteration:
    """Run `solver` on `fn` from `z0` until it terminates or takes `max_steps` steps.

    The loop runs in segments of `solver.segment_length(max_steps)` steps; after
    each, whatever the solver archives is stacked outside the carry and handed back
    to it at the end (see [`revdeq.AbstractSolver`][]).

    With `differentiable=True` the loop supports reverse-mode autodiff through
    `equinox.internal.while_loop` with `checkpoints` recomputation checkpoints, in
    one segment and with nothing archived; otherwise it is a plain
    `lax.while_loop`. Solvers see the flag as `options["differentiable"]`: one
    built to be reversed keeps what autodiff needs only when it is needed.
    """
    if not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1:
        raise ValueError(f"`max_steps` must be an int >= 1, got {max_steps!r}.")
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
        return step + 1, z, state, done, RESULTS.promote(result)

    def below(limit):
        def cond(carry):
            step, _, _, done, _ = carry
            return ~done & (step < limit)

        return cond

    if differentiable:
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
    result = RESULTS.where(done, result, RESULTS.max_steps_reached)
    state, result = solver.finish(state, archived, result)
    return Iteration(z, state, num_steps, result)
