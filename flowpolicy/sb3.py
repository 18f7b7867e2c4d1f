r"""A drop-in SAC policy for Stable-Baselines3 whose action distribution is a normalizing flow.

``SAC(FlowPolicy, env)`` replaces the squashed diagonal Gaussian of SB3's SAC actor by a
state-conditioned flow: the actor's MLP latent :math:`h(s)` sets every parameter of a chain of
affine and element-wise nonlinear bijectors (a linear hypernetwork head, see
:class:`~flowpolicy.flows.ConditionalFlow`), followed by tanh,

.. math:: a = \tanh\big(f_{\theta(s)}(z)\big),\ z \sim \mathcal{N}(0, I), \qquad
          \log \pi(a \mid s) = \log \mathcal{N}(z) - \log|\det J_{f_{\theta(s)}}(z)|
          - \sum_i \log(1 - a_i^2),

with the last term computed stably from the pre-tanh value. The log-density is exact, so SAC's
entropy bonus and ``target_entropy="auto"`` keep their meaning, and the shape of the action
distribution (several modes, skew, correlations), not only its location, depends on the state.

Everything else is SB3's: the critics, the features extractor, ``net_arch``, the optimizers,
``predict`` (which rescales actions from ``[-1, 1]`` to the action space), saving and loading.

Example:
    >>> from stable_baselines3 import SAC
    >>> import flowpolicy
    >>> model = SAC(flowpolicy.FlowPolicy, "Pendulum-v1", policy_kwargs=dict(flow_layers=4))
    >>> model.learn(5_000)
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    FlattenExtractor,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from stable_baselines3.sac.policies import SACPolicy
from torch import Tensor, nn

from flowpolicy.flows import ConditionalFlow, FlowDistribution

__all__ = ["FlowActor", "FlowPolicy"]

# The deterministic action is the densest sample among those with at least this fraction of the
# largest kernel mass. Measured on exact mixtures (K = 64): best-of-K by density picked a thin
# central ridge holding 10% of the mass 98% of the time; a ratio of 0.5 still did 29% of the
# time, 0.9 never (0.7% for a ridge holding 20%), and on a unimodal Gaussian it stays exact.
_MODE_MASS_RATIO = 0.9

# Initialization spread of the policy's flow. With ConditionalFlow's 1.0, the initial PReLU
# policies put up to 23% (1-D) and 25% (2-D) of their actions within 1e-3 of the bounds, over 8
# seeds (a tanh-squashed N(0, 1), SB3's start, puts 0.01% there); with 0.5, at most 3.4% and 7.4%.
DEFAULT_INIT_STRENGTH = 0.5

# Bound on the flow's raw parameters (log-slopes, shifts, scale entries, spline logits), as SB3
# clamps a Gaussian's log_std: with it the flow stays finite even for observations of 1e6.
_THETA_MAX = 10.0

# Observation spaces SB3's preprocessing turns into one flat float vector (FlattenExtractor).
_FLAT_OBS_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _quasi_normal(num: int, dim: int, seed: int = 0) -> Tensor:
    r"""``num`` quasi-random standard-normal vectors: scrambled Sobol points through the normal
    inverse CDF, :math:`z = \sqrt{2}\,\mathrm{erfinv}(2u - 1)` (they cover the base evenly)."""
    sobol = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    u = sobol.draw(num, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    return (math.sqrt(2.0) * torch.erfinv(2 * u - 1)).float()


def _select_mode(samples: Tensor, log_prob: Tensor, bandwidth: float = 1.0) -> Tensor:
    r"""Per column ``n``, the densest of the samples whose kernel mass is near the largest.

    :param samples: ``(K, n, d)`` samples of ``n`` distributions.
    :param log_prob: ``(K, n)`` their exact log-densities.
    :param bandwidth: factor on Scott's bandwidth, :math:`h_j = c K^{-1/(d+4)} \mathrm{std}_j`.
    :return: ``(n, d)`` one sample per distribution (see :class:`FlowActor`).
    """
    num, _, d = samples.shape
    h = (bandwidth * num ** (-1.0 / (d + 4)) * samples.std(0)).clamp_min(1e-6)  # (n, d)
    u = samples / h
    distance2 = (u[:, None] - u[None, :]).pow(2).sum(-1)  # (K, K, n)
    mass = torch.logsumexp(-0.5 * distance2, dim=1)  # (K, n): log of K times the kernel mass
    massive = mass >= mass.max(0, keepdim=True).values + math.log(_MODE_MASS_RATIO)
    best = torch.where(massive, log_prob, -math.inf).argmax(0)  # (n,)
    return samples.gather(0, best[None, :, None].expand(1, -1, d))[0]


def _check_spaces(
    observation_space: spaces.Space,
    action_space: spaces.Space,
    features_extractor_class: type[BaseFeaturesExtractor],
) -> None:
    """Raise a ``ValueError`` naming the problem when FlowPolicy cannot handle the spaces."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"FlowPolicy needs a continuous (gymnasium.spaces.Box) action space, got "
            f"{action_space}; a flow is a density over real vectors"
        )
    if not (action_space.low.size > 0 and action_space.is_bounded("both")):
        raise ValueError(
            f"FlowPolicy needs a non-empty action space with finite bounds (actions are squashed "
            f"into [-1, 1] and rescaled), got {action_space}"
        )
    if isinstance(observation_space, spaces.Dict):
        if issubclass(features_extractor_class, FlattenExtractor):
            raise ValueError(
                "FlowPolicy: a Dict observation space needs a features extractor that takes "
                "dicts, e.g. policy_kwargs=dict(features_extractor_class=CombinedExtractor) "
                "(from stable_baselines3.common.torch_layers), as SB3's MultiInputPolicy does"
            )
    elif not isinstance(observation_space, _FLAT_OBS_SPACES):
        raise ValueError(
            f"FlowPolicy: observation space {observation_space} is not supported by SB3's "
            f"networks; use Box, Discrete, MultiDiscrete, MultiBinary or Dict (with "
            f"CombinedExtractor), e.g. through a gymnasium FlattenObservation wrapper"
        )
    elif isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 0:
        raise ValueError(
            f"FlowPolicy: a Box observation space needs at least one dimension, got shape "
            f"{observation_space.shape}; reshape observations to (1,)"
        )


