"""Tests of :func:`flowpolicy.pretraining.pretrain`: maximum likelihood on demonstrations for the
actor of SAC, TQC and CrossQ models, through the policy's preprocessing and action scaling."""

from __future__ import annotations

import copy

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import TQC, CrossQ
from stable_baselines3 import SAC

from flowpolicy.contrib import FlowCrossQPolicy, FlowTQCPolicy
from flowpolicy.pretraining import _Standardized, pretrain
from flowpolicy.sb3 import FlowPolicy

torch.set_num_threads(1)

SMALL = dict(net_arch=[32, 32], flow_kwargs=dict(layers=2, nonlinearity="spline"))


class Offset(gym.Env):
    """Observations far from the origin in a narrow range (as raw positions often are); actions
    in ``[-2, 2]``, SB3 scales them to ``[-1, 1]``."""

    observation_space = spaces.Box(90.0, 110.0, (1,), dtype=np.float32)
    action_space = spaces.Box(-2.0, 2.0, (1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.array([100.0], np.float32), {}

    def step(self, action):
        return np.array([100.0], np.float32), 0.0, True, False, {}


def two_mode_demonstrations(n: int = 512, seed: int = 0):
    """States ``100 + 0.1 u``; the action is ``+1.2`` or ``-1.2`` (env units) at random,
    whatever the state: a bimodal expert."""
    rng = np.random.default_rng(seed)
    obs = 100 + 0.1 * rng.uniform(-1, 1, (n, 1)).astype(np.float32)
    actions = rng.choice([-1.2, 1.2], (n, 1)).astype(np.float32)
    return obs, actions + 0.05 * rng.standard_normal((n, 1)).astype(np.float32)


def sampled_actions(model, n: int = 400) -> np.ndarray:
    obs = np.full((n, 1), 100.0, np.float32)
    return model.predict(obs, deterministic=False)[0][:, 0]


@pytest.mark.parametrize(
    "algo, policy",
    [(SAC, FlowPolicy), (TQC, FlowTQCPolicy), (CrossQ, FlowCrossQPolicy)],
    ids=["sac", "tqc", "crossq"],
)
def test_flow_actor_learns_both_modes_in_env_units(algo, policy):
    model = algo(policy, Offset(), policy_kwargs=SMALL, seed=0)
    critic = copy.deepcopy(model.critic.state_dict())
    obs, actions = two_mode_demonstrations()
    losses = pretrain(model, obs, actions, steps=300, seed=0, progress_bar=False)
    assert losses.shape == (300,) and losses[-50:].mean() < losses[:50].mean() - 1.0
    samples = sampled_actions(model)
    # both modes, each near its share; the gap between them (a Gaussian's mean) nearly empty
    assert 0.3 < np.mean(samples > 0.6) < 0.7 and 0.3 < np.mean(samples < -0.6) < 0.7
    assert np.mean(np.abs(samples) < 0.6) < 0.1
    assert all(torch.equal(v, model.critic.state_dict()[k]) for k, v in critic.items())
    assert not model.policy.training
    if algo is CrossQ:  # the batch-renorm statistics were fitted (momentum 0.01, from 0)
        renorm = model.actor.latent_pi[0]
        assert renorm.ra_mean.item() > 90 and not renorm.training


def test_gaussian_sac_is_pretrained_too_and_fills_the_gap():
    model = SAC("MlpPolicy", Offset(), policy_kwargs=dict(net_arch=[32, 32]), seed=0)
    obs, actions = two_mode_demonstrations()
    losses = pretrain(model, obs, actions, steps=300, seed=0, progress_bar=False)
    assert losses[-50:].mean() < losses[:50].mean()
    # one bump over both modes: much of its mass lies between them
    assert np.mean(np.abs(sampled_actions(model)) < 0.6) > 0.2


def test_standardization_is_folded_into_the_first_layer_exactly():
    model = SAC(FlowPolicy, Offset(), policy_kwargs=SMALL, seed=0)
    actor = model.actor
    x = torch.as_tensor(two_mode_demonstrations(64)[0])
    with torch.no_grad():
        standardized = _Standardized(actor, x)
        assert standardized(x).std(0).sub(1).abs().max() < 1e-4
        assert standardized(x).mean(0).abs().max() < 1e-4
        trained = actor.latent_pi(standardized(x))
        standardized.fold()
        assert torch.allclose(actor.latent_pi(x), trained, atol=1e-4)


def test_standardization_is_refused_after_training():
    model = SAC(FlowPolicy, Offset(), policy_kwargs=SMALL, seed=0, learning_starts=5)
    model.learn(10)
    obs, actions = two_mode_demonstrations(16)
    with pytest.raises(ValueError, match="standardize=False"):
        pretrain(model, obs, actions, steps=1, progress_bar=False)
    pretrain(model, obs, actions, steps=1, standardize=False, progress_bar=False)


def test_standardization_helps_on_offset_observations():
    """The states differ by 0.2 around 100: raw inputs barely move the first layer."""
    obs, actions = two_mode_demonstrations()
    actions = np.where(obs > 100, 1.2, -1.2).astype(np.float32)  # now the state decides
    errors = {}
    for standardize in (True, False):
        model = SAC(FlowPolicy, Offset(), policy_kwargs=SMALL, seed=0)
        pretrain(
            model, obs, actions, steps=300, seed=0, standardize=standardize, progress_bar=False
        )
        predicted = model.predict(obs, deterministic=True)[0]
        errors[standardize] = np.mean(np.sign(predicted) != np.sign(actions))
    assert errors[True] < 0.05 < errors[False]


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda o, a: (o, a * 2), "outside the action space"),
        (lambda o, a: (o, a[:-1]), "shape"),
        (lambda o, a: (o[0], a[:1]), "a batch"),
        (lambda o, a: (o, np.where(a > 0, np.nan, a)), "NaN"),
    ],
    ids=["out-of-bounds", "count", "single-observation", "nan"],
)
def test_bad_demonstrations_are_refused(change, message):
    model = SAC(FlowPolicy, Offset(), policy_kwargs=SMALL, seed=0)
    with pytest.raises(ValueError, match=message):
        pretrain(model, *change(*two_mode_demonstrations(16)), steps=1, progress_bar=False)


def test_bad_settings_are_refused():
    model = SAC(FlowPolicy, Offset(), policy_kwargs=SMALL, seed=0)
    obs, actions = two_mode_demonstrations(16)
    for kwargs in (dict(steps=0), dict(batch_size=1.5), dict(learning_rate=-1.0)):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            pretrain(model, obs, actions, progress_bar=False, **kwargs)
    gsde = SAC("MlpPolicy", "Pendulum-v1", use_sde=True)
    with pytest.raises(ValueError, match="use_sde=False"):
        pretrain(gsde, np.zeros((4, 3), np.float32), np.zeros((4, 1), np.float32))
