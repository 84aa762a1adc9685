"""How the reversible iteration stores its state, and so how exactly it reverses.

A precision policy owns the arithmetic of the update `s ← c·s + β·f` (with
`c = 1 − β`) and of its inverse `s ← (s − β·f) / c`. Inverting a step that contracts
by `|c|` must recover `log2(1/|c|)` bits per element, so a policy decides where those
bits live:

- [`revdeq.FloatState`][] keeps the state as floats. The inverse amplifies rounding by
  `1/|c|` per step, so exactness lasts only as long as the state's spare mantissa.
- [`revdeq.ExactState`][] keeps the state as a fixed-point integer and pushes exactly
  the bits that the multiplication by `c` discards into an integer information
  buffer, with O(1) work per step. The reversal is then bit-exact for any number of
  steps, at a memory cost of `log2(1/|c|)` bits per element per step: the
  information limit.
"""

import abc
import math
from fractions import Fraction

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Bool, Float, Int, PyTree, UInt16

from ._custom_types import Y


class AbstractPrecision(eqx.Module):
    """A state representation for [`revdeq.Reversible`][]."""

    def representable_beta(self, beta: float) -> float:
        """The relaxation this representation uses in place of `beta`."""
        return beta

    @abc.abstractmethod
    def encode(self, z0: Y, fz0: Y, beta: float, max_steps: int) -> PyTree:
        """The representation of `z0`, given its image `fz0 = f(z0)`."""

    @abc.abstractmethod
    def forward(self, state: PyTree, fval: Y, beta: float) -> PyTree:
        """`(1 − β)·state + β·fval`."""

    @abc.abstractmethod
    def reverse(self, state: PyTree, fval: Y, beta: float) -> PyTree:
        """The inverse of `forward`: `(state − β·fval) / (1 − β)`."""

    @abc.abstractmethod
    def decode(self, state: PyTree) -> Y:
        """The value `f` sees, in the dtypes of `z0`."""

    @abc.abstractmethod
    def in_range(self, state: PyTree) -> Bool[Array, ""]:
        """Whether the representation still holds the state faithfully."""


