r"""Pretraining an off-policy actor from demonstrations: :func:`pretrain`, then ``model.learn``.

Behaviour cloning by maximum likelihood on demonstration pairs :math:`(s_i, a_i)`,

.. math:: \min_\theta\ -\frac1B \sum_{i \in \text{batch}} \log \pi_\theta(u_i \mid s_i),
          \qquad u_i = \operatorname{scale}(a_i) \in (-1, 1)^d,

with Adam and a cosine-decayed learning rate, on the actor of a SAC, TQC or CrossQ model: a
flow policy's exact density (:class:`~flowpolicy.sb3.FlowActor`) or SB3's tanh-squashed
Gaussian (scored exactly by :func:`~flowpolicy.flows.squashed_gaussian`). Observations go
through the policy's own preprocessing (``obs_to_tensor``, the features extractor, and the
environment's ``VecNormalize`` statistics if the model has one); actions are scaled to the
policy's :math:`[-1, 1]` space as SB3's ``scale_action`` does.

**Standardized inputs.** Demonstrations often cover a small part of the observation space (on
LakeCrossing the two routes' first positions differ by ~0.1), which an MLP on raw inputs resolves
slowly, and raw inputs far from the origin put a fresh network's outputs far out. When the latent
MLP starts with a linear layer :math:`W' z + b'`, pretraining feeds it standardized features
:math:`z = (x - \mu) / \sigma` (the demonstrations' mean and standard deviation), as if the layer
had been initialized for them, and folds the standardization into it at the end,
:math:`W = W' \operatorname{diag}(\sigma)^{-1}`, :math:`b = b' - W\mu`: no new module, nothing
changes for ``save``/``load`` or ``learn``. This discards the layer's initial function, so it is
for a model that has not been trained (``standardize=False`` otherwise). CrossQ's actor starts
with batch renormalization, which standardizes already (its statistics are trained).

Example:
    >>> model = SAC(FlowPolicy, "LakeCrossing-v0", policy_kwargs=dict(flow_kwargs=...))
    >>> demos = flowpolicy.envs.collect_demonstrations(200, seed=0)
    >>> flowpolicy.pretrain(model, demos.observations, demos.actions)
    >>> model.learn(5_000)  # fine-tunes
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.base_class import BaseAlgorithm
from torch import Tensor, nn
from tqdm.auto import trange

from flowpolicy.distribution import squashed_gaussian
from flowpolicy.sb3 import FlowActor

__all__ = ["pretrain"]

# SB3's clamp of the Gaussian actor's log-std
_LOG_STD_MIN, _LOG_STD_MAX = -20.0, 2.0
# actions at the bounds have no finite log-density under a tanh squash: keep them this far in
_ACTION_EDGE = 1e-6


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"pretrain: {name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _scaled_actions(model: BaseAlgorithm, actions: Any, n: int) -> Tensor:
    """The demonstrations' actions in the policy's ``[-1, 1]`` space, checked against the bounds."""
    space = model.action_space
    actions = np.asarray(actions, dtype=np.float32).reshape(n, -1)
    if actions.shape[1:] != space.shape:
        raise ValueError(
            f"pretrain: actions have shape {actions.shape}, expected ({n}, *{space.shape}) "
            "(one action per observation, in the action space's units)"
        )
    if not np.isfinite(actions).all():
        raise ValueError("pretrain: the actions contain NaN or inf")
    tolerance = 1e-6 * (space.high - space.low)
    outside = (actions < space.low - tolerance) | (actions > space.high + tolerance)
    if outside.any():
        row = int(np.argwhere(outside)[0][0])
        raise ValueError(
            f"pretrain: {int(outside.any(1).sum())} actions lie outside the action space "
            f"[{space.low}, {space.high}] (first: row {row}, {actions[row]}); pass actions in "
            "the environment's units, as env.step takes them, within its bounds"
        )
    scaled = np.clip(model.policy.scale_action(actions), -1 + _ACTION_EDGE, 1 - _ACTION_EDGE)
    return torch.as_tensor(scaled, device=model.device)


def _observations(model: BaseAlgorithm, observations: Any) -> tuple[Any, int]:
    """Observations as the policy's tensors (``VecNormalize`` applied) and their number."""
    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is not None:
        observations = vec_normalize.normalize_obs(observations)
    obs, vectorized = model.policy.obs_to_tensor(observations)
    if not vectorized:
        raise ValueError(
            "pretrain: observations must be a batch, shape (n, *observation_space.shape) (dicts: "
            "each entry batched), got a single observation"
        )
    first = next(iter(obs.values())) if isinstance(obs, dict) else obs
    return obs, len(first)


def _log_prob(actor: nn.Module, features: Tensor, actions: Tensor) -> Tensor:
    """:math:`\\log\\pi(u \\mid s)` from the actor's features: the flow's exact density, or SB3's
    squashed Gaussian (mean and clamped log-std heads) scored exactly."""
    latent = actor.latent_pi(features)
    if isinstance(actor, FlowActor):
        return actor.flow(latent).log_prob(actions)
    log_std = actor.log_std(latent).clamp(_LOG_STD_MIN, _LOG_STD_MAX)
    return squashed_gaussian(actor.mu(latent), log_std.exp()).log_prob(actions)


