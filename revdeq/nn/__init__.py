"""Equinox cells, equilibrium layers, models and regularisers."""

from ._baselines import (
    ExplicitLanguageModel as ExplicitLanguageModel,
    ExplicitResNet as ExplicitResNet,
    ExplicitStack as ExplicitStack,
)
from ._cells import (
    ConvCell as ConvCell,
    DEQTransformerCell as DEQTransformerCell,
    MLPCell as MLPCell,
    TransformerCell as TransformerCell,
)
from ._deq import DEQ as DEQ
from ._models import (
    CIFAR10_TRUNK as CIFAR10_TRUNK,
    DEQLanguageModel as DEQLanguageModel,
    ImplicitResNet as ImplicitResNet,
)
from ._params import count_parameters as count_parameters
from ._regularise import (
    apply_weight_norm as apply_weight_norm,
    fixed_point_correction_loss as fixed_point_correction_loss,
    jacobian_frobenius_penalty as jacobian_frobenius_penalty,
)
