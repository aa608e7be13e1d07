"""Sample-based divergences between two point clouds: sliced Wasserstein, Sinkhorn (GeomLoss) and MMD.

Every function takes ``x: (n, d)`` and ``y: (m, d)`` (uniform weights, ``n`` and ``m`` may differ), returns a scalar
that is differentiable in both, and never detaches. Units without ``normalize`` (see :mod:`lorakit.regularizers.ot`):

* :func:`sliced_wasserstein` is SW₂², the mean over random unit directions θ of W₂²(θ·x, θ·y). For a translation
  by ``t`` it equals ‖t‖²/d exactly in expectation, and it is ≈ W₂²/d for near-isotropic clouds.
* :func:`sinkhorn` is GeomLoss' debiased Sinkhorn divergence with cost ‖x−y‖²/2, so it tends to W₂²/2 as blur → 0.
* :func:`mmd` is the unbiased estimate of MMD² (can be slightly negative); it is not a transport cost.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from lorakit.regularizers.errors import RegularizerError

#: Kernels that :func:`mmd` knows.
KERNELS = ("imq", "gaussian", "energy")


def _check_clouds(x: Tensor, y: Tensor, who: str) -> None:
    if x.dim() != 2 or y.dim() != 2:
        raise RegularizerError(f"{who}: expected 2-D samples (n, d) and (m, d), got shapes {tuple(x.shape)} "
                               f"and {tuple(y.shape)}")
    if x.shape[1] != y.shape[1]:
        raise RegularizerError(f"{who}: feature sizes differ, {x.shape[1]} vs {y.shape[1]}")
    if x.shape[0] < 1 or y.shape[0] < 1:
        raise RegularizerError(f"{who}: empty sample set (n={x.shape[0]}, m={y.shape[0]})")


def random_directions(d: int, num: int, *, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """``num`` directions uniform on the unit sphere of R^d, as columns: (d, num)."""
    gen_device = generator.device if generator is not None else device
    theta = torch.randn(d, num, generator=generator, dtype=dtype, device=gen_device)
    return (theta / theta.norm(dim=0, keepdim=True).clamp_min(1e-12)).to(device)


def _matched_quantiles(n: int, m: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    """How the step quantile functions of an n-sample and an m-sample measure line up on [0, 1].

    The quantile function of n sorted samples is constant on each [i/n, (i+1)/n); merging the breakpoints of both
    sizes cuts [0, 1] into at most n + m − 1 pieces on which both are constant.

    Returns:
        ``(ix, iy, w)``: for each piece the sample index on each side (int64) and the piece's length (float64).
    """
    cuts = torch.cat([torch.arange(n + 1, dtype=torch.float64) / n, torch.arange(m + 1, dtype=torch.float64) / m])
    cuts = torch.unique(cuts)  # sorted
    w = cuts[1:] - cuts[:-1]
    mid = (cuts[1:] + cuts[:-1]) / 2
    ix = (mid * n).floor().long().clamp(max=n - 1)
    iy = (mid * m).floor().long().clamp(max=m - 1)
    return ix.to(device), iy.to(device), w.to(device)


def sliced_wasserstein(x: Tensor, y: Tensor, *, num_projections: int = 128,
                       generator: torch.Generator | None = None, directions: Tensor | None = None) -> Tensor:
    """Sliced Wasserstein SW₂² between the empirical measures of ``x`` and ``y`` (Bonneel et al. 2015; SWAE,
    Kolouri et al. 2019, eq. 9), in O(L·n log n).

    Each projection reduces to a 1-D problem solved by sorting. With ``n == m`` the sorted values pair up directly;
    otherwise both (step) quantile functions are evaluated on the merged grid of their breakpoints, which gives the
    exact 1-D W₂² between the two empirical measures (no interpolation error) in O((n + m)·L) after the sort.

    Args:
        x: (n, d) samples.
        y: (m, d) samples.
        num_projections: L, the number of random directions (ignored when ``directions`` is given).
        generator: draws the directions reproducibly; default the global RNG.
        directions: (d, L) unit directions to use instead of random ones.

    Returns:
        Scalar: mean over directions of the mean squared difference of matched quantiles.
    """
    _check_clouds(x, y, "sliced_wasserstein")
    if directions is None:
        if num_projections < 1:
            raise RegularizerError(f"num_projections must be >= 1, got {num_projections}")
        directions = random_directions(x.shape[1], num_projections, generator=generator, dtype=x.dtype,
                                       device=x.device)
    elif directions.dim() != 2 or directions.shape[0] != x.shape[1]:
        raise RegularizerError(f"directions must be (d={x.shape[1]}, L), got {tuple(directions.shape)}")
    px = torch.sort(x @ directions, dim=0).values  # (n, L)
    py = torch.sort(y @ directions, dim=0).values  # (m, L)
    n, m = px.shape[0], py.shape[0]
    if n == m:
        return (px - py).pow(2).mean()
    ix, iy, w = _matched_quantiles(n, m, x.device)
    per_direction = (w.to(x.dtype).unsqueeze(1) * (px[ix] - py[iy]).pow(2)).sum(0)  # (L,)
    return per_direction.mean()


@functools.lru_cache(maxsize=16)
def _samples_loss(blur: float, scaling: float, backend: str):
    try:
        from geomloss import SamplesLoss
    except ImportError as exc:
        raise RegularizerError("divergence 'sinkhorn' needs the optional package geomloss: "
                               "pip install 'lorakit[ot]' (or pick divergence 'sliced')") from exc
    return SamplesLoss("sinkhorn", p=2, blur=blur, scaling=scaling, debias=True, backend=backend)


def sinkhorn(x: Tensor, y: Tensor, *, blur: float = 0.05, scaling: float = 0.5,
             backend: str = "tensorized") -> Tensor:
    """Debiased Sinkhorn divergence S_ε (Feydy et al. 2019) through GeomLoss, with ε = blur².

    GeomLoss iterates in the log domain with ε-annealing, so it stays accurate in float32 at small blur (a plain
    Sinkhorn in the kernel domain underflows to zero there). The cost is ‖x−y‖²/2, so S_ε → W₂²/2 as ε → 0; for
    uniform weights ``|S_ε − W₂²/2| ≤ ε·log(max(n, m))`` (the entropic term lies between 0 and ε log n).

    Args:
        x: (n, d) samples.
        y: (m, d) samples.
        blur: the length scale ε^{1/2} below which points are not resolved, in units of the features.
        scaling: ε-annealing ratio in (0, 1); closer to 1 is more accurate and slower.
        backend: GeomLoss backend; ``"tensorized"`` suits minibatches and needs no KeOps.

    Raises:
        RegularizerError: geomloss is not installed, or a bad option.
    """
    _check_clouds(x, y, "sinkhorn")
    if not blur > 0:
        raise RegularizerError(f"blur must be > 0, got {blur}")
    if not 0 < scaling < 1:
        raise RegularizerError(f"scaling must be in (0, 1), got {scaling}")
    return _samples_loss(float(blur), float(scaling), backend)(x, y)


def _sq_dists(a: Tensor, b: Tensor) -> Tensor:
    """(n, d), (m, d) → (n, m) squared Euclidean distances, clamped at 0 against round-off."""
    d2 = a.pow(2).sum(1, keepdim=True) + b.pow(2).sum(1).unsqueeze(0) - 2 * a @ b.T
    return d2.clamp_min(0)


def _kernel(d2: Tensor, kernel: str, bandwidth: float) -> Tensor:
    if kernel == "imq":
        return bandwidth / (bandwidth + d2)
    if kernel == "gaussian":
        return torch.exp(-d2 / bandwidth)
    # energy: the distance-induced kernel -‖x−y‖; the clamp keeps the gradient finite on the diagonal.
    return -torch.sqrt(d2.clamp_min(1e-12))


def mmd(x: Tensor, y: Tensor, *, kernel: str = "imq", bandwidth: float | None = None) -> Tensor:
    """Unbiased MMD² estimate (Gretton et al. 2012, eq. 3) between the samples ``x`` and ``y``.

    Kernels, with squared length scale ``h`` (default ``2·d``, the WAE choice C = 2dσ² for a unit-variance prior,
    Tolstikhin et al. 2018 §4):

    * ``"imq"``: h / (h + ‖x−y‖²), heavy-tailed, the WAE-MMD default;
    * ``"gaussian"``: exp(−‖x−y‖² / h);
    * ``"energy"``: −‖x−y‖ (no ``h``); MMD² is then the energy distance 2E‖x−y‖ − E‖x−x'‖ − E‖y−y'‖.

    Args:
        x: (n, d) samples, n ≥ 2.
        y: (m, d) samples, m ≥ 2.
        kernel: one of :data:`KERNELS`.
        bandwidth: ``h``; default ``2·d``.

    Returns:
        Scalar; zero in expectation when both sets come from one distribution, so it may be slightly negative.
    """
    _check_clouds(x, y, "mmd")
    if kernel not in KERNELS:
        raise RegularizerError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
    n, m = x.shape[0], y.shape[0]
    if n < 2 or m < 2:
        raise RegularizerError(f"mmd needs at least 2 samples per set for the unbiased estimate (n={n}, m={m})")
    h = float(bandwidth) if bandwidth is not None else 2.0 * x.shape[1]
    if not h > 0 or not math.isfinite(h):
        raise RegularizerError(f"bandwidth must be a positive number, got {bandwidth}")
    kxx = _kernel(_sq_dists(x, x), kernel, h)
    kyy = _kernel(_sq_dists(y, y), kernel, h)
    kxy = _kernel(_sq_dists(x, y), kernel, h)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return within_x + within_y - 2 * kxy.mean()
