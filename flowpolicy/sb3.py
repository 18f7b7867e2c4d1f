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
The flow's settings are one dict, ``policy_kwargs=dict(flow_kwargs=...)``, as SB3 takes a
features extractor's; ``policy_kwargs=dict(symmetry=reflection)`` makes the critic symmetric
(:mod:`flowpolicy.symmetry`); :class:`EntropyCallback` logs the policy's entropy.
:class:`MultiInputFlowPolicy` takes Dict observations (``HerReplayBuffer``);
:mod:`flowpolicy.contrib` has the same actor for TQC and CrossQ.

Example:
    >>> from stable_baselines3 import SAC
    >>> import flowpolicy
    >>> model = SAC(
    ...     flowpolicy.FlowPolicy,
    ...     "Pendulum-v1",
    ...     policy_kwargs=dict(flow_kwargs=dict(layers=4, nonlinearity="spline")),
    ... )
    >>> model.learn(5_000, callback=flowpolicy.EntropyCallback())  # logs train/entropy
"""

from __future__ import annotations

import math
from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import BasePolicy
from stable_baselines3.common.preprocessing import get_action_dim
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    create_mlp,
)
from stable_baselines3.common.type_aliases import PyTorchObs, Schedule
from torch import Tensor, nn

from flowpolicy.flows import ConditionalFlow, FlowDistribution, quasi_normal
from flowpolicy.symmetry import Reflection, SymmetricSACPolicy

__all__ = [
    "DEFAULT_FLOW_KWARGS",
    "EntropyCallback",
    "FlowActor",
    "FlowActorPolicyMixin",
    "FlowPolicy",
    "MultiInputFlowPolicy",
    "flow_settings",
]

DEFAULT_FLOW_KWARGS: dict[str, Any] = dict(
    layers=4,
    rank=1,
    nonlinearity="prelu",
    # the latent MLP (net_arch) is the hypernetwork's body: a linear head suffices
    hidden=(),
    # With ConditionalFlow's 1.0, the initial PReLU policies put up to 23% (1-D) and 25% (2-D) of
    # their actions within 1e-3 of the bounds, over 8 seeds (a tanh-squashed N(0, 1), SB3's
    # start, puts 0.01% there); with 0.5, at most 3.4% and 7.4%.
    init_strength=0.5,
    # bound on the raw flow parameters, as SB3 clamps a Gaussian's log_std
    param_bound=10.0,
    # and on what compounds over the layers: for unnormalized observations (1e6), |log pi| at
    # most ~2e3 at initialization (the exact tanh term) instead of 1e10. It rescales no state of
    # a trained LakeCrossing policy; a batch's one-reduction pre-check keeps its cost small.
    output_bound=1000.0,
)
"""The policy's flow settings; ``flow_kwargs`` entries replace them (ConditionalFlow's
arguments, except ``dim``, ``context_dim`` and ``squash``, which the actor sets)."""

# set by the actor from the spaces, not by the user
_RESERVED_FLOW_KWARGS = ("dim", "context_dim", "squash")

# SACPolicy passes these Gaussian (gSDE) settings to its actor; a flow has no use for them
_GAUSSIAN_ACTOR_KWARGS = ("use_sde", "log_std_init", "use_expln", "clip_mean")

# Observation spaces SB3's preprocessing turns into one flat float vector (FlattenExtractor).
_FLAT_OBS_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def _check_spaces(
    observation_space: spaces.Space,
    action_space: spaces.Space,
    features_extractor_class: type[BaseFeaturesExtractor],
    name: str = "FlowPolicy",
) -> None:
    """Raise a ``ValueError`` naming the problem when policy ``name`` cannot take the spaces."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(
            f"{name} needs a continuous (gymnasium.spaces.Box) action space, got "
            f"{action_space}; a flow is a density over real vectors. For discrete actions use "
            f"an algorithm that takes them (PPO, DQN) with SB3's own policies"
        )
    if not (action_space.low.size > 0 and action_space.is_bounded("both")):
        raise ValueError(
            f"{name} needs a non-empty action space with finite bounds (actions are squashed "
            f"into [-1, 1] and rescaled), got {action_space}; give the environment finite "
            f"bounds, e.g. gymnasium.wrappers.ClipAction over a bounded Box"
        )
    if isinstance(observation_space, spaces.Dict):
        if issubclass(features_extractor_class, FlattenExtractor):
            raise ValueError(
                f"{name}: a Dict observation space needs a features extractor that takes "
                "dicts, e.g. policy_kwargs=dict(features_extractor_class=CombinedExtractor) "
                "(from stable_baselines3.common.torch_layers), as SB3's MultiInputPolicy does, "
                "or the flow policy's MultiInput class (flowpolicy.MultiInputFlowPolicy)"
            )
    elif not isinstance(observation_space, _FLAT_OBS_SPACES):
        raise ValueError(
            f"{name}: observation space {observation_space} is not supported by SB3's "
            f"networks; use Box, Discrete, MultiDiscrete, MultiBinary or Dict (with "
            f"CombinedExtractor), e.g. through a gymnasium FlattenObservation wrapper"
        )
    elif isinstance(observation_space, spaces.Box) and len(observation_space.shape) == 0:
        raise ValueError(
            f"{name}: a Box observation space needs at least one dimension, got shape "
            f"{observation_space.shape}; reshape observations to (1,)"
        )


