from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int, PyTree, Scalar

from .._custom_types import Args, SolverFn, Y
from .._tree import ravel_rows, tree_max_abs
from .base import AbstractSolver, AbstractSolverState, ConvergenceState


class _AndersonState(AbstractSolverState):
    progress: ConvergenceState
    iterates: Float[Array, "history rows n"]
    residuals: Float[Array, "history rows n"]
    count: Int[Array, ""]


class Anderson(AbstractSolver[_AndersonState]):
    """Anderson acceleration (type II) over the joint state of all pytree leaves.

    Keeps the last `history` pairs `(z_i, g_i = f(z_i) − z_i)` and steps to
    `Σ α_i (z_i + damping · g_i)`, where `α` minimises `‖Σ α_i g_i‖²` subject to
    `Σ α_i = 1`, with a Tikhonov term scaled by the mean of `‖g_i‖²` so that the
    regularisation is free of the problem's units. One evaluation of `f` per step.

    The least squares couples every element of the state: `vmap` over a batch so that
    each sample is solved on its own. Where rows of the state must stay independent
    (the positions of a causal language model), `rowwise=True` gives each row its
    own mixing weights from its own history; `f` is then the only link between rows.

    **Arguments:**

    - `history`: number of past iterates kept (at least 1; 1 is damped iteration).
    - `damping`: the mixing weight of the residual, in (0, 2).
    - `regularisation`: relative Tikhonov weight of the least squares. Much below
        the default, residuals at rounding level make the weights blow up once the
        iteration has converged.
    - `rowwise`: solve one least-squares problem per row, i.e. per element of the
        leading axis that every leaf of the state shares.
    - `rtol`, `atol`, `norm`: stop once
      `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`, as optimistix does;
      `norm` defaults to the largest magnitude.

    ??? cite "Reference"

        ```bibtex
        @article{walker2011anderson,
            title={Anderson acceleration for fixed-point iterations},
            author={Walker, Homer F and Ni, Peng},
            journal={SIAM Journal on Numerical Analysis},
            volume={49}, number={4}, pages={1715--1735}, year={2011}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, solver=revdeq.Anderson(history=5),
                           adjoint=revdeq.ImplicitAdjoint(), max_steps=30)
        ```
    """

    history: int = 5
    damping: float = eqx.field(converter=float, default=1.0)
    regularisation: float = eqx.field(converter=float, default=1e-4)
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_max_abs
    rowwise: bool = False

    def __check_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"`history` must be >= 1, got {self.history}.")
        if not 0 < self.damping < 2:
            raise ValueError(f"`damping` must lie in (0, 2), got {self.damping}.")
        if self.regularisation < 0:
            raise ValueError(
                f"`regularisation` must be >= 0, got {self.regularisation}."
            )

    def init(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _AndersonState:
        del fn, args, options, f_struct, aux_struct, tags
        rows, _ = ravel_rows(y, self.rowwise)
        empty = jnp.zeros((self.history, *rows.shape), rows.dtype)
        progress = ConvergenceState.initial(rows.dtype)
        return _AndersonState(progress, empty, empty, jnp.array(0))

    def step(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: _AndersonState,
        tags: frozenset[object],
    ) -> tuple[Y, _AndersonState, Any]:
        del options, tags
        fy, aux = fn(y, args)
        rows_y, unravel = ravel_rows(y, self.rowwise)
        rows_f, _ = ravel_rows(fy, self.rowwise)
        slot = state.count % self.history
        iterates = state.iterates.at[slot].set(rows_y)
        residuals = state.residuals.at[slot].set(rows_f - rows_y)
        valid = jnp.arange(self.history) <= state.count
        alpha = _mixing_weights(residuals, valid, self.regularisation)
        new_rows = jnp.einsum("ri,irn->rn", alpha, iterates + self.damping * residuals)
        progress = self.progress(fy, y, state.progress, 1)
        new_state = _AndersonState(progress, iterates, residuals, state.count + 1)
        return unravel(new_rows), new_state, aux


def _mixing_weights(
    residuals: Float[Array, "history rows n"],
    valid: Bool[Array, " history"],
    regularisation: float,
) -> Float[Array, "rows history"]:
    """Per row `r`, solve `min ‖Σ_i α_i G_ir‖²` s.t. `Σ α_i = 1` over the valid `i`."""
    # α is unchanged by scaling a row's residuals, and scaled ones cannot overflow
    # when squared. (Slots not yet filled hold zeros.)
    biggest = jnp.max(jnp.abs(residuals), axis=(0, 2))
    scale = jnp.where(biggest > 0, biggest, 1)
    scaled = residuals / scale[None, :, None]
    both = valid[:, None] & valid[None, :]
    gram = jnp.where(both[None], jnp.einsum("irn,jrn->rij", scaled, scaled), 0)
    mean_sq = jnp.trace(gram, axis1=1, axis2=2) / jnp.sum(valid, dtype=gram.dtype)
    tiny = jnp.finfo(gram.dtype).tiny
    ridge = jnp.maximum(regularisation * mean_sq, tiny)
    # Invalid rows become identity rows with a zero right-hand side, so α_i = 0.
    diagonal = jnp.where(valid[None, :], ridge[:, None], 1)
    gram = gram + diagonal[:, :, None] * jnp.eye(len(valid), dtype=gram.dtype)[None]
    rhs = jnp.broadcast_to(valid.astype(gram.dtype), diagonal.shape)
    alpha = jnp.linalg.solve(gram, rhs[..., None])[..., 0]
    return alpha / jnp.sum(alpha, axis=1, keepdims=True)
