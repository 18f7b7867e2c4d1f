r"""Why is a policy one-sided? Exact action masses and soft-value gaps, for any SAC policy.

Two measurements that explain the behaviour of a stochastic policy over a 2-D action square:

* **Probability mass in a region** of the action square at given states, by integrating the
  policy's exact density on a midpoint grid:

  .. math:: \pi(R \mid s) = \int_R \pi(a \mid s)\,da
            \approx \sum_{ij} \mathbb{1}[a_{ij} \in R]\, e^{\log\pi(a_{ij} \mid s)}\, \Delta a^2

  This works for any policy with an exact log-density over squashed actions: a
  :class:`~flowpolicy.flows.FlowDistribution`, the actor of a ``FlowPolicy``, SB3's own
  (tanh-squashed diagonal Gaussian) SAC actor, or any module that maps observations to a torch
  distribution. :func:`side_mass` splits the square into the two sides of a direction (for
  LakeCrossing: around the lake on the left or on the right of "straight ahead") plus the
  "gap" strip around that direction. Sampling would also estimate these masses; the grid is
  exact up to the discretization, and has no noise, so that small masses (1e-4) can be read.
  Where a density is narrower than a grid cell (the clone of a deterministic expert), the grid
  misses mass; ``method="auto"`` (the default) then falls back to Monte Carlo at that state.

* **Soft-value gaps** :math:`\Delta Q / \alpha = (Q(s, a) - Q(s, b)) / \alpha` between given
  actions, logged by :class:`QGapCallback` to SB3's logger during training. A soft actor that
  is optimal for its critic puts mass :math:`\propto e^{Q/\alpha}` on each action, so the mass
  ratio between two actions is :math:`e^{\Delta Q/\alpha}`: a gap of 5 nats leaves < 1% on the
  losing side, whatever the policy class.

Example:
    >>> model = SAC(FlowPolicy, "LakeCrossing-v0")
    >>> masses = side_mass(model, start_obs)            # {"left": ..., "right": ..., "gap": ...}
    >>> model.learn(10_000, callback=QGapCallback(start_obs, left_action, right_action))
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from torch import Tensor
from torch.distributions import Distribution

from flowpolicy.flows import squashed_gaussian

__all__ = [
    "QGapCallback",
    "action_distribution",
    "action_grid",
    "density_grid",
    "q_values",
    "region_mass",
    "side_mass",
]


def _integer(name: str, value: Any, minimum: int) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _finite(name: str, value: Any, minimum: float = -math.inf) -> float:
    """``value`` as a float if it is a finite number ``>= minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not (math.isfinite(value) and value >= minimum):
        bound = "" if minimum == -math.inf else f" and >= {minimum}"
        raise ValueError(f"{name} must be finite{bound}, got {value!r}")
    return float(value)


def _as_obs_tensor(policy: Any, obs: Any) -> Tensor:
    """Observations as a float tensor of shape ``(S, obs_dim)`` on the policy's device."""
    device = getattr(policy, "device", None)
    if device is None:
        params = list(policy.parameters()) if isinstance(policy, torch.nn.Module) else []
        device = params[0].device if params else torch.device("cpu")
    obs_t = torch.as_tensor(np.asarray(obs, dtype=np.float32), device=device)
    if obs_t.dim() == 1:
        obs_t = obs_t.unsqueeze(0)
    if obs_t.dim() != 2:
        raise ValueError(
            f"obs must have shape (obs_dim,) or (S, obs_dim), got {tuple(obs_t.shape)}"
        )
    if not torch.isfinite(obs_t).all():  # whatever torch's global validation says
        raise ValueError("the observations contain NaN or inf")
    return obs_t