def _check_finite_observations(obs: PyTorchObs) -> None:
    """Raise a ``ValueError`` if an observation holds NaN or inf (a dict: any of its entries).

    Always on, whatever torch's global distribution validation says (any ``torch.compile`` in
    the process turns it off), and it names the observations rather than the flow.
    """
    items = obs.items() if isinstance(obs, dict) else [(None, obs)]
    for key, tensor in items:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            where = "" if key is None else f" (entry {key!r})"
            raise ValueError(
                f"FlowPolicy: the observations{where} contain NaN or inf, which would give NaN "
                f"actions; check the environment (SB3's VecCheckNan wrapper finds the step)"
            )


def flow_settings(
    flow_kwargs: dict[str, Any] | None, mode_samples: int, mode_bandwidth: float
) -> dict[str, Any]:
    """:data:`DEFAULT_FLOW_KWARGS` updated by ``flow_kwargs``, after checking the settings every
    flow actor shares (``ValueError`` for keys the actor sets, ``mode_samples < 2`` or a
    ``mode_bandwidth`` that is not a positive finite number); ConditionalFlow checks the rest."""
    flow_kwargs = {**DEFAULT_FLOW_KWARGS, **(flow_kwargs or {})}
    reserved = [key for key in _RESERVED_FLOW_KWARGS if key in flow_kwargs]
    if reserved:
        raise ValueError(
            f"flow_kwargs: {reserved} are set by the actor from the action space and the "
            f"latent size; leave them out"
        )
    if isinstance(mode_samples, bool) or not isinstance(mode_samples, int) or mode_samples < 2:
        raise ValueError(f"mode_samples must be an integer >= 2, got {mode_samples!r}")
    real = isinstance(mode_bandwidth, (int, float)) and not isinstance(mode_bandwidth, bool)
    if not (real and 0 < mode_bandwidth < math.inf):
        raise ValueError(f"mode_bandwidth must be a positive finite number, got {mode_bandwidth!r}")
    return flow_kwargs


