r"""Initializers: what each layer of a :class:`~flowpolicy.flows.Flow` should be at the start.

Each one states the maps it wants (a shift and a scale, slopes, knots) and writes them with
:meth:`Flow.set_layer_ <flowpolicy.flows.Flow.set_layer_>`, which inverts the flow's
parametrization; layer ``2k`` of the chain is affine, layer ``2k + 1`` nonlinear.

* :func:`standardize_`: the last affine layer matches the flow's output moments to the data's.
* :func:`init_layers_`: base-driven, kinks scattered through the bulk of each PReLU's inputs.
* :func:`init_hinges_` (PReLU) and :func:`init_splines_` (spline): data-driven, the chain built
  as pairs of nonlinear layers that each add a regression of one coordinate on another.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from flowpolicy.flows import Flow
from flowpolicy.parametrization import AffineParams

__all__ = ["init_hinges_", "init_layers_", "init_splines_", "standardize_"]


@torch.no_grad()
def _rescale_affine_(flow: Flow, i: int, a: Tensor, c: Tensor) -> None:
    r"""Compose affine layer ``i`` with :math:`y \mapsto a \odot y + c` (in place).

    :math:`S x + b \to \mathrm{diag}(a) S x + a \odot b + c`, i.e. :math:`L \to \mathrm{diag}(a) L`
    (still lower-triangular with a positive diagonal, the low-rank factor unchanged).
    """
    layer = flow.layer(i)
    a, c = a.double(), c.double()
    shift = a * layer.shift.double() + c
    scale_tril = a[:, None] * layer.scale_tril.double()
    flow.set_layer_(i, shift=shift, scale_tril=scale_tril, factor=layer.factor)


def _affine_diagonals(flow: Flow) -> Tensor:
    """The diagonals of ``L`` of every affine layer, ``(layers + 1, d)``, in float64."""
    indices = range(0, 2 * flow.config["layers"] + 1, 2)
    return torch.stack([flow.layer(i).scale_tril.diagonal().double() for i in indices])


#: margin above the affine diagonal's floor (``AffineParams.eps``) that a rescaled layer keeps
#: (half of the diagonal then lies in its softplus, which float32 resolves to ~1e-7)
_FLOOR_MARGIN = 2.0


@torch.no_grad()
def scale_output_(flow: Flow, a: Tensor, c: Tensor) -> Flow:
    r"""Compose the flow with :math:`y \mapsto a \odot y + c` (``a > 0``), in place, exactly.

    The last affine layer takes it (:math:`L \to \mathrm{diag}(a) L`), unless its diagonal
    would fall near the parametrization's floor (``AffineParams.eps`` = 1e-4, data of std
    below ~1e-4). An affine + PReLU chain then spreads the common factor
    :math:`s = \min_i a_i` over its :math:`m` affine layers: a PReLU is positively homogeneous,
    so scaling every :math:`L_k` by :math:`r = s^{1/m}` and shift :math:`b_k` by :math:`r^k`
    scales the output by :math:`s`; the last layer takes :math:`a / s`.

    :raises ValueError: if the flow cannot represent the scale (a spline chain, or a factor
        beyond :math:`(\text{floor})^{m}`): nothing is written then.
    """
    if flow.config["squash"]:
        raise ValueError("a squashed flow's support is fixed to (-1, 1)^d: it cannot be rescaled")
    theta = flow.theta
    a = torch.as_tensor(a, dtype=torch.float64, device=theta.device).expand(flow.config["dim"])
    c = torch.as_tensor(c, dtype=torch.float64, device=theta.device).expand(flow.config["dim"])
    if not (torch.isfinite(a).all() and torch.isfinite(c).all() and (a > 0).all()):
        raise ValueError("scale_output_: the scale must be positive and finite, the shift finite")
    diagonals = _affine_diagonals(flow)
    floor = _FLOOR_MARGIN * AffineParams.eps
    if (a * diagonals[-1] > floor).all():
        _rescale_affine_(flow, -1, a, c)
        return flow
    s, m = float(a.min()), len(diagonals)
    r = s ** (1.0 / m)
    homogeneous = flow.config["nonlinearity"] == "prelu" or m == 1
    if (
        not homogeneous
        or not (r * diagonals > floor).all()
        or not (a / s * r * diagonals[-1] > floor).all()
    ):
        raise ValueError(
            f"the flow cannot represent outputs scaled by {s:.3g}: the diagonal of its affine "
            f"layers is floored at {AffineParams.eps:g} ({flow.config['nonlinearity']} chain of "
            f"{m} affine layers); rescale the data to unit scale first (fit x / k, and subtract "
            "d log k from the log-densities)"
        )
    for k in range(m - 1):  # layer k + 1 of m: scale r, shift r^(k + 1)
        layer = flow.layer(2 * k)
        flow.set_layer_(
            2 * k,
            shift=r ** (k + 1) * layer.shift.double(),
            scale_tril=r * layer.scale_tril.double(),
            factor=layer.factor,
        )
    last = flow.layer(-1)  # a (L u + b) + c with u = u' / r^(m - 1): L -> (a / s) r L
    flow.set_layer_(
        -1,
        shift=a * last.shift.double() + c,
        scale_tril=(a / s * r)[:, None] * last.scale_tril.double(),
        factor=last.factor,
    )
    return flow


@torch.no_grad()
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
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    dim, theta = flow.config["dim"], flow.theta
    z = torch.randn(num_samples, dim, generator=generator).to(theta)
    for k in range(flow.config["layers"]):
        pre = flow.layer(2 * k)(z)
        u = spread * torch.randn(dim, generator=generator).to(theta)
        std = pre.std(0).clamp_min(1e-6)
        _rescale_affine_(flow, 2 * k, 1 / std, u - pre.mean(0) / std)
        z = flow.layer(2 * k + 1)(flow.layer(2 * k)(z))
    return flow


@torch.no_grad()
def standardize_(flow: Flow, data: Tensor, num_samples: int = 16384, seed: int = 0) -> Flow:
    r"""Match the flow's output mean and standard deviation to the data's (data-dependent init).

    With :math:`\mu_q, \sigma_q` the moments of the flow's samples and :math:`\mu, \sigma` the
    data's, the last affine layer :math:`y = S x + b` becomes
    :math:`y = a \odot (S x + b - \mu_q) + \mu` with :math:`a = \sigma / \sigma_q`, i.e.
    :math:`L \to \mathrm{diag}(a) L` (still lower-triangular with a positive diagonal) and
    :math:`b \to a \odot (b - \mu_q) + \mu`. The chain then works on unit-scale values whatever
    the data's units, and a flow that already fits is left (nearly) unchanged.
    """
    if flow.config["squash"]:
        raise ValueError("standardize_: a squashed flow's support is fixed to (-1, 1)^d")
    mean, std = column_moments("standardize_", check_data("standardize_", data, flow.config["dim"]))
    theta = flow.theta
    generator = torch.Generator(theta.device).manual_seed(seed)
    z = torch.randn(
        num_samples, flow.config["dim"], generator=generator, device=theta.device, dtype=theta.dtype
    )
    x = flow().push_forward(z)[0].double()
    spread = x.std(0)
    if not (torch.isfinite(x).all() and (spread > 0).all()):
        raise ValueError("standardize_: the flow's samples are not finite, or have no spread")
    a = std.to(spread) / spread
    try:
        scale_output_(flow, a, mean.to(spread) - a * x.mean(0))
    except ValueError as error:
        raise ValueError(f"standardize_: {error}") from None
    return flow


# --------------------------------------------------------------------------------------------
# data-driven pairs: the regression both pair initializations start from
# --------------------------------------------------------------------------------------------


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


def _set_affine_(flow: Flow, k: int, shift: Tensor, L: Tensor, factor: Tensor) -> None:
    """Affine layer ``k`` (chain index ``2k``) to ``y = L (I + F F^T) x + shift``; ``factor``
    holds ``d`` columns, of which the flow keeps its rank's."""
    rank = flow.config["rank"]
    flow.set_layer_(2 * k, shift=shift, scale_tril=L, factor=factor[:, :rank] if rank else None)


