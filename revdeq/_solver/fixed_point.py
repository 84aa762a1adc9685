from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree, Scalar

from .._custom_types import Args, SolverFn, Y
from .._tree import tree_dtype, tree_lerp, tree_max_abs
from .base import AbstractSolver, AbstractSolverState, ConvergenceState


class _FixedPointState(AbstractSolverState):
    progress: ConvergenceState


class FixedPointIteration(AbstractSolver[_FixedPointState]):
    """Damped fixed-point iteration `z ← (1 − damping) z + damping f(z)`.

    One evaluation of `f` per step. Simple and robust for contractive cells; prefer
    [`revdeq.Anderson`][] for speed or [`revdeq.Reversible`][] for exact gradients.

    **Arguments:**

    - `damping`: weight of `f(z)` in the update, in (0, 2); `1` is plain iteration.
    - `rtol`, `atol`, `norm`: stop once
      `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`, as optimistix does;
      `norm` defaults to the largest magnitude.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        sol = revdeq.solve(lambda z, x: jnp.tanh(0.5 * z + x), jnp.zeros(3),
                           jnp.ones(3), solver=revdeq.FixedPointIteration(),
                           adjoint=revdeq.ImplicitAdjoint(), max_steps=50)
        ```
    """

    damping: float = eqx.field(converter=float, default=1.0)
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_max_abs

    def __check_init__(self) -> None:
        if not 0 < self.damping < 2:
            raise ValueError(f"`damping` must lie in (0, 2), got {self.damping}.")

    def init(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _FixedPointState:
        del fn, args, options, f_struct, aux_struct, tags
        return _FixedPointState(ConvergenceState.initial(tree_dtype(y)))

    def step(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: _FixedPointState,
        tags: frozenset[object],
    ) -> tuple[Y, _FixedPointState, Any]:
        del options, tags
        fy, aux = fn(y, args)
        new_y = tree_lerp(self.damping, y, fy)
        progress = self.progress(fy, y, state.progress, 1)
        return new_y, _FixedPointState(progress), aux