class _FloatCarrier(eqx.Module):
    value: PyTree[Array]
    dtypes: tuple = eqx.field(static=True)


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
        jax.config.update("jax_enable_x64", True)
        solver = revdeq.Reversible(beta=0.8, precision=revdeq.FloatState(jnp.float64))
        ```
    """

    dtype: jnp.dtype | None = eqx.field(
        static=True,
        default=None,
        converter=lambda d: None if d is None else jnp.dtype(d),
    )

    def __check_init__(self):
        if self.dtype is not None:
            if not jnp.issubdtype(self.dtype, jnp.floating):
                raise ValueError(f"`dtype` must be floating, got {self.dtype}.")
            if jnp.dtype(self.dtype).itemsize == 8 and not jax.config.jax_enable_x64:
                raise ValueError(
                    "`FloatState(dtype=float64)` needs "
                    "`jax.config.update('jax_enable_x64', True)`; without x64 use "
                    "`ExactState()`, which is exact in float32."
                )

    def encode(self, z0, fz0, beta, max_steps):
        del fz0, beta, max_steps
        leaves, treedef = jtu.tree_flatten(z0)
        dtypes = tuple(leaf.dtype for leaf in leaves)
        value = (
            z0
            if self.dtype is None
            else jtu.tree_map(lambda x: x.astype(self.dtype), z0)
        )
        return _FloatCarrier(value, dtypes)

    def forward(self, state, fval, beta):
        new = jtu.tree_map(
            lambda s, f: ((1 - beta) * s + beta * f.astype(s.dtype)).astype(s.dtype),
            state.value,
            fval,
        )
        return _FloatCarrier(new, state.dtypes)

    def reverse(self, state, fval, beta):
        new = jtu.tree_map(
            lambda s, f: ((s - beta * f.astype(s.dtype)) / (1 - beta)).astype(s.dtype),
            state.value,
            fval,
        )
        return _FloatCarrier(new, state.dtypes)

    def decode(self, state):
        leaves, treedef = jtu.tree_flatten(state.value)
        return jtu.tree_unflatten(
            treedef, [x.astype(d) for x, d in zip(leaves, state.dtypes)]
        )

    def in_range(self, state):
        del state
        return jnp.array(True)


_WORD_BITS = 16
_WORD_MASK = (1 << _WORD_BITS) - 1
# Bits of headroom above the initial bound on the state's magnitude.
_HEADROOM_BITS = 6
# The buffer's head stays in [low, low · 2^16) with `low ≤ 2^15`, and must be a
# multiple of both n and d: hence `n · d ≤ 2^15`.
_MAX_HEAD_LOW = 1 << 15


def _rational(c: float) -> tuple[int, int, int]:
    """`c ≈ sign · n / d`: the best rational with `n · d ≤ 2**15`. Exact for the usual
    `β` (0.5, 0.8, 0.9, 1.2, ...)."""
    limit = _MAX_HEAD_LOW
    while True:
        frac = Fraction(abs(c)).limit_denominator(limit)
        if frac.numerator * frac.denominator <= _MAX_HEAD_LOW:
            return (1 if c > 0 else -1), frac.numerator, frac.denominator
        limit //= 2


def _head_low(n: int, d: int) -> int:
    lcm = n * d // math.gcd(n, d)
    return lcm * (_MAX_HEAD_LOW // lcm)


def _num_words(beta: float, max_steps: int) -> int:
    _, n, d = _rational(1 - beta)
    return math.ceil(max_steps * math.log2(d / n) / _WORD_BITS) + 2


class _Buffer(eqx.Module):
    """A per-element stack of 16-bit words under a head in `[low, low · 2^16)`.

    Pushing a digit in base `m` multiplies the head by `m`, spilling one word to the
    stack first when that would overflow; popping divides and refills. This is
    range-variant ANS coding with a uniform distribution (Duda, 2009): pushes and pops
    are exact inverses, and each costs O(1) per element. Words below the bottom of
    the stack read as zero.
    """

    head: Int[Array, "..."]
    words: UInt16[Array, "words ..."]
    top: Int[Array, "..."]


def _push(buffer: _Buffer, digit, base: int, low: int) -> tuple[_Buffer, Array]:
    """Push `digit ∈ [0, base)`; also returns whether the stack overflowed."""
    if base == 1:  # nothing to push: c = 1/d for the usual β
        return buffer, jnp.array(False)
    spill = buffer.head >= (low // base) << _WORD_BITS
    index = jnp.clip(buffer.top, 0, buffer.words.shape[0] - 1)[None]
    kept = jnp.take_along_axis(buffer.words, index, axis=0)[0]
    word = jnp.where(spill, buffer.head & _WORD_MASK, kept).astype(kept.dtype)
    words = jnp.put_along_axis(buffer.words, index, word[None], axis=0, inplace=False)
    head = jnp.where(spill, buffer.head >> _WORD_BITS, buffer.head) * base + digit
    top = buffer.top + spill
    overflow = jnp.any(top > buffer.words.shape[0])
    return _Buffer(head, words, top), overflow


def _pop(buffer: _Buffer, base: int, low: int) -> tuple[_Buffer, Array]:
    """Pop a digit in `[0, base)`."""
    if base == 1:
        return buffer, jnp.zeros_like(buffer.head)
    digit = buffer.head % base
    head = buffer.head // base
    refill = head < low
    index = jnp.clip(buffer.top - 1, 0, buffer.words.shape[0] - 1)
    word = jnp.take_along_axis(buffer.words, index[None], axis=0)[0]
    word = jnp.where(buffer.top > 0, word.astype(head.dtype), 0)
    head = jnp.where(refill, (head << _WORD_BITS) | word, head)
    return _Buffer(head, buffer.words, buffer.top - refill), digit


class _ExactLeaf(eqx.Module):
    ints: Int[Array, "..."]
    buffer: _Buffer
    exponent: Int[Array, ""]
    value: Float[Array, "..."]
    ok: Bool[Array, ""]


class ExactState(AbstractPrecision):
    """Bit-exact reversal through a fixed-point state and an information buffer.

    Each leaf is stored as `Y · 2^(−e)` with `Y` an int32 (int64 for float64 states)
    and one exponent `e`, chosen from `max(|z0|, |f(z0)|)` over all leaves with 64×
    headroom, so the resolution is about `2^-24` (`2^-55`) of the state's scale.
    Additions are then exact, and the multiplication by `c = 1 − β ≈ ±n/d` (the
    best rational with `n · d ≤ 2^15`, exact for the usual `β`) is made invertible
    as in the information buffer of Maclaurin et al.: the digit `Y mod d` is pushed
    into a per-element buffer and `Y // d · n` takes a digit in base `n` back out.
    The buffer is coded as in range-variant asymmetric numeral systems, so each push
    and pop is O(1) work, and it grows by `log2(d/n) = log2(1/|c|)` bits per step:
    the information limit, rounded up to whole 16-bit words. `f` still sees floats
    of the dtype of `z0`, and its output enters the state as `round(β·f·2^e)`, a
    deterministic function of `f`'s bits.

    The reconstruction is exact whatever `β`, dtype or number of steps, as long as
    `f` returns the same bits when re-evaluated on the same input, and the state stays
    within its range (reported as `RESULTS.state_out_of_range`).

    ??? cite "Reference"

        ```bibtex
        @inproceedings{maclaurin2015gradient,
            title={Gradient-based hyperparameter optimization through reversible
                   learning},
            author={Maclaurin, Dougal and Duvenaud, David and Adams, Ryan},
            booktitle={International Conference on Machine Learning},
            pages={2113--2122}, year={2015}
        }
        ```

    !!! Example

        ```python
        solver = revdeq.Reversible(beta=0.9, precision=revdeq.ExactState())  # default
        revdeq.reconstruction_error(cell, z0, x, solver=solver, max_steps=64)  # 0.0
        ```
    """

    def representable_beta(self, beta):
        sign, n, d = _rational(1 - beta)
        return 1 - sign * n / d

    def encode(self, z0, fz0, beta, max_steps):
        _, n, d = _rational(1 - beta)
        bound = max(1.0, abs(beta) / (1 - abs(1 - beta)))
        num_words = _num_words(beta, max_steps)
        low = _head_low(n, d)

        # One scale for all leaves: a leaf that starts at zero may grow like the rest.
        magnitude = jnp.maximum(_max_abs(z0), bound * _max_abs(fz0))
        top = jnp.ceil(jnp.log2(jnp.maximum(magnitude, 1e-30))).astype(jnp.int32)

        def leaf(z, f):
            int_dtype, float_dtype, bits = _fixed_point_format(z.dtype)
            exponent = jnp.clip(bits - 1 - _HEADROOM_BITS - top, -120, 120)
            ints = jnp.round(_scale(z, exponent)).astype(int_dtype)
            buffer = _Buffer(
                jnp.full(z.shape, low, jnp.int32),
                jnp.zeros((num_words, *z.shape), jnp.uint16),
                jnp.zeros(z.shape, jnp.int32),
            )
            value = _straight_through(_unscale(ints, exponent, z.dtype), z)
            return _ExactLeaf(ints, buffer, exponent, value, jnp.array(True))

        return jtu.tree_map(leaf, z0, fz0)

    def forward(self, state, fval, beta):
        sign, n, d = _rational(1 - beta)
        low = _head_low(n, d)

        def leaf(s: _ExactLeaf, f):
            _, _, bits = _fixed_point_format(s.value.dtype)
            digit = (s.ints % d).astype(jnp.int32)
            buffer, overflow_push = _push(s.buffer, digit, d, low)
            buffer, rem = _pop(buffer, n, low)
            injection, injection_ok = _injection(f, beta, s.exponent)
            ints = sign * ((s.ints // d) * n + rem.astype(s.ints.dtype)) + injection
            linear = (1 - beta) * s.value + beta * f.astype(s.value.dtype)
            value = _straight_through(_unscale(ints, s.exponent, s.value.dtype), linear)
            in_range = jnp.all(jnp.abs(ints) < (1 << bits))
            ok = s.ok & ~overflow_push & injection_ok & in_range
            return _ExactLeaf(ints, buffer, s.exponent, value, ok)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def reverse(self, state, fval, beta):
        sign, n, d = _rational(1 - beta)
        low = _head_low(n, d)

        def leaf(s: _ExactLeaf, f):
            ints = sign * (s.ints - _injection(f, beta, s.exponent)[0])
            digit = (ints % n).astype(jnp.int32)
            buffer, overflow_push = _push(s.buffer, digit, n, low)
            buffer, rem = _pop(buffer, d, low)
            ints = (ints // n) * d + rem.astype(ints.dtype)
            value = _unscale(ints, s.exponent, s.value.dtype)
            return _ExactLeaf(ints, buffer, s.exponent, value, s.ok & ~overflow_push)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def decode(self, state):
        return jtu.tree_map(lambda s: s.value, state, is_leaf=_is_exact_leaf)

    def in_range(self, state):
        oks = [s.ok for s in jtu.tree_leaves(state, is_leaf=_is_exact_leaf)]
        return jnp.all(jnp.stack(oks))


def _max_abs(tree) -> Float[Array, ""]:
    return jnp.max(
        jnp.stack(
            [jnp.max(jnp.abs(x)).astype(jnp.float32) for x in jtu.tree_leaves(tree)]
        )
    )


def _is_exact_leaf(x) -> bool:
    return isinstance(x, _ExactLeaf)


def _fixed_point_format(dtype) -> tuple[jnp.dtype, jnp.dtype, int]:
    """The integer dtype, the float dtype it is scaled in, and the magnitude bits.

    Magnitudes stay below `2**bits`, so sums of two never overflow. float64 states
    (under x64) get int64, and so a resolution finer than float64's own.
    """
    if jnp.dtype(dtype).itemsize == 8:
        return jnp.dtype(jnp.int64), jnp.dtype(jnp.float64), 61
    return jnp.dtype(jnp.int32), jnp.dtype(jnp.float32), 30


def _scale(x, exponent):
    _, float_dtype, _ = _fixed_point_format(x.dtype)
    return x.astype(float_dtype) * jnp.exp2(exponent.astype(float_dtype))


def _unscale(ints, exponent, dtype):
    float_dtype = jnp.float64 if ints.dtype == jnp.int64 else jnp.float32
    scaled = ints.astype(float_dtype) * jnp.exp2(-exponent.astype(float_dtype))
    return scaled.astype(dtype)


def _injection(f, beta, exponent):
    """`round(β·f·2^e)`, the same integer whenever `f` has the same bits, and whether
    it fits."""
    int_dtype, float_dtype, bits = _fixed_point_format(f.dtype)
    beta_f = (beta * jax.lax.stop_gradient(f).astype(float_dtype)).astype(f.dtype)
    scaled = jnp.round(_scale(beta_f, exponent))
    fits = jnp.all(jnp.abs(scaled) < 2.0**bits)
    return scaled.astype(int_dtype), fits


def _straight_through(exact, linear):
    """The value of `exact` with the derivative of `linear`, for unrolled autodiff."""
    return jax.lax.stop_gradient(exact) + (linear - jax.lax.stop_gradient(linear))
