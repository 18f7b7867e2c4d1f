"""FlowSAC: the score-function actor update is unbiased, keeps both modes of a symmetric critic
where SAC's reparameterized update loses one, and FlowSAC is a SAC (save/load, Gaussian policy,
symmetry tools)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from flowpolicy import ConditionalFlow, FlowPolicy
from flowpolicy.bijectors import Tanh
from flowpolicy.diagnostics import side_mass
from flowpolicy.flows import squashed_gaussian
from flowpolicy.flowsac import FlowSAC, _samples_and_score_surrogate, _unsquashed, soft_actor_loss
from flowpolicy.symmetry import MirrorReplayBuffer

ALPHA = 0.5


def smooth_q(actions: torch.Tensor) -> torch.Tensor:
    """A smooth 1-D critic with two bumps."""
    return 2.0 * torch.sin(3.0 * actions[..., 0]) + actions[..., 0]


class TanhGaussian(nn.Module):
    """A state-independent 1-D tanh-Gaussian actor, float64: obs -> pi(. | s)."""

    def __init__(self) -> None:
        super().__init__()
        self.mean = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        self.log_std = nn.Parameter(torch.tensor(-0.2, dtype=torch.float64))

    def forward(self, obs: torch.Tensor):
        shape = (len(obs), 1)
        return squashed_gaussian(self.mean.expand(shape), self.log_std.exp().expand(shape))


def exact_gradient(actor: TanhGaussian) -> torch.Tensor:
    r"""d/d(mean, log_std) of E[alpha log pi(a) - Q(a)] by 120-node Gauss-Hermite quadrature:
    u = mean + std sqrt(2) x, log pi(a) = log N(u) - log|d tanh/du|."""
    x, w = (torch.as_tensor(v) for v in np.polynomial.hermite.hermgauss(120))
    std = actor.log_std.exp()
    u = actor.mean + std * math.sqrt(2.0) * x
    log_normal = -(x**2) - actor.log_std - 0.5 * math.log(2 * math.pi)
    log_pi = log_normal - Tanh().log_abs_det_jacobian(u[:, None], None)
    integrand = ALPHA * log_pi - smooth_q(torch.tanh(u)[:, None])
    objective = (w * integrand).sum() / math.sqrt(math.pi)
    return torch.stack(torch.autograd.grad(objective, [actor.mean, actor.log_std]))


def estimated_gradient(actor: TanhGaussian, gradient: str, samples: int) -> torch.Tensor:
    obs = torch.zeros(4000, 1, dtype=torch.float64)
    loss, _ = soft_actor_loss(
        actor, lambda o, a: (smooth_q(a)[:, None],), obs, ALPHA, gradient, samples
    )
    return torch.stack(torch.autograd.grad(loss, [actor.mean, actor.log_std]))


@pytest.mark.parametrize("gradient", ["score", "combined", "reparam"])
def test_actor_gradient_is_unbiased(gradient):
    torch.manual_seed(0)
    actor = TanhGaussian()
    exact = exact_gradient(actor)
    draws = torch.stack([estimated_gradient(actor, gradient, samples=4) for _ in range(30)])
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(len(draws))
    # precise enough that a 10% bias (e.g. a baseline that includes the sample, (K-1)/K = 75%)
    # would be seen, and the estimate within 4 standard errors of the exact gradient
    assert (stderr < 0.025 * exact.abs()).all(), (stderr, exact)
    assert ((mean - exact).abs() < 4 * stderr).all(), (mean, exact, stderr)


def test_score_update_takes_the_tanh_term_pathwise():
    # far in the saturated tail, the tanh term dominates the objective's gradient (2 alpha per
    # unit of the mean); taken pathwise it adds no noise: the spread over draws is that of the
    # score of log q - Q alone (measured 0.066; with the tanh term in f_k instead, 0.107)
    actor = TanhGaussian()
    with torch.no_grad():
        actor.mean.fill_(6.0)
    torch.manual_seed(0)
    obs = torch.zeros(64, 1, dtype=torch.float64)
    draws = []
    for _ in range(100):
        loss, _ = soft_actor_loss(actor, lambda o, a: (smooth_q(a)[:, None],), obs, ALPHA,
                                  "score", samples=4)  # fmt: skip
        draws.append(torch.autograd.grad(loss, actor.mean)[0])
    draws = torch.stack(draws)
    exact = exact_gradient(actor)[0]
    assert exact == pytest.approx(2 * ALPHA, rel=1e-3)
    assert draws.std() < 0.085, draws.std()
    assert (draws.mean() - exact).abs() < 4 * draws.std() / math.sqrt(len(draws))


MODES = torch.tensor([[-0.6, 0.6], [0.6, 0.6]])


def two_well_critic(obs: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor]:
    """Fixed, exactly symmetric: high at a = (+-0.6, 0.6), low straight ahead."""
    return (-10.0 * ((actions[..., None, :] - MODES) ** 2).sum(-1).min(-1).values[:, None],)


def minority_mass(gradient: str, steps: int = 300, seed: int = 1) -> float:
    """Fit a flow actor to the fixed critic, alpha annealed from 1 to 0.1 over half the steps
    (as SAC's automatic alpha decreases); the exact mass of its smaller side."""
    torch.manual_seed(seed)
    actor = ConditionalFlow(
        dim=2, context_dim=2, layers=4, hidden=(32, 32), nonlinearity="spline", squash=True,
        init_strength=0.0, seed=seed,
    )  # fmt: skip
    optimizer = torch.optim.Adam(actor.parameters(), lr=5e-3)
    state = torch.tensor([[0.0, -1.0]])
    # same number of actions per step: 128 states x 1 (reparam), 8 states x 16 (score)
    obs = state.expand(128 if gradient == "reparam" else 8, -1)
    for step in range(steps):
        alpha = 0.1 ** min(1.0, 2 * step / steps)
        loss, _ = soft_actor_loss(actor, two_well_critic, obs, alpha, gradient, samples=16)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mass = side_mass(actor, state, direction=(0.0, 1.0), gap=0.2, resolution=100)
    return float(min(mass["left"][0], mass["right"][0]))


def test_score_update_keeps_both_modes_where_reparam_loses_one():
    # Boltzmann target: 50/50. Measured (seeds 0-2, this budget): reparam 0.29, 0.000, 0.000;
    # score 0.49-0.50 on each; combined 0.46, 0.37, 0.44.
    assert minority_mass("score") > 0.4
    assert minority_mass("combined") > 0.3
    assert minority_mass("reparam") < 0.1


def small_sac(policy, env="Pendulum-v1", **kwargs) -> FlowSAC:
    return FlowSAC(
        policy, env, learning_starts=64, batch_size=32, buffer_size=1000, seed=0,
        policy_kwargs=dict(net_arch=[32, 32], **kwargs.pop("policy_kwargs", {})), **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize("policy", [FlowPolicy, "MlpPolicy"])
def test_score_update_trains_the_actor(policy):
    model = small_sac(policy, actor_gradient="score", score_samples=4)
    before = [p.detach().clone() for p in model.actor.parameters()]
    model.learn(128)
    after = list(model.actor.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after))
    values = model.logger.name_to_value
    for key in ("train/actor_loss", "train/critic_loss", "train/ent_coef", "train/entropy"):
        assert np.isfinite(values[key]), key
    assert values["train/ent_coef"] < 1.0  # the entropy coefficient is updated too


@pytest.mark.parametrize("nonlinearity", ["prelu", "spline"])
def test_score_surrogate_is_the_inverse_pass_score(nonlinearity):
    # float64: the implicit-function form's value and gradient are those of log_prob(u) through
    # the inverse, at u held fixed
    flow = ConditionalFlow(3, 2, layers=3, squash=True, hidden=(16,), seed=0,
                           nonlinearity=nonlinearity).double()  # fmt: skip
    obs = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    u, _, surrogate = _samples_and_score_surrogate(_unsquashed(flow(obs)), samples=4)
    u = u.detach()
    assert surrogate.shape == (4, 5)
    given = _unsquashed(flow(obs)).log_prob(u)
    torch.testing.assert_close(surrogate, given, rtol=0, atol=1e-10)
    params = list(flow.parameters())
    for ours, reference in zip(torch.autograd.grad(surrogate.sum(), params),
                               torch.autograd.grad(given.sum(), params)):  # fmt: skip
        torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)


