"""Tests of the SB3 integration: ``SAC(FlowPolicy, env)`` learns, saves, loads and stays exact.

Tiny real ``learn()`` runs, plus checks of the action distribution: it integrates to one over the
action square, ``action_log_prob`` agrees with ``action_distribution(obs).log_prob``, actions stay
in bounds for extreme observations, and the deterministic action is a dense one.
"""

from __future__ import annotations

import copy
import math
import warnings

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium import spaces
from stable_baselines3 import SAC
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.torch_layers import CombinedExtractor
from stable_baselines3.common.vec_env import VecNormalize
from stable_baselines3.sac.policies import SACPolicy

import flowpolicy
from flowpolicy.distribution import _select_mode
from flowpolicy.sb3 import DEFAULT_FLOW_KWARGS, EntropyCallback, FlowActor, FlowPolicy

torch.set_num_threads(1)

NONLINEARITIES = ["prelu", "spline"]
OBS_SPACE = spaces.Box(-1.0, 1.0, (3,), dtype=np.float32)
ACTION_SPACE_2D = spaces.Box(-1.0, 1.0, (2,), dtype=np.float32)


def constant_lr(_: float) -> float:
    return 1e-3


class Capture(KVWriter):
    """An SB3 logger output that keeps every dumped record in memory."""

    def __init__(self) -> None:
        self.records: list[dict] = []

    def write(self, key_values, key_excluded, step=0) -> None:
        self.records.append(dict(key_values))


def make_policy(nonlinearity: str = "prelu", action_space=ACTION_SPACE_2D, **kwargs) -> FlowPolicy:
    flow_kwargs = dict(nonlinearity=nonlinearity, **kwargs.pop("flow_kwargs", {}))
    return FlowPolicy(OBS_SPACE, action_space, constant_lr, flow_kwargs=flow_kwargs, **kwargs)


def random_obs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.rand(n, 3, generator=g) - 1


# --- real learning runs ---------------------------------------------------------------------


def test_sac_learns_pendulum_and_logs_entropy():
    model = SAC(FlowPolicy, "Pendulum-v1", learning_starts=100, batch_size=64, seed=0)
    assert isinstance(model.actor, FlowActor)
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    before = [p.detach().clone() for p in model.actor.parameters()]
    model.learn(300, log_interval=1, callback=EntropyCallback())

    assert model._n_updates > 0
    changed = [not torch.equal(a, b) for a, b in zip(before, model.actor.parameters())]
    assert all(changed), "every actor parameter (latent MLP and flow head) is trained"
    logged = [r for r in capture.records if "train/entropy" in r]
    assert logged, f"train/entropy was never logged; keys: {capture.records[-1].keys()}"
    for record in logged:
        assert math.isfinite(record["train/entropy"]) and math.isfinite(record["train/ent_coef"])
        assert math.isfinite(record["train/actor_loss"])
        assert math.isfinite(record["train/critic_loss"])
    # the logged value is -mean log pi of training batches: compare with a fresh estimate
    obs = torch.as_tensor(model.replay_buffer.observations[:256, 0])
    with torch.no_grad():
        _, log_prob = model.actor.action_log_prob(obs)
    assert abs(logged[-1]["train/entropy"] + log_prob.mean().item()) < 1.0

    obs = model.env.reset()
    for deterministic in (False, True):
        action, _ = model.predict(obs, deterministic=deterministic)
        assert action.shape == (1, 1) and np.all(np.abs(action) <= 2.0)


class ScaledObservations(gym.ObservationWrapper):
    """Pendulum's observations times 1e6: unnormalized inputs, as a careless user feeds them."""

    def __init__(self, env: gym.Env, scale: float = 1e6) -> None:
        super().__init__(env)
        self.scale = scale
        shape = env.observation_space.shape
        self.observation_space = spaces.Box(-np.inf, np.inf, shape, np.float32)

    def observation(self, observation: np.ndarray) -> np.ndarray:
        return (observation * self.scale).astype(np.float32)


