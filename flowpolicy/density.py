r"""Standalone density fitting: maximum likelihood of a :class:`~flowpolicy.flows.Flow`.

Fit a flow to an analytic target of :mod:`flowpolicy.targets` or to a tensor of data by
minimizing the negative log-likelihood :math:`-\frac{1}{B}\sum_b \log q_\theta(x_b)` with Adam.
For an analytic target a perfect model reaches a held-out NLL equal to the target's entropy,
and the gap is the exact divergence

.. math:: \mathrm{KL}(p\,\|\,q) = \mathbb{E}_p[\log p(x) - \log q(x)]
          = \mathrm{NLL}_{\text{held-out}} - H(p),

estimated on fresh samples with a standard error (it has far less noise than NLL minus entropy,
because :math:`\log p - \log q` varies much less than :math:`\log q`).

Everything runs on one device (``device="auto"`` takes CUDA when there is one), including the
target's sampler. The seed article's experiment::

    flow = Flow(2, layers=24, rank=2, seed=0)
    init_hinges_(flow, targets.banana.sample(65536))  # hinge pairs fitted to samples
    history = fit(flow, targets.banana, steps=2000, batch_size=2048, lr=1e-4)
    save(flow, "runs/banana"); flow = load("runs/banana")

A PReLU chain is piecewise linear, and two facts make it fit well: its kinks must start where
the data is (:func:`init_hinges_` regresses one coordinate on hinges of another and builds the
chain as pairs of PReLU layers that each add one hinge), and the gradient must include the
kinks' boundary term (``fit(kink_bandwidth=...)``), which backpropagation misses because each
sample's log-det is piecewise constant in the kinks' positions. A spline chain started by
:func:`init_splines_` (the same regression, with smooth hinges, built as pairs of spline layers
that each add one monotone function) begins within about 1e-4 nats of the banana::

    flow = Flow(2, layers=4, rank=2, nonlinearity="spline", bins=16)
    init_splines_(flow, targets.banana.sample(2**18))

Command line (trains at good defaults, prints the held-out NLL, the entropy and the KL with its
standard error, saves the flow and the figures)::

    python -m flowpolicy.density --target banana --device auto --out runs/banana
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowpolicy import targets as _targets
from flowpolicy.bijectors import Spline, call_and_ladj
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = [
    "History",
    "evaluate",
    "fit",
    "init_hinges_",
    "init_layers_",
    "init_splines_",
    "load",
    "main",
    "resolve_device",
    "save",
    "save_figures",
    "standardize_",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
_FORMAT = "flowpolicy.Flow"


# --------------------------------------------------------------------------------------------
# devices, initialization
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is checked to be usable.

    :raises ValueError: for a CUDA device when torch sees none, or an unknown device string.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:i]'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for, but no CUDA device is available "
                "(use --device auto or cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device}: use 'auto', 'cpu' or 'cuda[:i]'")
    return device


def _blocks(flow: Flow, affine: bool = True) -> list[tuple[int, torch.nn.Module]]:
    """(offset in ``theta``, parameter module) of every affine layer of the chain, or with
    ``affine=False`` of every nonlinear (PReLU or spline) layer."""
    blocks, offset = [], 0
    for module, size in zip(flow.layout.chain, flow.layout.sizes):
        if hasattr(module, "diag_offset") == affine:  # only _AffineParams has one
            blocks.append((offset, module))
        offset += size
    return blocks


def _rescale_affine_(
    flow: Flow, offset: int, module: torch.nn.Module, a: Tensor, c: Tensor
) -> None:
    r"""Compose the affine layer at ``offset`` with :math:`y \mapsto a \odot y + c` (in place).

    :math:`S x + b \to \mathrm{diag}(a) S x + a \odot b + c`, i.e. :math:`L \to \mathrm{diag}(a) L`
    (still lower-triangular with a positive diagonal, the low-rank part unchanged).
    """
    d, theta = module.dim, flow.theta
    with torch.no_grad():
        shift = theta[offset : offset + d]
        tril = theta[offset + d : offset + d + d * (d + 1) // 2]
        diag = F.softplus(tril[:d] + module.diag_offset) + module.eps
        # inverse of softplus(t + c0) + eps, for the new diagonal a * L_ii
        new_diag = (a * diag - module.eps).clamp_min(1e-6)
        tril[:d] = new_diag + torch.log(-torch.expm1(-new_diag)) - module.diag_offset
        rows, _ = torch.tril_indices(d, d, offset=-1)
        tril[d:] = tril[d:] * a[rows.to(theta.device)]
        shift.copy_(a * shift + c)


def init_layers_(
    flow: Flow, spread: float = 0.5, num_samples: int = 8192, seed: int | None = 0
) -> Flow:
    r"""Base-driven initialization of the inner affine layers (as ActNorm, Kingma & Dhariwal 2018).

    Pushing base samples through the chain, each inner affine layer :math:`k` is rescaled so
    that its outputs, the inputs of the next nonlinearity, have unit standard deviation and mean
    :math:`u_k \sim \mathcal{N}(0, \text{spread}^2)` per dimension.

    Why: with every shift at zero, each PReLU bends at the origin and the chain is positively
    homogeneous, :math:`f(cz) = c f(z)` for :math:`c > 0`, so it can only shape the density along
    rays; and random shears compound over many layers into values whose scale drifts by orders
    of magnitude. Unit-scale inputs with kinks scattered through their bulk give every PReLU
    something to bend. The last affine layer is left for :func:`standardize_`.
    """
    blocks = _blocks(flow)
    theta = flow.theta
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        z = torch.randn(num_samples, flow.layout.dim, generator=generator).to(theta)
        for (offset, module), layer in zip(blocks[:-1], list(flow.layout.chain)[1::2]):
            size = module.num_params
            pre, _ = call_and_ladj(module(theta[offset : offset + size]), z)
            u = spread * torch.randn(module.dim, generator=generator).to(theta)
            std = pre.std(0).clamp_min(1e-6)
            _rescale_affine_(flow, offset, module, 1 / std, u - pre.mean(0) / std)
            pre, _ = call_and_ladj(module(theta[offset : offset + size]), z)
            nonlinear_offset = offset + size
            z, _ = call_and_ladj(
                layer(theta[nonlinear_offset : nonlinear_offset + layer.num_params]), pre
            )
    return flow


def _set_affine_(
    flow: Flow, offset: int, module: torch.nn.Module, shift: Tensor, tril: Tensor, factor: Tensor
) -> None:
    """Write ``S = L (I + F F^T)``, ``b`` into the affine layer at ``offset`` (in place)."""
    d, theta = module.dim, flow.theta
    with torch.no_grad():
        raw_shift, raw_tril, raw_factor = theta[offset : offset + module.num_params].split(
            module.sizes
        )
        diag = (torch.diagonal(tril) - module.eps).clamp_min(1e-6)
        raw_tril[:d] = (diag + torch.log(-torch.expm1(-diag)) - module.diag_offset).to(theta)
        rows, cols = torch.tril_indices(d, d, offset=-1)
        raw_tril[d:] = tril[rows, cols].to(theta)
        raw_shift.copy_(shift)
        if module.rank:
            raw_factor.copy_(factor[:, : module.rank].reshape(-1))


def _shear(
    d: int, target: int, source: int, coef: float, scale: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    r"""``(L, F)`` with ``L (I + F F^T) = diag(scale) + coef\, e_t e_s^T`` (scale: ones).

    A lower shear (``target > source``) is ``L`` alone. An upper one needs the rank-one
    update: on the block ``(t, s)``, ``[[p, e], [0, q]] = L (I + f f^T)`` with
    ``f = (1, 2e/p)`` and ``L^{-1} = [[2/p, 0], [2e/p^2, (1 + 2e^2/p^2)/q]]`` (well
    conditioned while :math:`|e/p|` is of order one).
    """
    scale = torch.ones(d, dtype=torch.float64) if scale is None else scale.double()
    L, factor = torch.diag(scale), torch.zeros(d, d, dtype=torch.float64)
    if target > source:
        L[target, source] = coef
        return L, factor
    p, q, e = float(scale[target]), float(scale[source]), coef
    inverse = torch.tensor(
        [[2 / p, 0.0], [2 * e / p**2, (1 + 2 * e**2 / p**2) / q]], dtype=torch.float64
    )
    index = torch.tensor([target, source])
    L[index[:, None], index] = torch.linalg.inv(inverse)
    factor[target, 0], factor[source, 0] = 1.0, 2 * e / p
    return L, factor


def _standardized(data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, std)`` with ``y = (data - mean) / std``, in float64 on the CPU."""
    data = data.detach().double().cpu()
    mean, std = data.mean(0), data.std(0).clamp_min(1e-12)
    return (data - mean) / std, mean, std