def action_distribution(policy: Any, obs: Any) -> Distribution:
    """The policy's distribution over squashed actions in ``(-1, 1)^d`` at states ``obs``.

    :param policy: one of: an SB3 algorithm (``SAC``), a ``SACPolicy`` (its actor is used), an
        actor with ``action_distribution(obs)`` (the flow actor), SB3's Gaussian SAC ``Actor``
        (its tanh-squashed diagonal Gaussian, rebuilt by
        :func:`~flowpolicy.flows.squashed_gaussian` with an exact, stable log-density), a torch
        ``Distribution`` (returned as is; ``obs`` is ignored), or any callable mapping an
        observation tensor ``(S, obs_dim)`` to a distribution with batch shape ``(S,)``.
    :param obs: observations, shape ``(obs_dim,)`` or ``(S, obs_dim)``.
    :return: a distribution with ``batch_shape == (S,)`` and a ``log_prob`` over actions.
    """
    if isinstance(policy, Distribution):
        return policy
    if isinstance(policy, BaseAlgorithm):
        policy = policy.policy
    if hasattr(policy, "actor") and isinstance(policy.actor, torch.nn.Module):
        policy = policy.actor
    obs_t = _as_obs_tensor(policy, obs)
    if hasattr(policy, "action_distribution"):
        return policy.action_distribution(obs_t)
    if hasattr(policy, "get_action_dist_params"):
        if getattr(policy, "use_sde", False):
            raise ValueError("action_distribution: gSDE actors are not supported")
        mean, log_std, _ = policy.get_action_dist_params(obs_t)
        return squashed_gaussian(mean, log_std.exp())
    if callable(policy):
        dist = policy(obs_t)
        if not isinstance(dist, Distribution):
            raise ValueError(
                f"action_distribution: the callable returned {type(dist).__name__}, "
                "expected a torch Distribution"
            )
        return dist
    raise ValueError(f"action_distribution: unsupported policy type {type(policy).__name__}")


def action_grid(
    resolution: int = 200, low: float = -1.0, high: float = 1.0
) -> tuple[Tensor, float]:
    r"""Midpoints of a ``resolution × resolution`` grid over ``[low, high]^2`` and the cell area.

    :return: ``(points, cell_area)``, ``points`` of shape ``(resolution, resolution, 2)`` with
        ``points[i, j] = (x_j, y_i)`` (rows are y, as ``imshow`` expects with ``origin="lower"``).
        Midpoints never touch the boundary, where a squashed density is singular.
    """
    resolution = _integer("resolution", resolution, 2)
    low, high = _finite("low", low), _finite("high", high)
    if not high > low:
        raise ValueError(f"need high > low, got low={low}, high={high}")
    step = (high - low) / resolution
    centers = low + step * (torch.arange(resolution, dtype=torch.float64) + 0.5)
    ys, xs = torch.meshgrid(centers, centers, indexing="ij")
    return torch.stack([xs, ys], -1), step * step


@torch.no_grad()
def density_grid(
    policy: Any, obs: Any = None, resolution: int = 200, chunk: int = 16384
) -> tuple[Tensor, Tensor, float]:
    r"""Exact log-density :math:`\log\pi(a \mid s)` on the grid of :func:`action_grid`.

    :param policy: see :func:`action_distribution`.
    :param obs: ``S`` observations (ignored when ``policy`` is a distribution).
    :param resolution: grid cells per side of the action square ``[-1, 1]^2``.
    :param chunk: grid points evaluated per call, to bound memory.
    :return: ``(log_prob, points, cell_area)`` with ``log_prob`` of shape ``(S, R, R)`` (float64,
        on the CPU), ``points`` of shape ``(R, R, 2)``.
    """
    dist = action_distribution(policy, obs)
    if dist.event_shape != torch.Size([2]):
        raise ValueError(f"density_grid needs 2-D actions, got event_shape {dist.event_shape}")
    points, cell_area = action_grid(resolution)
    flat = points.reshape(-1, 1, 2)  # (P, 1, 2) broadcasts against batch_shape (S,)
    batch = dist.batch_shape.numel() if len(dist.batch_shape) else 1
    if batch == 0:  # no states: nothing to evaluate
        return torch.zeros(0, resolution, resolution, dtype=torch.float64), points, cell_area
    device = _dist_device(dist)
    out = []
    for part in flat.split(chunk):
        value = part.to(device=device, dtype=torch.float32)
        if len(dist.batch_shape) == 0:
            value = value.squeeze(1)
        out.append(dist.log_prob(value).double().cpu().reshape(len(part), batch))
    log_prob = torch.cat(out).T.reshape(batch, resolution, resolution)
    return log_prob, points, cell_area