def test_sac_on_observations_of_1e6_keeps_log_prob_and_losses_moderate():
    """Raw parameters bounded one by one still compounded over the layers: log pi reached 1e10
    (2.3e7 here) before training and the critic loss 4e26 after 300 steps. The default
    flow_kwargs' output_bound=1000 bounds the chain before tanh; what remains at
    initialization is the exact tanh term, -log(1 - tanh(x)^2) ~ 2|x| (SB3's Gaussian stays at
    |log pi| <= 66 only because it adds 1e-6 inside that log). Training brings log pi back to
    the Gaussian's range (|log pi| <= 33 here, critic loss ~2e7 from the critic's own inputs)."""
    env = ScaledObservations(gym.make("Pendulum-v1"))
    model = SAC(FlowPolicy, env, learning_starts=100, batch_size=64, seed=0)
    assert model.actor.flow.output_bound == 1000.0
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    rng = np.random.default_rng(0)
    angle = rng.uniform(-np.pi, np.pi, 256)
    raw = np.stack([np.cos(angle), np.sin(angle), rng.uniform(-8, 8, 256)], axis=1)
    obs = torch.as_tensor(env.observation(raw))
    with torch.no_grad():
        _, log_prob = model.actor.action_log_prob(obs)
    assert log_prob.isfinite().all() and log_prob.abs().max() <= 2.5e3

    model.learn(400, log_interval=1)  # 300 gradient steps
    records = [r for r in capture.records if "train/critic_loss" in r]
    assert records and model._n_updates == 300
    for record in records:
        assert math.isfinite(record["train/actor_loss"]) and abs(record["train/actor_loss"]) < 1e7
        assert math.isfinite(record["train/critic_loss"]) and record["train/critic_loss"] < 1e9
    with torch.no_grad():
        actions, log_prob = model.actor.action_log_prob(obs)
        seen = torch.as_tensor(model.replay_buffer.observations[:400, 0])
        _, seen_log_prob = model.actor.action_log_prob(seen)
    assert actions.isfinite().all() and log_prob.abs().max() <= 100
    assert seen_log_prob.abs().max() <= 100


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_sac_with_several_envs_and_vecnormalize(nonlinearity):
    env = VecNormalize(make_vec_env("LakeCrossing-v0", n_envs=2, seed=0))
    model = SAC(
        FlowPolicy,
        env,
        learning_starts=40,
        batch_size=32,
        train_freq=2,
        gradient_steps=2,
        policy_kwargs=dict(
            net_arch=[32, 32], flow_kwargs=dict(nonlinearity=nonlinearity, layers=2)
        ),
        seed=1,
    )
    model.learn(120)
    assert model._n_updates > 0
    obs = env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert actions.shape == (2, 2) and np.all(np.abs(actions) <= 1.0)
    assert np.array_equal(actions, model.predict(obs, deterministic=True)[0])


def test_entropy_is_logged_by_the_callback_not_by_the_policy():
    """No hidden hook: the policy's training-mode switch is SACPolicy's, and without the callback
    nothing is logged; the callback refuses an actor that records no entropy."""
    assert FlowPolicy.set_training_mode is SACPolicy.set_training_mode
    model = SAC(FlowPolicy, "Pendulum-v1", learning_starts=32, batch_size=16, seed=0)
    capture = Capture()
    model.set_logger(Logger(folder=None, output_formats=[capture]))
    model.learn(240, log_interval=1)
    assert model._n_updates > 0 and capture.records
    assert not any("train/entropy" in r for r in capture.records)
    gaussian = SAC("MlpPolicy", "Pendulum-v1", learning_starts=10, seed=0)
    with pytest.raises(ValueError, match="EntropyCallback"):
        gaussian.learn(20, callback=EntropyCallback())


# --- saving and loading ---------------------------------------------------------------------

CUSTOM_FLOW = dict(
    layers=2, rank=2, nonlinearity="spline", bins=5, bound=3.0, init_strength=0.5, head_scale=0.1
)
CUSTOM = dict(flow_kwargs=CUSTOM_FLOW, mode_samples=32, mode_bandwidth=0.8, net_arch=[16, 16])