class FlowActor(BasePolicy):
    r"""SAC actor whose action distribution is a state-conditioned flow squashed by tanh.

    Same contract as SB3's :class:`~stable_baselines3.sac.policies.Actor`:
    ``forward(obs, deterministic)`` returns actions in :math:`[-1, 1]^d` and
    ``action_log_prob(obs)`` returns reparameterized actions and their exact log-density, tanh
    correction included, in one forward pass (no inverse). ``action_distribution(obs)`` gives the
    :class:`~flowpolicy.flows.FlowDistribution` itself, whose ``log_prob`` takes any actions in
    :math:`(-1, 1)^d` (behaviour cloning, analysis, plots).

    Network: features extractor, then an MLP latent :math:`h(s)` (``net_arch``, as in SB3), then
    the :class:`~flowpolicy.flows.ConditionalFlow` whose linear head
    :math:`\theta(s) = W h(s) + b` gives every parameter of the flow.

    **Deterministic action.** Not the image of the base mean: for a bimodal flow that lands
    between the modes (for a lake, in the water). It is
    ``dist.high_density_sample(mode_noise, mode_bandwidth)``: ``mode_samples`` fixed
    quasi-random base vectors (the buffer ``mode_noise``, saved with the weights) are pushed
    through the state's flow, and the densest of the samples that carry nearly the most kernel
    mass is returned (see :meth:`~flowpolicy.flows.FlowDistribution.high_density_sample`). The
    same observation always gives the same action.

    **Entropy.** Each ``action_log_prob`` call with gradients (SAC's actor loss) adds
    :math:`-\frac1n \sum_i \log\pi(a_i \mid s_i)` to a running mean that :meth:`pop_entropy`
    returns and resets; :class:`EntropyCallback` logs it as ``train/entropy``.

    :param observation_space: Observation space.
    :param action_space: Action space (a bounded ``Box``).
    :param net_arch: Hidden sizes of the latent MLP.
    :param features_extractor: Network to extract features.
    :param features_dim: Number of features.
    :param activation_fn: Activation function of the MLP.
    :param flow_kwargs: Settings of the :class:`~flowpolicy.flows.ConditionalFlow` (``layers``,
        ``rank``, ``nonlinearity``, ``bins``, ``bound``, ``init_strength``, ``head_scale``,
        ``param_bound``, ...), on top of :data:`DEFAULT_FLOW_KWARGS`; checked by ConditionalFlow.
    :param mode_samples: Number ``K`` of fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor on Scott's bandwidth in the deterministic action's mass score.
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
        flow_kwargs: dict[str, Any] | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
        normalize_images: bool = True,
    ) -> None:
        flow_kwargs = flow_settings(flow_kwargs, mode_samples, mode_bandwidth)
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
        self.flow_kwargs = flow_kwargs
        self.mode_samples = mode_samples
        self.mode_bandwidth = mode_bandwidth

        action_dim = get_action_dim(self.action_space)
        self.latent_pi = self.make_latent_pi(features_dim, net_arch, activation_fn)
        latent_dim = net_arch[-1] if len(net_arch) > 0 else features_dim
        self.flow = ConditionalFlow(action_dim, latent_dim, squash=True, **flow_kwargs)
        # fixed base points of the deterministic action, saved with the weights
        self.register_buffer("mode_noise", quasi_normal(mode_samples, action_dim))
        # running sum of -mean log pi over training batches, read by pop_entropy
        self._entropy_sum: Tensor | None = None
        self._entropy_count = 0

    def make_latent_pi(
        self, features_dim: int, net_arch: list[int], activation_fn: type[nn.Module]
    ) -> nn.Module:
        """The latent MLP :math:`h(s)` (SB3's ``create_mlp``); subclasses add layers to it."""
        return nn.Sequential(*create_mlp(features_dim, -1, net_arch, activation_fn))

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(
            dict(
                net_arch=self.net_arch,
                features_dim=self.features_dim,
                activation_fn=self.activation_fn,
                features_extractor=self.features_extractor,
                flow_kwargs=self.flow_kwargs,
                mode_samples=self.mode_samples,
                mode_bandwidth=self.mode_bandwidth,
            )
        )
        return data

    def action_distribution(
        self, obs: PyTorchObs, validate_args: bool | None = None
    ) -> FlowDistribution:
        r"""The flow over squashed actions :math:`\pi(\cdot \mid s)`, batch shape ``(n,)``.

        :param obs: Observations (a batch, as SB3 passes them).
        :param validate_args: ``None`` or ``True``: the flow's parameters and samples are
            checked for NaN and inf whatever torch's global default (a NaN observation raises
            instead of giving NaN actions, as SB3's Gaussian does), and the values given to
            ``log_prob`` (finiteness, support) as torch's default says (``True``: always).
            ``False``: no checks.
        :return: The distribution; ``log_prob(actions)`` takes actions in ``(-1, 1)``.
        """
        features = self.extract_features(obs, self.features_extractor)
        return self.flow(self.latent_pi(features), validate_args)

    def forward(self, obs: PyTorchObs, deterministic: bool = False) -> Tensor:
        """Actions in ``[-1, 1]`` for a batch of observations (``predict``'s path).

        Raises a ``ValueError`` for NaN or infinite observations whatever torch's global
        distribution validation says (``torch.compile`` turns that off for the whole process).
        """
        _check_finite_observations(obs)
        dist = self.action_distribution(obs)
        if dist.batch_shape.numel() == 0:  # an empty batch: no actions (as SB3's Gaussian)
            return self.mode_noise.new_zeros(dist.batch_shape + dist.event_shape)
        if deterministic:
            with torch.no_grad():
                return dist.high_density_sample(self.mode_noise, self.mode_bandwidth)
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

    def _predict(self, observation: PyTorchObs, deterministic: bool = False) -> Tensor:
        return self(observation, deterministic)


class FlowActorPolicyMixin:
    """Gives an SB3 actor-critic policy (SAC's, TQC's, CrossQ's) a :class:`FlowActor`.

    Put it first among the bases, ``class P(FlowActorPolicyMixin, SomePolicy)``, and call
    :meth:`_setup_flow` in ``__init__`` before the parent's ``__init__`` (which builds the
    networks through :meth:`make_actor`). ``actor_class`` is the actor built; the Gaussian
    (gSDE) settings the parent passes to its actor are dropped, and the flow's settings, defaults
    included, are saved so that a load rebuilds the same flow.
    """

    actor_class: type[FlowActor] = FlowActor
    actor: FlowActor
    actor_kwargs: dict[str, Any]

    def _setup_flow(
        self,
        use_sde: bool,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        features_extractor_class: type[BaseFeaturesExtractor],
        flow_kwargs: dict[str, Any] | None,
        mode_samples: int,
        mode_bandwidth: float,
    ) -> None:
        """Check the arguments a flow cannot take and keep the actor's flow settings."""
        name = type(self).__name__
        if use_sde:
            raise ValueError(
                f"{name} does not support use_sde=True (gSDE perturbs a Gaussian's mean; the "
                f"flow explores through its own base noise); pass use_sde=False to the algorithm"
            )
        _check_spaces(observation_space, action_space, features_extractor_class, name)
        # read by make_actor; the flow settings are checked by ConditionalFlow there
        self._flow_actor_kwargs = dict(
            flow_kwargs=flow_kwargs, mode_samples=mode_samples, mode_bandwidth=mode_bandwidth
        )

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()  # type: ignore[misc]
        for key in _GAUSSIAN_ACTOR_KWARGS:
            data.pop(key, None)
        data.update(
            flow_kwargs=self.actor.flow_kwargs,
            mode_samples=self.actor.mode_samples,
            mode_bandwidth=self.actor.mode_bandwidth,
        )
        return data

    def make_actor(self, features_extractor: BaseFeaturesExtractor | None = None) -> FlowActor:
        actor_kwargs = self._update_features_extractor(  # type: ignore[attr-defined]
            self.actor_kwargs, features_extractor
        )
        for key in _GAUSSIAN_ACTOR_KWARGS:
            actor_kwargs.pop(key, None)
        actor = self.actor_class(**actor_kwargs, **self._flow_actor_kwargs)
        return actor.to(self.device)  # type: ignore[attr-defined]


class FlowPolicy(FlowActorPolicyMixin, SymmetricSACPolicy):
    r"""SAC policy (actor and critics) with a :class:`FlowActor`: ``SAC(FlowPolicy, env)``.

    The critics, features extractors and optimizers are SB3's
    (:class:`~stable_baselines3.sac.policies.SACPolicy`); only the actor's distribution changes.
    With ``symmetry``, the critics are symmetric by construction
    (:class:`~flowpolicy.symmetry.SymmetricCritic`). To log ``train/entropy`` (the mean of
    :math:`-\log\pi(a \mid s)` over the actor's training batches) next to SAC's
    ``train/ent_coef``, pass ``callback=EntropyCallback()`` to ``learn``.

    :param observation_space: Observation space.
    :param action_space: Action space (a bounded ``Box``).
    :param lr_schedule: Learning rate schedule (could be constant).
    :param net_arch: The specification of the policy and value networks (SB3's format).
    :param activation_fn: Activation function.
    :param use_sde: Must be ``False`` (SAC passes it): gSDE perturbs a Gaussian's mean, the flow
        explores through its own base noise.
    :param features_extractor_class: Features extractor to use.
    :param features_extractor_kwargs: Keyword arguments to pass to the features extractor.
    :param normalize_images: Whether to normalize images or not, dividing by 255.0.
    :param optimizer_class: The optimizer to use, ``torch.optim.Adam`` by default.
    :param optimizer_kwargs: Additional keyword arguments, excluding the learning rate, to pass
        to the optimizer.
    :param n_critics: Number of critic networks to create.
    :param share_features_extractor: Whether to share the features extractor between the actor
        and the critic.
    :param flow_kwargs: The flow's settings, arguments of
        :class:`~flowpolicy.flows.ConditionalFlow` (e.g. ``dict(layers=4, rank=1,
        nonlinearity="spline")``) on top of :data:`DEFAULT_FLOW_KWARGS` (4 PReLU layers, rank 1,
        ``init_strength=0.5``, ``param_bound=10``).
    :param mode_samples: Fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor on Scott's bandwidth of the deterministic action's mass score.
    :param symmetry: A :class:`~flowpolicy.symmetry.Reflection` of the task: the critic and its
        target become symmetric, :math:`Q(s, a) = Q(Ms, M_a a)`.
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
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        features_extractor_kwargs: dict[str, Any] | None = None,
        normalize_images: bool = True,
        optimizer_class: type[torch.optim.Optimizer] = torch.optim.Adam,
        optimizer_kwargs: dict[str, Any] | None = None,
        n_critics: int = 2,
        share_features_extractor: bool = False,
        flow_kwargs: dict[str, Any] | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
        symmetry: Reflection | None = None,
    ) -> None:
        # checked before SACPolicy.__init__, which builds the networks
        self._setup_flow(
            use_sde,
            observation_space,
            action_space,
            features_extractor_class,
            flow_kwargs,
            mode_samples,
            mode_bandwidth,
        )
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            net_arch=net_arch,
            activation_fn=activation_fn,
            features_extractor_class=features_extractor_class,
            features_extractor_kwargs=features_extractor_kwargs,
            normalize_images=normalize_images,
            optimizer_class=optimizer_class,
            optimizer_kwargs=optimizer_kwargs,
            n_critics=n_critics,
            share_features_extractor=share_features_extractor,
            symmetry=symmetry,
        )


class MultiInputFlowPolicy(FlowPolicy):
    """:class:`FlowPolicy` for Dict observation spaces (as SB3's ``MultiInputPolicy``): the
    features extractor defaults to SB3's ``CombinedExtractor``. Works with ``HerReplayBuffer``.

    Example:
        >>> SAC(MultiInputFlowPolicy, env, replay_buffer_class=HerReplayBuffer)
    """

    def __init__(
        self,
        observation_space: spaces.Dict,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        *args: Any,
        features_extractor_class: type[BaseFeaturesExtractor] = CombinedExtractor,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            observation_space,
            action_space,
            lr_schedule,
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class EntropyCallback(BaseCallback):
    r"""Log the entropy of a :class:`FlowPolicy` during ``learn`` as ``train/entropy``.

    The value is the mean of :math:`-\log\pi(a \mid s)` over the actor's training batches of
    the last ``train()`` (:meth:`FlowActor.pop_entropy`, no extra forward pass), recorded at the
    start of each rollout, so SB3 writes it with ``train/ent_coef`` and the losses.

    Example:
        >>> model.learn(10_000, callback=EntropyCallback())
    """

    def _init_callback(self) -> None:
        if not hasattr(self.model.policy.actor, "pop_entropy"):
            raise ValueError(
                f"EntropyCallback needs a FlowPolicy's actor (with pop_entropy), got "
                f"{type(self.model.policy.actor).__name__}"
            )
        self.model.policy.actor.pop_entropy()  # start from this run's batches

    def _on_rollout_start(self) -> None:
        entropy = self.model.policy.actor.pop_entropy()
        if entropy is not None:
            self.logger.record("train/entropy", entropy)

    def _on_step(self) -> bool:
        return True