def _dist_device(dist: Distribution) -> torch.device:
    """Where the distribution's parameters live (the base's mean for a flow)."""
    for owner in (getattr(dist, "base", None), dist):
        try:
            return owner.mean.device
        except (AttributeError, NotImplementedError):
            continue
    return dist.sample().device


METHODS = ("auto", "grid", "sample")


@torch.no_grad()
def _weighted_points(
    policy: Any, obs: Any, method: str, resolution: int, num_samples: int, tolerance: float
) -> tuple[Tensor, Tensor]:
    r"""Points ``(S or 1, P, 2)`` and probability weights ``(S, P)`` representing the policy.

    ``grid``: midpoints with weights :math:`e^{\log\pi} \Delta a^2` (exact up to discretization;
    their sum is the grid's total mass). ``sample``: ``num_samples`` draws per state with weights
    :math:`1/n` (unbiased, standard error :math:`\sqrt{m(1-m)/n}`). ``auto``: the grid, except at
    states where its total mass is off 1 by more than ``tolerance`` (a density narrower than a
    cell, e.g. a clone of a deterministic expert), which are sampled.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    num_samples = _integer("num_samples", num_samples, 1)
    tolerance = _finite("tolerance", tolerance, 0.0)
    if method in ("grid", "auto"):
        log_prob, points, cell_area = density_grid(policy, obs, resolution)
        weights = (log_prob.exp() * cell_area).flatten(1)  # (S, R*R)
        points = points.reshape(1, -1, 2)
        if method == "grid":
            return points, weights
        bad = ((weights.sum(1) - 1.0).abs() > tolerance).nonzero().flatten()
        if len(bad) == 0:
            return points, weights
        dist = action_distribution(policy, obs)
        samples = dist.sample((num_samples,)).double().cpu().transpose(0, 1)  # (S, n, 2)
        # mixed representation: grid points for good states, samples (weight 1/n) for bad ones
        size = max(points.shape[1], num_samples)
        out_points = torch.zeros(len(weights), size, 2, dtype=torch.float64)
        out_weights = torch.zeros(len(weights), size, dtype=torch.float64)
        out_points[:, : points.shape[1]] = points
        out_weights[:, : points.shape[1]] = weights
        out_points[bad] = 0.0
        out_weights[bad] = 0.0
        out_points[bad, :num_samples] = samples[bad]
        out_weights[bad, :num_samples] = 1.0 / num_samples
        return out_points, out_weights
    dist = action_distribution(policy, obs)
    samples = dist.sample((num_samples,)).double().cpu()
    if samples.dim() == 2:  # a distribution without batch shape
        samples = samples.unsqueeze(1)
    samples = samples.transpose(0, 1)  # (S, n, 2)
    return samples, torch.full(samples.shape[:2], 1.0 / num_samples, dtype=torch.float64)


def region_mass(
    policy: Any,
    obs: Any,
    region: Callable[[Tensor], Tensor],
    resolution: int = 200,
    method: str = "auto",
    num_samples: int = 20000,
    tolerance: float = 0.02,
) -> np.ndarray:
    r"""Probability mass :math:`\pi(R \mid s)` of a region of the action square at each state.

    :param policy: see :func:`action_distribution`.
    :param obs: ``S`` observations.
    :param region: maps points ``(..., 2)`` to booleans ``(...)`` (inside the region); points
        come as ``(1, P, 2)`` (grid) or ``(S, P, 2)`` (samples), so a region may depend on the
        state through a leading dimension of size ``S``.
    :param resolution: grid cells per side.
    :param method: ``"grid"`` (integrate the density on the grid), ``"sample"`` (Monte Carlo)
        or ``"auto"`` (the grid, and sampling where the grid misses more than ``tolerance`` of
        the mass, i.e. where the density is narrower than a cell).
    :param num_samples: samples per state for ``"sample"`` and the ``"auto"`` fallback.
    :param tolerance: largest accepted error of the grid's total mass in ``"auto"``.
    :return: masses, shape ``(S,)``. The mass of the whole square is 1 up to the grid error.
    """
    points, weights = _weighted_points(policy, obs, method, resolution, num_samples, tolerance)
    inside = region(points)
    try:
        inside = inside.expand(weights.shape)
    except RuntimeError as error:
        raise ValueError(
            f"region returned shape {tuple(inside.shape)} for points of shape "
            f"{tuple(points.shape)}; expected {tuple(points.shape[:-1])}"
        ) from error
    return (weights * inside.to(weights.dtype)).sum(-1).numpy()


def side_mass(
    policy: Any,
    obs: Any,
    direction: Any = (0.0, 1.0),
    gap: float = 0.2,
    resolution: int = 200,
    method: str = "auto",
    num_samples: int = 20000,
    tolerance: float = 0.02,
) -> dict[str, np.ndarray]:
    r"""Mass on each side of a direction :math:`d` ("straight ahead"), and in the strip around it.

    With the left normal :math:`n = (-d_y, d_x)` and the lateral coordinate :math:`u = a \cdot n`:

    .. math:: m_\text{left} = \pi(u > 0),\quad m_\text{right} = \pi(u < 0),
              \quad m_\text{gap} = \pi(|u| < w,\ a \cdot d > 0)

    so ``left + right`` is the total mass (≈ 1) and the gap, the strip of half-width ``w``
    ahead, overlaps both. For ``d = (0, 1)`` left means :math:`a_x < 0`.

    :param policy: see :func:`action_distribution`.
    :param obs: ``S`` observations.
    :param direction: :math:`d`, shape ``(2,)`` or ``(S, 2)`` (one per state; normalized here),
        for example the direction of the lake's centre from each state.
    :param gap: half-width :math:`w` of the gap strip, in action units.
    :param resolution: grid cells per side.
    :param method: ``"grid"``, ``"sample"`` or ``"auto"`` (see :func:`region_mass`).
    :param num_samples: samples per state when sampling.
    :param tolerance: largest accepted error of the grid's total mass in ``"auto"``.
    :return: ``{"left", "right", "gap", "total"}``, arrays of shape ``(S,)``.
    """
    d = torch.as_tensor(np.asarray(direction, dtype=np.float64))
    if d.shape[-1] != 2 or d.dim() > 2:
        raise ValueError(f"direction must have shape (2,) or (S, 2), got {tuple(d.shape)}")
    norm = d.norm(dim=-1, keepdim=True)
    if not (torch.isfinite(d).all() and (norm > 0).all()):
        raise ValueError("direction must be finite and non-zero")
    gap = _finite("gap", gap, 0.0)
    points, weights = _weighted_points(policy, obs, method, resolution, num_samples, tolerance)
    d = (d / norm).reshape(-1, 1, 2)  # (1 or S, 1, 2)
    n = torch.stack([-d[..., 1], d[..., 0]], -1)
    lateral = (points * n).sum(-1)  # (1 or S, P)
    ahead = (points * d).sum(-1) > 0
    masses = {
        "left": (weights * (lateral > 0)).sum(-1),
        "right": (weights * (lateral < 0)).sum(-1),
        "gap": (weights * ((lateral.abs() < gap) & ahead)).sum(-1),
        "total": weights.sum(-1),
    }
    return {key: value.numpy() for key, value in masses.items()}


@torch.no_grad()
def q_values(model: BaseAlgorithm, obs: Any, actions: Any) -> np.ndarray:
    r"""SAC's pessimistic value :math:`\min_k Q_k(s, a)` (what its actor maximizes).

    :param model: a SAC-like algorithm with ``policy.critic``.
    :param obs: observations, shape ``(S, obs_dim)``.
    :param actions: actions in the environment's action space, shape ``(S, act_dim)``; rescaled
        to ``[-1, 1]`` as the replay buffer stores them.
    :return: shape ``(S,)``.
    """
    policy = model.policy
    obs_t = _as_obs_tensor(policy, obs)
    act = np.asarray(actions, dtype=np.float32)
    action_dim = int(np.prod(policy.action_space.shape))
    if act.size != len(obs_t) * action_dim or not np.isfinite(act).all():
        raise ValueError(
            f"actions must be finite, one of size {action_dim} per observation ({len(obs_t)}), "
            f"got shape {act.shape}"
        )
    act = act.reshape(len(obs_t), action_dim)
    act_t = torch.as_tensor(policy.scale_action(act), device=obs_t.device)
    q = torch.cat(policy.critic(obs_t, act_t), dim=1)
    return q.min(dim=1).values.cpu().numpy()


def _entropy_coefficient(model: BaseAlgorithm) -> float:
    log_ent_coef = getattr(model, "log_ent_coef", None)
    if log_ent_coef is not None:
        return float(log_ent_coef.detach().exp().item())
    tensor = getattr(model, "ent_coef_tensor", None)
    if tensor is not None:
        return float(tensor.item())
    return float(model.ent_coef)


class QGapCallback(BaseCallback):
    r"""Log :math:`\Delta Q/\alpha = (Q(s, a) - Q(s, b)) / \alpha` at given states to SB3's logger.

    :math:`Q = \min_k Q_k` is the value SAC's actor maximizes and :math:`\alpha` the current
    entropy coefficient. An actor that is optimal for this critic keeps a mass ratio
    :math:`e^{-|\Delta Q|/\alpha}` between the neighbourhoods of ``b`` and ``a``: the number says
    how one-sided even a perfect (multimodal) actor must be.

    Logged keys, per state ``i``: ``{prefix}/dq_over_alpha_{i}``, ``{prefix}/dq_{i}``, and
    ``{prefix}/alpha``. Every record is also kept in :attr:`history` (a list of dicts).

    :param states: observations, shape ``(S, obs_dim)`` (or ``(obs_dim,)``).
    :param actions_a: actions ``a`` in the environment's action space, shape ``(S, act_dim)``.
    :param actions_b: actions ``b``, same shape.
    :param every: evaluate every ``every`` environment steps, and at the end of training (that
        record, of the final model, replaces one made at the same step).
    :param prefix: logger namespace.
    :param verbose: SB3 verbosity.
    """

    def __init__(
        self,
        states: Any,
        actions_a: Any,
        actions_b: Any,
        every: int = 1000,
        prefix: str = "qgap",
        verbose: int = 0,
    ) -> None:
        super().__init__(verbose)
        self.states = np.atleast_2d(np.asarray(states, dtype=np.float32))
        self.actions_a = np.atleast_2d(np.asarray(actions_a, dtype=np.float32))
        self.actions_b = np.atleast_2d(np.asarray(actions_b, dtype=np.float32))
        if not len(self.states) == len(self.actions_a) == len(self.actions_b):
            raise ValueError(
                f"QGapCallback: got {len(self.states)} states, {len(self.actions_a)} actions_a "
                f"and {len(self.actions_b)} actions_b; they must match"
            )
        if every < 1:
            raise ValueError(f"QGapCallback: every must be >= 1, got {every}")
        self.every = every
        self.prefix = prefix
        self.history: list[dict[str, Any]] = []

    def record(self) -> dict[str, Any]:
        """Measure now, write to the logger, append to :attr:`history` and return the record."""
        dq = q_values(self.model, self.states, self.actions_a) - q_values(
            self.model, self.states, self.actions_b
        )
        alpha = _entropy_coefficient(self.model)
        entry = {
            "timesteps": int(self.num_timesteps),
            "alpha": alpha,
            "dq": dq.tolist(),
            "dq_over_alpha": (dq / alpha).tolist(),
        }
        self.logger.record(f"{self.prefix}/alpha", alpha)
        for i, value in enumerate(dq):
            self.logger.record(f"{self.prefix}/dq_{i}", float(value))
            self.logger.record(f"{self.prefix}/dq_over_alpha_{i}", float(value / alpha))
        self.history.append(entry)
        return entry

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            self.record()
        return True

    def _on_training_end(self) -> None:
        # the last _on_step came before the last gradient step: measure the final model
        if self.history and self.history[-1]["timesteps"] == self.num_timesteps:
            self.history.pop()
        self.record()