class _Standardized:
    """Trains the first linear layer of ``actor.latent_pi`` on standardized features, then folds
    the standardization into its weights (see the module docstring)."""

    def __init__(self, actor: nn.Module, features: Tensor, enabled: bool = True) -> None:
        first = actor.latent_pi[0] if enabled and len(actor.latent_pi) else None
        self.layer = first if isinstance(first, nn.Linear) else None
        self.mean = features.mean(0)
        # constant features (std 0) are only centred
        std = features.std(0) if len(features) > 1 else torch.ones_like(self.mean)
        self.std = torch.where(std > 1e-6, std, torch.ones_like(std))

    def __call__(self, features: Tensor) -> Tensor:
        return features if self.layer is None else (features - self.mean) / self.std

    def fold(self) -> None:
        if self.layer is not None:
            with torch.no_grad():  # W = W' / std, b = b' - W mean
                self.layer.weight.div_(self.std)
                self.layer.bias.sub_(self.layer.weight @ self.mean)


def pretrain(
    model: BaseAlgorithm,
    observations: Any,
    actions: Any,
    *,
    steps: int = 20000,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    standardize: bool = True,
    seed: int | None = None,
    progress_bar: bool = True,
) -> np.ndarray:
    r"""Fit the actor of ``model`` to demonstrations by maximum likelihood; ``learn`` fine-tunes.

    Minimizes :math:`-\frac1B\sum_i \log\pi(\operatorname{scale}(a_i) \mid s_i)` over random
    batches with Adam, its learning rate decayed from ``learning_rate`` to 0 on a cosine; only
    the actor's parameters change (the features extractor too when the actor has its own). See
    the module docstring for the preprocessing and ``standardize``.

    :param model: a SAC, TQC or CrossQ model with a flow policy (or SB3's Gaussian actor).
    :param observations: ``n`` observations as the environment returns them (a dict of arrays
        for Dict spaces); a model's ``VecNormalize`` statistics are applied here.
    :param actions: ``n`` actions in the environment's units (``env.step``'s), within bounds.
    :param steps: Adam steps. Where the demonstrations choose between separated actions (two
        routes from one start), the gap between the modes empties slowly: on LakeCrossing
        (4,600 pairs, spline flow), 6,000 steps left 12-20% of sampled episodes in it, 20,000
        steps 0.5-5%.
    :param batch_size: demonstration pairs per step (all of them if fewer).
    :param learning_rate: Adam's initial learning rate.
    :param standardize: train the latent MLP's first linear layer on standardized features
        (re-initializing its function: refused for a model that has trained).
    :param seed: seed of the batch draws (``None``: torch's global generator).
    :param progress_bar: show a tqdm bar with the running negative log-likelihood.
    :return: the loss (mean negative log-likelihood, nats) of each step, shape ``(steps,)``.
    """
    if not isinstance(model, BaseAlgorithm) or not hasattr(model.policy, "actor"):
        raise ValueError(
            f"pretrain: model must be an SB3 algorithm with an actor (SAC, TQC, CrossQ), got "
            f"{type(model).__name__}"
        )
    actor = model.policy.actor
    if getattr(actor, "use_sde", False):
        raise ValueError(
            "pretrain: gSDE actors are not supported; create the model with use_sde=False"
        )
    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    if not (isinstance(learning_rate, (int, float)) and 0 < learning_rate < math.inf):
        raise ValueError(
            f"pretrain: learning_rate must be a positive number, got {learning_rate!r}"
        )
    if standardize and model.num_timesteps > 0:
        raise ValueError(
            f"pretrain: standardize=True takes the first layer's weights as weights on "
            f"standardized inputs, which would discard what this model learned in "
            f"{model.num_timesteps} steps; pass standardize=False"
        )
    obs, n = _observations(model, observations)
    scaled = _scaled_actions(model, actions, n)
    generator = torch.Generator(device="cpu")
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(_check_int("seed", seed, 0))

    model.policy.set_training_mode(True)
    if hasattr(actor, "set_bn_training_mode"):  # CrossQ: batch statistics, trained
        actor.set_bn_training_mode(True)
    with torch.no_grad():
        features = actor.extract_features(obs, actor.features_extractor)
    standardized = _Standardized(actor, features, enabled=standardize)
    optimizer = torch.optim.Adam(actor.parameters(), lr=learning_rate)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    losses = np.empty(steps)
    bar = trange(steps, desc="pretrain", disable=not progress_bar)
    try:
        for step in bar:
            index = torch.randint(n, (min(batch_size, n),), generator=generator).to(model.device)
            batch = {k: v[index] for k, v in obs.items()} if isinstance(obs, dict) else obs[index]
            features = standardized(actor.extract_features(batch, actor.features_extractor))
            loss = -_log_prob(actor, features, scaled[index]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses[step] = loss.item()
            if not math.isfinite(losses[step]):
                raise ValueError(
                    f"pretrain: the loss is {losses[step]} at step {step}; check the "
                    f"demonstrations or lower learning_rate (now {learning_rate})"
                )
            if step % 100 == 99:
                bar.set_postfix(nll=f"{losses[step - 99 : step + 1].mean():.3f}")
    finally:
        standardized.fold()
        model.policy.set_training_mode(False)
        if hasattr(actor, "set_bn_training_mode"):
            actor.set_bn_training_mode(False)
    return losses