def assert_same_policy(a: FlowPolicy, b: FlowPolicy) -> None:
    obs = torch.as_tensor(np.stack([a.observation_space.sample() for _ in range(16)]))
    with torch.no_grad():
        np.testing.assert_array_equal(a.actor(obs, deterministic=True), b.actor(obs, True))
        actions = a.actor.action_distribution(obs).sample()
        np.testing.assert_array_equal(
            a.actor.action_distribution(obs).log_prob(actions),
            b.actor.action_distribution(obs).log_prob(actions),
        )
    np.testing.assert_array_equal(a.actor.mode_noise, b.actor.mode_noise)
    assert b.actor.flow_kwargs == {**DEFAULT_FLOW_KWARGS, **CUSTOM_FLOW}
    assert (b.actor.mode_samples, b.actor.mode_bandwidth) == (32, 0.8)
    assert b.net_arch == [16, 16]


def test_sac_save_load_round_trip(tmp_path):
    model = SAC(FlowPolicy, "LakeCrossing-v0", policy_kwargs=CUSTOM, learning_starts=20, seed=0)
    model.learn(40)
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip")
    assert type(loaded.policy) is FlowPolicy
    assert_same_policy(model.policy, loaded.policy)
    obs = model.env.reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )


def test_policy_save_load_round_trip(tmp_path):
    policy = FlowPolicy(OBS_SPACE, ACTION_SPACE_2D, constant_lr, **CUSTOM)
    policy.save(str(tmp_path / "policy.pt"))
    loaded = FlowPolicy.load(str(tmp_path / "policy.pt"))
    assert_same_policy(policy, loaded)
    assert loaded._get_constructor_parameters() == policy._get_constructor_parameters()


def test_flow_settings_are_one_dict_with_the_policy_defaults():
    policy = FlowPolicy(OBS_SPACE, ACTION_SPACE_2D, constant_lr)
    assert policy.actor.flow_kwargs == DEFAULT_FLOW_KWARGS
    assert DEFAULT_FLOW_KWARGS == dict(
        layers=4,
        rank=1,
        nonlinearity="prelu",
        hidden=(),
        init_strength=0.5,
        param_bound=10.0,
        output_bound=1000.0,
    )
    assert (policy.actor.flow.param_bound, policy.actor.flow.output_bound) == (10.0, 1000.0)
    data = policy._get_constructor_parameters()
    assert data["flow_kwargs"] == DEFAULT_FLOW_KWARGS
    assert (data["mode_samples"], data["mode_bandwidth"]) == (64, 1.0)
    unbounded = make_policy(flow_kwargs=dict(param_bound=None, output_bound=None, layers=2))
    assert unbounded.actor.flow.param_bound is None and unbounded.actor.flow.output_bound is None
    assert unbounded.actor.flow_kwargs["layers"] == 2


def test_gaussian_settings_are_neither_taken_nor_stored():
    """SAC passes use_sde (False) to every policy; the Gaussian's other settings would be
    ignored by a flow, so they are refused, and none of them is stored or saved."""
    policy = FlowPolicy(OBS_SPACE, ACTION_SPACE_2D, constant_lr, use_sde=False)
    data = policy._get_constructor_parameters()
    for key in ("use_sde", "log_std_init", "use_expln", "clip_mean", "full_std"):
        assert key not in data and not hasattr(policy.actor, key)
        assert key not in policy.actor._get_constructor_parameters()
    for key in ("log_std_init", "use_expln", "clip_mean"):
        with pytest.raises(TypeError, match=key):
            FlowPolicy(OBS_SPACE, ACTION_SPACE_2D, constant_lr, **{key: 1.0})


