from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, PyTree, Scalar

from .._custom_types import Args, SolverFn, Y
from .._tree import ravel_rows, tree_max_abs
from .base import AbstractSolver, AbstractSolverState, ConvergenceState


class _BroydenState(AbstractSolverState):
    progress: ConvergenceState
    residual: Float[Array, "rows n"]
    us: Float[Array, "history rows n"]
    vs: Float[Array, "history rows n"]
    count: Int[Array, ""]


class Broyden(AbstractSolver[_BroydenState]):
    """Limited-memory ("good") Broyden's method on `g(z) = f(z) − z = 0`.

    Keeps the inverse Jacobian of `g` as `H = −I + Σ u_i v_iᵀ` with the last `history`
    rank-one updates, and steps `z ← z − H g(z)`. It evaluates `f` once at
    initialisation and once per step, and the returned iterate is the last evaluated
    one, so its residual is exact. Like [`revdeq.Anderson`][], it couples every
    element of the state: `vmap` over a batch. With `rowwise=True`, each row of the
    state (each element of the leading axis every leaf shares) keeps its own inverse
    Jacobian, of its own block of `g`, and rows interact only through `f`.

    **Arguments:**

    - `history`: the number of rank-one updates kept (at least 1).
    - `rowwise`: one quasi-Newton update per row rather than one for the whole state.
    - `rtol`, `atol`, `norm`: stop once
      `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`, as optimistix does;
      `norm` defaults to the largest magnitude.

    ??? cite "Reference"

        ```bibtex
        @article{broyden1965class,
            title={A class of methods for solving nonlinear simultaneous equations},
            author={Broyden, Charles G},
            journal={Mathematics of Computation},
            volume={19}, number={92}, pages={577--593}, year={1965}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        sol = revdeq.solve(cell, z0, x, solver=revdeq.Broyden(history=8),
                           adjoint=revdeq.ImplicitAdjoint(), max_steps=30)
        ```
    """

    history: int = 8
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_max_abs
    rowwise: bool = False

    def __check_init__(self) -> None:
        if self.history < 1:
            raise ValueError(f"`history` must be >= 1, got {self.history}.")

    def init(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        f_struct: PyTree[jax.ShapeDtypeStruct],
        aux_struct: PyTree[jax.ShapeDtypeStruct],
        tags: frozenset[object],
    ) -> _BroydenState:
        del options, f_struct, aux_struct, tags
        fy, _ = fn(y, args)
        rows_y, _ = ravel_rows(y, self.rowwise)
        rows_f, _ = ravel_rows(fy, self.rowwise)
        empty = jnp.zeros((self.history, *rows_y.shape), rows_y.dtype)
        progress = self.progress(fy, y, ConvergenceState.initial(rows_y.dtype), 1)
        return _BroydenState(progress, rows_f - rows_y, empty, empty, jnp.array(0))

    def step(
        self,
        fn: SolverFn,
        y: Y,
        args: Args,
        options: dict[str, Any],
        state: _BroydenState,
        tags: frozenset[object],
    ) -> tuple[Y, _BroydenState, Any]:
        del options, tags
        rows_y, unravel = ravel_rows(y, self.rowwise)
        g = state.residual
        dz = -_apply_inverse(state.us, state.vs, g)
        new_y = unravel(rows_y + dz)
        fy, aux = fn(new_y, args)
        rows_f, _ = ravel_rows(fy, self.rowwise)
        new_g = rows_f - (rows_y + dz)
        dg = new_g - g
        # Good Broyden, per row: H ← H + (dz − H dg) (dzᵀ H) / (dzᵀ H dg).
        v = _apply_inverse_transpose(state.us, state.vs, dz)
        denom = jnp.sum(v * dg, axis=1, keepdims=True)
        eps = jnp.finfo(denom.dtype).eps
        norms = jnp.linalg.norm(v, axis=1, keepdims=True) * jnp.linalg.norm(
            dg, axis=1, keepdims=True
        )
        ok = jnp.abs(denom) > eps * norms
        u = jnp.where(ok, (dz - _apply_inverse(state.us, state.vs, dg)) / denom, 0)
        slot = state.count % self.history
        progress = self.progress(fy, new_y, state.progress, 1)
        new_state = _BroydenState(
            progress,
            new_g,
            state.us.at[slot].set(u),
            state.vs.at[slot].set(jnp.where(ok, v, 0)),
            state.count + 1,
        )
        return new_y, new_state, aux


def _apply_inverse(us, vs, x):
    """`H x` for `H = −I + Σ_i u_i v_iᵀ`, row by row."""
    return -x + jnp.einsum("irn,ir->rn", us, jnp.einsum("irn,rn->ir", vs, x))


def _apply_inverse_transpose(us, vs, x):
    return -x + jnp.einsum("irn,ir->rn", vs, jnp.einsum("irn,rn->ir", us, x))
