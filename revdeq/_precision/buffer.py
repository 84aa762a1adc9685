"""The information buffer: per-element digits packed into 32-bit words.

Pushing a digit `a` in base `b` is `h ← h·b + a`; popping one is `a = h mod b,
h ← h // b`. Each is the other's inverse, so a sequence of pushes and pops undoes
exactly when it is replayed backwards. An [`revdeq.ExactState`][] update pops a
digit in base `n` that its multiplication by `n/d` consumes, pushes the remainder
that the multiplication would discard (base `d`), and pushes the low guard bits of
its injection (base `2^k`).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Int, UInt32


Step = Int[Array, ""] | int


_WORD_LIMIT = 1 << 32


class Radices(eqx.Module):
    """The bases of one update: pop in base `pop`, push in base `push`, then push in
    base `2^guard_bits`."""

    push: int = eqx.field(static=True)
    pop: int = eqx.field(static=True)
    guard_bits: int = eqx.field(static=True)

    @property
    def updates_per_word(self) -> int:
        """How many updates a head that starts at 0 takes while no intermediate
        value can reach `2^32`."""
        guard = 1 << self.guard_bits
        bound, updates = 0, 0
        while True:
            pushed = (bound // self.pop) * self.push + self.push - 1
            guarded = pushed * guard + guard - 1
            if max(pushed, guarded) >= _WORD_LIMIT:
                return updates
            bound, updates = guarded, updates + 1


class InformationBuffer(eqx.Module):
    """Per-element digits, packed into 32-bit words on a fixed schedule.

    The head starts afresh at zero every `updates_per_word` updates, as many as keep
    it below `2^32`, and the driver archives it at the end of each word (one segment
    of the loop). Every element so changes word at the same update, and a word is
    addressed by the update count alone: it is read back as one slice, with no
    per-element gather.
    """

    head: UInt32[Array, "..."]
    # The archived heads, one per word; `None` until the loop has ended.
    words: UInt32[Array, "words ..."] | None = None

    def begin(self, radices: Radices, step: Step) -> "InformationBuffer":
        """The buffer before the `step`-th update: a fresh head at a word's start."""
        fresh = step % radices.updates_per_word == 0
        return InformationBuffer(jnp.where(fresh, jnp.uint32(0), self.head), self.words)

    def resume(self, radices: Radices, step: Step) -> "InformationBuffer":
        """The inverse of `begin`, before undoing the `step`-th update: the head
        archived after a word's last update."""
        assert self.words is not None, "restore the archived words first"
        per_word = radices.updates_per_word
        archived = jax.lax.dynamic_index_in_dim(
            self.words, step // per_word, 0, keepdims=False
        )
        last = step % per_word == per_word - 1
        return InformationBuffer(jnp.where(last, archived, self.head), self.words)

    def push(self, digit: Array, base: int) -> "InformationBuffer":
        """Push `digit ∈ [0, base)`."""
        if base == 1:
            return self
        head = self.head * jnp.uint32(base) + digit.astype(jnp.uint32)
        return InformationBuffer(head, self.words)

    def pop(self, base: int) -> tuple["InformationBuffer", UInt32[Array, "..."]]:
        """Pop a digit in `[0, base)`: the inverse of `push`."""
        if base == 1:
            return self, jnp.zeros_like(self.head)
        base_u = jnp.uint32(base)
        return InformationBuffer(self.head // base_u, self.words), self.head % base_u