def check_data(name: str, data: Tensor, dim: int, min_rows: int = 2) -> Tensor:
    """``data`` checked to be a finite real tensor of shape ``(n >= min_rows, dim)``; returned
    detached, in float64, on its device (NumPy arrays are converted).

    :raises TypeError: for a non-tensor or a complex tensor.
    :raises ValueError: for a wrong shape, too few rows, or NaN/inf.
    """
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, Tensor) or data.is_complex():
        kind = f"a {data.dtype} tensor" if isinstance(data, Tensor) else type(data).__name__
        raise TypeError(f"{name}: data must be a real tensor of shape (n, {dim}), got {kind}")
    if data.dim() != 2 or data.shape[1] != dim:
        raise ValueError(f"{name}: data must have shape (n, {dim}), got {tuple(data.shape)}")
    if len(data) < min_rows:
        raise ValueError(
            f"{name}: needs at least {min_rows} rows of data (to estimate a spread), got "
            f"{len(data)}"
        )
    data = data.detach().double()
    bad = ~torch.isfinite(data).all(1)
    if bad.any():
        raise ValueError(
            f"{name}: data contains NaN or inf in {int(bad.sum())} of {len(data)} rows (the "
            f"first is row {int(bad.nonzero()[0, 0])}); drop or impute them first"
        )
    return data


