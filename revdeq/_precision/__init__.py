"""How the reversible iteration stores its state, and so how exactly it reverses.

A precision policy owns the arithmetic of the update `s ← c·s + β·f` (with
`c = 1 − β`) and of its inverse `s ← (s − β·f) / c`. Inverting a step that contracts
by `|c|` must recover `log2(1/|c|)` bits per element, so a policy decides where those
bits live:

- [`revdeq.FloatState`][] (`float_state.py`) keeps the state as floats. The inverse
  amplifies rounding by `1/|c|` per step, so exactness lasts only as long as the
  state's spare mantissa.
- [`revdeq.ExactState`][] (`exact_state.py`) keeps the state as a fixed-point integer
  (`fixed_point.py`) and pushes exactly the bits that the multiplication by `c`
  discards into an integer information buffer (`buffer.py`), with O(1) work per
  step, together with guard bits of each injection of `f`, so that the reversal is
  bit-exact even where `f` gives slightly other bits in the backward pass.

The interface both implement is in `base.py`.
"""
