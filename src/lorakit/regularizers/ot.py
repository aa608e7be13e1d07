"""Latent OT regularisation as a training loop sees it: one config, one call per step.

``ot_loss(cfg, source, target, step)`` returns the weighted, warmed-up, optionally normalised divergence between
the features captured at ``cfg.tap`` (flattened per sample) and either a standard normal prior (``pair="prior"``,
as in Wasserstein / sliced-Wasserstein autoencoders) or the features of an unlabelled target batch
(``pair="domain"``, as in DeepJDOT-style domain adaptation).

Normalisation (``normalize=True``) puts the transport divergences on one scale, the squared displacement per
coordinate W₂²/d, so one ``weight`` means about the same whichever divergence or tap width is chosen:

* ``sliced``: unchanged (SW₂² is already ≈ W₂²/d, exactly ‖t‖²/d in expectation for a translation t);
* ``sinkhorn``: multiplied by 2/d (GeomLoss' cost is ‖x−y‖²/2);
* ``deepjdot``: the feature cost is divided by d; the label cost (a cross-entropy, in nats) is unchanged;
* ``mmd``: unchanged; MMD² is not a transport cost and has no W₂ scale.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields

import torch
from torch import Tensor

from lorakit.regularizers.divergences import KERNELS, mmd, sinkhorn, sliced_wasserstein
from lorakit.regularizers.errors import RegularizerError
from lorakit.regularizers.jdot import deepjdot_loss

#: Divergences :func:`ot_loss` knows.
DIVERGENCES = ("sliced", "sinkhorn", "mmd", "deepjdot")
#: What the tapped source features are compared with.
PAIRS = ("prior", "domain")


@dataclass(frozen=True)
class OTConfig:
    """The ``ot:`` section of a training config."""

    tap: str
    """Dotted path of the module whose output is regularised (e.g. ``encoder.14`` or ``layer3``)."""
    divergence: str = "sliced"
    """One of ``sliced``, ``sinkhorn`` (needs geomloss), ``mmd``, ``deepjdot`` (needs scipy, ``pair="domain"``)."""
    weight: float = 1.0
    """Multiplier of the divergence in the total loss, once warm-up is over."""
    pair: str = "domain"
    """``prior``: match a standard normal N(0, I); ``domain``: match the target batch's features."""
    normalize: bool = True
    """Rescale to W₂²/d units so weights compare across divergences (see the module docstring)."""
    warmup_steps: int = 0
    """The weight ramps linearly from 0 at step 0 to ``weight`` at this step; 0 means full weight at once."""
    num_projections: int = 128
    """Random directions per call for ``sliced``."""
    blur: float = 0.05
    """GeomLoss blur (ε = blur²) for ``sinkhorn``, in feature units."""
    kernel: str = "imq"
    """MMD kernel: ``imq``, ``gaussian`` or ``energy``."""
    bandwidth: float | None = None
    """MMD squared length scale h; default 2·d."""
    label_weight: float = 1.0
    """DeepJDOT λ_t: weight of the label cost against the feature cost."""

    def __post_init__(self) -> None:
        problems = []
        if not isinstance(self.tap, str) or not self.tap:
            problems.append(f"ot.tap must name a module path, got {self.tap!r}")
        if self.divergence not in DIVERGENCES:
            problems.append(f"ot.divergence must be one of {', '.join(DIVERGENCES)}, got {self.divergence!r}")
        if self.pair not in PAIRS:
            problems.append(f"ot.pair must be one of {', '.join(PAIRS)}, got {self.pair!r}")
        if self.divergence == "deepjdot" and self.pair != "domain":
            problems.append("ot.pair must be 'domain' for divergence 'deepjdot' (it needs target predictions)")
        if not isinstance(self.weight, (int, float)) or not self.weight >= 0:
            problems.append(f"ot.weight must be a number >= 0, got {self.weight!r}")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            problems.append(f"ot.warmup_steps must be an integer >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.num_projections, int) or self.num_projections < 1:
            problems.append(f"ot.num_projections must be an integer >= 1, got {self.num_projections!r}")
        if not isinstance(self.blur, (int, float)) or not self.blur > 0:
            problems.append(f"ot.blur must be > 0, got {self.blur!r}")
        if self.kernel not in KERNELS:
            problems.append(f"ot.kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")
        if self.bandwidth is not None and not (isinstance(self.bandwidth, (int, float)) and self.bandwidth > 0):
            problems.append(f"ot.bandwidth must be > 0 or null, got {self.bandwidth!r}")
        if not isinstance(self.label_weight, (int, float)) or not self.label_weight >= 0:
            problems.append(f"ot.label_weight must be a number >= 0, got {self.label_weight!r}")
        if problems:
            raise RegularizerError("invalid ot config:\n" + "\n".join(f"  - {p}" for p in problems))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> OTConfig:
        """Build from the ``ot:`` mapping of a YAML config; unknown or missing keys are named in the error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RegularizerError(f"unknown ot option(s): {', '.join('ot.' + k for k in unknown)}; known: "
                                   f"{', '.join(sorted(known))}")
        if "tap" not in data:
            raise RegularizerError("ot.tap is required: the module path whose output is regularised")
        return cls(**data)


def warmup_weight(weight: float, step: int, warmup_steps: int) -> float:
    """``weight · min(1, step / warmup_steps)``; the full ``weight`` when ``warmup_steps`` is 0."""
    if warmup_steps <= 0:
        return float(weight)
    return float(weight) * min(1.0, max(step, 0) / warmup_steps)


def ot_loss(cfg: OTConfig, source_feats: Tensor, target_feats: Tensor | None, step: int, *,
            source_labels: Tensor | None = None, target_logits: Tensor | None = None,
            generator: torch.Generator | None = None) -> Tensor:
    """The regularisation term to add to the task loss at ``step``.

    Args:
        cfg: the OT settings.
        source_feats: (n, ...) tapped features of the (labelled) source batch; flattened to (n, d).
        target_feats: (m, ...) tapped features of the unlabelled target batch for ``pair="domain"``;
            must be None for ``pair="prior"``.
        step: the optimizer step, for the warm-up.
        source_labels: (n,) class ids, ``deepjdot`` only.
        target_logits: (m, K) the model's logits on the target batch, ``deepjdot`` only.
        generator: RNG for prior samples and projection directions (reproducible runs); default global RNG.

    Returns:
        Scalar on ``source_feats``' device; an exact zero (no graph work) while the warmed-up weight is 0.
    """
    w = warmup_weight(cfg.weight, step, cfg.warmup_steps)
    if cfg.pair == "domain" and target_feats is None:
        raise RegularizerError("ot.pair is 'domain' but no target features were given (is the target stream set?)")
    if cfg.pair == "prior" and target_feats is not None:
        raise RegularizerError("ot.pair is 'prior': pass target_feats=None, the prior supplies the other side")
    if w == 0.0:
        return source_feats.new_zeros(())
    x = source_feats.flatten(1)
    d = x.shape[1]
    if cfg.pair == "prior":
        gen_device = generator.device if generator is not None else x.device
        y = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=gen_device).to(x.device)
    else:
        y = target_feats.flatten(1)
    if cfg.divergence == "sliced":
        value = sliced_wasserstein(x, y, num_projections=cfg.num_projections, generator=generator)
    elif cfg.divergence == "sinkhorn":
        value = sinkhorn(x, y, blur=cfg.blur)
        value = value * (2.0 / d) if cfg.normalize else value
    elif cfg.divergence == "mmd":
        value = mmd(x, y, kernel=cfg.kernel, bandwidth=cfg.bandwidth)
    else:
        if source_labels is None or target_logits is None:
            raise RegularizerError("ot.divergence 'deepjdot' needs source_labels and target_logits")
        value = deepjdot_loss(x, y, source_labels, target_logits, label_weight=cfg.label_weight,
                              feature_weight=1.0 / d if cfg.normalize else 1.0)
    return w * value
