r"""Two-dimensional target densities with exact log-densities, samplers and entropies.

Each target has ``log_prob(x)`` (exact, normalized), ``sample(n, generator=None, device=None)``
(drawn directly on the device, so GPU training never copies data from the host) and
``entropy()`` in nats (closed form, or a deterministic quadrature accurate to ~1e-10 where none
exists). A perfect model's held-out negative log-likelihood equals the entropy, and
:math:`\mathrm{KL}(p\,\|\,q) = \mathbb{E}_p[\log p - \log q]` can be estimated exactly from samples.

* :data:`banana`: the target of Jang (2018),
  :math:`p(x_1, x_2) = \mathcal{N}(x_1 \mid x_2^2/4, 1)\,\mathcal{N}(x_2 \mid 0, 4^2)`;
* :data:`two_clusters`: two well-separated modes at :math:`(\pm 0.5, 0.5)` with std 0.05, the
  shape of a policy at the lake's start state;
* :data:`ring`: eight Gaussians (std 0.2) evenly spaced on a circle of radius 2.

Example:
    >>> from flowpolicy import targets
    >>> x = targets.banana.sample(1024)
    >>> nll = -targets.banana.log_prob(x).mean()   # ~ targets.banana.entropy() = 4.2242
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "Banana",
    "GaussianMixture",
    "Target",
    "banana",
    "get",
    "names",
    "ring",
    "two_clusters",
]

_LOG_2PI = math.log(2 * math.pi)


class Target:
    """A density on :math:`\\mathbb{R}^d` with exact ``log_prob``, ``sample`` and ``entropy``.

    Subclasses set :attr:`name`, :attr:`dim`, :attr:`bounds` (a box ``((lo1, hi1), (lo2, hi2))``
    holding all but ~1e-5 of the mass, for grid checks), :attr:`view` (the box worth plotting)
    and implement :meth:`_sample`, :meth:`log_prob` and :meth:`entropy`.
    """

    name: str = "target"
    dim: int = 2
    bounds: tuple[tuple[float, float], ...] = ((-1.0, 1.0), (-1.0, 1.0))
    view: tuple[tuple[float, float], ...] = ((-1.0, 1.0), (-1.0, 1.0))

    def sample(
        self,
        n: int,
        generator: torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """``n`` independent samples, shape ``(n, dim)``, drawn on ``device``.

        :param n: number of samples (a positive integer).
        :param generator: random generator; it must live on ``device`` (``None``: torch's global
            generator of that device). Without ``device``, the generator's device is used.
        :param device: where to draw the samples (default: the generator's device, else CPU).
        :param dtype: floating dtype (default: torch's default dtype).
        """
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"{self.name}.sample: n must be a positive integer, got {n!r}")
        if device is None:
            device = generator.device if generator is not None else torch.device("cpu")
        device = torch.device(device)
        if generator is not None and generator.device.type != device.type:
            raise ValueError(
                f"{self.name}.sample: the generator lives on {generator.device}, "
                f"but samples were asked on {device}"
            )
        dtype = dtype or torch.get_default_dtype()
        if not dtype.is_floating_point:
            raise TypeError(f"{self.name}.sample: dtype must be a floating dtype, got {dtype}")
        return self._sample(n, generator, device, dtype)

    def _sample(
        self, n: int, generator: torch.Generator | None, device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        raise NotImplementedError

    def log_prob(self, x: Tensor) -> Tensor:
        """Exact log-density of ``x`` of shape ``(..., dim)``, shape ``(...)``."""
        raise NotImplementedError

    def entropy(self) -> float:
        """Exact differential entropy :math:`H = -\\mathbb{E}_p[\\log p]` in nats."""
        raise NotImplementedError

    def _check(self, x: Tensor) -> Tensor:
        """``x`` checked for shape; integer and boolean points are converted to torch's default
        floating dtype (a mixture computed in an integer dtype would be NaN)."""
        if not isinstance(x, Tensor) or x.is_complex():
            kind = f"a {x.dtype} tensor" if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"{self.name}.log_prob: expected a real tensor, got {kind}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(
                f"{self.name}.log_prob: expected shape (..., {self.dim}), got {tuple(x.shape)}"
            )
        return x if x.is_floating_point() else x.to(torch.get_default_dtype())

    def __repr__(self) -> str:
        return f"<target {self.name!r}: dim={self.dim}, entropy={self.entropy():.4f} nats>"


class Banana(Target):
    r"""The banana of Jang (2018): :math:`x_2 \sim \mathcal{N}(0, s^2)`,
    :math:`x_1 \mid x_2 \sim \mathcal{N}(c\,x_2^2, 1)`.

    .. math:: \log p(x) = \log\mathcal{N}(x_2; 0, s^2) + \log\mathcal{N}(x_1; c\,x_2^2, 1),
              \qquad H = \log(2\pi e) + \log s

    (chain rule: :math:`H(x_2) + H(x_1 \mid x_2)`, and the conditional entropy does not depend
    on :math:`x_2`). With the tutorial's :math:`s = 4, c = 1/4`: :math:`H = 4.2242` nats.

    :param scale: :math:`s`, the standard deviation of :math:`x_2`.
    :param curvature: :math:`c`.
    """

    def __init__(self, scale: float = 4.0, curvature: float = 0.25, name: str = "banana") -> None:
        self.scale, self.curvature, self.name = float(scale), float(curvature), name
        # x1 ranges over c * (k s)^2 for |x2| <= k s; 4.5 std keeps > 99.99% of the mass
        reach = self.curvature * (4.5 * self.scale) ** 2
        self.bounds = ((-4.5, reach + 4.5), (-4.5 * self.scale, 4.5 * self.scale))
        reach = self.curvature * (3 * self.scale) ** 2
        self.view = ((-4.0, reach + 3.0), (-3 * self.scale, 3 * self.scale))

    def _sample(self, n, generator, device, dtype):
        eps = torch.randn(n, 2, generator=generator, device=device, dtype=dtype)
        x2 = self.scale * eps[:, 1]
        x1 = self.curvature * x2.square() + eps[:, 0]
        return torch.stack([x1, x2], dim=-1)

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._check(x)
        x1, x2 = x[..., 0], x[..., 1]
        log_p2 = -0.5 * (x2 / self.scale).square() - math.log(self.scale) - 0.5 * _LOG_2PI
        log_p1 = -0.5 * (x1 - self.curvature * x2.square()).square() - 0.5 * _LOG_2PI
        return log_p1 + log_p2

    def entropy(self) -> float:
        return _LOG_2PI + 1.0 + math.log(self.scale)


class GaussianMixture(Target):
    r"""A mixture of isotropic Gaussians,
    :math:`p(x) = \sum_k w_k\,\mathcal{N}(x; \mu_k, \sigma_k^2 I)`.

    No closed form exists for the entropy of a mixture. It is computed by a deterministic
    quadrature, exact up to ~1e-10 nats for any overlap: :math:`H = \sum_k w_k\,
    \mathbb{E}_{\mathcal{N}_k}[-\log p]`, and each expectation under a Gaussian is a tensor-product
    Gauss–Hermite rule with ``quadrature`` nodes per axis. Around its own mode,
    :math:`-\log p` is a quadratic plus :math:`-\log(w_k + \sum_{j\ne k} w_j \mathcal{N}_j /
    \mathcal{N}_k)`, a smooth function, which is the case Gauss–Hermite integrates to near
    machine precision (for well-separated modes :math:`H \to \sum_k w_k (H_k - \log w_k)`).

    :param means: mode locations, shape ``(K, d)``.
    :param stds: standard deviations, one per mode (or one for all).
    :param weights: mixture weights (normalized here; default equal).
    :param name: the target's name.
    :param quadrature: Gauss–Hermite nodes per axis for the entropy.
    """

    def __init__(
        self,
        means: Sequence[Sequence[float]],
        stds: float | Sequence[float],
        weights: Sequence[float] | None = None,
        name: str = "mixture",
        quadrature: int = 64,
    ) -> None:
        self.name = name
        self.means = torch.as_tensor(means, dtype=torch.float64)
        if self.means.dim() != 2:
            raise ValueError(f"{name}: means must have shape (K, d), got {tuple(self.means.shape)}")
        k, self.dim = self.means.shape
        self.stds = torch.as_tensor(stds, dtype=torch.float64).expand(k).clone()
        w = torch.ones(k, dtype=torch.float64) if weights is None else torch.as_tensor(weights)
        w = w.to(torch.float64)
        if w.shape != (k,) or not (w > 0).all() or not (self.stds > 0).all():
            raise ValueError(f"{name}: need K positive weights and positive stds")
        self.log_weights = (w / w.sum()).log()
        self.quadrature = quadrature
        lo = (self.means - 6 * self.stds[:, None]).min(0).values
        hi = (self.means + 6 * self.stds[:, None]).max(0).values
        self.bounds = tuple((float(a), float(b)) for a, b in zip(lo, hi))
        self.view = self.bounds
        self._entropy: float | None = None

    def _sample(self, n, generator, device, dtype):
        weights = self.log_weights.exp().to(device=device, dtype=dtype)
        k = torch.multinomial(weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, device=device, dtype=dtype)
        means = self.means.to(device=device, dtype=dtype)
        stds = self.stds.to(device=device, dtype=dtype)
        return means[k] + stds[k, None] * eps

    def log_prob(self, x: Tensor) -> Tensor:
        x = self._check(x)
        means = self.means.to(device=x.device, dtype=x.dtype)
        stds = self.stds.to(device=x.device, dtype=x.dtype)
        log_weights = self.log_weights.to(device=x.device, dtype=x.dtype)
        sq = (x[..., None, :] - means).square().sum(-1) / stds.square()
        log_n = -0.5 * sq - self.dim * (stds.log() + 0.5 * _LOG_2PI)
        return torch.logsumexp(log_weights + log_n, dim=-1)

    def entropy(self) -> float:
        if self._entropy is None:
            # probabilists' Gauss-Hermite: sum_i w_i f(u_i) ~ E_{u ~ N(0, 1)} f(u)
            nodes, w = np.polynomial.hermite_e.hermegauss(self.quadrature)
            nodes, w = torch.from_numpy(nodes), torch.from_numpy(w / w.sum())
            grid = torch.stack(torch.meshgrid(*[nodes] * self.dim, indexing="ij"), -1)
            grid = grid.reshape(-1, self.dim)
            weight = w
            for _ in range(self.dim - 1):
                weight = (weight[:, None] * w).flatten()
            h = 0.0
            for mean, std, log_w in zip(self.means, self.stds, self.log_weights):
                h -= log_w.exp() * (weight * self.log_prob(mean + std * grid)).sum()
            self._entropy = float(h)
        return self._entropy


#: The banana of Jang (2018), exact entropy 4.2242 nats.
banana = Banana()

#: Two modes at (+-0.5, 0.5), std 0.05: entropy -2.4605 nats (= log(2 pi e 0.05^2) + log 2).
two_clusters = GaussianMixture([[-0.5, 0.5], [0.5, 0.5]], 0.05, name="two_clusters")

#: Eight modes of std 0.2 on a circle of radius 2: entropy 1.6981 nats (neighbours 7.7 std apart;
#: the separated-modes limit log(2 pi e 0.2^2) + log 8 = 1.6984 is 3e-4 too high).
ring = GaussianMixture(
    [[2 * math.cos(2 * math.pi * k / 8), 2 * math.sin(2 * math.pi * k / 8)] for k in range(8)],
    0.2,
    name="ring",
)

_TARGETS: dict[str, Target] = {t.name: t for t in (banana, two_clusters, ring)}


def names() -> list[str]:
    """Names of the built-in targets."""
    return sorted(_TARGETS)


def get(name: str) -> Target:
    """The built-in target called ``name`` (``"banana"``, ``"ring"``, ``"two_clusters"``)."""
    key = name.strip().lower().replace("-", "_") if isinstance(name, str) else name
    if key not in _TARGETS:
        raise ValueError(f"unknown target {name!r}; valid targets: {', '.join(names())}")
    return _TARGETS[key]
