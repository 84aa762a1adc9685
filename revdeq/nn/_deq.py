from collections.abc import Callable
from typing import Any, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, DTypeLike, Float, PyTree

from .._adjoint.base import AbstractAdjoint
from .._cast import cast_exactly, check_float_dtype
from .._solve import solve
from .._solver.base import AbstractSolver


def _cast(tree: PyTree, dtype: DTypeLike) -> PyTree:
    """Cast every floating-point array leaf of `tree` to `dtype`, exactly."""
    return jtu.tree_map(
        lambda x: cast_exactly(x, dtype) if eqx.is_inexact_array(x) else x, tree
    )


class _PolicyCell(eqx.Module):
    """`cell` under a mixed-precision policy, as the `fn(z, x)` of `revdeq.solve`.

    Being a Module, its array leaves (the cell's parameters) receive gradients.
    """

    cell: Callable[[Array, PyTree], Array]
    compute_dtype: jnp.dtype | None = eqx.field(static=True)

    def __call__(self, z: Array, x: PyTree) -> Array:
        if self.compute_dtype is None:
            out = self.cell(z, x)
        else:
            cell, z_in, x_in = _cast((self.cell, z, x), self.compute_dtype)
            out = cell(z_in, x_in)
        return cast_exactly(out, z.dtype)


class DEQ(eqx.Module):
    r"""A deep equilibrium layer: `x ↦ z*` with `z* = cell(z*, x)`.

    The fixed point is found by [`revdeq.solve`][] under the given solver and adjoint;
    the cell's parameters receive gradients through it.

    **Mixed precision.** The state lives in `state_dtype` (float32 by default; the
    paper keeps a float64 state under float32 weights). With `compute_dtype` set
    (e.g. `jnp.bfloat16`), every evaluation casts the cell's parameters, the state
    and `x` to `compute_dtype`, and casts the output back to `state_dtype`, each
    with [`revdeq.cast_exactly`][] so that the reconstruction stays exact. The
    parameters themselves stay in their own dtype and receive gradients there.

    ??? cite

        ```bibtex
        @inproceedings{bai2019deep,
            title={Deep Equilibrium Models},
            author={Bai, Shaojie and Kolter, J. Zico and Koltun, Vladlen},
            booktitle={Advances in Neural Information Processing Systems},
            year={2019}
        }
        ```

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=16, hidden=32, key=jax.random.key(0))
        deq = revdeq.nn.DEQ(
            cell, (16,), solver=revdeq.Reversible(beta=0.8, rtol=0, atol=0),
            adjoint=revdeq.ReversibleAdjoint(), max_steps=4,
        )
        xs = jnp.ones((5, 16))  # (batch, 16)
        z_star, stats = jax.vmap(deq)(xs)
        ```
    """

    cell: Callable[[Array, PyTree], Array]
    solver: AbstractSolver
    adjoint: AbstractAdjoint
    z0: Array | None
    max_steps: int = eqx.field(static=True)
    state_shape: tuple[int, ...] = eqx.field(static=True)
    state_dtype: jnp.dtype = eqx.field(static=True)
    compute_dtype: jnp.dtype | None = eqx.field(static=True)

    def __init__(
        self,
        cell: Callable[[Array, PyTree], Array],
        state_shape: tuple[int, ...],
        *,
        solver: AbstractSolver,
        adjoint: AbstractAdjoint,
        max_steps: int,
        z0: Literal["zeros", "learned"] = "zeros",
        state_dtype: DTypeLike = jnp.float32,
        compute_dtype: DTypeLike | None = None,
    ) -> None:
        """**Arguments:**

        - `cell`: the equilibrium function `cell(z, x) -> z`, e.g. a
            [`revdeq.nn.ConvCell`][].
        - `state_shape`: the shape of `z`, for one example.
        - `solver`: the forward solver, e.g. `revdeq.Reversible(beta=0.8)`.
        - `adjoint`: the gradient rule, e.g. `revdeq.ReversibleAdjoint()`.
        - `max_steps`: the solver's step budget.
        - `z0`: the initial state when none is passed: `"zeros"`, or `"learned"`
            for a trainable one (initialised at zero).
        - `state_dtype`: the floating dtype of the state; float64 needs
            `jax.config.update("jax_enable_x64", True)`.
        - `compute_dtype`: the dtype the cell computes in, or `None` to call it on
            the state as is.
        """
        if z0 not in ("zeros", "learned"):
            raise ValueError(f'`z0` must be "zeros" or "learned", got {z0!r}.')
        for name, dtype in (
            ("state_dtype", state_dtype),
            ("compute_dtype", compute_dtype),
        ):
            if dtype is None:
                continue
            check_float_dtype(name, dtype)
        self.cell = cell
        self.solver = solver
        self.adjoint = adjoint
        self.max_steps = max_steps
        self.state_shape = tuple(state_shape)
        self.state_dtype = jnp.dtype(state_dtype)
        self.compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
        self.z0 = jnp.zeros(state_shape, state_dtype) if z0 == "learned" else None

    @property
    def fn(self) -> Callable[[Array, PyTree], Array]:
        """The `fn(z, x)` that the solve iterates: the cell under the precision
        policy. Regularisers such as [`revdeq.nn.jacobian_frobenius_penalty`][] take
        it."""
        return _PolicyCell(self.cell, self.compute_dtype)

    def __call__(
        self, x: PyTree[Array], z0: Float[Array, "..."] | None = None
    ) -> tuple[Float[Array, "..."], dict[str, Any]]:
        """**Arguments:**

        - `x`: the injected input of one example, passed to the cell as is.
        - `z0`: an optional warm start of shape `state_shape`, e.g. the previous
            fixed point. It replaces the constructed initial state.

        **Returns:**

        A pair `(z_star, stats)`: the fixed-point estimate, of shape `state_shape`
        and dtype `state_dtype`, and the solve's statistics (`num_steps`,
        `num_fn_evals`, `residual`).
        """
        if z0 is None:
            z0 = (
                jnp.zeros(self.state_shape, self.state_dtype)
                if self.z0 is None
                else self.z0
            )
        elif z0.shape != self.state_shape:
            raise ValueError(
                f"`z0` must have the shape {self.state_shape}, got {z0.shape}."
            )
        sol = solve(
            self.fn,
            z0.astype(self.state_dtype),
            x,
            solver=self.solver,
            adjoint=self.adjoint,
            max_steps=self.max_steps,
        )
        return sol.value, sol.stats
