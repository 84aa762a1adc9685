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
import functools
from fractions import Fraction
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree, UInt32

from ._custom_types import Y
from ._solution import RESULTS
from ._tree import check_rows


class AbstractPrecision(eqx.Module):
    """A state representation for [`revdeq.Reversible`][]."""

    # Whether the reconstruction is bit for bit. Such a state is not unrolled by
    # default: in straight-line code XLA may fuse (and round) `f` differently in
    # the forward pass and in the backward pass's VJPs.
    bit_exact: ClassVar[bool] = False

    def representable_beta(self, beta: float) -> float:
        """The relaxation this representation uses in place of `beta`."""
        return beta

    @abc.abstractmethod
    def encode(self, z0: Y, fz0: Y, beta: float, differentiable: bool) -> PyTree:
        """The representation of `z0`, given its image `fz0 = f(z0)`.

        With `differentiable=True` the loop is differentiated by autodiff (as by
        [`revdeq.UnrolledAdjoint`][]), so the decoded values must carry the tangents
        of the float iteration; otherwise the state is only ever reversed.
        """

    @abc.abstractmethod
    def segment_length(self, beta: float, max_steps: int) -> int:
        """How many steps the driver runs between calls to `archive`."""

    @abc.abstractmethod
    def archive(self, state: PyTree) -> PyTree:
        """What to set aside at the end of a segment; the driver stacks it."""

    @abc.abstractmethod
    def restore(self, state: PyTree, archived: PyTree) -> PyTree:
        """The final state joined with its stacked archive, ready to reverse."""

    @abc.abstractmethod
    def forward(
        self, state: PyTree, fval: Y, beta: float, step: Int[Array, ""]
    ) -> PyTree:
        """`(1 − β)·state + β·fval`, as the `step`-th update (from 0) of `state`."""

    @abc.abstractmethod
    def reverse(
        self, state: PyTree, fval: Y, beta: float, step: Int[Array, ""]
    ) -> PyTree:
        """The inverse of the `step`-th `forward`: `(state − β·fval) / (1 − β)`.

        The step is an argument rather than part of `state`, so that a batched
        reverse loop can share one unbatched counter across its samples.
        """

    @abc.abstractmethod
    def decode(self, state: PyTree) -> Y:
        """The value `f` sees, in the dtypes of `z0`."""

    @abc.abstractmethod
    def status(self, state: PyTree) -> RESULTS:
        """`RESULTS.successful` if the representation has held `state` (a pytree of
        states) faithfully throughout, and otherwise why not.

        Asked once, after the loop, so a state that is lost must stay lost: checking
        in every step would cost a reduction per step, and the loop's result code,
        not an early stop, is what reports the failure.
        """


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
        import jax
        import jax.numpy as jnp
        import revdeq


        jax.config.update("jax_enable_x64", True)
        solver = revdeq.Reversible(beta=0.8, precision=revdeq.FloatState(jnp.float64))
        z0, x = jnp.zeros(4, jnp.float32), jnp.ones(4, jnp.float32)  # a float32 cell
        sol = revdeq.solve(lambda z, x: jnp.tanh(0.5 * z + x), z0, x, solver=solver)
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

    def encode(self, z0, fz0, beta, differentiable):
        del fz0, beta, differentiable
        leaves, treedef = jtu.tree_flatten(z0)
        dtypes = tuple(leaf.dtype for leaf in leaves)
        value = (
            z0
            if self.dtype is None
            else jtu.tree_map(lambda x: x.astype(self.dtype), z0)
        )
        return _FloatCarrier(value, dtypes)

    def segment_length(self, beta, max_steps):
        del beta
        return max_steps

    def archive(self, state):
        del state
        return None

    def restore(self, state, archived):
        del archived
        return state

    def forward(self, state, fval, beta, step):
        del step
        new = jtu.tree_map(
            lambda s, f: ((1 - beta) * s + beta * f.astype(s.dtype)).astype(s.dtype),
            state.value,
            fval,
        )
        return _FloatCarrier(new, state.dtypes)

    def reverse(self, state, fval, beta, step):
        del step
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

    def status(self, state):
        del state
        return RESULTS.successful


