"""Fixed-point arithmetic: the integer formats of [`revdeq.ExactState`][], exact
scalings by powers of two, the rational form of `1 − β`, and the injection of `β·f`
on its grid, whose guard bits make its reversal tolerant."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

from .._cast import cast_exactly, round_to


# `c ≈ ±n/d` with `n · d` at most this: exact for the usual `β`, and at least two
# updates fit in each buffer word.
_MAX_RATIONAL = 1 << 15


def rational(c: float) -> tuple[int, int, int]:
    """`c ≈ sign · n / d`: the best rational with `n · d ≤ 2**15`. Exact for the usual
    `β` (0.5, 0.8, 0.9, 1.2, ...)."""
    limit = _MAX_RATIONAL
    while True:
        frac = Fraction(abs(c)).limit_denominator(limit)
        if frac.numerator * frac.denominator <= _MAX_RATIONAL:
            return (1 if c > 0 else -1), frac.numerator, frac.denominator
        limit //= 2


def fixed_point_format(dtype: jnp.dtype) -> tuple[jnp.dtype, jnp.dtype, int]:
    """The integer dtype, the float dtype it is scaled in, and the magnitude bits.

    Magnitudes stay below `2**bits`, so sums of two never overflow. float64 states
    (under x64) get int64, and so a resolution finer than float64's own.
    """
    if jnp.dtype(dtype).itemsize == 8:
        return jnp.dtype(jnp.int64), jnp.dtype(jnp.float64), 61
    return jnp.dtype(jnp.int32), jnp.dtype(jnp.float32), 30


def floor_divmod(ints: Array, divisor: int, bits: int) -> tuple[Array, Array]:
    """`(ints // divisor, ints % divisor)` for `|ints| < 2^bits`.

    A power of two takes an arithmetic shift and a mask. Other divisors go through
    unsigned division: shifted up by a multiple of `divisor`, the dividend is never
    negative, so there are no sign corrections to make."""
    if divisor & (divisor - 1) == 0:  # 1, 2, 4, ...
        return ints >> (divisor.bit_length() - 1), ints & (divisor - 1)
    unsigned = jnp.uint64 if ints.dtype == jnp.int64 else jnp.uint32
    shift = -(-(2**bits) // divisor)
    u = ints.astype(unsigned) + unsigned(shift * divisor)  # wraps into [0, 2^(bits+2))
    quotient = (u // unsigned(divisor)).astype(ints.dtype) - shift
    return quotient, (u % unsigned(divisor)).astype(ints.dtype)


def times_fraction(
    ints: Array, popped: Array, n: int, d: int, bits: int
) -> tuple[Array, Array]:
    """`⌊(ints·n + popped) / d⌋` and its remainder, for `popped ∈ [0, n)` and
    `|ints| < 2^bits`, without forming `ints·n` (which would overflow).

    With `popped` a digit taken from the information buffer and the remainder pushed
    back, this is the reversible multiplication by `n/d` of Maclaurin et al.: it
    loses no information, and its result lies within one unit of `ints·n/d`, since
    `popped/d < 1`. Undone by `undo_times_fraction`."""
    high, low = floor_divmod(ints, d, bits)  # ints = high·d + low
    if n == 1:
        return high, low
    # ints·n + popped = high·d·n + (low·n + popped), the last term in [0, n·d).
    rest = low * n + popped.astype(ints.dtype)
    divisor = jnp.asarray(d, rest.dtype)
    return high * n + jax.lax.div(rest, divisor), jax.lax.rem(rest, divisor)


def undo_times_fraction(
    product: Array, remainder: Array, n: int, d: int, bits: int
) -> tuple[Array, Array]:
    """The `(ints, popped)` that `times_fraction` maps to `(product, remainder)`."""
    remainder = remainder.astype(product.dtype)
    if n == 1:
        return product * d + remainder, jnp.zeros_like(product)
    # product = high·n + t with t = ⌊(low·n + popped) / d⌋ ∈ [0, n).
    high, t = floor_divmod(product, n, bits)
    rest = t * d + remainder  # = low·n + popped
    divisor = jnp.asarray(n, rest.dtype)
    return high * d + jax.lax.div(rest, divisor), jax.lax.rem(rest, divisor)


def times_pow2(x: Array, exponent: Int[Array, "..."]) -> Array:
    """`x · 2^exponent` for `|exponent|` up to `2 · (maxexp − 2)` of `x`'s float:
    two exact scalings by normal powers of two, built from their bits (`exp2` may
    round), exact barring a result that under- or overflows."""
    finfo = jnp.finfo(x.dtype)
    int_dtype = jnp.int64 if finfo.bits == 64 else jnp.int32
    half = exponent // 2
    for part in (half, exponent - half):
        biased = (part.astype(int_dtype) + (finfo.maxexp - 1)) << finfo.nmant
        x = x * jax.lax.bitcast_convert_type(biased, x.dtype)
    return x


def computed_once(x: Array) -> Array:
    """`x`, computed once however many consumers read it: what becomes an integer
    of the state goes through here.

    XLA:CPU drops optimisation barriers before it fuses, and then copies cheap
    elementwise producers (a cell's last layers, the scaling of its output) into
    every consumer's fusion. The copies can round differently (on x86 the drift
    this caused vanished when XLA could not use FMAs). An injection computed twice
    could so give the state one value and its guard digit in the buffer another, a
    disagreement within the forward pass that no guard radius absorbs (measured on
    conv training steps). XLA:CPU never copies a division of floats, so this
    divides by one, as an array XLA cannot prove to be one (`1 + 0·isnan(x)`) and
    not a broadcast, which it would turn into a multiplication by the reciprocal.
    Exact for every `x`, infinities, NaNs and `−0` included. (XLA:GPU removes
    barriers only after fusion, so there the one before each update should suffice
    already; not measured.)
    """
    return x / (1 + 0 * jnp.isnan(x).astype(x.dtype))


def scale(x: Array, exponent: Int[Array, "..."]) -> Array:
    """`x · 2^exponent` in the float dtype of `x`'s fixed-point format, computed once
    (see `computed_once`)."""
    _, float_dtype, _ = fixed_point_format(x.dtype)
    return computed_once(times_pow2(x.astype(float_dtype), exponent))


def unscale(ints: Array, exponent: Int[Array, "..."], dtype: jnp.dtype) -> Array:
    """`ints · 2^−exponent`, in `dtype`."""
    float_dtype = jnp.float64 if ints.dtype == jnp.int64 else jnp.float32
    return cast_exactly(times_pow2(ints.astype(float_dtype), -exponent), dtype)


def injection(
    f: Array, beta: float, exponent: Int[Array, "..."]
) -> tuple[Array, Bool[Array, "..."]]:
    """`β·f·2^e` truncated to an integer, the same whenever `f` has the same bits,
    and whether it fits.

    An injection below `(1 − |c|)·2^(bits − 1)` keeps `|c·Y + injection|` below
    `2^bits` whenever `|Y|` is, so the state never leaves its range unnoticed.
    """
    int_dtype, float_dtype, bits = fixed_point_format(f.dtype)
    # One rounding, of β·f to the dtype of f as the float iteration would; the
    # scaling by 2^e is exact. Both roundings hold under XLA's excess precision
    # (see `cast_exactly`).
    wide = cast_exactly(jax.lax.stop_gradient(f), float_dtype)
    beta_f = round_to(beta * wide, f.dtype)
    scaled = computed_once(times_pow2(beta_f, exponent))
    fits = jnp.abs(scaled) < (1 - abs(1 - beta)) * 2.0 ** (bits - 1)
    return scaled.astype(int_dtype), fits


def injection_bits(f_dtype: jnp.dtype, state_dtype: jnp.dtype) -> int:
    """The significant bits of an injection of `f` in `f_dtype` into a state in
    `state_dtype`: `β·f` is rounded to the narrower of `f_dtype` and the float of
    the state's format, and scaled exactly."""
    _, float_dtype, _ = fixed_point_format(state_dtype)
    return min(jnp.finfo(f_dtype).nmant, jnp.finfo(float_dtype).nmant) + 1