class FlowActor(BasePolicy):
    r"""SAC actor whose action distribution is a state-conditioned flow squashed by tanh.

    Same contract as SB3's :class:`~stable_baselines3.sac.policies.Actor`:
    ``forward(obs, deterministic)`` returns actions in :math:`[-1, 1]^d` and
    ``action_log_prob(obs)`` returns reparameterized actions and their exact log-density, tanh
    correction included, in one forward pass (no inverse). ``action_distribution(obs)`` gives the
    :class:`~flowpolicy.flows.FlowDistribution` itself, whose ``log_prob`` takes any actions in
    :math:`(-1, 1)^d` (behaviour cloning, analysis, plots).

    Network: features extractor, then an MLP latent :math:`h(s)` (``net_arch``, as in SB3), then a
    linear head :math:`\theta(s) = W h(s) + b` giving every parameter of the flow.

    **Deterministic action.** Not the image of the base mean: for a bimodal flow that lands
    between the modes (for a lake, in the water). Fixed base vectors :math:`z_1..z_K` (a buffer,
    quasi-random normal) are pushed through the state's flow to :math:`a_k` with exact
    :math:`\log\pi(a_k)`; each sample gets the probability mass around it, estimated by a kernel
    density over the samples with a per-state, per-dimension bandwidth
    :math:`h_j = c\,K^{-1/(d+4)}\,\mathrm{std}_k(a_{kj})` (Scott's rule times ``mode_bandwidth``),

    .. math:: m_k = \log \sum_l \exp\Big(-\tfrac12 \sum_j (a_{kj} - a_{lj})^2 / h_j^2\Big),

    and the action is the most probable sample (largest :math:`\log\pi`) among those whose mass
    is at least 90% of the largest. A thin ridge of high density but little mass (measured to
    make best-of-K by density alone drown in the lake) is not chosen, and among the samples in
    the most massive region the densest wins. The same observation always gives the same action.

    :param observation_space: Observation space.
    :param action_space: Action space (a bounded ``Box``).
    :param net_arch: Hidden sizes of the latent MLP.
    :param features_extractor: Network to extract features.
    :param features_dim: Number of features.
    :param activation_fn: Activation function of the MLP.
    :param flow_layers: Number of (affine, nonlinearity) blocks of the flow.
    :param rank: Rank of the low-rank update of each affine layer (``0 <= rank <= action dim``).
    :param nonlinearity: ``"prelu"`` or ``"spline"`` (rational-quadratic, for separated modes).
    :param bins: Spline bins.
    :param bound: Spline interval ``[-bound, bound]`` (identity outside).
    :param init_strength: Spread of the flow's random initialization (default
        ``DEFAULT_INIT_STRENGTH`` = 0.5, a broad, unsaturated start; ``None``: the default of
        :class:`~flowpolicy.flows.ConditionalFlow`).
    :param head_scale: Scale of the head's initial weights (``None``: ConditionalFlow's default).
    :param mode_samples: Number ``K`` of fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor ``c`` on Scott's bandwidth in the mass estimate.
    :param use_sde: Must be ``False`` (accepted because SAC always passes it).
    :param log_std_init: Ignored (a Gaussian parameter SACPolicy passes).
    :param full_std: Ignored (gSDE).
    :param use_expln: Ignored (gSDE).
    :param clip_mean: Ignored (gSDE).
    :param normalize_images: Whether to divide images by 255.
    """

    action_space: spaces.Box

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        net_arch: list[int],
        features_extractor: nn.Module,
        features_dim: int,
        activation_fn: type[nn.Module] = nn.ReLU,
        flow_layers: int = 4,
        rank: int = 1,
        nonlinearity: str = "prelu",
        bins: int = 8,
        bound: float = 4.0,
        init_strength: float | None = DEFAULT_INIT_STRENGTH,
        head_scale: float | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
        use_sde: bool = False,
        log_std_init: float = -3,
        full_std: bool = True,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        normalize_images: bool = True,
    ) -> None:
        if use_sde:
            raise ValueError(
                "FlowActor: use_sde=True (gSDE) is not available for a flow policy: its "
                "exploration noise is the flow's base noise; use SAC(..., use_sde=False)"
            )
        if not isinstance(mode_samples, int) or mode_samples < 2:
            raise ValueError(f"mode_samples must be an integer >= 2, got {mode_samples!r}")
        if not (isinstance(mode_bandwidth, (int, float)) and mode_bandwidth > 0):
            raise ValueError(f"mode_bandwidth must be a positive number, got {mode_bandwidth!r}")
        super().__init__(
            observation_space,
            action_space,
            features_extractor=features_extractor,
            normalize_images=normalize_images,
            squash_output=True,
        )
        self.net_arch = net_arch
        self.features_dim = features_dim
        self.activation_fn = activation_fn
        self.use_sde = use_sde
        self.log_std_init = log_std_init
        self.full_std = full_std
        self.use_expln = use_expln
        self.clip_mean = clip_mean
        self.flow_layers = flow_layers
        self.rank = rank
        self.nonlinearity = nonlinearity
        self.bins = bins
        self.bound = bound
        self.init_strength = init_strength
        self.head_scale = head_scale
        self.mode_samples = mode_samples
        self.mode_bandwidth = mode_bandwidth

        action_dim = get_action_dim(self.action_space)
        self.latent_pi = nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))
        latent_dim = net_arch[-1] if len(net_arch) > 0 else features_dim
        optional = dict(init_strength=init_strength, head_scale=head_scale)
        self.flow = ConditionalFlow(
            dim=action_dim,
            context_dim=latent_dim,
            layers=flow_layers,
            rank=rank,
            hidden=(),  # the latent MLP is the hypernetwork's body: a linear head suffices
            nonlinearity=nonlinearity,
            squash=True,
            bins=bins,
            bound=bound,
            **{key: value for key, value in optional.items() if value is not None},
        )
        # fixed base points of the deterministic action, saved with the weights
        self.register_buffer("mode_noise", _quasi_normal(mode_samples, action_dim))
        # running sum of -mean log pi over training batches, read by FlowPolicy's logging
        self._entropy_sum: Tensor | None = None
        self._entropy_count = 0

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                features_dim=self.features_dim,
                activation_fn=self.activation_fn,
                features_extractor=self.features_extractor,
                flow_layers=self.flow_layers,
                rank=self.rank,
                nonlinearity=self.nonlinearity,
                bins=self.bins,
                bound=self.bound,
                init_strength=self.init_strength,
                head_scale=self.head_scale,
                mode_samples=self.mode_samples,
                mode_bandwidth=self.mode_bandwidth,
                use_sde=self.use_sde,
                log_std_init=self.log_std_init,
                full_std=self.full_std,
                use_expln=self.use_expln,
                clip_mean=self.clip_mean,
            )
        )
        return data

    def action_distribution(
        self, obs: PyTorchObs, validate_args: bool | None = None
    ) -> FlowDistribution:
        r"""The flow over squashed actions :math:`\pi(\cdot \mid s)`, batch shape ``(n,)``.

        :param obs: Observations (a batch, as SB3 passes them).
        :param validate_args: Check that the flow's parameters are finite (a NaN observation
            raises instead of giving NaN actions, as SB3's Gaussian does) and the values given to
            ``log_prob`` (shape, finiteness). ``None``: torch's default (on).
        :return: The distribution; ``log_prob(actions)`` takes actions in ``(-1, 1)``.
        """
        features = self.extract_features(obs, self.features_extractor)
        # bounded raw parameters keep the flow finite for any observation (as SB3 clamps log_std)
        theta = self.flow.hyper(self.latent_pi(features)).clamp(-_THETA_MAX, _THETA_MAX)
        return self.flow.layout(theta, validate_args)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> Tensor:
        dist = self.action_distribution(obs)
        if deterministic:
            return self.mode(dist)
        return dist.rsample()

    def action_log_prob(self, obs: PyTorchObs) -> tuple[Tensor, Tensor]:
        """Reparameterized actions in ``[-1, 1]`` and their exact log-density, one forward pass.

        :param obs: Observations.
        :return: ``(actions, log_prob)`` with shapes ``(n, d)`` and ``(n,)``.
        """
        actions, log_prob = self.action_distribution(obs).rsample_and_log_prob()
        if torch.is_grad_enabled():
            # SAC's actor-loss call; accumulate without a device sync (.item() comes at logging)
            entropy = -log_prob.detach().mean()
            self._entropy_sum = (
                entropy if self._entropy_sum is None else self._entropy_sum + entropy
            )
            self._entropy_count += 1
        return actions, log_prob

    def pop_entropy(self) -> float | None:
        r"""Mean of :math:`-\frac1n\sum_i \log\pi(a_i \mid s_i)` over the batches of
        ``action_log_prob`` calls with gradients since the last call (``None`` if none)."""
        if self._entropy_sum is None:
            return None
        value = self._entropy_sum.item() / self._entropy_count
        self._entropy_sum, self._entropy_count = None, 0
        return value

    @torch.no_grad()
    def mode(self, dist: FlowDistribution) -> Tensor:
        """A high-density action per state: the densest of the fixed samples that carry the most
        mass (see the class docstring). Vectorized over the batch.

        :param dist: A distribution returned by :meth:`action_distribution`.
        :return: Actions of shape ``dist.batch_shape + (d,)``.
        """
        batch, d = dist.batch_shape, dist.event_shape[0]
        num = self.mode_samples
        z = self.mode_noise.view((num,) + (1,) * len(batch) + (d,))
        x, log_prob = dist.push_forward(z)  # (K, *batch, d), (K, *batch)
        x = x.expand((num,) + batch + (d,)).reshape(num, -1, d)
        log_prob = log_prob.expand((num,) + batch).reshape(num, -1)
        return _select_mode(x, log_prob, self.mode_bandwidth).reshape(batch + (d,))

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> Tensor:
        return self(observation, deterministic)