# --- the action distribution ------------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_action_density_integrates_to_one(nonlinearity):
    torch.manual_seed(0)
    policy = make_policy(nonlinearity, flow_kwargs=dict(head_scale=0.5))  # state-dependent
    actor = policy.actor
    obs = random_obs(3, seed=1)
    with torch.no_grad():
        latent = actor.latent_pi(actor.extract_features(obs, actor.features_extractor)).double()
    flow = copy.deepcopy(actor.flow).double()
    # int p(a) da over [-1, 1]^2 = int p(tanh u) |det J_tanh(u)| du over the pre-tanh plane, in
    # float64, on an atanh-spaced grid of actions: u = sinh(s), fine near 0 and up to |u| = 15
    s = torch.linspace(-math.asinh(15.0), math.asinh(15.0), 401, dtype=torch.float64)
    u, du = torch.sinh(s), torch.cosh(s) * (s[1] - s[0])
    grid = torch.stack(torch.meshgrid(u, u, indexing="ij"), -1).reshape(-1, 1, 2)
    weight = (du[:, None] * du[None, :]).reshape(-1, 1)
    log_jacobian = (2 * (math.log(2) - grid - torch.nn.functional.softplus(-2 * grid))).sum(-1)
    with torch.no_grad():
        log_prob = flow(latent, False).log_prob(torch.tanh(grid))  # (401 * 401, 3)
    mass = ((log_prob + log_jacobian).exp() * weight).sum(0)
    np.testing.assert_allclose(mass.numpy(), 1.0, atol=2e-3)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_action_log_prob_agrees_with_action_distribution(nonlinearity):
    actor = make_policy(nonlinearity).actor
    obs = random_obs(256)
    actions, log_prob = actor.action_log_prob(obs)
    assert actions.shape == (256, 2) and log_prob.shape == (256,)
    assert actions.requires_grad and log_prob.requires_grad  # reparameterized
    assert torch.all(actions.abs() <= 1)
    with torch.no_grad():
        again = actor.action_distribution(obs).log_prob(actions)
    # float32 inverses through tanh: compare where the action is not within 1e-3 of the boundary
    inside = (actions.abs() < 0.999).all(-1)
    assert inside.float().mean() > 0.8
    torch.testing.assert_close(again[inside], log_prob.detach()[inside], rtol=1e-4, atol=2e-3)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_extreme_observations_give_finite_actions_in_bounds(nonlinearity):
    actor = make_policy(nonlinearity).actor
    obs = torch.tensor([[1e6] * 3, [-1e6] * 3, [1e6, -1e6, 1e6], [0.0, 0.0, 0.0]])
    actions, log_prob = actor.action_log_prob(obs)
    (actions.sum() + log_prob.sum()).backward()
    for a in (actions, actor(obs), actor(obs, deterministic=True)):
        assert torch.isfinite(a).all() and torch.all(a.abs() <= 1)
    assert torch.isfinite(log_prob).all()
    assert all(torch.isfinite(p.grad).all() for p in actor.parameters() if p.grad is not None)


def test_nan_observation_raises_like_sb3s_gaussian():
    """SB3's Gaussian actor refuses a NaN observation (torch validates its Normal); so does ours."""
    actor = make_policy().actor
    obs = torch.tensor([[0.0, float("nan"), 0.0]])
    for call in (actor.action_log_prob, actor, actor.action_distribution):
        with pytest.raises(ValueError, match="NaN"):
            call(obs)


def test_nan_observation_raises_even_without_torchs_default_validation():
    """Any torch.compile in the process calls Distribution.set_default_validate_args(False);
    predict must still refuse NaN observations, not return NaN actions."""
    model = SAC(FlowPolicy, "Pendulum-v1", seed=0)
    default = torch.distributions.Distribution._validate_args
    torch.distributions.Distribution.set_default_validate_args(False)
    try:
        for deterministic in (False, True):
            for obs in (np.full(3, np.nan, np.float32), np.array([[0, np.inf, 0]], np.float32)):
                with pytest.raises(ValueError, match="observations contain NaN"):
                    model.predict(obs, deterministic=deterministic)
        with pytest.raises(ValueError, match="observations contain NaN"):
            model.actor(torch.full((2, 3), float("nan")))
        # Dict observations: the entry is named
        observation_space = spaces.Dict({"pos": OBS_SPACE, "id": spaces.Discrete(3)})
        policy = FlowPolicy(
            observation_space,
            ACTION_SPACE_2D,
            constant_lr,
            features_extractor_class=CombinedExtractor,
        )
        obs = {"pos": np.array([0.0, np.nan, 0.0], np.float32), "id": 1}
        with pytest.raises(ValueError, match=r"observations \(entry 'pos'\) contain NaN"):
            policy.predict(obs)
    finally:
        torch.distributions.Distribution.set_default_validate_args(default)
    assert model.predict(np.zeros(3, np.float32))[0].shape == (1,)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("deterministic", [False, True])