# `c ≈ ±n/d` with `n · d` at most this: exact for the usual `β`, and at least two
# updates fit in each buffer word.
_MAX_RATIONAL = 1 << 15
_WORD_LIMIT = 1 << 32


def _rational(c: float) -> tuple[int, int, int]:
    """`c ≈ sign · n / d`: the best rational with `n · d ≤ 2**15`. Exact for the usual
    `β` (0.5, 0.8, 0.9, 1.2, ...)."""
    limit = _MAX_RATIONAL
    while True:
        frac = Fraction(abs(c)).limit_denominator(limit)
        if frac.numerator * frac.denominator <= _MAX_RATIONAL:
            return (1 if c > 0 else -1), frac.numerator, frac.denominator
        limit //= 2


def _updates_per_word(n: int, d: int) -> int:
    """How many updates `h ← (h·d + a) // n` (with `a < d`) a head that starts at 0
    takes before the next could exceed 32 bits."""
    bound, updates = 0, 0
    while bound * d + d - 1 < _WORD_LIMIT:
        bound = (bound * d + d - 1) // n
        updates += 1
    return updates


class _Buffer(eqx.Module):
    """Per-element digits, packed into 32-bit words on a fixed schedule.

    An update pushes a digit in base `d` into the head and pops one in base `n` back
    out, `h ← h·d + a; r = h mod n; h ← h // n`: a bijection between `(h, a)` and
    `(h, r)`. The head starts afresh at zero every `per_word` updates, as many as
    keep it below `2^32`, and the driver archives it at the end of each word (one
    segment of the loop). Every element so changes word at the same update, and a
    word is addressed by the update count alone: it is read back as one slice, with
    no per-element gather.
    """

    head: UInt32[Array, "..."]
    # The archived heads, one per word; `None` until the loop has ended.
    words: UInt32[Array, "words ..."] | None = None


