"""The reversible state as plain floats."""

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Int, PyTree

from .._cast import check_float_dtype
from .._custom_types import Y
from .._solution import RESULTS
from .base import AbstractPrecision


class _FloatCarrier(eqx.Module):
    value: PyTree[Array]
    dtypes: tuple[jnp.dtype, ...] = eqx.field(static=True)


class FloatState(AbstractPrecision):
    """Keep the reversible state as floats of `dtype` (default: the dtype of `z0`).

    A float64 state under a float32 cell (with `jax.config.update("jax_enable_x64",
    True)`) gives 29 spare bits, enough for about `29 / log2(1/|1 − β|)` exact steps.
    A state of the cell's own dtype has no spare bits; the reconstruction
    certificate of [`revdeq.ReversibleAdjoint`][] reports the resulting drift.

    **Arguments:**

    - `dtype`: the floating dtype of the state, or `None` for that of `z0`.

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq


        jax.config.update("jax_enable_x64", True)
        solver = revdeq.Reversible(beta=0.8, precision=revdeq.FloatState(jnp.float64))
        z0, x = jnp.zeros(4, jnp.float32), jnp.ones(4, jnp.float32)  # a float32 cell
        sol = revdeq.solve(lambda z, x: jnp.tanh(0.5 * z + x), z0, x, solver=solver)
        ```
    """

    bit_exact: ClassVar[bool] = False  # pyright: ignore[reportIncompatibleVariableOverride]

    dtype: jnp.dtype | None = eqx.field(
        static=True,
        default=None,
        converter=lambda d: None if d is None else jnp.dtype(d),
    )

    def __check_init__(self) -> None:
        if self.dtype is not None:
            check_float_dtype(
                "dtype", self.dtype, " Without x64, `ExactState()` is exact in float32."
            )

    def representable_beta(self, beta: float) -> float:
        return beta

    def encode(self, z0: Y, fz0: Y, beta: float, differentiable: bool) -> _FloatCarrier:
        del fz0, beta, differentiable
        dtypes = tuple(leaf.dtype for leaf in jtu.tree_leaves(z0))
        value = (
            z0
            if self.dtype is None
            else jtu.tree_map(lambda x: x.astype(self.dtype), z0)
        )
        return _FloatCarrier(value, dtypes)

    def forward(
        self, state: _FloatCarrier, fval: Y, beta: float, step: Int[Array, ""] | int
    ) -> _FloatCarrier:
        del step
        new = jtu.tree_map(
            lambda s, f: ((1 - beta) * s + beta * f.astype(s.dtype)).astype(s.dtype),
            state.value,
            fval,
        )
        return _FloatCarrier(new, state.dtypes)

    def reverse(
        self, state: _FloatCarrier, fval: Y, beta: float, step: Int[Array, ""] | int
    ) -> _FloatCarrier:
        del step
        new = jtu.tree_map(
            lambda s, f: ((s - beta * f.astype(s.dtype)) / (1 - beta)).astype(s.dtype),
            state.value,
            fval,
        )
        return _FloatCarrier(new, state.dtypes)

    def decode(self, state: _FloatCarrier) -> Y:
        leaves, treedef = jtu.tree_flatten(state.value)
        return jtu.tree_unflatten(
            treedef, [x.astype(d) for x, d in zip(leaves, state.dtypes)]
        )

    def status(self, state: PyTree) -> RESULTS:
        del state
        return RESULTS.successful  # pyright: ignore[reportReturnType]