def test_predict_of_an_empty_batch_gives_no_actions(nonlinearity, deterministic):
    """Zero observations give zero actions, as with SB3's Gaussian, without errors or warnings."""
    policy = make_policy(nonlinearity)
    gaussian = SACPolicy(OBS_SPACE, ACTION_SPACE_2D, constant_lr)
    obs = np.zeros((0, 3), np.float32)
    expected, _ = gaussian.predict(obs, deterministic=deterministic)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        actions, state = policy.predict(obs, deterministic=deterministic)
        assert actions.shape == expected.shape == (0, 2) and state is None
        assert policy.actor(torch.zeros(0, 3), deterministic).shape == (0, 2)
        actions, log_prob = policy.actor.action_log_prob(torch.zeros(0, 3))
        assert actions.shape == (0, 2) and log_prob.shape == (0,)


# --- the deterministic action -------------------------------------------------------------


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_deterministic_action_is_repeatable_and_dense(nonlinearity):
    # seeded: the action is chosen for its mass first (see FlowActor), so at some random
    # initializations a state's choice is less dense than the median sample (3 in 40 measured)
    torch.manual_seed(0)
    actor = make_policy(nonlinearity, flow_kwargs=dict(head_scale=1.0)).actor
    obs = random_obs(64, seed=2)
    with torch.no_grad():
        det = actor(obs, deterministic=True)
        assert torch.equal(det, actor(obs, deterministic=True))
        # per state: the same with another batch (up to the float rounding of batched matmuls)
        torch.testing.assert_close(det[:5], actor(obs[:5], deterministic=True))
        dist = actor.action_distribution(obs)
        median = dist.log_prob(dist.sample((512,))).median(0).values
        assert torch.all(dist.log_prob(det) >= median)


def test_deterministic_action_is_the_distributions_high_density_sample():
    actor = make_policy("spline", mode_samples=16, mode_bandwidth=0.7).actor
    obs = random_obs(8, seed=3)
    assert actor.mode_noise.shape == (16, 2)
    torch.testing.assert_close(actor.mode_noise, flowpolicy.flows.quasi_normal(16, 2))
    with torch.no_grad():
        expected = actor.action_distribution(obs).high_density_sample(actor.mode_noise, 0.7)
        assert torch.equal(actor(obs, deterministic=True), expected)


def test_deterministic_action_of_a_bimodal_policy_is_in_a_mode():
    """Fit the actor to two action clusters (the lake's start state): its deterministic action
    must lie in a cluster, not in the empty gap between them."""
    torch.manual_seed(0)
    actor = make_policy("spline", net_arch=[32, 32]).actor
    optimizer = torch.optim.Adam(actor.parameters(), lr=3e-3)
    obs = torch.zeros(256, 3)
    for _ in range(200):
        side = 2.0 * torch.randint(0, 2, (256,)) - 1
        target = torch.stack([0.5 * side, torch.full_like(side, 0.5)], -1)
        target = target + 0.05 * torch.randn(256, 2)
        loss = -actor.action_distribution(obs).log_prob(target).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        dist = actor.action_distribution(obs[:1])
        det = actor(obs[:1], deterministic=True)[0]
        gap = torch.tensor([0.0, 0.5])
        assert dist.log_prob(gap) < dist.log_prob(det) - 3.0  # the fit is bimodal
        assert 0.35 < det[0].abs() < 0.65 and 0.35 < det[1] < 0.65
        samples = dist.sample((2000,))
        assert dist.log_prob(det) >= dist.log_prob(samples).quantile(0.75)