def test_score_update_is_finite_where_float32_cannot_invert_the_flow():
    # a flow driven far out (a large head, large contexts): float32 cannot invert some of its own
    # samples (pre-tanh values in the hundreds), as happened in SAC on LakeCrossing
    flow = ConditionalFlow(2, 3, layers=5, squash=True, hidden=(16,), head_scale=1.0, seed=0)
    flow.output_bound = 1000.0  # FlowPolicy's
    obs = 10 * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    dist = _unsquashed(flow(obs))
    with torch.no_grad():
        u, log_q = dist.rsample_and_log_prob((4,))
    assert not torch.isfinite(dist.log_prob(u)).all()  # the inverse pass fails here
    torch.manual_seed(1)
    loss, log_prob = soft_actor_loss(flow, lambda o, a: (a.sum(-1, keepdim=True),), obs, 0.5,
                                     "score", samples=4)  # fmt: skip
    torch.testing.assert_close(log_prob, log_q - Tanh().log_abs_det_jacobian(u, torch.tanh(u)))
    grads = torch.autograd.grad(loss, list(flow.parameters()), allow_unused=True)
    assert torch.isfinite(loss)
    assert all(g is None or torch.isfinite(g).all() for g in grads)


def test_score_surrogate_where_the_jacobian_underflows_to_singular():
    # two float32 scalings by 1e-30: the samples' Jacobian is 0 (singular) in float32, their
    # log-det (-138 nats, a sum of logs) finite; the score is then taken by least squares
    from torch.distributions import AffineTransform, Independent, Normal

    from flowpolicy.distribution import FlowDistribution

    scale = torch.tensor(1e-30, requires_grad=True)
    base = Independent(Normal(torch.zeros(3, 2), torch.ones(3, 2)), 1)
    steps = [AffineTransform(0.0, scale, event_dim=1), AffineTransform(0.0, 1e-30, event_dim=1)]
    u, _, surrogate = _samples_and_score_surrogate(FlowDistribution(base, steps), samples=4)
    (grad,) = torch.autograd.grad(surrogate.sum(), scale)
    assert (u == 0).all() and torch.isfinite(surrogate).all() and torch.isfinite(grad)


