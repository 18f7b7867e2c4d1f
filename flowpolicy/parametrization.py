r"""Raw parameter vectors to bijectors and back: the layers of a flow module.

A flow module holds one flat vector of raw parameters per distribution (learnable for
:class:`~flowpolicy.flows.Flow`, the output of a hypernetwork for
:class:`~flowpolicy.flows.ConditionalFlow`). Each layer module here maps its slice of that vector
to a bijector (``forward``), so that every raw value is valid, and back (``encode``): from what
the layer should be (a shift and a scale, slopes, knots) to the raw values that give it. Both
accept leading batch dimensions. :class:`FlowParams` is the layout of the whole chain.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform

from flowpolicy.bijectors import Affine, PReLU, Spline, Tanh
from flowpolicy.coupling import CouplingParams
from flowpolicy.fastpath import unbind_layers
from flowpolicy.output_bound import OutputBound

__all__ = ["AffineParams", "FlowParams", "PReLUParams", "SplineParams", "inverse_softplus"]

NONLINEARITIES = ("prelu", "spline", "coupling")


def inverse_softplus(y: Tensor) -> Tensor:
    """The ``x`` with ``softplus(x) = y`` for ``y > 0``, without overflow:
    ``log(exp(y) - 1) = y + log(1 - exp(-y))``."""
    return y + torch.log(-torch.expm1(-y))


def _require(condition: bool | Tensor, message: str) -> None:
    if not bool(condition):
        raise ValueError(message)


class AffineParams(nn.Module):
    r"""Raw vector :math:`\theta` of size :math:`d + d(d+1)/2 + d r` to an :class:`Affine`.

    The raw vector holds the shift, the raw diagonal of :math:`L`, its strictly lower entries
    (row by row) and the factor :math:`F` (``(d, r)``, row-major), in this order. The diagonal of
    :math:`L` is :math:`\mathrm{softplus}(\theta + c) + \epsilon` (1 at :math:`\theta = 0`), so
    every :math:`\theta` is valid. The low-rank factor is learned as :math:`F = V D^{1/2}`
    directly (``perturb_diag`` is redundant for a learned parametrization): the scale is
    :math:`S = L (I + F F^\top)`.
    """

    eps = 1e-4

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        n_tril = dim * (dim + 1) // 2
        self.sizes = (dim, n_tril, dim * rank)
        self.num_params = sum(self.sizes)
        # strictly lower entries @ scatter: one matmul places them in every L of the batch
        rows, cols = torch.tril_indices(dim, dim, offset=-1)
        scatter = torch.zeros(len(rows), dim * dim)
        scatter[torch.arange(len(rows)), rows * dim + cols] = 1.0
        self.register_buffer("scatter", scatter, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.diag_offset = math.log(math.expm1(1.0 - self.eps))

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        shift, tril, factor = torch.zeros(self.num_params).split(self.sizes)
        noise = torch.randn(tril.numel() - self.dim, generator=generator)
        tril[self.dim :] = strength * noise / math.sqrt(self.dim)
        # a mild update, |F|^2 ~ 0.05: strong updates compound over layers into huge scales
        noise = torch.randn(factor.numel(), generator=generator)
        factor.copy_(min(strength, 1.0) * 0.22 * noise / math.sqrt(self.dim))
        return torch.cat([shift, tril, factor])

    def split(self, theta: Tensor) -> tuple[Tensor, ...]:
        """Views of the raw parameters: shift, raw diagonal, strictly lower entries, factor."""
        d = self.dim
        return theta.split((d, d, self.sizes[1] - d, self.sizes[2]), -1)

    def parts(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(shift, diag, L, F)`` of the raw parameters: ``diag`` is the diagonal of ``L``."""
        shift, raw_diag, lower, factor = self.split(theta)
        d, r = self.dim, self.rank
        diag = F.softplus(raw_diag + self.diag_offset) + self.eps
        if d == 1:  # no strictly lower entries to place
            L = diag.unsqueeze(-1)
        else:
            L = lower @ self.scatter
            L[..., :: d + 1] = diag  # the diagonal of the flattened d x d matrices
            L = L.unflatten(-1, (d, d))
        return shift, diag, L, factor.unflatten(-1, (d, r)) if r > 0 else None

    def forward(self, theta: Tensor) -> Affine:
        shift, diag, L, factor = self.parts(theta)
        return Affine(shift, L, factor, validate=False, log_diag=diag.log())

    def encode(self, shift: Tensor, scale_tril: Tensor, factor: Tensor | None = None) -> Tensor:
        """The raw parameters of ``y = L (I + F F^T) x + shift``.

        :param shift: shape ``(..., d)``.
        :param scale_tril: ``L``, shape ``(..., d, d)``; its upper triangle is ignored, its
            diagonal must exceed ``eps`` (1e-4).
        :param factor: ``F``, shape ``(..., d, r)``; ``None`` for zeros (``S = L``).
        """
        d, r = self.dim, self.rank
        _require(shift.shape[-1:] == (d,), f"shift must have shape (..., {d})")
        _require(scale_tril.shape[-2:] == (d, d), f"scale_tril must have shape (..., {d}, {d})")
        diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1)
        _require((diag > self.eps).all(), f"the diagonal of scale_tril must exceed {self.eps}")
        raw_diag = inverse_softplus(diag - self.eps) - self.diag_offset
        lower = scale_tril[..., self.rows, self.cols]
        batch = torch.broadcast_shapes(shift.shape[:-1], scale_tril.shape[:-2])
        if factor is None:
            factor = shift.new_zeros(batch + (d, r))
        _require(factor.shape[-2:] == (d, r), f"factor must have shape (..., {d}, {r})")
        parts = [shift, raw_diag, lower, factor.flatten(-2)]
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], -1)


