from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, DTypeLike, Float, PRNGKeyArray, PyTree

from .._custom_types import Args, Fn, Y


class TanhCell(eqx.Module):
    """`f(z, x) = tanh(W z + U x + b)` on vectors of size `dim`.

    `W`'s entries have standard deviation `scale / √dim`, so its spectral norm is
    about `2·scale`: the cell is a contraction in `z` when that is below 1, and the
    reversible iteration converges on it for the default `scale` too.

    **Arguments:** `dim`, the size of `z` and `x`; `key`; `scale`; `dtype`, the
    parameters' dtype (float64 needs x64 on).
    """

    weight: Float[Array, "dim dim"]
    inject: Float[Array, "dim dim"]
    bias: Float[Array, " dim"]

    def __init__(
        self,
        dim: int,
        *,
        key: PRNGKeyArray,
        scale: float = 0.9,
        dtype: DTypeLike = jnp.float32,
    ) -> None:
        k1, k2, k3 = jax.random.split(key, 3)
        self.weight = (scale / dim**0.5) * jax.random.normal(k1, (dim, dim), dtype)
        self.inject = jax.random.normal(k2, (dim, dim), dtype) / dim**0.5
        self.bias = 0.1 * jax.random.normal(k3, (dim,), dtype)

    def __call__(self, z: Float[Array, " dim"], x: Float[Array, " dim"]) -> Array:
        return jnp.tanh(self.weight @ z + self.inject @ x + self.bias)


def plain_reversible_loop(
    cell: Fn, z0: Y, x: Args, beta: float, steps: int, *, scan: bool = False
) -> Y:
    """The reversible iteration `y ← (1 − β)y + βf(z, x)`, `z ← (1 − β)z + βf(y, x)`
    from `y = z = z0`, written plainly, so that autodiff through it stores every step.

    As a Python loop (`scan=False`) it is straight-line code: at a fixed step count
    the fastest program a user could write, and the yardstick for time and memory
    (XLA:CPU runs a convolution in a loop body several times slower,
    jax-ml/jax#12868). `scan=True` writes the same steps as a `jax.lax.scan`.

    **Returns:** `z` after `steps` steps.

    The gradient of [`revdeq.solve`][] with [`revdeq.ReversibleAdjoint`][] matches
    autodiff of this loop to the precision of its dtype:

    !!! Example

        ```python
        import jax
        import jax.numpy as jnp
        import revdeq
        from revdeq.testing import TanhCell, plain_reversible_loop, relative_error

        cell, x = TanhCell(8, key=jax.random.key(0)), jnp.ones(8)
        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)


        def ours(cell):
            sol = revdeq.solve(cell, jnp.zeros(8), x, solver=solver, max_steps=4)
            return jnp.sum(sol.value)


        def truth(cell):
            return jnp.sum(plain_reversible_loop(cell, jnp.zeros(8), x, 0.8, 4))


        relative_error(jax.grad(ours)(cell), jax.grad(truth)(cell))  # below 1e-6
        ```
    """

    def relax(state: Y, fval: Y) -> Y:
        return jtu.tree_map(lambda s, f: (1 - beta) * s + beta * f, state, fval)

    def step(carry: tuple[Y, Y], _: Any = None) -> tuple[tuple[Y, Y], None]:
        y, z = carry
        y = relax(y, cell(z, x))
        return (y, relax(z, cell(y, x))), None

    carry = (z0, z0)
    if scan:
        carry, _ = jax.lax.scan(step, carry, None, length=steps)
    else:
        for _ in range(steps):
            carry, _ = step(carry)
    return carry[1]


def relative_error(x: PyTree[ArrayLike], truth: PyTree[ArrayLike]) -> float:
    """`‖x − truth‖ / ‖truth‖` over all leaves together, computed in float64 NumPy
    (so on the host, outside `jit`)."""
    xs = [np.asarray(a, np.float64).ravel() for a in jtu.tree_leaves(x)]
    ts = [np.asarray(a, np.float64).ravel() for a in jtu.tree_leaves(truth)]
    if len(xs) != len(ts):
        raise ValueError(f"`x` has {len(xs)} leaves and `truth` {len(ts)}.")
    num = np.sqrt(sum(np.sum((a - b) ** 2) for a, b in zip(xs, ts)))
    den = np.sqrt(sum(np.sum(b**2) for b in ts))
    return float(num / max(den, 1e-300))


def compiled_memory(fn: Callable[..., Any], *args: Any) -> int:
    """The temporary memory in bytes that XLA allocates for `fn(*args)` compiled:
    deterministic, and read without running it. Non-array arguments (a model's
    static parts) are held static; the array outputs are kept."""
    arrays, static = eqx.partition(args, eqx.is_array)

    def on_arrays(arrays: PyTree) -> PyTree:
        return eqx.filter(fn(*eqx.combine(arrays, static)), eqx.is_array)

    analysis = jax.jit(on_arrays).lower(arrays).compile().memory_analysis()
    if analysis is None:
        raise RuntimeError(f"{jax.default_backend()!r} reports no memory analysis.")
    return int(analysis.temp_size_in_bytes)