def column_moments(name: str, data: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std of each column of float64 ``data``.

    :raises ValueError: naming a constant column (no spread, to float64 precision): its density
        would be a point mass, and maximum likelihood diverges.
    """
    mean, std = data.mean(0), data.std(0)
    constant = (std <= 64 * torch.finfo(torch.float64).eps * mean.abs()) | (std == 0)
    if constant.any():
        j = int(constant.nonzero()[0, 0])
        raise ValueError(
            f"{name}: column {j} of the data is constant (every row is {float(mean[j]):.6g}): "
            "its density is a point mass, which no flow can fit; drop the column or add noise"
        )
    return mean, std


def _standardized(name: str, data: Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, mean, std)`` with ``y = (data - mean) / std``, in float64 on the CPU (checked)."""
    data = check_data(name, data, dim).cpu()
    mean, std = column_moments(name, data)
    return (data - mean) / std, mean, std


def _to_data_units_(name: str, flow: Flow, std: Tensor, mean: Tensor) -> Flow:
    """The flow, built on standardized data, composed with ``y -> std * y + mean``."""
    try:
        return scale_output_(flow, std, mean)
    except ValueError as error:
        raise ValueError(f"{name}: {error}") from None


def _hinges(u: Tensor, kinks: Tensor, smooth: float) -> Tensor:
    r"""Features :math:`\mathrm{relu}(u - b_j)`, or :math:`\tau\,\mathrm{softplus}((u - b_j)/\tau)`
    for ``smooth`` :math:`= \tau > 0`; shape ``(n, J)``."""
    u = u[:, None] - kinks
    return F.relu(u) if smooth == 0 else smooth * F.softplus(u / smooth)


def _check_pair_init(flow: Flow, name: str, nonlinearity: str, instead: str) -> None:
    """The flows a pair initialization can build: unsquashed, of its nonlinearity, dim >= 2,
    at least one pair of nonlinear layers, and a low-rank update (for upper shears)."""
    config = flow.config
    if config["nonlinearity"] != nonlinearity:
        kind = "PReLU" if nonlinearity == "prelu" else "spline"
        raise ValueError(f"{name} is for affine + {kind} flows ({instead})")
    if config["squash"]:
        raise ValueError(f"{name}: a squashed flow's support is fixed to (-1, 1)^d")
    if config["dim"] < 2 or config["layers"] < 2 or config["rank"] == 0:
        raise ValueError(f"{name} needs dim >= 2, layers >= 2 and rank >= 1")


def _spread_quantiles(n: int, spread: float) -> Tensor:
    r""":math:`b_j = \text{spread}\cdot\Phi^{-1}((j - \frac12)/n)`, :math:`j = 1 \dots n`."""
    normal = torch.distributions.Normal(0.0, 1.0)
    return spread * normal.icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n)


#: the least conditional spread (in data stds) a pair initialization starts from: a few rows
#: can be fitted exactly, and a zero spread is no density
_MIN_RESIDUAL = 1e-3


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


# --------------------------------------------------------------------------------------------
# affine + PReLU: pairs of layers that each add one hinge
# --------------------------------------------------------------------------------------------