def _hinges(u: Tensor, kinks: Tensor, smooth: float) -> Tensor:
    r"""Features :math:`\mathrm{relu}(u - b_j)`, or :math:`\tau\,\mathrm{softplus}((u - b_j)/\tau)`
    for ``smooth`` :math:`= \tau > 0`; shape ``(n, J)``."""
    u = u[:, None] - kinks
    return F.relu(u) if smooth == 0 else smooth * F.softplus(u / smooth)


def _check_pair_init(flow: Flow, name: str, nonlinearity: str, instead: str) -> None:
    """The flows a pair initialization can build: unsquashed, of its nonlinearity, dim >= 2,
    at least one pair of nonlinear layers, and a low-rank update (for upper shears)."""
    if flow.config["nonlinearity"] != nonlinearity:
        kind = "PReLU" if nonlinearity == "prelu" else "spline"
        raise ValueError(f"{name} is for affine + {kind} flows ({instead})")
    if flow.config.get("squash"):
        raise ValueError(f"{name}: a squashed flow's support is fixed to (-1, 1)^d")
    if flow.layout.dim < 2 or flow.config["layers"] < 2 or flow.config["rank"] == 0:
        raise ValueError(f"{name} needs dim >= 2, layers >= 2 and rank >= 1")


def _spread_quantiles(n: int, spread: float) -> Tensor:
    r""":math:`b_j = \text{spread}\cdot\Phi^{-1}((j - \frac12)/n)`, :math:`j = 1 \dots n`."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return spread * normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)


def _hinge_regression(
    y: Tensor, kinks: Tensor, smooth: float, ridge: float
) -> tuple[float, int, int, Tensor]:
    r"""Least squares of :math:`y_t` on :math:`1, y_s` and hinges of :math:`y_s` at ``kinks``,
    for every pair :math:`t \ne s`; returns ``(residual std, t, s, coefficients)`` of the pair
    whose fit explains most of :math:`y_t`'s variance."""
    best = None
    ones = torch.ones(len(y), 1, dtype=y.dtype)
    eye = ridge * torch.eye(len(kinks) + 2, dtype=y.dtype)
    for t in range(y.shape[1]):
        for s in range(y.shape[1]):
            if s == t:
                continue
            features = torch.cat([ones, y[:, s : s + 1], _hinges(y[:, s], kinks, smooth)], 1)
            gram = features.T @ features / len(y) + eye
            coef = torch.linalg.solve(gram, features.T @ y[:, t] / len(y))
            residual = float((y[:, t] - features @ coef).std())
            if best is None or residual < best[0]:
                best = (residual, t, s, coef)
    return best


