from collections.abc import Callable

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Int, PyTree, Scalar

from .._precision import AbstractPrecision, ExactState
from .._solution import RESULTS
from .._tree import tree_dtype, tree_max_abs
from .base import AbstractSolver, ConvergenceState, check_tolerances, no_progress


class _ReversibleState(eqx.Module):
    y: PyTree
    z: PyTree
    fz: PyTree
    # The encoded z₀, against which the certificate checks the rebuilt one.
    start: PyTree
    num_steps: Int[Array, ""]
    progress: ConvergenceState


class Reversible(AbstractSolver):
    """The reversible fixed-point iteration of RevDEQs.

    With state `(y, z)`, `y₀ = z₀` and `c = 1 − β`, one step is

        y ← c·y + β·f(z)
        z ← c·z + β·f(y)

    and is exactly invertible, so [`revdeq.ReversibleAdjoint`][] can walk it backwards
    and give the exact gradient of the computed output at memory constant in the
    number of steps. Each step evaluates `f` twice; one more evaluation at `z₀` starts
    the iteration, and the last evaluation at `z` makes the reported residual that of
    the returned value.

    **Arguments:**

    - `beta`: relaxation, in (0, 2) and not 1. The paper uses 0.5 for language and
        0.8 for vision. The inverse amplifies errors by `1/|1 − β|` per step.
    - `rtol`, `atol`, `norm`: stop once
      `norm((f(z) − z) / (atol + rtol · |f(z)|)) < 1`, as optimistix does;
      `norm` defaults to the largest magnitude.
    - `precision`: how the state is stored; see [`revdeq.ExactState`][] (default,
        bit-exact reversal) and [`revdeq.FloatState`][].

    ??? cite "Reference"

        ```bibtex
        @article{mccallum2025reversible,
            title={Reversible Deep Equilibrium Models},
            author={McCallum, Sam and Arora, Kamran and Foster, James},
            journal={arXiv preprint arXiv:2509.12917},
            year={2025}
        }
        ```

    !!! Example

        ```python
        import jax.numpy as jnp
        import revdeq


        def cell(z, x):
            return jnp.tanh(0.5 * z + x)


        z0, x = jnp.zeros(4), jnp.ones(4)

        solver = revdeq.Reversible(beta=0.8, rtol=0, atol=0)  # exactly max_steps
        sol = revdeq.solve(cell, z0, x, solver=solver,
                           adjoint=revdeq.ReversibleAdjoint(), max_steps=4)
        ```
    """

    beta: float = eqx.field(converter=float, default=0.8)
    rtol: float = eqx.field(converter=float, default=1e-4)
    atol: float = eqx.field(converter=float, default=1e-6)
    norm: Callable[[PyTree], Scalar] = tree_max_abs
    precision: AbstractPrecision = ExactState()

    def __check_init__(self):
        check_tolerances(self)
        if not 0 < self.beta < 2 or self.beta == 1:
            raise ValueError(
                f"`beta` must lie in (0, 2) and differ from 1, got {self.beta}: at 1 "
                "the step cannot be inverted, and outside (0, 2) it does not contract."
            )

    @property
    def bit_exact(self) -> bool:
        return self.precision.bit_exact

    @property
    def relaxation(self) -> float:
        """The `β` the iteration uses: `beta` itself, unless the precision can only
        reverse a nearby value exactly (see [`revdeq.ExactState`][])."""
        return self.precision.representable_beta(self.beta)

    def init(self, fn, y, args, options, f_struct, aux_struct, tags):
        del f_struct, aux_struct, tags
        fz0, _ = fn(y, args)
        # Drivers other than revdeq's (optimistix's) do not say whether they
        # differentiate the loop: assume they do, so that no gradient is lost.
        differentiable = options.get("differentiable", True)
        state = self.precision.encode(y, fz0, self.relaxation, differentiable)
        # The first step uses f at the true z₀; the backward pass evaluates f there
        # too. The certificate compares against the encoded z₀.
        start = self.precision.decode(state)
        progress = self.progress(fz0, y, no_progress(tree_dtype(y)), 1)
        return _ReversibleState(state, state, fz0, start, jnp.array(0), progress)

    def step(self, fn, y, args, options, state, tags):
        del y, options, tags
        beta, step = self.relaxation, state.num_steps
        ys = self.precision.forward(state.y, state.fz, beta, step)
        fy, _ = fn(self.precision.decode(ys), args)
        zs = self.precision.forward(state.z, fy, beta, step)
        z = self.precision.decode(zs)
        fz, aux = fn(z, args)
        progress = self.progress(fz, z, state.progress, 2)
        new_state = _ReversibleState(ys, zs, fz, state.start, step + 1, progress)
        return z, new_state, aux

    def segment_length(self, max_steps):
        return self.precision.segment_length(self.relaxation, max_steps)

    def archive(self, state):
        return self.precision.archive(state.y), self.precision.archive(state.z)

    def finish(self, state, archived, result):
        if archived is not None:
            y = self.precision.restore(state.y, archived[0])
            z = self.precision.restore(state.z, archived[1])
            state = eqx.tree_at(lambda s: (s.y, s.z), state, (y, z))
        # Checked once: a lost state stays lost until the loop ends. A loop that
        # stopped on a non-finite residual has already named the likelier cause.
        status = self.precision.status((state.y, state.z))
        keep = (status == RESULTS.successful) | (result == RESULTS.nonfinite_value)
        return state, RESULTS.where(keep, result, status)
