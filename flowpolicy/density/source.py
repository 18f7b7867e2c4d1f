r"""What :func:`~flowpolicy.density.fit` trains on, and the checks of its arguments.

A source draws batches of an analytic target or of a data tensor's training rows and holds a
held-out set. With ``standardize`` it works in standardized units,
:math:`u = (x - \mu) / \sigma` per column (:math:`\mu, \sigma` of the training rows, computed in
float64 before any cast to the flow's dtype): the flow is trained on unit-scale values whatever
the data's units, and :math:`\log q(x) = \log q_u(u) - \sum_i \log\sigma_i`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from flowpolicy import targets as _targets
from flowpolicy.density.init import check_data, column_moments
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = ["MIN_HELD", "MIN_TRAIN", "Source", "check_fit_args", "check_positive", "make_source"]

#: rows a data tensor must hold out (a held-out NLL and its standard error) and train on
MIN_HELD, MIN_TRAIN = 2, 2
_DTYPES = (torch.float32, torch.float64)


def check_positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def _is_real(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_range(name: str, value, low: float, high: float, *, open_low=False, open_high=False):
    """``value`` must be a finite real number in the interval (brackets as given)."""
    ok = _is_real(value) and math.isfinite(value)
    ok = ok and (value > low if open_low else value >= low)
    ok = ok and (value < high if open_high else value <= high)
    if not ok:
        interval = f"{'(' if open_low else '['}{low:g}, {high:g}{')' if open_high else ']'}"
        raise ValueError(f"{name} must be a finite number in {interval}, got {value!r}")


def check_fit_args(flow, steps, batch_size, lr, time_limit, ema, **options) -> None:
    """Every argument of :func:`fit` that does not depend on the data (ValueError or TypeError
    naming the argument), before anything is touched."""
    if not isinstance(flow, Flow):
        raise ValueError(f"fit: expected a flowpolicy.Flow, got {type(flow).__name__}")
    if flow.theta.dtype not in _DTYPES:
        raise TypeError(
            f"fit: the flow is in {flow.theta.dtype}; fit trains in float32 or float64 "
            "(call flow.float() first: half precision cannot resolve a log-likelihood's gradient)"
        )
    check_positive("steps", steps)
    check_positive("batch_size", batch_size)
    check_range("lr", lr, 0, math.inf, open_low=True, open_high=True)
    if time_limit is not None:
        check_range("time_limit", time_limit, 0, math.inf, open_low=True, open_high=True)
    if ema is not None:
        check_range("ema", ema, 0, 1, open_high=True)
    check_range("final_lr", options["final_lr"], 0, 1)
    check_range("warmup", options["warmup"], 0, 1)
    check_range("holdout", options["holdout"], 0, 1, open_high=True)
    check_range("kink_bandwidth", options["kink_bandwidth"], 0, math.inf, open_high=True)
    if options["eval_every"] is not None:
        check_positive("eval_every", options["eval_every"])
    check_positive("eval_samples", options["eval_samples"])
    if options["eval_samples"] < 2:
        raise ValueError(f"eval_samples must be at least 2, got {options['eval_samples']}")
    seed = options["seed"]
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an integer or None, got {seed!r}")


@dataclass
class Source:
    """Where the batches come from: ``draw(n)`` (in working units), the held-out set (working
    units) and its exact ``log p`` (``None`` for data), rows to standardize the flow to
    (working units), the target's entropy, and the working units: ``mean`` and ``std`` of the
    data (float64), or ``None`` when the flow is trained in the data's own units."""

    draw: Callable[[int], Tensor]
    held: Tensor
    held_log_p: Tensor | None
    moments: Tensor
    entropy: float | None
    mean: Tensor | None = None
    std: Tensor | None = None

    @property
    def log_scale(self) -> float:
        r""":math:`\sum_i \log\sigma_i`: ``log q(x) = log q_u(u) - log_scale``."""
        return 0.0 if self.std is None else float(self.std.log().sum())


