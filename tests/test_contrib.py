"""Tests of the flow policies for SAC, sb3-contrib's TQC and CrossQ, and Dict observations.

The same :class:`~flowpolicy.sb3.FlowActor` serves every algorithm: each one learns a contextual
bandit, saves and loads bit-identically, predicts for several environments, and refuses what a
flow cannot take (gSDE, unbounded or discrete actions, dicts without a dict extractor).
"""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from sb3_contrib import TQC, CrossQ
from sb3_contrib.common.torch_layers import BatchRenorm1d
from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.torch_layers import FlattenExtractor

from flowpolicy.contrib import (
    CrossQFlowActor,
    FlowCrossQPolicy,
    FlowTQCPolicy,
    MultiInputFlowTQCPolicy,
)
from flowpolicy.sb3 import FlowActor, FlowPolicy, MultiInputFlowPolicy

torch.set_num_threads(1)

ALGORITHMS = [(SAC, FlowPolicy), (TQC, FlowTQCPolicy), (CrossQ, FlowCrossQPolicy)]
DICT_ALGORITHMS = [(SAC, MultiInputFlowPolicy), (TQC, MultiInputFlowTQCPolicy)]
IDS = ["sac", "tqc", "crossq"]
SMALL = dict(net_arch=[32, 32], flow_kwargs=dict(layers=2, nonlinearity="spline"))


class Bandit(gym.Env):
    """One-step task: observe ``s`` uniform in [-1, 1], reward ``-(a - 0.6 s)^2``."""

    observation_space = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)
    action_space = spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.state = self.np_random.uniform(-1, 1, (1,)).astype(np.float32)
        return self.state, {}

    def step(self, action):
        reward = -float((action[0] - 0.6 * self.state[0]) ** 2)
        return self.state, reward, True, False, {}


class DictBandit(Bandit):
    """:class:`Bandit` with the observation in a dict, as goal-conditioned tasks give them."""

    observation_space = spaces.Dict({"s": Bandit.observation_space, "bias": spaces.Box(0, 1, (1,))})

    def reset(self, *, seed=None, options=None):
        obs, info = super().reset(seed=seed)
        return {"s": obs, "bias": np.ones(1, np.float32)}, info

    def step(self, action):
        _, reward, *rest = super().step(action)
        return {"s": self.state, "bias": np.ones(1, np.float32)}, reward, *rest


def make_model(algo, policy, env=Bandit, n_envs=2, **kwargs):
    vec_env = make_vec_env(env, n_envs=n_envs, seed=0)
    options = dict(learning_starts=100, batch_size=64, learning_rate=1e-2, seed=0, gamma=0.0)
    options.update(ent_coef=0.01, policy_kwargs={**SMALL, **kwargs.pop("policy_kwargs", {})})
    return algo(policy, vec_env, **{**options, **kwargs})


def bandit_error(model) -> float:
    """Mean squared distance of the deterministic action from the best one, 0.6 s."""
    states = np.linspace(-0.9, 0.9, 19, dtype=np.float32)[:, None]
    actions, _ = model.predict(states, deterministic=True)
    return float(np.mean((actions - 0.6 * states) ** 2))


@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
def test_each_algorithm_learns_a_bandit_with_several_envs(algo, policy):
    model = make_model(algo, policy)
    assert type(model.actor) is (CrossQFlowActor if algo is CrossQ else FlowActor)
    before = bandit_error(model)
    model.learn(400)
    after = bandit_error(model)
    # measured 0.001-0.03 after 400 steps; the initial policy (a broken gradient) is at 0.75
    assert after < 0.06 < 0.3 < before, (before, after)
    obs = model.env.reset()
    for deterministic in (True, False):
        actions, _ = model.predict(obs, deterministic=deterministic)
        assert actions.shape == (2, 1) and np.all(np.abs(actions) <= 1)


