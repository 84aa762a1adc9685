"""revdeq: Deep Equilibrium Models and Reversible DEQs in JAX/Equinox."""

from ._adjoint.base import AbstractAdjoint as AbstractAdjoint
from ._adjoint.implicit import ImplicitAdjoint as ImplicitAdjoint
from ._adjoint.phantom import PhantomAdjoint as PhantomAdjoint
from ._adjoint.reversible import (
    ReversibleAdjoint as ReversibleAdjoint,
    reconstruction_error as reconstruction_error,
)
from ._adjoint.unrolled import UnrolledAdjoint as UnrolledAdjoint
from ._cast import cast_exactly as cast_exactly
from ._precision.base import (
    AbstractPrecision as AbstractPrecision,
    AbstractSegmentedPrecision as AbstractSegmentedPrecision,
)
from ._precision.exact_state import ExactState as ExactState
from ._precision.float_state import FloatState as FloatState
from ._solution import RESULTS as RESULTS, Solution as Solution
from ._solve import solve as solve
from ._solver.anderson import Anderson as Anderson
from ._solver.base import (
    AbstractSolver as AbstractSolver,
    AbstractSolverState as AbstractSolverState,
    ConvergenceState as ConvergenceState,
)
from ._solver.broyden import Broyden as Broyden
from ._solver.fixed_point import FixedPointIteration as FixedPointIteration
from ._solver.reversible import Reversible as Reversible


# isort: split
# Subpackages that build on the core above.
from . import (
    data as data,
    internal as internal,
    nn as nn,
    testing as testing,
    train as train,
)


__version__ = "0.1.0"