class PReLUParams(nn.Module):
    r"""Raw :math:`\theta \in \mathbb{R}^d` to a :class:`PReLU` with slopes :math:`e^\theta`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = self.num_params = dim

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        # slopes log-uniform in [e^-s, e^s]: all-ones slopes keep the chain linear forever
        return strength * (2 * torch.rand(self.num_params, generator=generator) - 1)

    def forward(self, theta: Tensor, kink_bandwidth: float = 0.0) -> PReLU:
        return PReLU.from_log_slopes(theta, kink_bandwidth)

    def encode(self, alpha: Tensor) -> Tensor:
        """The raw parameters of the slopes ``alpha (..., d)``, all positive."""
        _require(alpha.shape[-1:] == (self.dim,), f"alpha must have shape (..., {self.dim})")
        _require((alpha > 0).all(), "alpha must be positive")
        return alpha.log()


class SplineParams(nn.Module):
    """Raw vector of size ``d (3K - 1)`` to a :class:`Spline` with ``K`` bins on [-B, B]: per
    dimension, ``K`` width logits, ``K`` height logits and ``K - 1`` raw interior derivatives."""

    def __init__(self, dim: int, bins: int, bound: float) -> None:
        super().__init__()
        self.dim, self.bins, self.bound = dim, bins, bound
        self.num_params = dim * (3 * bins - 1)
        self.identity_derivative = math.log(math.expm1(1.0 - Spline.min_derivative))

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        theta = torch.zeros(self.dim, 3 * self.bins - 1)
        theta[:, 2 * self.bins :] = self.identity_derivative
        theta += strength * 0.1 * torch.randn(theta.shape, generator=generator)
        return theta.flatten()

    def forward(self, theta: Tensor) -> Spline:
        theta = theta.unflatten(-1, (self.dim, 3 * self.bins - 1))
        widths, heights, derivatives = theta.split([self.bins, self.bins, self.bins - 1], -1)
        return Spline(widths, heights, derivatives, self.bound, validate=False)

    def _bin_logits(self, knots: Tensor, name: str) -> Tensor:
        """Inverse of the bins' softmax: logits whose bins end at ``knots``."""
        d, K, B = self.dim, self.bins, self.bound
        _require(knots.shape[-2:] == (d, K + 1), f"{name} must have shape (..., {d}, {K + 1})")
        ends = knots[..., [0, -1]] - knots.new_tensor([-B, B])
        _require(ends.abs().amax() <= 1e-6 * B, f"{name} must start at -{B} and end at {B}")
        fractions = (knots[..., 1:] - knots[..., :-1]) / (2 * B)
        share = (fractions - Spline.min_bin) / (1 - Spline.min_bin * K)
        _require((share > 0).all(), f"the bins of {name} must be wider than {2 * B} * 1e-3")
        return share.log()

    def encode(self, knots_x: Tensor, knots_y: Tensor, derivatives: Tensor) -> Tensor:
        """The raw parameters of the spline through the knots.

        :param knots_x: ``(..., d, K + 1)``, increasing from ``-B`` to ``B``; each bin wider than
            ``2 B min_bin``.
        :param knots_y: the same for the outputs.
        :param derivatives: ``(..., d, K - 1)``, the derivatives at the interior knots, each
            above ``min_derivative`` (the end derivatives are 1).
        """
        d, K = self.dim, self.bins
        widths, heights = self._bin_logits(knots_x, "knots_x"), self._bin_logits(knots_y, "knots_y")
        _require(derivatives.shape[-2:] == (d, K - 1), f"derivatives must be (..., {d}, {K - 1})")
        _require((derivatives > Spline.min_derivative).all(), "derivatives must exceed 1e-3")
        raw = inverse_softplus(derivatives - Spline.min_derivative)
        batch = torch.broadcast_shapes(widths.shape[:-2], heights.shape[:-2], raw.shape[:-2])
        parts = [p.expand(batch + p.shape[-2:]) for p in (widths, heights, raw)]
        return torch.cat(parts, -1).flatten(-2)