def test_fixed_entropy_coefficient():
    model = small_sac(FlowPolicy, actor_gradient="score", ent_coef=0.2)
    model.learn(96)
    assert model.logger.name_to_value["train/ent_coef"] == pytest.approx(0.2)
    assert np.isfinite(model.logger.name_to_value["train/actor_loss"])


@pytest.mark.parametrize("gradient", ["score", "combined"])
def test_save_load_keeps_the_actor_gradient(tmp_path, gradient):
    model = small_sac(FlowPolicy, actor_gradient=gradient, score_samples=3)
    model.learn(80)
    model.save(tmp_path / "model.zip")
    loaded = FlowSAC.load(tmp_path / "model.zip", env=model.get_env())
    assert (loaded.actor_gradient, loaded.score_samples) == (gradient, 3)
    obs = model.get_env().reset()
    np.testing.assert_array_equal(
        model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0]
    )
    loaded.learn(16)  # and trains on


def test_symmetry_tools():
    import gymnasium as gym

    reflection = gym.make("LakeCrossing-v0").unwrapped.reflection()
    model = small_sac(
        FlowPolicy,
        "LakeCrossing-v0",
        actor_gradient="score",
        policy_kwargs=dict(symmetry=reflection),
        replay_buffer_class=MirrorReplayBuffer,
        replay_buffer_kwargs=dict(symmetry=reflection),
    )
    model.learn(96)
    assert np.isfinite(model.logger.name_to_value["train/actor_loss"])


def test_bad_input():
    with pytest.raises(ValueError, match="actor_gradient must be one of"):
        small_sac(FlowPolicy, actor_gradient="likelihood")
    with pytest.raises(ValueError, match="score_samples must be >= 2"):
        small_sac(FlowPolicy, actor_gradient="score", score_samples=1)
    with pytest.raises(TypeError, match="score_samples must be an integer"):
        small_sac(FlowPolicy, score_samples=4.0)
    with pytest.raises(ValueError, match="use_sde=False"):
        small_sac("MlpPolicy", actor_gradient="combined", use_sde=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_score_update_on_cuda():
    flow = ConditionalFlow(3, 2, layers=3, squash=True, hidden=(16,), seed=0).double().cuda()
    obs = torch.randn(5, 2, dtype=torch.float64, device="cuda")
    u, _, surrogate = _samples_and_score_surrogate(_unsquashed(flow(obs)), samples=4)
    given = _unsquashed(flow(obs)).log_prob(u.detach())
    params = list(flow.parameters())
    for ours, reference in zip(torch.autograd.grad(surrogate.sum(), params),
                               torch.autograd.grad(given.sum(), params)):  # fmt: skip
        torch.testing.assert_close(ours, reference, rtol=1e-8, atol=1e-10)
    model = FlowSAC(FlowPolicy, "Pendulum-v1", actor_gradient="score", learning_starts=64,
                    batch_size=64, device="cuda", seed=0)  # fmt: skip
    model.learn(160)
    assert model.actor.mode_noise.is_cuda
    assert np.isfinite(model.logger.name_to_value["train/actor_loss"])
