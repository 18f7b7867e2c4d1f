"""Tests of flowpolicy.symmetry: the reflection, the mirror replay buffer and the symmetric critic.

The real example is Pendulum-v1, whose dynamics and rewards are unchanged by
(θ, θdot, u) -> (-θ, -θdot, -u): observations (cos θ, sin θ, θdot) -> (cos θ, -sin θ, -θdot).
"""

from __future__ import annotations

import pickle

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.policies import ContinuousCritic

from flowpolicy.sb3 import FlowPolicy
from flowpolicy.symmetry import (
    MirrorReplayBuffer,
    Reflection,
    SymmetricCritic,
    SymmetricSACPolicy,
)

torch.set_num_threads(1)

PENDULUM = Reflection(obs_sign=[1, -1, -1], action_sign=[-1])
LAKE = Reflection(obs_sign=[-1, 1], action_sign=[-1, 1])  # about the lake's axis x = 0
# a reflection with every part: swap obs 0 and 1, flip obs 2 about 1.5, swap the actions
SWAP = Reflection(
    obs_sign=[1, 1, -1], action_sign=[-1, -1], obs_shift=[0, 0, 3.0], obs_perm=[1, 0, 2],
    action_perm=[1, 0],
)  # fmt: skip
POLICIES = [SymmetricSACPolicy, FlowPolicy]


def constant_lr(_: float) -> float:
    return 1e-3


# --- Reflection ----------------------------------------------------------------------------


@pytest.mark.parametrize("reflection", [PENDULUM, LAKE, SWAP])
def test_reflection_is_an_involution_on_arrays_and_tensors(reflection):
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(4, 5, reflection.obs_dim)).astype(np.float32)
    act = rng.uniform(-1, 1, size=(7, reflection.action_dim)).astype(np.float32)
    for x, mirror in ((obs, reflection.obs), (act, reflection.action)):
        y = mirror(x)
        assert isinstance(y, np.ndarray) and y.dtype == np.float32 and y.shape == x.shape
        np.testing.assert_allclose(mirror(y), x, atol=1e-6)
        t = mirror(torch.as_tensor(x, dtype=torch.float64))
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float64
        np.testing.assert_allclose(t.numpy(), y, atol=1e-6)
        torch.testing.assert_close(mirror(t), torch.as_tensor(x, dtype=torch.float64))
    if reflection.obs_shift is None:  # sign flips and permutations are exact
        assert np.array_equal(reflection.obs(reflection.obs(obs)), obs)


def test_reflection_maps_entries_as_documented():
    obs = np.array([1.0, 2.0, 0.5])
    np.testing.assert_array_equal(SWAP.obs(obs), [2.0, 1.0, 2.5])
    np.testing.assert_array_equal(SWAP.action(np.array([0.25, -0.5])), [0.5, -0.25])
    np.testing.assert_array_equal(PENDULUM.obs(np.array([0.6, 0.8, -2.0])), [0.6, -0.8, 2.0])
    x = torch.tensor([[1.0, 2.0, 0.5]], requires_grad=True)
    SWAP.obs(x).sum().backward()  # differentiable, as the critic needs
    torch.testing.assert_close(x.grad, torch.tensor([[1.0, 1.0, -1.0]]))


