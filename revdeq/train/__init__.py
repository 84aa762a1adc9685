"""Training infrastructure for Equinox models: jitted steps, optimisers, data
parallelism, checkpoints and metrics. Independent of the DEQ machinery.
"""

from ._checkpoint import (
    latest_checkpoint as latest_checkpoint,
    restore_checkpoint as restore_checkpoint,
    save_checkpoint as save_checkpoint,
)
from ._metrics import MetricsLogger as MetricsLogger, read_metrics as read_metrics
from ._optimiser import make_optimiser as make_optimiser
from ._parallel import (
    DataParallel as DataParallel,
    maybe_initialize_distributed as maybe_initialize_distributed,
)
from ._plot import plot_learning_curves as plot_learning_curves
from ._step import (
    init_optimiser as init_optimiser,
    make_eval_step as make_eval_step,
    make_step as make_step,
)