def _grid_constants(ints: Array, significant_bits: int) -> tuple[type, int, int, int]:
    """The float of `ints`'s format, the start `2^significant_bits` of the sparse
    part of the grid, the bits of that start as a float, and the low bits that a
    float with `significant_bits` significant bits leaves at zero."""
    float_dtype = np.float64 if ints.dtype == jnp.int64 else np.float32
    start = 1 << significant_bits
    start_bits = int(np.array(start, float_dtype).view(ints.dtype))
    unused = int(np.finfo(float_dtype).nmant) - (significant_bits - 1)
    return float_dtype, start, start_bits, unused


def grid_index(q: Array, significant_bits: int) -> Array:
    """The position of the injection `q` among the values an injection can take.

    An injection is a float with `significant_bits` significant bits, scaled exactly
    and truncated: below `2^significant_bits` it may be any integer, above only
    every `2^(⌊log2 |q|⌋ − significant_bits + 1)`-th. Consecutive values get
    consecutive indices (read from the float's bits above the start), so one step
    of the index is a quantum where `|q|` is small and a unit in the last place of
    `β·f` where it is large. Odd in `q`, and undone by `from_grid_index`."""
    float_dtype, start, start_bits, unused = _grid_constants(q, significant_bits)
    magnitude = jnp.abs(q)
    bits = jax.lax.bitcast_convert_type(magnitude.astype(float_dtype), q.dtype)
    sparse = (
        ((bits - start_bits) >> unused) + start
        if unused
        else bits - (start_bits - start)
    )
    index = jnp.where(magnitude < start, magnitude, sparse)
    return jnp.where(q < 0, -index, index)


def from_grid_index(index: Array, significant_bits: int) -> Array:
    """The injection at position `index` of its grid: the inverse of `grid_index`."""
    float_dtype, start, start_bits, unused = _grid_constants(index, significant_bits)
    magnitude = jnp.abs(index)
    bits = (
        ((magnitude - start) << unused) + start_bits
        if unused
        else magnitude + (start_bits - start)
    )
    sparse = jax.lax.bitcast_convert_type(bits, float_dtype).astype(index.dtype)
    q = jnp.where(magnitude < start, magnitude, sparse)
    return jnp.where(index < 0, -q, q)


def guard(q: Array, guard_bits: int, significant_bits: int) -> Array:
    """The low `guard_bits` bits of the injection `q`'s grid index (two's
    complement), the digit that lets `snap` recover `q` from an estimate."""
    if guard_bits == 0:
        return jnp.zeros_like(q)
    return grid_index(q, significant_bits) & ((1 << guard_bits) - 1)


def snap(
    estimate: Array, low_bits: Array, guard_bits: int, significant_bits: int
) -> Array:
    """The injection whose `guard` is `low_bits` nearest on the grid to `estimate`:
    the true one whenever the two lie less than `2^(guard_bits − 1)` steps of the
    grid apart."""
    if guard_bits == 0:
        return estimate
    size = 1 << guard_bits
    index = grid_index(estimate, significant_bits)
    offset = (low_bits.astype(index.dtype) - index) & (size - 1)  # in [0, 2^k)
    index = index + jnp.where(offset >= size // 2, offset - size, offset)
    return from_grid_index(index, significant_bits)