class FlowPolicy(SACPolicy):
    r"""SAC policy (actor and critics) with a :class:`FlowActor`: ``SAC(FlowPolicy, env)``.

    The critics, features extractors and optimizers are SB3's
    (:class:`~stable_baselines3.sac.policies.SACPolicy`); only the actor's distribution changes.
    During training, ``train/entropy`` (the mean of :math:`-\log\pi(a \mid s)` over the actor's
    training batches) is recorded in the algorithm's logger, next to SAC's ``train/ent_coef``.

    :param observation_space: Observation space.
    :param action_space: Action space (a bounded ``Box``).
    :param lr_schedule: Learning rate schedule (could be constant).
    :param net_arch: The specification of the policy and value networks (SB3's format).
    :param activation_fn: Activation function.
    :param use_sde: Must be ``False``: gSDE has no meaning for a flow.
    :param log_std_init: Ignored (accepted because SAC passes it).
    :param use_expln: Ignored (gSDE).
    :param clip_mean: Ignored (gSDE).
    :param features_extractor_class: Features extractor to use.
    :param features_extractor_kwargs: Keyword arguments to pass to the features extractor.
    :param normalize_images: Whether to normalize images or not, dividing by 255.0.
    :param optimizer_class: The optimizer to use, ``torch.optim.Adam`` by default.
    :param optimizer_kwargs: Additional keyword arguments, excluding the learning rate, to pass
        to the optimizer.
    :param n_critics: Number of critic networks to create.
    :param share_features_extractor: Whether to share the features extractor between the actor
        and the critic.
    :param flow_layers: Number of (affine, nonlinearity) blocks of the flow.
    :param rank: Rank of the low-rank update of each affine layer.
    :param nonlinearity: ``"prelu"`` or ``"spline"``.
    :param bins: Spline bins.
    :param bound: Spline interval ``[-bound, bound]``.
    :param init_strength: Spread of the flow's initialization (``None``: ConditionalFlow's).
        The default, 0.5, keeps the initial policy broad but unsaturated (see
        ``DEFAULT_INIT_STRENGTH``).
    :param head_scale: Scale of the flow head's initial weights (``None``: ConditionalFlow's).
    :param mode_samples: Fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor on Scott's bandwidth of the deterministic action's mass score.
    """

    actor: FlowActor

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        net_arch: list[int] | dict[str, list[int]] | None = None,
        activation_fn: type[nn.Module] = nn.ReLU,
        use_sde: bool = False,
        log_std_init: float = -3,
        use_expln: bool = False,
        clip_mean: float = 2.0,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        flow_layers: int = 4,
        rank: int = 1,
        nonlinearity: str = "prelu",
        bins: int = 8,
        bound: float = 4.0,
        init_strength: float | None = DEFAULT_INIT_STRENGTH,
        head_scale: float | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
    ) -> None:
        # checked before SACPolicy.__init__, which builds the networks
        if use_sde:
            raise ValueError(
                "FlowPolicy does not support use_sde=True (gSDE perturbs a Gaussian's mean; the "
                "flow explores through its own base noise); use SAC(..., use_sde=False)"
            )
        _check_spaces(observation_space, action_space, features_extractor_class)
        # flow settings (rank, nonlinearity, ...) are checked by ConditionalFlow in make_actor
        self.flow_kwargs = dict(
            flow_layers=flow_layers,
            rank=rank,
            nonlinearity=nonlinearity,
            bins=bins,
            bound=bound,
            init_strength=init_strength,
            head_scale=head_scale,
            mode_samples=mode_samples,
            mode_bandwidth=mode_bandwidth,
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            activation_fn=activation_fn,
            use_sde=use_sde,
            log_std_init=log_std_init,
            use_expln=use_expln,
            clip_mean=clip_mean,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(self.flow_kwargs)
        # SACPolicy leaves this one out; it changes the networks, so keep it
        data["share_features_extractor"] = self.share_features_extractor
        return data

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> FlowActor:
        actor_kwargs = self._update_features_extractor(self.actor_kwargs, features_extractor)
        return FlowActor(**actor_kwargs, **self.flow_kwargs).to(self.device)

    def set_training_mode(self, mode: bool) -> None:
        """Put the policy in training or evaluation mode (batch norm, dropout).

        Also the logging hook: SB3 gives a policy no handle on its algorithm's logger, but
        off-policy algorithms call ``self.policy.set_training_mode(False)`` at the start of every
        rollout, right after the previous ``train()``. When the caller is such an algorithm (it
        owns this policy and has a logger), the entropy estimate of the last ``train()`` is
        recorded there as ``train/entropy``, to be written with SAC's ``train/ent_coef``.
        """
        super().set_training_mode(mode)
        if mode or self.actor._entropy_sum is None:
            return
        owner = sys._getframe(1).f_locals.get("self")
        if owner is None or getattr(owner, "policy", None) is not self:
            return
        try:
            logger = owner.logger
        except AttributeError:  # an algorithm before its first learn() has no logger yet
            return
        entropy = self.actor.pop_entropy()
        if entropy is not None:
            logger.record("train/entropy", entropy)