def test_pendulum_reflection_is_a_symmetry_of_its_dynamics():
    env, mirror_env = gym.make("Pendulum-v1"), gym.make("Pendulum-v1")
    env.reset(seed=0)
    mirror_env.reset(seed=0)
    rng = np.random.default_rng(1)
    for _ in range(20):
        theta, theta_dot, torque = (
            rng.uniform(-np.pi, np.pi),
            rng.uniform(-8, 8),
            rng.uniform(-2, 2),
        )
        env.unwrapped.state = np.array([theta, theta_dot])
        mirror_env.unwrapped.state = np.array([-theta, -theta_dot])
        obs, reward, *_ = env.step(np.array([torque], dtype=np.float32))
        mirror_obs, mirror_reward, *_ = mirror_env.step(
            PENDULUM.action(np.array([torque], dtype=np.float32))
        )
        np.testing.assert_allclose(mirror_obs, PENDULUM.obs(obs), atol=1e-6)
        assert mirror_reward == pytest.approx(reward)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(obs_sign=[1, 2], action_sign=[1]), "obs_sign"),
        (dict(obs_sign=[], action_sign=[1]), "obs_sign"),
        (dict(obs_sign=[1, 1], action_sign=[0.5]), "action_sign"),
        (dict(obs_sign=[1, 1, 1], action_sign=[1], obs_perm=[1, 2, 0]), "applied twice"),
        (dict(obs_sign=[1, 1], action_sign=[1], obs_perm=[0, 0]), "permutation"),
        (dict(obs_sign=[1, -1], action_sign=[1], obs_perm=[1, 0]), "obs_sign must be equal"),
        (dict(obs_sign=[1, 1], action_sign=[-1, 1], action_perm=[1, 0]), "action_sign"),
        (dict(obs_sign=[1, -1], action_sign=[1], obs_shift=[1.0, 0.0]), "not a reflection"),
        (dict(obs_sign=[1, -1], action_sign=[1], obs_shift=[0.0]), "obs_shift"),
    ],
)
def test_reflection_refuses_maps_that_are_not_involutions(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Reflection(**kwargs)


def test_reflection_pickles_compares_and_prints():
    _ = SWAP.obs(torch.zeros(3))  # fills the tensor cache, which is not pickled
    again = pickle.loads(pickle.dumps(SWAP))
    assert again == SWAP and hash(again) == hash(SWAP) and again != PENDULUM
    np.testing.assert_array_equal(again.obs(np.ones(3)), SWAP.obs(np.ones(3)))
    assert repr(PENDULUM) == "Reflection(obs_sign=[1.0, -1.0, -1.0], action_sign=[-1.0])"
    assert Reflection([1, -1], [1], obs_shift=[0.0, 0.0]) == Reflection([1, -1], [1])
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 3\)"):
        PENDULUM.obs(np.zeros((2, 4)))


def test_reflection_checks_the_spaces():
    pendulum = gym.make("Pendulum-v1")
    PENDULUM.check_spaces(pendulum.observation_space, pendulum.action_space)
    with pytest.raises(ValueError, match="observation space"):
        PENDULUM.check_spaces(spaces.Box(-1, 1, (2,)), pendulum.action_space)
    with pytest.raises(ValueError, match="onto itself"):
        PENDULUM.check_spaces(pendulum.observation_space, spaces.Box(0.0, 1.0, (1,)))


# --- MirrorReplayBuffer --------------------------------------------------------------------


@pytest.mark.parametrize("n_envs", [1, 3])
def test_buffer_stores_each_transition_and_its_mirror(n_envs):
    env = gym.make("Pendulum-v1")
    buffer = MirrorReplayBuffer(
        10 * n_envs,
        env.observation_space,
        env.action_space,
        "cpu",
        n_envs=n_envs,
        symmetry=PENDULUM,
    )
    rng = np.random.default_rng(0)
    steps = []
    for t in range(3):
        step = dict(
            obs=rng.normal(size=(n_envs, 3)).astype(np.float32),
            next_obs=rng.normal(size=(n_envs, 3)).astype(np.float32),
            action=rng.uniform(-1, 1, size=(n_envs, 1)).astype(np.float32),
            reward=rng.normal(size=n_envs).astype(np.float32),
            done=np.arange(n_envs) == t,
            infos=[{"TimeLimit.truncated": i == 0} for i in range(n_envs)],
        )
        buffer.add(**step)
        steps.append(step)
    assert buffer.size() == 6 and buffer.pos == 6
    for t, step in enumerate(steps):
        real, mirror = 2 * t, 2 * t + 1
        np.testing.assert_array_equal(buffer.observations[real], step["obs"])
        np.testing.assert_array_equal(buffer.observations[mirror], PENDULUM.obs(step["obs"]))
        np.testing.assert_array_equal(buffer.next_observations[real], step["next_obs"])
        np.testing.assert_array_equal(
            buffer.next_observations[mirror], PENDULUM.obs(step["next_obs"])
        )
        np.testing.assert_array_equal(buffer.actions[real], step["action"])
        np.testing.assert_array_equal(buffer.actions[mirror], -step["action"])
        for row in (real, mirror):
            np.testing.assert_array_equal(buffer.rewards[row], step["reward"])
            np.testing.assert_array_equal(buffer.dones[row], step["done"])
            np.testing.assert_array_equal(buffer.timeouts[row], np.arange(n_envs) == 0)
    batch = buffer.sample(64)
    assert batch.observations.shape == (64, 3) and batch.actions.shape == (64, 1)