def _update(buffer: _Buffer, digit, d: int, n: int, step) -> tuple[_Buffer, Array]:
    """The `step`-th update: push `digit ∈ [0, d)` and pop a digit in `[0, n)`."""
    fresh = step % _updates_per_word(n, d) == 0
    head = jnp.where(fresh, 0, buffer.head) * d + digit.astype(jnp.uint32)
    if n == 1:
        return _Buffer(head), jnp.zeros_like(head)
    return _Buffer(head // n), head % n


def _undo(buffer: _Buffer, rem, d: int, n: int, step) -> tuple[_Buffer, Array]:
    """The inverse of the `step`-th `_update`: push back `rem`, and return the digit
    it took."""
    per_word = _updates_per_word(n, d)
    # Undoing the last update of a word starts from the head archived after it.
    archived = jax.lax.dynamic_index_in_dim(
        buffer.words, step // per_word, 0, keepdims=False
    )
    head = jnp.where(step % per_word == per_word - 1, archived, buffer.head)
    head = head * n + rem.astype(jnp.uint32)
    return _Buffer(head // d, buffer.words), head % d


class _ExactLeaf(eqx.Module):
    # The state times `2^e`, or the sentinel `_lost` (below `−2^bits`) where it has
    # left its range or met a non-finite `f`.
    ints: Int[Array, "..."]
    buffer: _Buffer
    # Broadcasts against `ints`: a scalar, or one per row with `rowwise`.
    exponent: Int[Array, "..."]
    # The dtype of `z0`, in which `f` sees the state.
    dtype: jnp.dtype = eqx.field(static=True)
    # Only in a differentiated loop: `ints · 2^-e` with the tangent of the float
    # iteration. Otherwise the value is decoded on demand, and the loop's carry
    # holds no float copy of the state.
    value: Float[Array, "..."] | None = None


class ExactState(AbstractPrecision):
    """Bit-exact reversal through a fixed-point state and an information buffer.

    Each leaf is stored as `Y · 2^(−e)` with `Y` an int32 (int64 for float64 states)
    and one exponent `e`, chosen from `max(|z0|, |f(z0)|)` over all leaves with
    `2^headroom_bits` headroom, so the resolution is about `2^-24` (`2^-55`) of the
    state's scale at the default 6 bits.
    Additions are then exact, and the multiplication by `c = 1 − β ≈ ±n/d` (the
    best rational with `n · d ≤ 2^15`, exact for the usual `β`) is made invertible
    as in the information buffer of Maclaurin et al.: the digit `Y mod d` is pushed
    into a per-element buffer and `Y // d · n` takes a digit in base `n` back out.
    The buffer packs the digits of consecutive steps into 32-bit words in mixed
    radix, with O(1) elementwise work per step and no gather or scatter. A word holds
    `⌊32 / log2(d/n)⌋` steps (32 at `β = 0.5`, 13 at 0.8, 9 at 0.9), so the buffer
    grows by 93–100% of the information limit, `log2(1/|c|)` bits per element per
    step, rounded up to whole words. Completed words are kept outside the loop's
    carry, so a batched loop does not copy them at every step. `f` still sees
    floats of the dtype of `z0`, and its output enters the state as `β·f·2^e`
    truncated to an integer, a deterministic function of `f`'s bits.

    With `rowwise=True` each row (each element of the leading axis that every leaf
    shares, e.g. the positions of a sequence) gets its own exponent from its own
    magnitudes, so how a row is rounded does not depend on the other rows: a causal
    model stays exactly causal.

    The reconstruction is exact whatever `β`, dtype or number of steps, as long as
    `f` returns the same bits when re-evaluated on the same input, and the state stays
    within its range (reported as `RESULTS.state_out_of_range`).

    **Arguments:**

    - `rowwise`: one exponent per row of the leading axis rather than one for the
        whole state.
    - `headroom_bits`: how far the state may grow past its initial bound
        (`β / (1 − |1 − β|) · max|f(z0)|`, the bound for a contraction) before it
        leaves its range; each bit costs one bit of resolution. A residual cell
        `z + g(z)` grows with the number of steps, so give it about
        `log2(max_steps)` more.

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
        import jax
        import jax.numpy as jnp
        import revdeq


        cell = revdeq.nn.MLPCell(dim=8, hidden=16, key=jax.random.key(0))
        x = jnp.ones(8)

        solver = revdeq.Reversible(beta=0.9, precision=revdeq.ExactState())  # default
        err = revdeq.reconstruction_error(cell, jnp.zeros(8), x, solver=solver,
                                          max_steps=16)  # 0.0
        ```
    """

    bit_exact: ClassVar[bool] = True

    rowwise: bool = False
    headroom_bits: int = 6

    def __check_init__(self):
        if not 0 <= self.headroom_bits <= 16:
            raise ValueError(
                f"`headroom_bits` must lie in [0, 16], got {self.headroom_bits}."
            )

    def representable_beta(self, beta):
        sign, n, d = _rational(1 - beta)
        return 1 - sign * n / d

    def encode(self, z0, fz0, beta, differentiable):
        bound = max(1.0, abs(beta) / (1 - abs(1 - beta)))
        if self.rowwise:
            check_rows(z0)

        # One scale for all leaves (per row): a leaf that starts at zero may grow
        # like the rest.
        magnitude = jnp.maximum(
            _max_abs(z0, self.rowwise), bound * _max_abs(fz0, self.rowwise)
        )
        tiny = jnp.finfo(magnitude.dtype).tiny  # an all-zero start
        top = jnp.ceil(jnp.log2(jnp.maximum(magnitude, tiny))).astype(jnp.int32)

        def leaf(z, f):
            int_dtype, float_dtype, bits = _fixed_point_format(z.dtype)
            # Any normal magnitude gets the full resolution: `_times_pow2` reaches
            # twice the float's exponent range.
            limit = 2 * (jnp.finfo(float_dtype).maxexp - 2)
            exponent = jnp.clip(bits - 1 - self.headroom_bits - top, -limit, limit)
            # One exponent per row, broadcast along the other axes.
            exponent = exponent.reshape(exponent.shape + (1,) * (z.ndim - top.ndim))
            ints = jnp.round(_scale(z, exponent)).astype(int_dtype)
            buffer = _Buffer(jnp.zeros(z.shape, jnp.uint32))
            value = None
            if differentiable:
                value = _straight_through(_unscale(ints, exponent, z.dtype), z)
            return _ExactLeaf(ints, buffer, exponent, z.dtype, value)

        return jtu.tree_map(leaf, z0, fz0)

    def segment_length(self, beta, max_steps):
        _, n, d = _rational(1 - beta)
        return min(max_steps, _updates_per_word(n, d))

    def archive(self, state):
        return jtu.tree_map(lambda s: s.buffer.head, state, is_leaf=_is_exact_leaf)

    def restore(self, state, archived):
        def leaf(s: _ExactLeaf, words):
            buffer = _Buffer(s.buffer.head, words)
            return _ExactLeaf(s.ints, buffer, s.exponent, s.dtype, s.value)

        return jtu.tree_map(leaf, state, archived, is_leaf=_is_exact_leaf)

    def forward(self, state, fval, beta, step):
        sign, n, d = _rational(1 - beta)

        def leaf(s: _ExactLeaf, f):
            _, _, bits = _fixed_point_format(s.ints.dtype)
            quotient, digit = _floor_divmod(s.ints, d, bits)
            buffer, rem = _update(s.buffer, digit, d, n, step)
            injection, fits = _injection(f, beta, s.exponent)
            ints = sign * (quotient * n + rem.astype(s.ints.dtype)) + injection
            # A non-finite `f` never fits.
            ints = jnp.where(fits, ints, _lost(ints.dtype))
            ints = jnp.where(s.ints < -(2**bits), s.ints, ints)  # sticky
            value = None
            if s.value is not None:
                linear = (1 - beta) * s.value + beta * f.astype(s.dtype)
                exact = _unscale(ints, s.exponent, s.dtype)
                value = _straight_through(exact, linear)
            return _ExactLeaf(ints, buffer, s.exponent, s.dtype, value)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def reverse(self, state, fval, beta, step):
        sign, n, d = _rational(1 - beta)

        def leaf(s: _ExactLeaf, f):
            _, _, bits = _fixed_point_format(s.ints.dtype)
            ints = sign * (s.ints - _injection(f, beta, s.exponent)[0])
            quotient, rem = _floor_divmod(ints, n, bits)
            buffer, digit = _undo(s.buffer, rem, d, n, step)
            ints = quotient * d + digit.astype(ints.dtype)
            return _ExactLeaf(ints, buffer, s.exponent, s.dtype)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def decode(self, state):
        def leaf(s: _ExactLeaf):
            if s.value is None:
                return _unscale(s.ints, s.exponent, s.dtype)
            return s.value

        return jtu.tree_map(leaf, state, is_leaf=_is_exact_leaf)

    def status(self, state):
        leaves = jtu.tree_leaves(state, is_leaf=_is_exact_leaf)
        lost = jnp.stack([jnp.min(s.ints) == _lost(s.ints.dtype) for s in leaves])
        return RESULTS.where(
            jnp.any(lost), RESULTS.state_out_of_range, RESULTS.successful
        )


def _lost(int_dtype) -> int:
    """The value of a state that left its range or met a non-finite `f`: the lowest
    integer, far below every valid state (within `±2^bits`).

    One sentinel rather than one per cause keeps the update, which waits on `f`,
    two operations shorter; the loop's own result code names a non-finite `f`.
    """
    return int(jnp.iinfo(int_dtype).min)


def _max_abs(tree, rowwise: bool) -> Float[Array, "*rows"]:
    """The largest magnitude over all leaves (per row of the leading axis, with
    `rowwise`), in float64 if a leaf is float64."""
    leaves = jtu.tree_leaves(tree)
    wide = any(jnp.dtype(x.dtype).itemsize == 8 for x in leaves)
    dtype = jnp.float64 if wide else jnp.float32
    axes = (lambda x: tuple(range(1, x.ndim))) if rowwise else (lambda x: None)
    maxima = [jnp.max(jnp.abs(x), axis=axes(x)).astype(dtype) for x in leaves]
    return jnp.max(jnp.stack(maxima), axis=0)


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


def _floor_divmod(ints, divisor: int, bits: int) -> tuple[Array, Array]:
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


def _times_pow2(x, exponent):
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


def _scale(x, exponent):
    _, float_dtype, _ = _fixed_point_format(x.dtype)
    return _times_pow2(x.astype(float_dtype), exponent)


def _unscale(ints, exponent, dtype):
    float_dtype = jnp.float64 if ints.dtype == jnp.int64 else jnp.float32
    return cast_exactly(_times_pow2(ints.astype(float_dtype), -exponent), dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def cast_exactly(x: Array, dtype) -> Array:
    """`x.astype(dtype)`, rounded where it is written even under XLA's excess
    precision.

    By default XLA may compute a bfloat16 (or float16) value in float32 and skip
    the rounding of a cast pair such as `x.astype(bfloat16).astype(float32)`;
    whether it does depends on where its fusions and loop bodies end, and these
    differ between the forward and the reverse pass. A cell whose inputs or
    output cross a precision boundary then gives different bits in the two passes,
    and a reversible reconstruction drifts. This cast rounds with integer
    arithmetic on the bits, which XLA keeps, to the precision of the narrower of
    the two dtypes. Its derivative is that of `astype`. [`revdeq.nn.DEQ`][]'s
    `compute_dtype` casts this way; use it at the boundaries of a cell that casts
    on its own.

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
    return _round_to(x.astype(wide), narrow).astype(dtype)


@cast_exactly.defjvp
def _cast_exactly_jvp(dtype, primals, tangents):
    (x,), (t,) = primals, tangents
    return cast_exactly(x, dtype), t.astype(dtype)


def _round_to(x, dtype):
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


def _injection(f, beta, exponent):
    """`β·f·2^e` truncated to an integer, the same whenever `f` has the same bits,
    and whether it fits.

    An injection below `(1 − |c|)·2^(bits − 1)` keeps `|c·Y + injection|` below
    `2^bits` whenever `|Y|` is, so the state never leaves its range unnoticed.
    """
    int_dtype, float_dtype, bits = _fixed_point_format(f.dtype)
    # One rounding, of β·f to the dtype of f as the float iteration would; the
    # scaling by 2^e is exact. Both roundings hold under XLA's excess precision
    # (see `cast_exactly`).
    wide = cast_exactly(jax.lax.stop_gradient(f), float_dtype)
    beta_f = _round_to(beta * wide, f.dtype)
    scaled = _times_pow2(beta_f, exponent)
    fits = jnp.abs(scaled) < (1 - abs(1 - beta)) * 2.0 ** (bits - 1)
    return scaled.astype(int_dtype), fits


@jax.custom_jvp
def _straight_through(exact, linear):
    """The value of `exact` with the derivative of `linear`, for unrolled autodiff.

    Without differentiation `linear` is unused, and so never computed."""
    del linear
    return exact


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
    exact, _ = primals
    _, linear_dot = tangents
    return exact, linear_dot
