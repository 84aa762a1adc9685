"""A cast between float dtypes that XLA cannot widen away."""

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, DTypeLike


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def cast_exactly(x: ArrayLike, dtype: jnp.dtype | type) -> Array:
    """`x.astype(dtype)`, rounded where it is written even under XLA's excess
    precision.

    By default XLA may compute a bfloat16 (or float16) value in float32 and skip
    the rounding of a cast pair such as `x.astype(bfloat16).astype(float32)`;
    whether it does depends on where its fusions and loop bodies end, and these
    differ between the forward and the reverse pass. A cell whose inputs or
    output cross a precision boundary then gives different bits in the two passes,
    by far more than the guard bits of [`revdeq.ExactState`][] absorb. This cast
    rounds with integer arithmetic on the bits, which XLA keeps, to the precision
    of the narrower of the two dtypes. Its derivative is that of `astype`.
    [`revdeq.nn.DEQ`][]'s `compute_dtype` casts this way; use it at the boundaries
    of a cell that casts on its own.

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):  # a float32 state, computed in bfloat16
            low = revdeq.cast_exactly(z, jnp.bfloat16)
            out = jnp.tanh(0.5 * low + revdeq.cast_exactly(x, jnp.bfloat16))
            return revdeq.cast_exactly(out, z.dtype)


        drift = revdeq.reconstruction_error(
            cell, jnp.zeros(4), jnp.ones(4), solver=revdeq.Reversible(beta=1.5),
            max_steps=12,
        )  # 0.0
        ```
    """
    x, dtype = jnp.asarray(x), jnp.dtype(dtype)
    if not (
        jnp.issubdtype(x.dtype, jnp.floating) and jnp.issubdtype(dtype, jnp.floating)
    ):
        return x.astype(dtype)
    narrow = min(x.dtype, dtype, key=lambda d: jnp.finfo(d).nmant)
    wide = jnp.float64 if jnp.float64 in (x.dtype, dtype) else jnp.float32
    return round_to(x.astype(wide), narrow).astype(dtype)


@cast_exactly.defjvp
def _cast_exactly_jvp(
    dtype: jnp.dtype | type, primals: tuple[Array], tangents: tuple[Array]
) -> tuple[Array, Array]:
    (x,), (t,) = primals, tangents
    return cast_exactly(x, dtype), t.astype(dtype)


def round_to(x: Array, dtype: jnp.dtype) -> Array:
    """`x` (float32 or float64) rounded to nearest-even at the precision of the
    narrower float `dtype`, still in `x`'s dtype, by integer arithmetic on its bits."""
    drop = jnp.finfo(x.dtype).nmant - jnp.finfo(dtype).nmant
    if drop <= 0:
        return x
    uint = jnp.uint64 if x.dtype == jnp.float64 else jnp.uint32
    bits = jax.lax.bitcast_convert_type(x, uint)
    odd = (bits >> drop) & 1
    half = uint((1 << (drop - 1)) - 1)
    rounded = jax.lax.bitcast_convert_type(
        (bits + half + odd) & ~uint((1 << drop) - 1), x.dtype
    )
    narrow = jnp.finfo(dtype)
    if narrow.minexp > jnp.finfo(x.dtype).minexp:  # float16: fewer exponents
        # Below its smallest normal the spacing is fixed: round on that grid, with
        # scalings by powers of two, which are exact.
        tiny = float(narrow.smallest_subnormal)
        grid = jnp.round(x * (1 / tiny)) * tiny
        rounded = jnp.where(jnp.abs(x) < float(narrow.smallest_normal), grid, rounded)
    # A NaN stays a NaN: carrying into the exponent could make it an infinity.
    return jnp.where(jnp.isnan(x), x, rounded)


def check_float_dtype(name: str, dtype: DTypeLike, hint: str = "") -> None:
    """A `ValueError` naming the argument `name` unless `dtype` is a floating
    dtype that JAX will honour: float64 needs x64 on. `hint` ends the message."""
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a floating dtype, got {dtype}.")
    if jnp.dtype(dtype).itemsize == 8 and not jax.config.read("jax_enable_x64"):
        raise ValueError(
            f"`{name}=float64` needs `jax.config.update('jax_enable_x64', True)` "
            f"first, or JAX computes in float32.{hint}"
        )