def test_buffer_refusals():
    env = gym.make("Pendulum-v1")
    spaces_ = (env.observation_space, env.action_space)
    with pytest.raises(ValueError, match="optimize_memory_usage"):
        MirrorReplayBuffer(
            10, *spaces_, optimize_memory_usage=True, handle_timeout_termination=False,
            symmetry=PENDULUM,
        )  # fmt: skip
    with pytest.raises(ValueError, match="Reflection"):
        MirrorReplayBuffer(10, *spaces_, symmetry=lambda x: -x)
    with pytest.raises(ValueError, match="Box of shape"):
        MirrorReplayBuffer(10, *spaces_, symmetry=LAKE)


def test_sac_with_several_envs_fills_the_buffer_with_mirror_pairs():
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = SAC(
        FlowPolicy,
        env,
        learning_starts=30,
        batch_size=16,
        policy_kwargs=dict(net_arch=[16, 16], flow_kwargs=dict(layers=2)),
        replay_buffer_class=MirrorReplayBuffer,
        replay_buffer_kwargs=dict(symmetry=PENDULUM),
        seed=0,
    )
    model.learn(60)
    buffer = model.replay_buffer
    assert model._n_updates > 0 and buffer.pos == 60 and buffer.n_envs == 2
    real, mirror = slice(0, 60, 2), slice(1, 60, 2)
    np.testing.assert_array_equal(
        buffer.observations[mirror], PENDULUM.obs(buffer.observations[real])
    )
    np.testing.assert_array_equal(buffer.actions[mirror], -buffer.actions[real])
    np.testing.assert_array_equal(buffer.rewards[mirror], buffer.rewards[real])
    assert not np.array_equal(buffer.observations[real, 0], buffer.observations[real, 1])


# --- the symmetric critic ------------------------------------------------------------------


