"""The reversible state as fixed-point integers with an information buffer."""

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree, UInt32

from .._custom_types import Y
from .._solution import RESULTS
from .._tree import check_rows, tree_max_abs
from .base import AbstractSegmentedPrecision
from .buffer import InformationBuffer, Radices
from .fixed_point import (
    fixed_point_format,
    guard,
    injection,
    injection_bits,
    rational,
    scale,
    snap,
    times_fraction,
    undo_times_fraction,
    unscale,
)


class _ExactLeaf(eqx.Module):
    # The state times `2^e`, or the sentinel `_lost` (below `−2^bits`) where it has
    # left its range or met a non-finite `f`.
    ints: Int[Array, "..."]
    buffer: InformationBuffer
    # Broadcasts against `ints`: a scalar, or one per row with `rowwise`.
    exponent: Int[Array, "..."]
    # The dtype of `z0`, in which `f` sees the state.
    dtype: jnp.dtype = eqx.field(static=True)
    # Only in a differentiated loop: `ints · 2^-e` with the tangent of the float
    # iteration. Otherwise the value is decoded on demand, and the loop's carry
    # holds no float copy of the state.
    value: Float[Array, "..."] | None = None


class ExactState(AbstractSegmentedPrecision):
    """Bit-exact reversal through a fixed-point state and an information buffer.

    Each leaf is stored as `Y · 2^(−e)` with `Y` an int32 (int64 for float64 states)
    and one exponent `e`, chosen from `max(|z0|, |f(z0)|)` over all leaves with
    `2^headroom_bits` headroom, so the resolution (one *quantum*, `2^−e`) is about
    `2^-24` (`2^-55`) of the state's scale at the default 6 bits. Additions are then
    exact, and the multiplication by `c = 1 − β ≈ ±n/d` (the best rational with
    `n · d ≤ 2^15`, exact for the usual `β`) is made invertible as in the
    information buffer of Maclaurin et al.: `Y` becomes `⌊(Y·n + r) / d⌋`, within one
    unit of `Y·n/d`, where the digit `r ∈ [0, n)` is popped from a per-element
    buffer and the remainder of the division by `d` is pushed into it. `f` sees
    floats of the dtype of `z0`, and its output enters the state as the integer
    `q = β·f·2^e` (truncated).

    **Guard bits.** The backward pass evaluates `f` in other programs than the
    forward pass (inside VJPs, in another loop body or in straight-line code), and
    XLA may round them differently: fused multiply-adds, reduction orders. So each
    update also pushes the low `guard_bits` bits of `q`'s index among the values an
    injection can take (every integer below `2^p`, `p` the significant bits of
    `f`'s dtype, and only the floats with `p` bits above) into the buffer, and the
    reverse step takes, of the values with those low bits, the one nearest to its
    own `q'`. The reversal is therefore bit for bit whenever the two evaluations of
    `f` at the same input give injections less than `2^(guard_bits − 1)` steps of
    that grid apart (128 at the default 8 bits), a step being the larger of a quantum
    and a unit in the last place of `β·f`, whatever the compiler does. Beyond that
    radius the rebuilt state drifts, and the certificate of
    [`revdeq.ReversibleAdjoint`][] reports it.

    The buffer packs the digits of consecutive steps into 32-bit words in mixed
    radix, with O(1) elementwise work per step and no gather or scatter: each step
    costs `log2(1/|c|) + guard_bits` bits per element, rounded up to whole words
    (a word holds 3 steps at `β = 0.5`, 0.8 and 1.2, and 2 at 0.9). Completed words
    are kept outside the loop's carry, so a batched loop does not copy them at every
    step.

    With `rowwise=True` each row (each element of the leading axis that every leaf
    shares, e.g. the positions of a sequence) gets its own exponent from its own
    magnitudes, so how a row is rounded does not depend on the other rows: a causal
    model stays exactly causal.

    The state must stay within its range (reported as
    `RESULTS.state_out_of_range`).

    **Arguments:**

    - `rowwise`: one exponent per row of the leading axis rather than one for the
        whole state.
    - `headroom_bits`: how far the state may grow past its initial bound
        (`β / (1 − |1 − β|) · max|f(z0)|`, the bound for a contraction) before it
        leaves its range; each bit costs one bit of resolution. A residual cell
        `z + g(z)` grows with the number of steps, so give it about
        `log2(max_steps)` more.
    - `guard_bits`: the low bits of each injection kept for the reverse pass,
        from 0 to 16; they tolerate a disagreement of `f` between the passes of up
        to `2^(guard_bits − 1)` steps of the injection's grid (strictly), and cost
        `guard_bits` bits per element and step in the buffer. 0 requires `f` to
        give the same bits in both passes.

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

    bit_exact: ClassVar[bool] = True  # pyright: ignore[reportIncompatibleVariableOverride]

    rowwise: bool = False
    headroom_bits: int = 6
    guard_bits: int = 8

    def __check_init__(self) -> None:
        if not 0 <= self.headroom_bits <= 16:
            raise ValueError(
                f"`headroom_bits` must lie in [0, 16], got {self.headroom_bits}."
            )
        if not 0 <= self.guard_bits <= 16:
            raise ValueError(
                f"`guard_bits` must lie in [0, 16], got {self.guard_bits}."
            )

    def representable_beta(self, beta: float) -> float:
        sign, n, d = rational(1 - beta)
        return 1 - sign * n / d

    def _radices(self, beta: float) -> Radices:
        _, n, d = rational(1 - beta)
        return Radices(push=d, pop=n, guard_bits=self.guard_bits)

    def encode(
        self, z0: Y, fz0: Y, beta: float, differentiable: bool
    ) -> PyTree[_ExactLeaf]:
        bound = max(1.0, abs(beta) / (1 - abs(1 - beta)))
        if self.rowwise:
            check_rows(z0)

        # One scale for all leaves (per row): a leaf that starts at zero may grow
        # like the rest.
        leaves = jtu.tree_leaves((z0, fz0))
        wide = any(jnp.dtype(x.dtype).itemsize == 8 for x in leaves)
        dtype = jnp.float64 if wide else jnp.float32
        magnitude = jnp.maximum(
            tree_max_abs(z0, rowwise=self.rowwise, dtype=dtype),
            bound * tree_max_abs(fz0, rowwise=self.rowwise, dtype=dtype),
        )
        tiny = jnp.finfo(magnitude.dtype).tiny  # an all-zero start
        top = jnp.ceil(jnp.log2(jnp.maximum(magnitude, tiny))).astype(jnp.int32)

        def leaf(z: Array, f: Array) -> _ExactLeaf:
            int_dtype, float_dtype, bits = fixed_point_format(z.dtype)
            # Any normal magnitude gets the full resolution: `times_pow2` reaches
            # twice the float's exponent range.
            limit = 2 * (jnp.finfo(float_dtype).maxexp - 2)
            exponent = jnp.clip(bits - 1 - self.headroom_bits - top, -limit, limit)
            # One exponent per row, broadcast along the other axes.
            exponent = exponent.reshape(exponent.shape + (1,) * (z.ndim - top.ndim))
            ints = jnp.round(scale(z, exponent)).astype(int_dtype)
            buffer = InformationBuffer(jnp.zeros(z.shape, jnp.uint32))
            value = None
            if differentiable:
                value = _straight_through(unscale(ints, exponent, z.dtype), z)
            return _ExactLeaf(ints, buffer, exponent, z.dtype, value)

        return jtu.tree_map(leaf, z0, fz0)

    def segment_length(self, beta: float, max_steps: int) -> int:
        return min(max_steps, self._radices(beta).updates_per_word)

    def archive(self, state: PyTree[_ExactLeaf]) -> PyTree[UInt32[Array, "..."]]:
        return jtu.tree_map(lambda s: s.buffer.head, state, is_leaf=_is_exact_leaf)

    def restore(
        self, state: PyTree[_ExactLeaf], archived: PyTree[UInt32[Array, "words ..."]]
    ) -> PyTree[_ExactLeaf]:
        def leaf(s: _ExactLeaf, words: Array) -> _ExactLeaf:
            buffer = InformationBuffer(s.buffer.head, words)
            return _ExactLeaf(s.ints, buffer, s.exponent, s.dtype, s.value)

        return jtu.tree_map(leaf, state, archived, is_leaf=_is_exact_leaf)

    def forward(
        self,
        state: PyTree[_ExactLeaf],
        fval: Y,
        beta: float,
        step: Int[Array, ""] | int,
    ) -> PyTree[_ExactLeaf]:
        sign, n, d = rational(1 - beta)
        radices = self._radices(beta)

        def leaf(s: _ExactLeaf, f: Array) -> _ExactLeaf:
            s, f = _materialise(s, f)
            _, _, bits = fixed_point_format(s.ints.dtype)
            buffer, popped = s.buffer.begin(radices, step).pop(n)
            product, remainder = times_fraction(s.ints, popped, n, d, bits)
            buffer = buffer.push(remainder, d)
            q, fits = injection(f, beta, s.exponent)
            low = guard(q, self.guard_bits, injection_bits(f.dtype, s.dtype))
            buffer = buffer.push(low, 1 << self.guard_bits)
            ints = sign * product + q
            # A non-finite `f` never fits.
            ints = jnp.where(fits, ints, _lost(ints.dtype))
            ints = jnp.where(s.ints < -(2**bits), s.ints, ints)  # sticky
            value = None
            if s.value is not None:
                linear = (1 - beta) * s.value + beta * f.astype(s.dtype)
                exact = unscale(ints, s.exponent, s.dtype)
                value = _straight_through(exact, linear)
            return _ExactLeaf(ints, buffer, s.exponent, s.dtype, value)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def reverse(
        self,
        state: PyTree[_ExactLeaf],
        fval: Y,
        beta: float,
        step: Int[Array, ""] | int,
    ) -> PyTree[_ExactLeaf]:
        sign, n, d = rational(1 - beta)
        radices = self._radices(beta)

        def leaf(s: _ExactLeaf, f: Array) -> _ExactLeaf:
            s, f = _materialise(s, f)
            _, _, bits = fixed_point_format(s.ints.dtype)
            buffer, low = s.buffer.resume(radices, step).pop(1 << self.guard_bits)
            estimate = injection(f, beta, s.exponent)[0]
            q = snap(estimate, low, self.guard_bits, injection_bits(f.dtype, s.dtype))
            buffer, remainder = buffer.pop(d)
            product = sign * (s.ints - q)
            ints, popped = undo_times_fraction(product, remainder, n, d, bits)
            buffer = buffer.push(popped, n)
            return _ExactLeaf(ints, buffer, s.exponent, s.dtype)

        return jtu.tree_map(leaf, state, fval, is_leaf=_is_exact_leaf)

    def decode(self, state: PyTree[_ExactLeaf]) -> Y:
        def leaf(s: _ExactLeaf) -> Array:
            if s.value is None:
                return unscale(s.ints, s.exponent, s.dtype)
            return s.value

        return jtu.tree_map(leaf, state, is_leaf=_is_exact_leaf)

    def status(self, state: PyTree[_ExactLeaf]) -> RESULTS:
        leaves = jtu.tree_leaves(state, is_leaf=_is_exact_leaf)
        lost = jnp.stack([jnp.min(s.ints) == _lost(s.ints.dtype) for s in leaves])
        out_of_range, successful = RESULTS.state_out_of_range, RESULTS.successful
        return RESULTS.where(jnp.any(lost), out_of_range, successful)  # pyright: ignore[reportArgumentType]


def _lost(int_dtype: jnp.dtype) -> int:
    """The value of a state that left its range or met a non-finite `f`: the lowest
    integer, far below every valid state (within `±2^bits`).

    One sentinel rather than one per cause keeps the update, which waits on `f`,
    two operations shorter; the loop's own result code names a non-finite `f`.
    """
    return int(jnp.iinfo(int_dtype).min)


def _materialise(s: _ExactLeaf, f: Array) -> tuple[_ExactLeaf, Array]:
    """The inputs of an update, computed once, on backends that keep optimisation
    barriers through fusion (XLA:GPU).

    An update has several outputs (the state, the buffer's head), and XLA fuses
    elementwise producers into each consumer: past this barrier, the cell's last
    layers and the previous update are not evaluated again for every output.
    XLA:CPU drops barriers before it fuses, so there it does not keep anything
    from being computed twice (a tanh and a conv cell compiled, straight-line, to
    the same programs without it), and `computed_once` keeps what becomes an
    integer of the state computed once. In XLA:CPU loop bodies it leaves copies of
    the leaf's arrays, the buffer's words among them; they did not change the
    time of a 16-step training step.
    """
    return jax.lax.optimization_barrier((s, f))


def _is_exact_leaf(x: object) -> bool:
    return isinstance(x, _ExactLeaf)


@jax.custom_jvp
def _straight_through(exact: Array, linear: Array) -> Array:
    """The value of `exact` with the derivative of `linear`, for unrolled autodiff.

    Without differentiation `linear` is unused, and so never computed."""
    del linear
    return exact


@_straight_through.defjvp
def _straight_through_jvp(
    primals: tuple[Array, Array], tangents: tuple[Array, Array]
) -> tuple[Array, Array]:
    exact, _ = primals
    _, linear_dot = tangents
    return exact, linear_dot