def test_mode_selection_avoids_a_thin_ridge():
    """Two broad modes plus a thin, dense central ridge holding 10% of the mass: best-of-K by
    density picks the ridge; the mass-aware selection does not."""
    g = torch.Generator().manual_seed(0)
    weights = torch.tensor([0.45, 0.45, 0.10])
    means = torch.tensor([[-0.5, 0.3], [0.5, 0.3], [0.0, 0.2]])
    stds = torch.tensor([[0.15, 0.15], [0.15, 0.15], [0.004, 0.5]])
    K, n = 64, 500
    component = torch.multinomial(weights, K * n, replacement=True, generator=g).view(K, n)
    x = means[component] + stds[component] * torch.randn(K, n, 2, generator=g)
    components = torch.distributions.Normal(means, stds)
    log_prob = (components.log_prob(x[..., None, :]).sum(-1) + weights.log()).logsumexp(-1)

    best_by_density = x.gather(0, log_prob.argmax(0)[None, :, None].expand(1, n, 2))[0]
    assert (best_by_density[:, 0].abs() < 0.2).float().mean() > 0.5  # the failure it avoids
    chosen = _select_mode(x, log_prob)
    assert (chosen[:, 0].abs() < 0.2).float().mean() < 0.01
    assert (chosen[:, 0].abs() - 0.5).abs().max() < 0.35


# --- refusals ------------------------------------------------------------------------------


def test_refuses_gsde():
    with pytest.raises(ValueError, match="use_sde"):
        SAC(FlowPolicy, "Pendulum-v1", use_sde=True)


@pytest.mark.parametrize(
    "action_space",
    [
        spaces.Discrete(3),
        spaces.MultiDiscrete([2, 3]),
        spaces.Box(-np.inf, np.inf, (2,), dtype=np.float32),
    ],
)
def test_refuses_action_spaces_a_flow_cannot_squash(action_space):
    with pytest.raises(ValueError, match="action space"):
        FlowPolicy(OBS_SPACE, action_space, constant_lr)


@pytest.mark.parametrize(
    "observation_space",
    [
        spaces.Tuple([OBS_SPACE, OBS_SPACE]),
        spaces.Dict({"a": OBS_SPACE}),
        spaces.Text(5),
        spaces.Box(-1.0, 1.0, (), dtype=np.float32),
    ],
)
def test_refuses_observation_spaces_the_mlp_cannot_take(observation_space):
    with pytest.raises(ValueError, match="FlowPolicy"):
        FlowPolicy(observation_space, ACTION_SPACE_2D, constant_lr)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(flow_kwargs=dict(rank=3)),
        dict(nonlinearity="relu"),
        dict(mode_samples=1),
        dict(mode_bandwidth=0.0),
        dict(flow_kwargs=dict(squash=False)),  # set by the actor
        dict(flow_kwargs=dict(param_bound=-1.0)),
        dict(mode_bandwidth=math.inf),
        dict(mode_bandwidth=math.nan),
        dict(mode_samples=True),
        dict(mode_samples=8.0),
    ],
)
def test_refuses_bad_flow_settings(kwargs):
    with pytest.raises(ValueError):
        make_policy(**kwargs)


def test_unknown_flow_setting_is_refused_by_conditional_flow():
    with pytest.raises(TypeError, match="layer"):
        make_policy(flow_kwargs=dict(layer=2))


def test_other_observation_spaces_work():
    """Spaces SB3's preprocessing flattens (one-hot for discrete ones) are accepted."""
    for observation_space in (spaces.Discrete(4), spaces.MultiBinary(3)):
        policy = FlowPolicy(observation_space, ACTION_SPACE_2D, constant_lr)
        action, _ = policy.predict(observation_space.sample(), deterministic=True)
        assert action.shape == (2,)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda(tmp_path):
    model = SAC(FlowPolicy, "Pendulum-v1", learning_starts=50, batch_size=64, device="cuda")
    model.learn(100)
    assert model.actor.mode_noise.is_cuda
    obs = model.env.reset()
    action, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model.zip")
    loaded = SAC.load(tmp_path / "model.zip", device="cuda")
    np.testing.assert_array_equal(action, loaded.predict(obs, deterministic=True)[0])


def test_package_exports():
    assert flowpolicy.FlowPolicy is FlowPolicy and "FlowPolicy" in flowpolicy.__all__
    assert gym.spec("LakeCrossing-v0") is not None