def pendulum_batch(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    theta = (2 * torch.rand(n, generator=g) - 1) * torch.pi
    obs = torch.stack([theta.cos(), theta.sin(), 16 * torch.rand(n, generator=g) - 8], -1)
    return obs, 2 * torch.rand(n, 1, generator=g) - 1


def assert_exactly_symmetric(critic: torch.nn.Module, reflection: Reflection = PENDULUM) -> None:
    assert isinstance(critic, SymmetricCritic)
    obs, actions = pendulum_batch()
    with torch.no_grad():
        values = critic(obs, actions)
        mirrored = critic(reflection.obs(obs), reflection.action(actions))
        assert len(values) == critic.n_critics
        for q, m in zip(values, mirrored):
            assert torch.equal(q, m)
        assert torch.equal(
            critic.q1_forward(obs, actions),
            critic.q1_forward(reflection.obs(obs), reflection.action(actions)),
        )


@pytest.mark.parametrize("policy_class", POLICIES)
def test_symmetric_critic_is_the_mirror_average(policy_class):
    torch.manual_seed(0)
    env = gym.make("Pendulum-v1")
    policy = policy_class(
        env.observation_space, env.action_space, constant_lr, n_critics=3, symmetry=PENDULUM
    )
    for critic in (policy.critic, policy.critic_target):
        assert_exactly_symmetric(critic)
    obs, actions = pendulum_batch(8)
    with torch.no_grad():
        plain = ContinuousCritic.forward(policy.critic, obs, actions)
        mirror = ContinuousCritic.forward(
            policy.critic, PENDULUM.obs(obs), PENDULUM.action(actions)
        )
        for q, a, b in zip(policy.critic(obs, actions), plain, mirror):
            torch.testing.assert_close(q, 0.5 * (a + b))
        assert not torch.allclose(plain[0], mirror[0])  # the networks themselves are not
        # at states on the mirror (θ = θdot = 0), an action and its mirror tie
        upright = torch.tensor([[1.0, 0.0, 0.0]]).expand(8, 3)
        for q, m in zip(policy.critic(upright, actions), policy.critic(upright, -actions)):
            assert torch.equal(q, m)


def test_without_symmetry_the_policies_keep_sb3s_critic():
    env = gym.make("Pendulum-v1")
    for policy_class in POLICIES:
        policy = policy_class(env.observation_space, env.action_space, constant_lr)
        assert type(policy.critic) is ContinuousCritic and policy.symmetry is None


@pytest.mark.parametrize("policy_class", POLICIES)
def test_symmetric_critic_survives_training_save_and_load(policy_class, tmp_path):
    kwargs = dict(net_arch=[16, 16], symmetry=PENDULUM)
    if policy_class is FlowPolicy:
        kwargs["flow_kwargs"] = dict(layers=2)
    model = SAC(
        policy_class,
        "Pendulum-v1",
        learning_starts=40,
        batch_size=16,
        policy_kwargs=kwargs,
        replay_buffer_class=MirrorReplayBuffer,
        replay_buffer_kwargs=dict(symmetry=PENDULUM),
        seed=0,
    )
    model.learn(100)
    assert model._n_updates > 0
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip")
    assert type(loaded.policy) is policy_class and loaded.policy.symmetry == PENDULUM
    for critic in (model.critic, model.critic_target, loaded.critic, loaded.critic_target):
        assert_exactly_symmetric(critic)
    obs, actions = pendulum_batch()
    with torch.no_grad():
        for q, r in zip(model.critic(obs, actions), loaded.critic(obs, actions)):
            assert torch.equal(q, r)
    # the policy alone, too
    model.policy.save(str(tmp_path / "policy.pt"))
    policy = policy_class.load(str(tmp_path / "policy.pt"))
    assert policy.symmetry == PENDULUM
    assert_exactly_symmetric(policy.critic)
    assert_exactly_symmetric(policy.critic_target)


def test_symmetric_flow_policy_learns_the_lake():
    """Both tools on LakeCrossing (symmetric about x = 0): a spline flow policy learns, and at the
    start state (on the axis) the critic gives an action and its mirror image the same value."""
    env = gym.make("LakeCrossing-v0")
    assert env.unwrapped.reflection() == LAKE  # the env's own mirror
    model = SAC(
        FlowPolicy,
        env,
        learning_starts=50,
        batch_size=32,
        policy_kwargs=dict(
            net_arch=[16, 16], flow_kwargs=dict(nonlinearity="spline", layers=2), symmetry=LAKE
        ),
        replay_buffer_class=MirrorReplayBuffer,
        replay_buffer_kwargs=dict(symmetry=LAKE),
        seed=0,
    )
    model.learn(120)
    assert model._n_updates > 0
    start = torch.tensor([[0.0, -1.25]]).expand(16, 2)
    actions = 2 * torch.rand(16, 2) - 1
    with torch.no_grad():
        for q, m in zip(model.critic(start, actions), model.critic(start, LAKE.action(actions))):
            assert torch.equal(q, m)


def test_policies_refuse_a_reflection_that_does_not_fit():
    env = gym.make("Pendulum-v1")
    for policy_class in POLICIES:
        with pytest.raises(ValueError, match="Box of shape"):
            policy_class(env.observation_space, env.action_space, constant_lr, symmetry=LAKE)
        with pytest.raises(ValueError, match="Reflection"):
            policy_class(env.observation_space, env.action_space, constant_lr, symmetry="x")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_symmetric_critic_on_cuda(tmp_path):
    model = SAC(
        FlowPolicy,
        "Pendulum-v1",
        learning_starts=50,
        batch_size=64,
        policy_kwargs=dict(symmetry=PENDULUM),
        replay_buffer_class=MirrorReplayBuffer,
        replay_buffer_kwargs=dict(symmetry=PENDULUM),
        device="cuda",
    )
    model.learn(100)
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", device="cuda")
    obs, actions = (t.cuda() for t in pendulum_batch())
    with torch.no_grad():
        for critic in (model.critic, loaded.critic, loaded.critic_target):
            mirrored = critic(PENDULUM.obs(obs), PENDULUM.action(actions))
            for q, m in zip(critic(obs, actions), mirrored):
                assert q.is_cuda and torch.equal(q, m)