@torch.no_grad()
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
    _check_pair_init(flow, "init_hinges_", "prelu", "init_splines_ for splines")
    d, layers = flow.config["dim"], flow.config["layers"]
    pairs = layers // 2
    y, mean, std = _standardized("init_hinges_", data, d)
    kinks = _spread_quantiles(pairs, spread)
    residual, t, s, coef = _hinge_regression(y, kinks, smooth=0.0, ridge=ridge)
    residual = max(residual, _MIN_RESIDUAL)
    signs = torch.ones(pairs, dtype=torch.float64)
    signs[1::2] = -1  # alternate alpha < 1 and alpha > 1
    log_alpha = -slope * signs
    shears = coef[2:] / (1 - log_alpha.exp())
    # pair j adds shears_j (alpha_j u + (1 - alpha_j) relu(u)), u = y_s - b_j: the affine layer
    # after it (where u is back) takes out its linear part; the first one adds coef[1] y_s
    linear = -shears * log_alpha.exp()
    linear[0] = linear[0] + coef[1]
    for k in range(layers + 1):
        shift = torch.zeros(d, dtype=torch.float64)
        L, factor = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        j = k // 2  # affine k = 2j sits before pair j, k = 2j + 1 inside it
        last = k == layers
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
        # else: last, after an unpaired PReLU layer (slopes 1): the identity
        _set_affine_(flow, k, shift, L, factor)
    for j in range(layers):
        alpha = torch.ones(d, dtype=torch.float64)
        if j < 2 * pairs:  # alpha on y_s in the pair's first layer, 1 / alpha in its second
            alpha[s] = (log_alpha[j // 2] * (1 if j % 2 == 0 else -1)).exp()
        flow.set_layer_(2 * j + 1, alpha=alpha)
    return _to_data_units_("init_hinges_", flow, std, mean)


# --------------------------------------------------------------------------------------------
# affine + spline: pairs of layers that each add one monotone function
# --------------------------------------------------------------------------------------------


def _spline_pieces(
    y: Tensor, t: int, s: int, kinks: Tensor, smooth: float, coef: Tensor, residual: float, n: int
) -> tuple[list[tuple[float, Tensor]], Tensor, float]:
    """The increasing pieces ``(sign, hinge weights)`` that ``n`` spline pairs add, with the
    regression's coefficients and residual: ``P`` and ``-N`` for two pairs or more; for one,
    the larger piece alone, refitted."""
    pieces = [(1.0, coef[2:].clamp_min(0)), (-1.0, (-coef[2:]).clamp_min(0))]
    if n >= 2:
        return pieces, coef, residual
    features = _hinges(y[:, s], kinks, smooth)
    _, weights = max(pieces, key=lambda piece: float((features @ piece[1]).std()))
    basis = torch.stack([torch.ones(len(y), dtype=y.dtype), y[:, s], features @ weights], 1)
    coef = torch.linalg.lstsq(basis, y[:, t, None]).solution[:, 0]
    residual = float((y[:, t] - basis @ coef).std())
    return [(float(coef[2].sign()), weights * coef[2].abs())], coef, residual


def _set_spline_(
    flow: Flow, j: int, s: int, knots_x: Tensor, knots_y: Tensor, derivatives: Tensor
) -> None:
    """Nonlinear layer ``j`` (chain index ``2j + 1``) to the identity, but on coordinate ``s``
    the spline through ``(knots_x, knots_y)`` with these interior derivatives."""
    d, bins, bound = flow.config["dim"], flow.config["bins"], flow.config["bound"]
    grid = torch.linspace(-bound, bound, bins + 1, dtype=torch.float64)
    xs, ys = grid.repeat(d, 1), grid.repeat(d, 1)
    slopes = torch.ones(d, bins - 1, dtype=torch.float64)
    xs[s], ys[s], slopes[s] = knots_x, knots_y, derivatives
    flow.set_layer_(2 * j + 1, knots_x=xs, knots_y=ys, derivatives=slopes)


@torch.no_grad()
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
    _check_pair_init(flow, "init_splines_", "spline", "init_hinges_ for PReLU")
    if not smooth > 0:
        raise ValueError(f"init_splines_: smooth must be positive, got {smooth}")
    d, layers = flow.config["dim"], flow.config["layers"]
    bins, bound = flow.config["bins"], flow.config["bound"]
    y, mean, std = _standardized("init_splines_", data, d)
    kinks = _spread_quantiles(knots, spread)
    residual, t, s, coef = _hinge_regression(y, kinks, smooth, ridge)
    pieces, coef, residual = _spline_pieces(y, t, s, kinks, smooth, coef, residual, layers // 2)
    residual = max(residual, _MIN_RESIDUAL)
    rho = bound / reach  # u = rho z_s in the splines' interval
    grid = torch.linspace(-bound, bound, bins + 1, dtype=torch.float64)
    ones = torch.ones(bins - 1, dtype=torch.float64)
    for j in range(layers):
        _set_spline_(flow, j, s, grid, grid, ones)
    # per pair: (shear coefficient a, offset mu, linear part to take out next)
    shears = [(0.0, 0.0, 0.0)] * (layers // 2)
    for j, (sign, weights) in enumerate(pieces[: layers // 2]):
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
        _set_spline_(flow, 2 * j, s, grid, knots_y, slopes)
        _set_spline_(flow, 2 * j + 1, s, knots_y, grid, 1 / slopes)
        shears[j] = (sign * c / lam, mu, sign * c)
    for k in range(layers + 1):
        shift = torch.zeros(d, dtype=torch.float64)
        L, factor = torch.eye(d, dtype=torch.float64), torch.zeros(d, d, dtype=torch.float64)
        # affine k = 2j + 1 is pair j's shear, affine k = 2j + 2 takes out its linear part
        linear = -shears[k // 2 - 1][2] if k >= 2 and k % 2 == 0 else 0.0
        if k == 0:  # z -> (residual z_t + c_0, rho z_s)
            L[t, t], L[s, s], shift[t] = residual, rho, coef[0]
        elif k == layers:  # and c_1 y_s (back in the data's units below)
            scale = torch.ones(d, dtype=torch.float64)
            scale[s] = 1 / rho
            L, factor = _shear(d, t, s, linear + float(coef[1]) / rho, scale)
        elif k % 2 == 1:
            a, mu, _ = shears[k // 2]
            L, factor = _shear(d, t, s, a)
            shift[t] = -a * mu
        else:
            L, factor = _shear(d, t, s, linear)
        _set_affine_(flow, k, shift, L, factor)
    return _to_data_units_("init_splines_", flow, std, mean)