def init_hinges_(
    flow: Flow,
    data: Tensor,
    spread: float = 2.0,
    slope: float = 1.0,
    ridge: float = 1e-3,
) -> Flow:
    r"""Data-driven initialization: the PReLU layers as pairs that each add one hinge.

    On the standardized data :math:`y`, one coordinate :math:`y_t` is regressed (least squares)
    on :math:`1, y_s` and hinges :math:`\mathrm{relu}(y_s - b_j)` of another coordinate
    :math:`y_s`, with one kink per pair of PReLU layers at :math:`b_j = \text{spread}\cdot
    \Phi^{-1}((j - \frac12)/J)` (a piecewise-linear fit of a smooth function against a Gaussian
    is best with knots spread about :math:`\sqrt5` times wider than the data); the pair
    :math:`(t, s)` explaining most of :math:`y_t`'s variance is used. PReLU layers
    :math:`2j-1, 2j` get slopes :math:`\alpha, 1/\alpha` on :math:`y_s` (1 elsewhere) around a
    shear :math:`y_t \mathrel{+}= c_j/(1-\alpha)\,\cdot`, which adds
    :math:`c_j\,\mathrm{relu}(y_s - b_j)` plus a linear term, compensated in the first layer;
    the last layer maps back to the data's units. The flow starts as that triangular map
    :math:`y_t = \text{fit}(y_s) + \sigma z_t` and training moves every kink and slope.
    """
    d = flow.layout.dim
    blocks = _blocks(flow)
    prelus = _blocks(flow, affine=False)
    pairs = len(prelus) // 2
    _check_pair_init(flow, "init_hinges_", "prelu", "init_splines_ for splines")
    y, mean, std = _standardized(data)
    kinks = _spread_quantiles(pairs, spread)
    residual, t, s, coef = _hinge_regression(y, kinks, smooth=0.0, ridge=ridge)
    signs = torch.ones(pairs, dtype=torch.float64)
    signs[1::2] = -1  # alternate alpha < 1 and alpha > 1
    log_alpha = -slope * signs
    alpha = log_alpha.exp()
    shears = coef[2:] / (1 - alpha)
    # pair j adds shears_j (alpha_j u + (1 - alpha_j) relu(u)), u = y_s - b_j: the affine layer
    # after it (where u is back) takes out its linear part; the first one adds coef[1] y_s
    linear = -shears * alpha
    linear[0] = linear[0] + coef[1]
    with torch.no_grad():
        theta = flow.theta
        for k, (offset, module) in enumerate(blocks):
            shift = torch.zeros(d, dtype=torch.float64)
            L, factor = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
            j = k // 2  # affine k = 2j sits before pair j, k = 2j + 1 inside it
            last = k == len(blocks) - 1
            if k == 0:  # z -> (residual z_t + coef[0], z_s - b_0)
                scale = torch.ones(d, dtype=torch.float64)
                scale[t] = residual
                L = torch.diag(scale)
                shift[t], shift[s] = coef[0], -kinks[0]
            elif k % 2 == 1 and not last:  # the pair's shear
                L, factor = _shear(d, t, s, float(shears[j]))
            elif k % 2 == 0:  # after pair j - 1: its linear part out, the kink to b_j
                e = float(linear[j - 1])
                shift[t] = coef[1] * kinks[0] if j == 1 else 0.0
                shift[s] = kinks[j - 1] - (kinks[j] if j < pairs else 0.0)
                L, factor = _shear(d, t, s, e)
                if last:  # and back to the data's units
                    L, factor = _shear(d, t, s, e * float(std[t]), std)
                    shift = std * shift + mean
            else:  # last, after an unpaired PReLU layer (slopes 1): back to the data's units
                L, shift = torch.diag(std), mean.clone()
            _set_affine_(flow, offset, module, shift.to(theta), L, factor)
        for j, (offset, module) in enumerate(prelus):
            value = torch.zeros(module.num_params, dtype=torch.float64)
            if j < 2 * pairs:
                value[s] = log_alpha[j // 2] * (1 if j % 2 == 0 else -1)
            theta[offset : offset + module.num_params] = value.to(theta)
    return flow


def _spline_raw(knots_x: Tensor, knots_y: Tensor, derivatives: Tensor) -> Tensor:
    """Raw parameters of one dimension of a :class:`~flowpolicy.bijectors.Spline` through the
    knots ``(knots_x, knots_y)`` (``K + 1`` each, from ``-B`` to ``B``) with the given interior
    derivatives (``K - 1``): the inverse of its softmax and softplus parametrization."""
    K = len(knots_x) - 1

    def unnormalized(sizes: Tensor) -> Tensor:
        share = (sizes / sizes.sum() - Spline.min_bin) / (1 - Spline.min_bin * K)
        return share.clamp_min(1e-12).log()

    slack = (derivatives - Spline.min_derivative).clamp_min(1e-9)
    raw_derivatives = slack + torch.log(-torch.expm1(-slack))  # softplus^-1
    return torch.cat([unnormalized(knots_x.diff()), unnormalized(knots_y.diff()), raw_derivatives])


def init_splines_(
    flow: Flow,
    data: Tensor,
    knots: int = 32,
    smooth: float = 0.3,
    spread: float = 2.5,
    ridge: float = 1e-6,
    reach: float = 5.0,
) -> Flow:
    r"""Data-driven initialization of an affine + spline chain: spline pairs that each add one
    monotone function of a coordinate to another.

    As in :func:`init_hinges_`, one standardized coordinate is regressed on another,
    :math:`y_t \approx h(y_s) = c_0 + c_1 y_s + \sum_j c_j\,\tau\,\mathrm{softplus}
    ((y_s - b_j)/\tau)`, with ``knots`` smooth hinges at :math:`b_j = \text{spread}\cdot
    \Phi^{-1}((j - \frac12)/J)`. Split by sign, :math:`h = c_0 + c_1 y_s + P - N` with
    :math:`P, N` increasing. A shear by an increasing :math:`Q \in \{P, N\}` takes two spline
    layers: on coordinate :math:`s`, :math:`u \mapsto w = g(u) = \lambda(u + Q/c) + \mu` (scaled
    to map :math:`[-B, B]` onto itself), then :math:`y_t \mathrel{+}= \pm(c/\lambda)(w - \mu)
    = \pm(c\,u + Q)`, then :math:`g^{-1}` (knots swapped, derivatives inverted), and the next
    affine layer takes out :math:`\pm c\,u`. The first pair adds :math:`P`, the second
    subtracts :math:`N`, further pairs start at the identity. The base coordinate :math:`z_s` is
    scaled by :math:`B/\text{reach}` so that :math:`|z_s| < \text{reach}` stays inside the
    splines' interval. The flow starts as :math:`y_t = h(y_s) + \sigma z_t` (KL 0.00004-0.00008 on
    the banana from :math:`2^{18}` samples, 4 layers, 16 bins) and training moves every knot.
    """
    d = flow.layout.dim
    blocks, splines = _blocks(flow), _blocks(flow, affine=False)
    _check_pair_init(flow, "init_splines_", "spline", "init_hinges_ for PReLU")
    if not smooth > 0:
        raise ValueError(f"init_splines_: smooth must be positive, got {smooth}")
    y, mean, std = _standardized(data)
    kinks = _spread_quantiles(knots, spread)
    residual, t, s, coef = _hinge_regression(y, kinks, smooth, ridge)
    bins, bound = splines[0][1].bins, splines[0][1].bound
    rho = bound / reach  # u = rho z_s in the splines' interval
    grid = torch.linspace(-bound, bound, bins + 1, dtype=torch.float64)
    identity = _spline_raw(grid, grid, torch.ones(bins - 1, dtype=torch.float64))
    width = identity.numel()
    pieces = [(1.0, coef[2:].clamp_min(0)), (-1.0, (-coef[2:]).clamp_min(0))]
    if len(splines) < 4:  # one pair: c_0 + c_1 y_s + gamma Q(y_s), Q the larger piece, refitted
        features = _hinges(y[:, s], kinks, smooth)
        _, weights = max(pieces, key=lambda piece: float((features @ piece[1]).std()))
        basis = torch.stack([torch.ones(len(y), dtype=y.dtype), y[:, s], features @ weights], 1)
        coef = torch.linalg.lstsq(basis, y[:, t, None]).solution[:, 0]
        residual = float((y[:, t] - basis @ coef).std())
        pieces = [(float(coef[2].sign()), weights * coef[2].abs())]
    pieces = pieces[: len(splines) // 2]
    # per pair: (shear coefficient a, offset mu, linear part to take out next)
    shears = [(0.0, 0.0, 0.0)] * (len(splines) // 2)
    with torch.no_grad():
        theta = flow.theta
        for offset, module in splines:
            theta[offset : offset + module.num_params] = identity.repeat(d).to(theta)
        for j, (sign, weights) in enumerate(pieces):
            if not weights.any():
                continue
            # u -> u + Q(u)/c in the splines' units (Q(u) = P(u / rho) or N(u / rho)), with
            # c = Q'(B)/2 so that its slope stays within [1, 3], scaled onto [-B, B]
            hinges = _hinges(grid / rho, kinks, smooth) @ weights
            slopes = torch.sigmoid((grid / rho - kinks[:, None]) / smooth).T @ weights / rho
            c = float(slopes[-1]) / 2
            g = grid + hinges / c
            lam = float(2 * bound / (g[-1] - g[0]))
            mu = -bound - lam * float(g[0])
            knots_y, slopes = lam * g + mu, lam * (1 + slopes[1:-1] / c)
            for offset, raw in (
                (splines[2 * j][0], _spline_raw(grid, knots_y, slopes)),
                (splines[2 * j + 1][0], _spline_raw(knots_y, grid, 1 / slopes)),
            ):
                theta[offset + s * width : offset + (s + 1) * width] = raw.to(theta)
            shears[j] = (sign * c / lam, mu, sign * c)
        for k, (offset, module) in enumerate(blocks):
            shift = torch.zeros(d, dtype=torch.float64)
            L, factor = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
            # affine k = 2j + 1 is pair j's shear, affine k = 2j + 2 takes out its linear part
            linear = -shears[k // 2 - 1][2] if k >= 2 and k % 2 == 0 else 0.0
            if k == 0:  # z -> (residual z_t + c_0, rho z_s)
                L[t, t], L[s, s], shift[t] = residual, rho, coef[0]
            elif k == len(blocks) - 1:  # and c_1 y_s, back in the data's units
                scale = std.clone()
                scale[s] = std[s] / rho
                e = (linear + float(coef[1]) / rho) * float(std[t])
                L, factor = _shear(d, t, s, e, scale)
                shift = mean.clone()
            elif k % 2 == 1:
                a, mu, _ = shears[k // 2]
                L, factor = _shear(d, t, s, a)
                shift[t] = -a * mu
            else:
                L, factor = _shear(d, t, s, linear)
            _set_affine_(flow, offset, module, shift.to(theta), L, factor)
    return flow


def standardize_(flow: Flow, data: Tensor, num_samples: int = 16384, seed: int = 0) -> Flow:
    r"""Match the flow's output mean and standard deviation to the data's (data-dependent init).

    With :math:`\mu_q, \sigma_q` the moments of the flow's samples and :math:`\mu, \sigma` the
    data's, the last affine layer :math:`y = S x + b` becomes
    :math:`y = a \odot (S x + b - \mu_q) + \mu` with :math:`a = \sigma / \sigma_q`, i.e.
    :math:`L \to \mathrm{diag}(a) L` (still lower-triangular with a positive diagonal) and
    :math:`b \to a \odot (b - \mu_q) + \mu`. The chain then works on unit-scale values whatever
    the data's units, and a flow that already fits is left (nearly) unchanged.
    """
    if flow.config.get("squash"):
        raise ValueError("standardize_: a squashed flow's support is fixed to (-1, 1)^d")
    offset, module = _blocks(flow)[-1]
    theta = flow.theta
    with torch.no_grad():
        generator = torch.Generator(theta.device).manual_seed(seed)
        z = torch.randn(
            num_samples, module.dim, generator=generator, device=theta.device, dtype=theta.dtype
        )
        x, _ = flow().push_forward(z)
        a = data.std(0).to(theta) / x.std(0)
        _rescale_affine_(flow, offset, module, a, data.mean(0).to(theta) - a * x.mean(0))
    return flow


# --------------------------------------------------------------------------------------------
# fast maximum-likelihood pass for affine + PReLU chains
# --------------------------------------------------------------------------------------------


class _PReLUChainLogProb:
    r"""``log q(x)`` of an affine + PReLU :class:`Flow` with all layers' parameters batched.

    The generic path builds one transform per layer and, for the inverse of each affine layer,
    runs batched triangular solves over the samples. In two dimensions that time is all
    per-operation overhead, so here every affine layer is built at once from the layout's own
    modules (same parametrization), each :math:`S_k^{-1}` is a dense :math:`d \times d`
    inverse, and the pass over the samples is :class:`_ChainInverse` (a layer costs an
    ``addmm`` and a ``prelu`` forward, an ``mm`` and a ``mul`` backward). Same value as
    ``flow().log_prob(x)`` (to float rounding), several times faster on CPU.
    """

    def __init__(self, flow: Flow) -> None:
        chain, sizes = list(flow.layout.chain), flow.layout.sizes
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        device = flow.theta.device

        def index(parity: int) -> Tensor:
            rows = [torch.arange(offsets[i], offsets[i + 1]) for i in range(parity, len(chain), 2)]
            return torch.stack(rows).to(device) if rows else torch.empty(0, dtype=torch.long)

        self.affine, self.prelu = chain[0], chain[1] if len(chain) > 1 else None
        self.affine_index, self.prelu_index = index(0), index(1)
        self.dim = flow.layout.dim

    @staticmethod
    def supports(flow: Flow) -> bool:
        return flow.config.get("nonlinearity") == "prelu" and not flow.config.get("squash")

    def __call__(self, theta: Tensor, x: Tensor, bandwidth: float = 0.0) -> Tensor:
        """``log q(x)``; ``bandwidth`` > 0 adds the kinks' boundary term to the gradient."""
        affine = self.affine(theta[self.affine_index])  # one Affine, batch of K + 1 layers
        inverse = torch.linalg.inv(affine.matrix)  # (K + 1, d, d): x_k = S_k^-1 (y - b_k)
        offset = -(inverse @ affine.shift[..., None])[..., 0]
        if self.prelu is not None:
            log_alpha = self.prelu(theta[self.prelu_index]).log_alpha  # (K, d)
        else:
            log_alpha = theta.new_zeros(0, self.dim)
        inner = _ChainInverse.apply(inverse, offset, log_alpha, x, bandwidth)
        return inner - (0.5 * self.dim * math.log(2 * math.pi) + affine.log_det().sum())


class _ChainInverse(torch.autograd.Function):
    r"""The inverse pass of an affine + PReLU chain over samples, with a hand-written backward.

    ``forward(W, c, log_alpha, x)`` with ``W`` of shape ``(K + 1, d, d)``, ``c`` of shape
    ``(K + 1, d)``, ``log_alpha`` of shape ``(K, d)`` and ``x`` of shape ``(N, d)`` runs, from
    :math:`h_{K+1} = x`,

    .. math:: u_k = W_k h_{k+1} + c_k, \qquad h_k = \mathrm{prelu}(u_k, 1/\alpha_k)
              \quad (k = K, \dots, 1), \qquad z = W_0 h_1 + c_0,

    and returns, per sample, :math:`-\frac12|z|^2 - \sum_k [u_k < 0] \cdot \log\alpha_k`.
    The samples lie along the last (contiguous) axis and every :math:`u_k` is kept in one
    buffer, so the backward pass is one ``mm`` and one ``mul`` per layer plus a few batched
    operations, instead of autograd's graph of about ten tiny nodes per layer.
    """

    @staticmethod
    def forward(
        ctx, weight: Tensor, offset: Tensor, log_alpha: Tensor, x: Tensor, bandwidth: float = 0.0
    ) -> Tensor:
        layers, d, n = len(log_alpha), x.shape[-1], len(x)
        inv_alpha = (-log_alpha).exp()
        pre = x.new_empty(layers + 1, d, n)  # pre[k] = u_k, pre[0] = z
        weights, offsets, outs = weight.unbind(0), offset[..., None].unbind(0), pre.unbind(0)
        slopes = inv_alpha.unbind(0)
        current = x.T
        for k in range(layers, 0, -1):
            torch.addmm(offsets[k], weights[k], current, out=outs[k])
            current = torch.prelu(pre[k : k + 1], slopes[k - 1])[0]
        z = torch.addmm(offsets[0], weights[0], current, out=outs[0])
        out = -0.5 * z.square().sum(0)
        negative = (pre[1:] < 0).to(x.dtype)  # (K, d, N)
        if layers:
            out = out - (log_alpha.reshape(1, -1) @ negative.view(-1, n))[0]
        ctx.save_for_backward(weight, log_alpha, inv_alpha, pre, negative, x)
        ctx.bandwidth = bandwidth
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        weight, log_alpha, inv_alpha, pre, negative, x = ctx.saved_tensors
        layers = len(inv_alpha)
        hidden = pre[1:]
        grad_pre = torch.empty_like(pre)  # d out / d u_k (d out / d z in row 0)
        torch.mul(pre[0], -grad, out=grad_pre[0])
        direct = None
        if ctx.bandwidth and layers:
            # the kinks' boundary term: a sample crossing u_k = 0 changes its log-det by
            # log alpha_k, so d E[[u_k < 0]] / d u = -(density of u_k at 0), estimated with a
            # Gaussian kernel of width bandwidth * std(u_k) (the pathwise gradient misses it)
            width = ctx.bandwidth * hidden.std(-1, keepdim=True).clamp_min(1e-12)
            kernel = torch.exp(-0.5 * (hidden / width).square()) / (math.sqrt(2 * math.pi) * width)
            direct = (kernel * (log_alpha[..., None] * grad)).unbind(0)
        grad_h = torch.empty_like(hidden)  # d out / d h_k
        scale = torch.where(negative.bool(), inv_alpha[..., None], 1.0)  # d h_k / d u_k
        weights_t, scales = weight.mT.unbind(0), scale.unbind(0)
        grads, grads_h = grad_pre.unbind(0), grad_h.unbind(0)
        for k in range(layers):
            torch.mm(weights_t[k], grads[k], out=grads_h[k])
            if direct is None:
                torch.mul(grads_h[k], scales[k], out=grads[k + 1])
            else:
                torch.addcmul(direct[k], grads_h[k], scales[k], out=grads[k + 1])
        inputs = torch.cat([hidden * scale, x.T[None]])  # h_1 .. h_K, h_{K+1} = x
        grad_weight = grad_pre @ inputs.mT
        grad_offset = grad_pre.sum(-1)
        # the log-det's direct term, then through 1/alpha_k in h_k = prelu(u_k, 1/alpha_k)
        through = (grad_h * hidden.clamp(max=0)).sum(-1) * inv_alpha
        grad_log_alpha = -(negative @ grad + through)
        grad_x = (weight[-1].T @ grad_pre[-1]).T if ctx.needs_input_grad[3] else None
        return grad_weight, grad_offset, grad_log_alpha, grad_x, None


# --------------------------------------------------------------------------------------------
# fitting and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class History:
    """What :func:`fit` measured.

    :ivar loss: training NLL of each step's batch.
    :ivar lr: learning rate of each step.
    :ivar eval_step: steps at which the held-out set was scored (with the averaged weights).
    :ivar nll: held-out NLL at those steps; ``nll_stderr`` its standard error.
    :ivar kl: :math:`\\mathrm{KL}(p\\|q)` at those steps (analytic targets only, else empty);
        ``kl_stderr`` its standard error.
    :ivar entropy: the target's exact entropy (``None`` for data).
    :ivar train_seconds: wall time of the training steps (evaluations excluded).
    :ivar steps_per_second: training steps per second.
    :ivar device: where it ran.
    """

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nll_stderr: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    kl_stderr: list[float] = field(default_factory=list)
    entropy: float | None = None
    train_seconds: float = 0.0
    steps_per_second: float = 0.0
    device: str = "cpu"

    @property
    def steps(self) -> int:
        return len(self.loss)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _score(
    theta: Tensor, flow: Flow, x: Tensor, log_p: Tensor | None, chunk: int = 65536
) -> dict[str, float]:
    """Held-out NLL (and KL when ``log_p`` is given) of ``x`` under ``layout(theta)``."""
    dist = flow.layout(theta, False)
    log_q = torch.cat([dist.log_prob(part) for part in x.split(chunk)]).double()
    n = log_q.numel()
    out = {"nll": -log_q.mean().item(), "nll_stderr": log_q.std().item() / math.sqrt(n)}
    if log_p is not None:
        gap = log_p.double() - log_q
        out.update(kl=gap.mean().item(), kl_stderr=gap.std().item() / math.sqrt(n))
    return out


def evaluate(
    flow: Flow,
    target: Target | str,
    num_samples: int = 200_000,
    seed: int = 12345,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    r"""Score a flow on ``num_samples`` fresh samples of an analytic target.

    Returns ``nll`` (:math:`-\frac1n\sum\log q(x_i)`), ``kl`` (:math:`\frac1n\sum[\log p(x_i)
    - \log q(x_i)]`), their standard errors ``nll_stderr`` and ``kl_stderr``
    (:math:`\hat\sigma/\sqrt n`) and the exact ``entropy``. Uses ``flow().log_prob`` (the
    library's inverse pass), never the training shortcut.
    """
    target = _targets.get(target) if isinstance(target, str) else target
    device = flow.theta.device if device is None else resolve_device(device)
    flow = flow.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x = target.sample(num_samples, generator=generator, device=device, dtype=flow.theta.dtype)
    out = _score(flow.theta.detach(), flow, x, target.log_prob(x))
    out["entropy"] = target.entropy()
    return out


def _check_positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def fit(
    flow: Flow,
    target_or_data: Target | str | Tensor,
    steps: int = 8000,
    batch_size: int = 4096,
    lr: float = 3e-3,
    device: str | torch.device = "auto",
    seed: int | None = 0,
    progress: bool = True,
    *,
    time_limit: float | None = None,
    ema: float | None = 0.998,
    final_lr: float = 0.0,
    warmup: float = 0.0,
    standardize: bool = True,
    eval_every: int | None = None,
    eval_samples: int = 20_000,
    holdout: float = 0.1,
    kink_bandwidth: float = 0.2,
) -> History:
    r"""Fit ``flow`` by maximum likelihood: Adam on :math:`-\frac1B\sum_b \log q_\theta(x_b)`.

    Each step draws a fresh batch from the target on the device (or a random batch of the
    training rows of a data tensor). The learning rate follows a cosine from ``lr`` to
    ``final_lr * lr`` over the run's progress, :math:`\max(\text{step}/\text{steps},
    \text{elapsed}/\text{time\_limit})`, so a wall-clock budget anneals too. Held-out scores
    and the final weights use an exponential moving average of the parameters,
    :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` (Polyak averaging: it
    removes most of the SGD noise that would otherwise sit in the KL); the flow ends with
    :math:`\bar\theta`.

    :param flow: the flow to train (moved to ``device``, trained in place).
    :param target_or_data: a :class:`~flowpolicy.targets.Target`, a target's name, or a tensor
        of data of shape ``(n, d)`` (a fraction ``holdout`` of the rows is kept for scoring).
    :param steps: maximum number of Adam steps (positive).
    :param batch_size: samples per step.
    :param lr: peak learning rate.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    :param seed: seed of the batches and of the held-out set.
    :param progress: show a tqdm progress bar.
    :param time_limit: stop after this many seconds of training (the schedule follows it).
    :param ema: decay :math:`\beta` of the weight average (``None`` or 0: no averaging).
    :param final_lr: learning rate at the end, as a fraction of ``lr``.
    :param warmup: fraction of the run over which the learning rate ramps up linearly.
    :param standardize: first match the flow's output mean and std to the data's
        (:func:`standardize_`; skipped for squashed flows).
    :param eval_every: score the held-out set every this many steps (default: 10 times a run,
        spaced by the clock when ``time_limit`` is given).
    :param eval_samples: size of the held-out set of an analytic target.
    :param holdout: fraction of a data tensor's rows held out.
    :param kink_bandwidth: affine + PReLU flows only: a sample whose PReLU input crosses 0 changes
        its log-det by :math:`\log\alpha`, a term of the gradient of the expected NLL with
        respect to the kinks' positions that backpropagation misses (the per-sample log-det is
        piecewise constant); it is estimated with a Gaussian kernel of this width, in units of
        the inputs' std (0: plain backpropagation). Without it the kinks drift out of the data.
    :returns: a :class:`History`.
    :raises ValueError: for non-positive steps or batch size, an unknown target, a data tensor
        of the wrong shape, or an unusable device.
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"fit: expected a flowpolicy.Flow, got {type(flow).__name__}")
    _check_positive("steps", steps)
    _check_positive("batch_size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit!r}")
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")
    device = resolve_device(device)
    flow = flow.to(device)
    dtype, dim = flow.theta.dtype, flow.config["dim"]
    seed = 0 if seed is None else seed
    generator = torch.Generator(device).manual_seed(seed)
    eval_generator = torch.Generator(device).manual_seed(seed + 1_000_003)

    target: Target | None = None
    if isinstance(target_or_data, Tensor):
        data = target_or_data.to(device=device, dtype=dtype)
        if data.dim() != 2 or data.shape[1] != dim or len(data) < 2:
            raise ValueError(f"data must have shape (n >= 2, {dim}), got {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or inf")
        order = torch.randperm(len(data), generator=generator, device=device)
        n_held = min(max(1, int(holdout * len(data))), len(data) - 1)
        held, train = data[order[:n_held]], data[order[n_held:]]
        held_log_p = None

        def draw(n: int) -> Tensor:
            return train[torch.randint(len(train), (n,), generator=generator, device=device)]
    else:
        target = _targets.get(target_or_data) if isinstance(target_or_data, str) else target_or_data
        if not isinstance(target, Target) or target.dim != dim:
            raise ValueError(f"expected a {dim}-D Target, a target name or a data tensor")
        held = target.sample(eval_samples, generator=eval_generator, device=device, dtype=dtype)
        held_log_p = target.log_prob(held)

        def draw(n: int) -> Tensor:
            return target.sample(n, generator=generator, device=device, dtype=dtype)

    if standardize and not flow.config.get("squash"):
        standardize_(flow, held if target is None else draw(eval_samples), seed=seed)
    fast = _PReLUChainLogProb(flow) if _PReLUChainLogProb.supports(flow) else None

    def objective(theta: Tensor, x: Tensor) -> Tensor:
        if fast is None:
            return -flow.layout(theta, False).log_prob(x).mean()
        return -fast(theta, x, bandwidth=kink_bandwidth).mean()

    optimizer = torch.optim.Adam([flow.theta], lr=lr)
    average = flow.theta.detach().clone()
    # score 10 times a run: by steps, or by the clock when a time limit is what ends the run
    eval_by_time = eval_every is None and time_limit is not None
    eval_every = eval_every or max(1, steps // 10)
    next_eval = 0.1 * time_limit if eval_by_time else math.inf
    history = History(entropy=None if target is None else target.entropy(), device=str(device))

    def record(step: int) -> None:
        scores = _score(average if ema else flow.theta.detach(), flow, held, held_log_p)
        history.eval_step.append(step)
        history.nll.append(scores["nll"])
        history.nll_stderr.append(scores["nll_stderr"])
        if "kl" in scores:
            history.kl.append(scores["kl"])
            history.kl_stderr.append(scores["kl_stderr"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps, desc=f"fit on {device}", unit="step", dynamic_ncols=True, mininterval=1.0
        )
    train_seconds, step, losses = 0.0, 0, []
    start = time.perf_counter()
    while step < steps:
        elapsed = time.perf_counter() - start + train_seconds
        done = step / steps if time_limit is None else max(step / steps, elapsed / time_limit)
        if done >= 1:
            break
        rate = lr * (final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * done)))
        if done < warmup:  # linear warm-up: Adam's first steps are full-size whatever the gradient
            rate *= done / warmup
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = objective(flow.theta, draw(batch_size))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        with torch.no_grad():
            # early on the average forgets fast (warm-up of the decay, as in Polyak averaging)
            beta = min(ema or 0.0, (1 + step) / (10 + step))
            average.mul_(beta).add_(flow.theta.detach(), alpha=1 - beta)
        losses.append(loss.detach())  # no .item() per step: it would sync a GPU every step
        history.lr.append(rate)
        if bar is not None:
            bar.update()
        by_time = eval_by_time and time.perf_counter() - start + train_seconds >= next_eval
        if by_time or (not eval_by_time and step % eval_every == 0) or step == steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - start
            next_eval = train_seconds + 0.1 * time_limit if eval_by_time else math.inf
            history.loss.extend(torch.stack(losses).tolist())
            losses.clear()
            record(step)
            if bar is not None:
                info = {"loss": f"{loss.item():.3f}", "nll": f"{history.nll[-1]:.3f}"}
                if history.kl:
                    info["kl"] = f"{history.kl[-1]:.4f}"
                bar.set_postfix(info)
            start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not history.eval_step or history.eval_step[-1] != step:
        train_seconds += time.perf_counter() - start
        if losses:
            history.loss.extend(torch.stack(losses).tolist())
        record(step)
    if bar is not None:
        bar.close()
    if ema:
        with torch.no_grad():
            flow.theta.copy_(average)
    history.train_seconds = train_seconds
    history.steps_per_second = step / max(train_seconds, 1e-9)
    return history


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------


def save(flow: Flow, path: str | Path) -> Path:
    """Save ``flow`` to the directory ``path`` (created): ``config.json`` + ``weights.pt``.

    ``config.json`` holds ``flow.config`` (the constructor arguments that fix the layout) and the
    dtype; ``weights.pt`` the state dict. :func:`load` rebuilds the flow from them.
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"save: expected a flowpolicy.Flow, got {type(flow).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _FORMAT,
        "format_version": 1,
        "config": flow.config,
        "dtype": str(flow.theta.dtype).removeprefix("torch."),
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    return path


def load(path: str | Path, device: str | torch.device = "cpu") -> Flow:
    """Rebuild a flow saved by :func:`save` from the directory ``path``, on ``device``.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if ``path`` is not a directory written by :func:`save`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist")
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir() or not config_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"load: {path} is not a saved flow: expected a directory with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, as written by flowpolicy.density.save"
        )
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load: {config_file} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"load: {config_file} does not describe a {_FORMAT}")
    try:
        flow = Flow(**meta["config"], seed=0)
    except TypeError as error:
        raise ValueError(f"load: the config in {config_file} does not fit Flow: {error}") from error
    dtype = getattr(torch, meta.get("dtype", "float32"))
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    flow = flow.to(dtype)
    try:
        flow.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"load: {weights_file} does not match its config: {error}") from error
    return flow.to(resolve_device(device))


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _grid(box, n: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    (x_lo, x_hi), (y_lo, y_hi) = box
    xs, ys = torch.linspace(x_lo, x_hi, n), torch.linspace(y_lo, y_hi, n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, torch.stack([gx, gy], -1).reshape(-1, 2)


def _box_of(points: Tensor, margin: float = 0.1) -> tuple[tuple[float, float], ...]:
    lo, hi = points.quantile(0.005, dim=0), points.quantile(0.995, dim=0)
    pad = margin * (hi - lo)
    return tuple((float(a), float(b)) for a, b in zip(lo - pad, hi + pad))


@torch.no_grad()
def _plot_density(flow: Flow, target: Target | None, data: Tensor | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    dist = flow()
    samples = dist.sample((4000,)).cpu()
    box = target.view if target is not None else _box_of(data.cpu())
    gx, gy, points = _grid(box)
    extent = (*box[0], *box[1])
    model = dist.log_prob(points.to(flow.theta)).cpu().exp().reshape(gx.shape).double().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    if target is not None:
        truth = target.log_prob(points).exp().reshape(gx.shape).double().numpy()
        axes[0].imshow(truth, origin="lower", extent=extent, aspect="auto", cmap="magma")
        axes[0].set_title(f"target p ({target.name})")
        reference = truth
    else:
        d = data.detach().cpu().double().numpy()
        axes[0].hist2d(d[:, 0], d[:, 1], bins=120, range=box, cmap="magma")
        axes[0].set_title("data")
        reference = model
    axes[1].imshow(model, origin="lower", extent=extent, aspect="auto", cmap="magma")
    axes[1].set_title("model q")
    axes[2].contour(gx.numpy(), gy.numpy(), reference, levels=8, cmap="viridis", linewidths=1)
    axes[2].scatter(*samples.T.numpy(), s=2, alpha=0.3, color="tab:red")
    axes[2].set_xlim(box[0])
    axes[2].set_ylim(box[1])
    axes[2].set_title("model samples on the target's contours")
    for ax in axes:
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(history: History, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    loss = torch.tensor(history.loss)
    axes[0].plot(loss.numpy(), lw=0.5, alpha=0.35, color="tab:blue", label="batch NLL")
    width = max(1, len(loss) // 100)
    if len(loss) > width:
        smooth = loss.unfold(0, width, 1).mean(-1)
        steps = (torch.arange(len(smooth)) + width - 1).numpy()
        axes[0].plot(steps, smooth.numpy(), color="tab:blue", label="mean")
    axes[0].errorbar(
        history.eval_step,
        history.nll,
        history.nll_stderr,
        fmt="o-",
        ms=3,
        color="tab:orange",
        label="held-out NLL",
    )
    if history.entropy is not None:
        axes[0].axhline(history.entropy, ls="--", color="k", label=f"entropy {history.entropy:.4f}")
    # the first steps' losses can be huge: frame the held-out curve and the entropy instead
    floor = [history.entropy] if history.entropy is not None else []
    low = min(history.nll + floor + [float(loss.quantile(0.01))])
    high = max(history.nll + [float(loss.quantile(0.5))])
    axes[0].set_ylim(low - 0.1, high + 0.4)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats")
    axes[0].legend()
    axes[0].set_title("negative log-likelihood")
    if history.kl:
        kl = torch.tensor(history.kl).clamp_min(1e-4)
        axes[1].errorbar(history.eval_step, kl.numpy(), history.kl_stderr, fmt="o-", ms=3)
        axes[1].set_yscale("log")
        axes[1].set_title(f"KL(p||q), final {history.kl[-1]:.4f} nats")
        axes[1].set_ylabel("nats")
    else:
        axes[1].plot(history.lr)
        axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _plot_deformation(flow: Flow, path: Path, panels: int = 10, seed: int = 0) -> None:
    """The seed's picture: base samples coloured by their starting quadrant, layer after layer."""
    import matplotlib.pyplot as plt

    dist = flow()
    generator = torch.Generator(flow.theta.device).manual_seed(seed)
    z = torch.randn(3000, 2, generator=generator, device=flow.theta.device, dtype=flow.theta.dtype)
    quadrant = ((z[:, 0] < 0).long() + 2 * (z[:, 1] < 0).long()).cpu()
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    stages, x = [("base z", z.cpu())], z
    for i, transform in enumerate(dist.transforms, start=1):
        x, _ = call_and_ladj(transform, x)
        stages.append((f"after {i} / {len(dist.transforms)}: {type(transform).__name__}", x.cpu()))
    if len(stages) > panels:  # a readable subset, evenly spaced, first and last kept
        keep = torch.linspace(0, len(stages) - 1, panels).round().long().unique().tolist()
        stages = [stages[i] for i in keep]
    cols = min(5, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, points) in zip(axes.flat, stages):
        for q in range(4):
            ax.scatter(*points[quadrant == q].T.numpy(), s=1.5, alpha=0.5, color=colors[q])
        lo, hi = _box_of(points, 0.05)
        ax.set_xlim(lo)
        ax.set_ylim(hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.suptitle("base samples coloured by starting quadrant, deformed by the flow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_figures(
    flow: Flow,
    target_or_data: Target | str | Tensor,
    history: History | None,
    out: str | Path,
) -> list[Path]:
    """Write ``density.png``, ``training.png`` (with a history) and ``deformation.png`` to ``out``.

    Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, data = None, None
    if isinstance(target_or_data, Tensor):
        data = target_or_data
    else:
        target = _targets.get(target_or_data) if isinstance(target_or_data, str) else target_or_data
    written = [out / "density.png"]
    _plot_density(flow, target, data, written[0])
    if history is not None and history.loss:
        written.append(out / "training.png")
        _plot_history(history, written[-1])
    if flow.config["dim"] == 2:
        written.append(out / "deformation.png")
        _plot_deformation(flow, written[-1])
    return written


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowpolicy.density",
        description="Fit an affine + PReLU (or spline) flow to a 2-D target by maximum likelihood; "
        "print the held-out NLL, the entropy and KL(p||q); save the flow and its figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="banana", help=f"one of {_targets.names()}")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--out", default=None, help="output directory (default runs/<target>)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="maximum steps")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULTS["time_limit"],
        help="training budget in seconds (the lr schedule follows it); 0: none",
    )
    parser.add_argument("--nonlinearity", default="prelu", choices=("prelu", "spline"))
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"nonlinear layers (default {DEFAULTS['layers']} for PReLU, "
        f"{SPLINE_DEFAULTS['layers']} for spline)",
    )
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--bins", type=int, default=SPLINE_DEFAULTS["bins"], help="spline bins")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--ema", type=float, default=DEFAULTS["ema"], help="0: no averaging")
    parser.add_argument("--init-strength", type=float, default=DEFAULTS["init_strength"])
    parser.add_argument(
        "--init",
        default=DEFAULTS["init"],
        choices=("data", "layers"),
        help="data: pairs of layers fitted to 2^18 samples (init_hinges_ for PReLU, "
        "init_splines_ for spline); layers: kinks scattered through the bulk (init_layers_)",
    )
    parser.add_argument(
        "--init-spread",
        type=float,
        default=DEFAULTS["init_spread"],
        help="spread of the PReLU kinks at init (init_layers_); negative: skip",
    )
    parser.add_argument(
        "--hinge-spread",
        type=float,
        default=DEFAULTS["hinge_spread"],
        help="kinks of init_hinges_ at the quantiles of N(0, spread^2), in data stds",
    )
    parser.add_argument(
        "--kink-bandwidth",
        type=float,
        default=DEFAULTS["kink_bandwidth"],
        help="kernel width of the kinks' boundary gradient (fit); 0: plain backpropagation",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=200_000, help="final fresh samples")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the 2-D ops are overhead-bound, more threads do not help)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


#: Defaults of the command line (affine + PReLU on the banana).
DEFAULTS = dict(
    steps=2000,
    time_limit=110.0,
    layers=24,
    rank=2,
    batch_size=2048,
    lr=1e-4,
    ema=0.998,
    init_strength=1.0,
    init="data",
    init_samples=2**18,
    init_spread=0.5,
    hinge_spread=2.0,
    kink_bandwidth=0.2,
)


#: What changes for ``--nonlinearity spline`` (init_splines_ builds the shear from two pairs).
SPLINE_DEFAULTS = dict(layers=4, bins=16)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        target = _targets.get(args.target)
        device = resolve_device(args.device)
        _check_positive("--steps", args.steps)
        _check_positive("--batch-size", args.batch_size)
        _check_positive("--eval-samples", args.eval_samples)
        _check_positive("--threads", args.threads)
        if args.time_limit < 0:
            raise ValueError(f"--time-limit must be >= 0, got {args.time_limit}")
        if args.layers is None:
            spline = args.nonlinearity == "spline"
            args.layers = SPLINE_DEFAULTS["layers"] if spline else DEFAULTS["layers"]
        flow = Flow(
            target.dim,
            layers=args.layers,
            rank=args.rank,
            nonlinearity=args.nonlinearity,
            bins=args.bins,
            init_strength=args.init_strength,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{target.name}")
    if args.init == "data" and args.layers >= 2 and args.rank >= 1 and target.dim >= 2:
        generator = torch.Generator().manual_seed(args.seed + 99)
        samples = target.sample(DEFAULTS["init_samples"], generator=generator)
        if args.nonlinearity == "prelu":
            init_hinges_(flow, samples, spread=args.hinge_spread)
        else:
            init_splines_(flow, samples)
    elif args.init_spread >= 0:
        init_layers_(flow, args.init_spread, seed=args.seed)
    history = fit(
        flow,
        target,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        time_limit=args.time_limit or None,
        ema=args.ema or None,
        kink_bandwidth=args.kink_bandwidth,
    )
    scores = evaluate(flow, target, args.eval_samples, seed=args.seed + 777)
    save(flow, out)
    metrics = {
        "target": target.name,
        **scores,
        "steps": history.steps,
        "train_seconds": history.train_seconds,
        "steps_per_second": history.steps_per_second,
        "device": str(device),
        "args": vars(args),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history.to_dict()) + "\n")
    if not args.no_figures:
        save_figures(flow, target, history, out)
    print(
        f"{target.name}: {history.steps} steps in {history.train_seconds:.1f} s "
        f"({history.steps_per_second:.0f} steps/s on {device})\n"
        f"  held-out NLL {scores['nll']:.4f} ± {scores['nll_stderr']:.4f} nats "
        f"({args.eval_samples} fresh samples)\n"
        f"  entropy      {scores['entropy']:.4f} nats (exact)\n"
        f"  KL(p||q)     {scores['kl']:.5f} ± {scores['kl_stderr']:.5f} nats\n"
        f"saved to {out} (load with flowpolicy.density.load({str(out)!r}))"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
