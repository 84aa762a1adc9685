from .._custom_types import Args, Fn, Y
from .._iterate import Iteration, iterate
from .._solver.base import AbstractSolver
from .base import AbstractAdjoint


class UnrolledAdjoint(AbstractAdjoint):
    """Backpropagate through every iteration: the exact gradient of the computed
    output, and the reference the other adjoints are measured against.

    The loop is recomputed from `checkpoints` stored states (binomial checkpointing,
    via `equinox.internal.while_loop`), so memory grows with the number of
    checkpoints rather than with the number of steps.

    **Arguments:**

    - `checkpoints`: the number of stored states; `None` derives it from
        `max_steps`, as `equinox.internal.while_loop` does.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, solver=revdeq.Reversible(rtol=0, atol=0),
                           adjoint=revdeq.UnrolledAdjoint(), max_steps=8)
        ```
    """

    checkpoints: int | None = None

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
        del throw
        return iterate(
            fn,
            solver,
            z0,
            args,
            max_steps=max_steps,
            unroll=unroll,
            checkpoints=self.checkpoints,
            differentiable=True,
        )