def _split(n: int, holdout: float) -> int:
    """Rows held out of ``n`` (``int(holdout * n)``, robust to rounding)."""
    return int(holdout * n + 1e-9)


def min_rows(holdout: float) -> int:
    """The fewest rows of data that :func:`fit` accepts with this ``holdout``."""
    n = max(MIN_HELD + MIN_TRAIN, math.ceil(MIN_HELD / holdout - 1e-6))
    while _split(n, holdout) < MIN_HELD or n - _split(n, holdout) < MIN_TRAIN:
        n += 1
    return n


def _data_source(
    data: Tensor,
    dim: int,
    generator: torch.Generator,
    holdout: float,
    dtype: torch.dtype,
    standardize: bool,
) -> Source:
    """Random batches of the training rows of ``data``; a fraction ``holdout`` is held out."""
    device = generator.device
    if not holdout > 0:
        raise ValueError("fit: holdout must be in (0, 1) for a data tensor")
    data = check_data("fit", data, dim, min_rows=1).to(device)
    need = min_rows(holdout)
    if len(data) < need:
        raise ValueError(
            f"fit: {len(data)} rows of data are too few with holdout={holdout}: it needs at least "
            f"{need} ({MIN_HELD} held out to score, {MIN_TRAIN} to train on); "
            "pass more rows or a larger holdout"
        )
    order = torch.randperm(len(data), generator=generator, device=device)
    n_held = _split(len(data), holdout)
    held, train = data[order[:n_held]], data[order[n_held:]]
    mean, std = column_moments("fit", train)  # constant columns raise in any units
    if standardize:
        held, train = (held - mean) / std, (train - mean) / std
    else:
        mean = std = None
    held, train = held.to(dtype), train.to(dtype)

    def draw(n: int) -> Tensor:
        return train[torch.randint(len(train), (n,), generator=generator, device=device)]

    return Source(draw, held, None, train, None, mean, std)


def _target_source(
    target: Target | str,
    dim: int,
    generator: torch.Generator,
    eval_generator: torch.Generator,
    eval_samples: int,
    dtype: torch.dtype,
    standardize: bool,
) -> Source:
    """Fresh samples of an analytic target each step, and a held-out set of its own."""
    target = _targets.get(target) if isinstance(target, str) else target
    if not isinstance(target, Target) or target.dim != dim:
        raise ValueError(f"expected a {dim}-D Target, a target name or a data tensor")
    device = generator.device
    held = target.sample(eval_samples, generator=eval_generator, device=device, dtype=dtype)
    held_log_p = target.log_prob(held)
    moments = target.sample(eval_samples, generator=generator, device=device, dtype=dtype)
    mean = std = None
    if standardize:
        mean, std = column_moments("fit", moments.double())
        shift, scale = mean.to(dtype), std.to(dtype)
        held, moments = (held - shift) / scale, (moments - shift) / scale

    def draw(n: int) -> Tensor:
        x = target.sample(n, generator=generator, device=device, dtype=dtype)
        return x if mean is None else (x - shift) / scale

    return Source(draw, held, held_log_p, moments, target.entropy(), mean, std)


def make_source(
    target_or_data: Target | str | Tensor,
    flow: Flow,
    seed: int,
    eval_samples: int,
    holdout: float,
    standardize: bool,
) -> Source:
    """The batches of a data tensor or of a target, on the flow's device and in its dtype."""
    device, dtype, dim = flow.theta.device, flow.theta.dtype, flow.config["dim"]
    generator = torch.Generator(device).manual_seed(seed)
    if isinstance(target_or_data, (Tensor, np.ndarray)):
        return _data_source(target_or_data, dim, generator, holdout, dtype, standardize)
    eval_generator = torch.Generator(device).manual_seed(seed + 1_000_003)
    return _target_source(
        target_or_data, dim, generator, eval_generator, eval_samples, dtype, standardize
    )
