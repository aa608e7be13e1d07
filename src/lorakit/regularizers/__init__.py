"""Latent regularisers for LoRA training: optimal-transport divergences, MMD, DeepJDOT, latent taps, and the
Fréchet distance between feature clouds (an evaluation metric, not a training term).

The package is ``lorakit.regularizers`` (its OT module is ``lorakit.regularizers.ot``), so it never shadows POT's
top-level ``ot`` package. GeomLoss (for ``sinkhorn``) and SciPy (for ``deepjdot``) are optional and imported only
when used: ``pip install 'lorakit[ot]'``.
"""

from lorakit.regularizers.divergences import (
    KERNELS,
    mmd,
    random_directions,
    sinkhorn,
    sliced_wasserstein,
)
from lorakit.regularizers.errors import RegularizerError
from lorakit.regularizers.frechet import frechet_distance, gaussian_frechet, mean_and_covariance
from lorakit.regularizers.jdot import (
    deepjdot_loss,
    exact_coupling,
    feature_cost,
    label_cost,
)
from lorakit.regularizers.ot import DIVERGENCES, PAIRS, OTConfig, ot_loss, warmup_weight
from lorakit.regularizers.taps import tap

__all__ = [
    "DIVERGENCES", "KERNELS", "PAIRS", "OTConfig", "RegularizerError", "deepjdot_loss", "exact_coupling",
    "feature_cost", "frechet_distance", "gaussian_frechet", "label_cost", "mean_and_covariance", "mmd", "ot_loss",
    "random_directions", "sinkhorn", "sliced_wasserstein", "tap", "warmup_weight",
]