class FlowParams(OutputBound, nn.Module):
    """The chain's layout: a raw parameter vector ``(..., P)`` to the bijectors of a flow."""

    def __init__(
        self,
        dim: int,
        layers: int,
        rank: int,
        nonlinearity: str,
        squash: bool,
        bins: int,
        bound: float,
        hidden: tuple[int, ...] = (64, 64),
        code: int = 0,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be a non-negative integer, got {layers!r}")
        if not isinstance(rank, int) or not 0 <= rank <= dim:
            raise ValueError(f"rank must be an integer in [0, dim = {dim}], got {rank!r}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        self.nonlinearity = nonlinearity
        if nonlinearity in ("spline", "coupling"):
            if isinstance(bins, bool) or not isinstance(bins, numbers.Integral) or bins < 2:
                raise ValueError(f"spline bins must be an integer >= 2, got {bins!r}")
            if isinstance(bound, bool) or not isinstance(bound, numbers.Real):
                raise ValueError(f"spline bound must be a number, got {bound!r}")
            if not (math.isfinite(bound) and bound > 0):
                raise ValueError(
                    f"spline bound must be positive and finite (the spline acts on [-bound, "
                    f"bound]), got {bound!r}"
                )
        if nonlinearity == "coupling":
            hidden = tuple(hidden)
            if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
                raise ValueError(
                    f"coupling_hidden must be a sequence of positive integers, got {hidden!r}"
                )
        bins = int(bins) if nonlinearity != "prelu" else bins
        self.dim, self.squash = dim, squash
        chain: list[nn.Module] = []
        for k in range(layers):
            chain.append(AffineParams(dim, rank))
            if nonlinearity == "prelu":
                chain.append(PReLUParams(dim))
            elif nonlinearity == "spline":
                chain.append(SplineParams(dim, bins, bound))
            else:  # each layer has its own conditioner; consecutive ones bend alternate halves
                chain.append(CouplingParams(dim, bins, bound, hidden, code, parity=k))
        chain.append(AffineParams(dim, rank))
        self.chain = nn.ModuleList(chain)
        self.sizes = [layer.num_params for layer in chain]
        self.num_params = sum(self.sizes)
        self.offsets = [0]
        for size in self.sizes:
            self.offsets.append(self.offsets[-1] + size)
        # raw entries whose largest signed value bounds the map (a diagonal, a log-slope); the
        # others (shifts, shears, factors) count by their absolute values
        signed = torch.zeros(self.num_params, dtype=torch.bool)
        index: dict[str, list[np.ndarray]] = dict(shift=[], diag=[], lower=[], factor=[], slope=[])
        for offset, layer in zip(self.offsets, chain):
            if isinstance(layer, AffineParams):
                signed[offset + dim : offset + 2 * dim] = True
                ends = np.cumsum((0, dim, dim, layer.sizes[1] - dim, layer.sizes[2])) + offset
                for name, a, b in zip(("shift", "diag", "lower", "factor"), ends, ends[1:]):
                    index[name].append(np.arange(a, b))
            elif isinstance(layer, PReLUParams):
                signed[offset : offset + dim] = True
                index["slope"].append(np.arange(offset, offset + dim))
        self.register_buffer("signed", signed, persistent=False)
        # where each affine part (and each PReLU's log-slopes) lies in the raw vector, per layer
        self.affine_index = {name: np.array(rows, dtype=np.int64) for name, rows in index.items()}
        # d = 1 with PReLU or spline layers: the raw entries the fused log-density reads
        # (fastpath.py, fastpath_spline.py), and a spline's bins and bound
        rows, self.scalar_spline = None, None
        if dim == 1 and nonlinearity in ("prelu", "spline"):
            parts = [self.affine_index[n].ravel() for n in ("shift", "diag", "factor", "slope")]
            if nonlinearity == "spline":  # all layers' width and height logits, then derivatives
                parts += [np.arange(o, o + 2 * bins) for o in self.offsets[1:-1:2]]
                parts += [np.arange(o + 2 * bins, o + 3 * bins - 1) for o in self.offsets[1:-1:2]]
                self.scalar_spline = (bins, float(bound))
            rows = torch.as_tensor(np.concatenate(parts))
        self.register_buffer("scalar_rows", rows, persistent=False)
        self.register_buffer("zero", torch.zeros(dim), persistent=False)
        self.register_buffer("one", torch.ones(dim), persistent=False)
        # within's memory: per (bound, dtype, device), a raw vector that passed its test
        self._passed: dict[tuple, Tensor] = {}

    def init(self, seed: int | None, strength: float) -> Tensor:
        generator = torch.Generator()
        if seed is None:
            # draw from the global generator: torch.seed() would re-seed it non-deterministically
            seed = int(torch.randint(0, 2**62, ()).item())
        generator.manual_seed(seed)
        return torch.cat([layer.init(generator, strength) for layer in self.chain])

    def _index(self, i: int) -> int:
        n = len(self.chain)
        if not -n <= i < n:
            raise IndexError(f"layer {i} out of range: the chain has {n} layers")
        return i % n

    def layer(self, theta: Tensor, i: int) -> Transform:
        """Bijector ``i`` of the chain for raw parameters ``theta (..., P)``."""
        i = self._index(i)
        return self.chain[i](theta[..., self.offsets[i] : self.offsets[i + 1]])

    def encode(self, i: int, **parts: Tensor) -> tuple[slice, Tensor]:
        """Where layer ``i``'s raw parameters lie in the vector, and their values for ``parts``
        (the keyword arguments of the layer's ``encode``)."""
        i = self._index(i)
        return slice(self.offsets[i], self.offsets[i + 1]), self.chain[i].encode(**parts)

    def layer_views(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Views, without copies, of raw parameters ``theta (..., P)`` as every affine layer
        ``(K+1, ..., P_affine)`` and every nonlinear layer ``(K, ..., P_nonlinear)``: the chain
        alternates them, so each kind repeats with a period of ``P_affine + P_nonlinear``."""
        size = self.sizes[0]
        period = size + (self.sizes[1] if len(self.sizes) > 1 else 0)
        affine = theta.unfold(-1, size, period).movedim(-2, 0)
        if len(self.sizes) == 1:
            return affine, theta.new_empty(0, *theta.shape[:-1], self.dim)
        return affine, theta[..., size:].unfold(-1, period - size, period).movedim(-2, 0)

    def layers(
        self,
        theta: Tensor,
        kink_bandwidth: float = 0.0,
        output_bound: float | None = None,
        inverse: bool = False,
    ) -> tuple[list[Affine], list[Transform], Tensor]:
        """The affine layers, the nonlinear layers and the sum of the affine layers' log-dets
        (which do not depend on the input), for raw parameters ``theta (..., P)``.

        :param output_bound: scale the affine layers where the chain could exceed it (see
            :meth:`output_scales`); ``None``: as the raw parameters say.
        :param inverse: form the affine layers' inverses now, all in one call (for a density's
            log-prob; else each layer forms its own on first use).
        """
        # All affine layers share one layout, and so do all nonlinear layers: build each kind in
        # one call with a leading layer dimension and split it, instead of one call per layer
        # (on CPU the many tiny kernels of per-layer builds dominate a small policy's step).
        raw_affine, raw_nonlinear = self.layer_views(theta)
        if output_bound is None or theta.numel() == 0 or self.within(theta, output_bound):
            affine = self.chain[0](raw_affine)
        else:
            parts = self.chain[0].parts(raw_affine)
            log_c = self.output_scales(theta, output_bound, parts)
            c = log_c.exp()
            shift, diag, L, factor = parts
            affine = Affine(
                shift * c[..., None],
                L * c[..., None, None],
                factor,
                validate=False,
                log_diag=diag.log() + log_c[..., None],
            )
        if inverse or theta.dim() == 1:  # (a density model always inverts)
            affine.dense_inverse()
        nonlinear: list[Transform] = []
        if len(self.chain) > 1:
            nonlinear = self._nonlinear_layers(raw_nonlinear, kink_bandwidth)
        return unbind_layers(affine), nonlinear, affine.log_det().sum(0)

    def _nonlinear_layers(self, raw: Tensor, kink_bandwidth: float = 0.0) -> list[Transform]:
        """The nonlinear layers of raw parameters ``raw (K, ..., P_nonlinear)``: element-wise
        layers share one layout, built in one call and split; coupling layers each have their
        own conditioner, built one by one."""
        module = self.chain[1]
        if isinstance(module, CouplingParams):
            return [self.chain[2 * k + 1](theta) for k, theta in enumerate(raw)]
        if isinstance(module, PReLUParams):
            return unbind_layers(module(raw, kink_bandwidth))
        return unbind_layers(module(raw))

    def chain_of(self, affines: list[Affine], nonlinear: list[Transform]) -> list[Transform]:
        """The bijectors in the order they apply: affine, nonlinear, ..., affine [, tanh]."""
        transforms: list[Transform] = [affines[0]]
        for g, affine in zip(nonlinear, affines[1:]):
            transforms += [g, affine]
        return transforms + [Tanh()] if self.squash else transforms