@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
def test_save_load_gives_identical_actions_and_log_probs(algo, policy, tmp_path):
    model = make_model(algo, policy, policy_kwargs=dict(flow_kwargs=dict(rank=1, layers=3)))
    model.learn(150)
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip")
    assert loaded.actor.flow_kwargs == model.actor.flow_kwargs
    assert loaded.policy.optimizer_kwargs == model.policy.optimizer_kwargs
    obs = np.linspace(-1, 1, 7, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    for m in (model, loaded):
        m.policy.set_training_mode(False)
    obs_t = torch.as_tensor(obs)
    with torch.no_grad():
        torch.manual_seed(1)
        actions, log_prob = model.actor.action_log_prob(obs_t)
        torch.manual_seed(1)
        actions_l, log_prob_l = loaded.actor.action_log_prob(obs_t)
    assert torch.equal(actions, actions_l) and torch.equal(log_prob, log_prob_l)
    for key, value in model.policy.state_dict().items():
        assert torch.equal(value, loaded.policy.state_dict()[key]), key


def test_crossq_actor_has_batch_renorm_toggled_by_train():
    model = make_model(CrossQ, FlowCrossQPolicy)
    actor = model.actor
    renorms = [m for m in actor.latent_pi if isinstance(m, BatchRenorm1d)]
    assert len(renorms) == 3  # before each linear layer and after the last hidden one
    actor.set_bn_training_mode(True)
    assert all(m.training for m in renorms)
    actor.set_bn_training_mode(False)
    assert not any(m.training for m in renorms)
    start = renorms[0].ra_mean.clone()
    model.learn(200)
    # the actor loss ran with batch statistics on: the running statistics moved
    assert not torch.equal(start, renorms[0].ra_mean)
    assert not any(m.training for m in renorms)  # and predict uses the running ones
    obs = torch.zeros(3, 1)
    with torch.no_grad():
        first = actor(obs, deterministic=True)
        # a state's action does not depend on the batch (batch statistics would make a batch
        # of one normalize to zero); float32 kernels for other batch sizes may differ in the
        # last bits, so not bit-equal
        torch.testing.assert_close(first[:1], actor(obs[:1], deterministic=True))
    assert dict(model.policy.actor.batch_norm_params)["renorm_warmup_steps"] == 100_000


def test_crossq_without_batch_norm_builds_sb3s_plain_mlp():
    model = make_model(CrossQ, FlowCrossQPolicy, policy_kwargs=dict(batch_norm=False))
    assert not any(isinstance(m, BatchRenorm1d) for m in model.actor.modules())


@pytest.mark.parametrize("algo, policy", DICT_ALGORITHMS, ids=IDS[:2])
def test_dict_observations(algo, policy, tmp_path):
    model = make_model(algo, policy, env=DictBandit, learning_starts=50)
    model.learn(100)
    obs = model.env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (2, 1)
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip")
    np.testing.assert_array_equal(actions, loaded.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
def test_each_algorithm_refuses_gsde(algo, policy):
    with pytest.raises(ValueError, match=f"{policy.__name__} does not support use_sde=True"):
        algo(policy, Bandit(), use_sde=True)


@pytest.mark.parametrize("algo, policy", ALGORITHMS[:2], ids=IDS[:2])
def test_each_algorithm_refuses_a_dict_without_a_dict_extractor(algo, policy):
    with pytest.raises(ValueError, match="CombinedExtractor.*MultiInputFlow"):
        algo(policy, DictBandit())


def test_crossq_refuses_dict_observations():
    """CrossQ concatenates observation batches, which dicts are not (sb3-contrib has no
    MultiInputPolicy for it)."""
    with pytest.raises(ValueError, match="FlattenObservation"):
        CrossQ(FlowCrossQPolicy, DictBandit())


@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
@pytest.mark.parametrize(
    "action_space, problem",
    [
        (spaces.Discrete(3), "continuous .*PPO, DQN"),
        (
            spaces.Box(-np.inf, np.inf, (2,), dtype=np.float32),
            "non-empty action space with finite bounds.*ClipAction",
        ),
    ],
    ids=["discrete", "unbounded"],
)
def test_each_policy_refuses_action_spaces_a_flow_cannot_take(algo, policy, action_space, problem):
    """The policies raise a ValueError naming problem and fix; the algorithms check the action
    space before they build a policy (SB3's own AssertionError, naming the space)."""
    with pytest.raises(ValueError, match=f"{policy.__name__} needs a {problem}"):
        policy(Bandit.observation_space, action_space, lambda _: 1e-3)
    env = Bandit()
    env.action_space = action_space
    with pytest.raises(AssertionError, match="action space"):
        algo(policy, env)


@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
def test_gaussian_actor_settings_are_not_stored(algo, policy):
    model = make_model(algo, policy)
    data = model.policy._get_constructor_parameters()
    assert not {"use_sde", "log_std_init", "use_expln", "clip_mean"} & set(data)
    assert data["features_extractor_class"] is FlattenExtractor


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("algo, policy", ALGORITHMS, ids=IDS)
def test_cuda_and_device_moves(algo, policy, tmp_path):
    model = make_model(algo, policy, device="cuda")
    model.learn(150)
    assert model.actor.mode_noise.is_cuda
    obs = model.env.reset()
    action, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = algo.load(tmp_path / "model.zip", device="cpu")
    assert not loaded.actor.mode_noise.is_cuda
    np.testing.assert_allclose(action, loaded.predict(obs, deterministic=True)[0], atol=1e-5)
