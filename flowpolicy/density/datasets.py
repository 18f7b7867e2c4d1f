r"""The 2-D toy datasets of the flow literature, as defined in FFJORD's ``toy_data.py``
(Grathwohl et al., 2019), which zuko's and nflows' examples follow: samples only (no density).

* ``two_moons``: scikit-learn's ``make_moons(noise=0.1)`` (two interleaved half circles of
  radius 1, Gaussian noise of std 0.1), scaled by 2 and shifted by :math:`(-1, -0.2)`;
* ``eight_gaussians``: eight Gaussians of std 0.5 at radius 4 on the unit circle's eighths,
  the whole divided by 1.414 (each mode's std 0.354, entropy
  :math:`\log 8 + \log(2\pi e\,0.125) \approx 2.837` nats);
* ``checkerboard``: uniform on the 8 black unit squares of a 4 x 4 board on
  :math:`[-2, 2]^2`, scaled by 2 (entropy :math:`\log 32 \approx 3.466` nats).

Example:
    >>> x = datasets.sample("two_moons", 200_000, torch.Generator().manual_seed(0))
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["DATASETS", "checkerboard", "eight_gaussians", "sample", "two_moons"]


def two_moons(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``make_moons(n, noise=0.1) * 2 + (-1, -0.2)``: an upper half circle at the origin and a
    lower one shifted by ``(1, 0.5)``, half of the points each."""
    upper = torch.rand(n, generator=generator) < 0.5
    t = math.pi * torch.rand(n, generator=generator, dtype=torch.float64)
    outer = torch.stack([t.cos(), t.sin()], -1)
    inner = torch.stack([1 - t.cos(), 0.5 - t.sin()], -1)
    x = torch.where(upper[:, None], outer, inner)
    x = x + 0.1 * torch.randn(n, 2, generator=generator, dtype=torch.float64)
    return x * 2 + torch.tensor([-1.0, -0.2], dtype=torch.float64)


def eight_gaussians(n: int, generator: torch.Generator | None = None) -> Tensor:
    """``(4 c_k + 0.5 z) / 1.414`` with ``c_k = (cos k pi/4, sin k pi/4)``, ``k`` uniform in
    0..7, ``z`` standard normal."""
    k = torch.randint(0, 8, (n,), generator=generator).double()
    centers = 4 * torch.stack([(k * math.pi / 4).cos(), (k * math.pi / 4).sin()], -1)
    return (centers + 0.5 * torch.randn(n, 2, generator=generator, dtype=torch.float64)) / 1.414


def checkerboard(n: int, generator: torch.Generator | None = None) -> Tensor:
    """FFJORD's checkerboard: ``x1 ~ U(-2, 2)``, ``x2 ~ U(0, 1) - 2 b + (floor(x1) mod 2)`` with
    ``b`` a fair bit, both times 2."""
    x1 = 4 * torch.rand(n, generator=generator, dtype=torch.float64) - 2
    bit = torch.randint(0, 2, (n,), generator=generator).double()
    x2 = torch.rand(n, generator=generator, dtype=torch.float64) - 2 * bit + x1.floor() % 2
    return torch.stack([x1, x2], -1) * 2


#: name -> sampler ``(n, generator) -> (n, 2)`` float64
DATASETS: dict[str, Callable[[int, torch.Generator | None], Tensor]] = {
    "two_moons": two_moons,
    "eight_gaussians": eight_gaussians,
    "checkerboard": checkerboard,
}


def sample(name: str, n: int, generator: torch.Generator | None = None) -> Tensor:
    """``n`` samples (float64, ``(n, 2)``) of the dataset ``name`` (one of :data:`DATASETS`)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}")
    return DATASETS[name](n, generator)
