r"""Flow policies for sb3-contrib's TQC and CrossQ: ``TQC(FlowTQCPolicy, env)``,
``CrossQ(FlowCrossQPolicy, env)``.

Both algorithms train a SAC-style actor, :math:`\min_\theta \mathbb{E}_s[\alpha \log
\pi_\theta(a \mid s) - Q(s, a)]` with reparameterized :math:`a \sim \pi_\theta(\cdot \mid s)`,
against their own critics (TQC: truncated quantile critics; CrossQ: batch-renormalized critics
without target networks). The policies here keep those critics and replace the squashed
Gaussian actor by the same :class:`~flowpolicy.sb3.FlowActor` as
:class:`~flowpolicy.FlowPolicy`: the same flow settings (``flow_kwargs``), deterministic action,
saving and loading. CrossQ's actor, :class:`CrossQFlowActor`, puts batch renormalization
before each linear layer of its latent MLP and after the last one, as sb3-contrib's, and has the
``set_bn_training_mode`` that ``CrossQ.train`` calls.

The critic symmetry of :class:`~flowpolicy.FlowPolicy` (``symmetry=``) is SAC's only.

Needs sb3-contrib: ``pip install flowpolicy[contrib]``.

Example:
    >>> from sb3_contrib import TQC, CrossQ
    >>> from flowpolicy.contrib import FlowCrossQPolicy, FlowTQCPolicy
    >>> TQC(FlowTQCPolicy, "Pendulum-v1", policy_kwargs=dict(flow_kwargs=dict(layers=2)))
    >>> CrossQ(FlowCrossQPolicy, "Pendulum-v1").learn(5_000)
"""

from __future__ import annotations

from functools import partial
from typing import Any

from gymnasium import spaces
from stable_baselines3.common.torch_layers import (
    BaseFeaturesExtractor,
    CombinedExtractor,
    FlattenExtractor,
    create_mlp,
)
from stable_baselines3.common.type_aliases import Schedule
from torch import nn

from flowpolicy.sb3 import FlowActor, FlowActorPolicyMixin

try:
    from sb3_contrib.common.torch_layers import BatchRenorm1d
    from sb3_contrib.crossq.policies import CrossQPolicy
    from sb3_contrib.tqc.policies import TQCPolicy
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flowpolicy.contrib needs sb3-contrib (TQC, CrossQ): pip install flowpolicy[contrib]"
    ) from error

__all__ = [
    "CrossQFlowActor",
    "FlowCrossQPolicy",
    "FlowTQCPolicy",
    "MultiInputFlowTQCPolicy",
]


class FlowTQCPolicy(FlowActorPolicyMixin, TQCPolicy):
    """TQC policy with a :class:`~flowpolicy.sb3.FlowActor`: ``TQC(FlowTQCPolicy, env)``.

    The quantile critics, features extractors and optimizers are sb3-contrib's
    :class:`~sb3_contrib.tqc.policies.TQCPolicy` (its other arguments: ``net_arch``,
    ``n_quantiles``, ``n_critics``, ``share_features_extractor``, ...).

    :param flow_kwargs: The flow's settings on top of :data:`~flowpolicy.sb3.DEFAULT_FLOW_KWARGS`.
    :param mode_samples: Fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor on Scott's bandwidth of the deterministic action's mass score.
    :param use_sde: Must be ``False`` (gSDE perturbs a Gaussian's mean).
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        *args: Any,
        use_sde: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        flow_kwargs: dict[str, Any] | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
        **kwargs: Any,
    ) -> None:
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
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class CrossQFlowActor(FlowActor):
    """:class:`~flowpolicy.sb3.FlowActor` whose latent MLP has CrossQ's batch renormalization.

    As sb3-contrib's CrossQ actor: a ``BatchRenorm1d`` before each linear layer of the latent
    MLP and one after the last hidden layer; :meth:`set_bn_training_mode` switches whether they
    use and update batch statistics (``CrossQ.train`` turns it on for the actor loss only).

    :param batch_norm: Whether to use the batch-renorm layers.
    :param batch_norm_momentum: Rate of the running statistics.
    :param batch_norm_eps: Added to the variance.
    :param renorm_warmup_steps: Steps before the running statistics renormalize.
    :param kwargs: :class:`~flowpolicy.sb3.FlowActor`'s arguments.
    """

    def __init__(
        self,
        *args: Any,
        batch_norm: bool = True,
        batch_norm_momentum: float = 0.01,
        batch_norm_eps: float = 0.001,
        renorm_warmup_steps: int = 100_000,
        **kwargs: Any,
    ) -> None:
        # read by make_latent_pi, which FlowActor.__init__ calls
        self.batch_norm_params = dict(
            batch_norm=batch_norm,
            batch_norm_momentum=batch_norm_momentum,
            batch_norm_eps=batch_norm_eps,
            renorm_warmup_steps=renorm_warmup_steps,
        )
        super().__init__(*args, **kwargs)

    def make_latent_pi(
        self, features_dim: int, net_arch: list[int], activation_fn: type[nn.Module]
    ) -> nn.Module:
        params = self.batch_norm_params
        if not params["batch_norm"]:
            return super().make_latent_pi(features_dim, net_arch, activation_fn)
        renorm = partial(
            BatchRenorm1d,
            momentum=params["batch_norm_momentum"],
            eps=params["batch_norm_eps"],
            warmup_steps=params["renorm_warmup_steps"],
        )
        layers = create_mlp(features_dim, -1, net_arch, activation_fn, pre_linear_modules=[renorm])
        if net_arch:
            layers.append(renorm(net_arch[-1]))
        return nn.Sequential(*layers)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return {**super()._get_constructor_parameters(), **self.batch_norm_params}

    def set_bn_training_mode(self, mode: bool) -> None:
        """Whether the batch-renorm layers use and update batch statistics (``True``) or use
        their running statistics (``False``)."""
        for module in self.modules():
            if isinstance(module, BatchRenorm1d):
                module.train(mode)


class FlowCrossQPolicy(FlowActorPolicyMixin, CrossQPolicy):
    """CrossQ policy with a :class:`CrossQFlowActor`: ``CrossQ(FlowCrossQPolicy, env)``.

    The batch-renormalized critics, features extractors and optimizers (Adam with
    ``betas=(0.5, 0.999)``) are sb3-contrib's :class:`~sb3_contrib.crossq.policies.CrossQPolicy`
    (its other arguments: ``net_arch``, ``batch_norm``, ``batch_norm_momentum``,
    ``renorm_warmup_steps``, ``n_critics``, ...); the batch-renorm settings apply to the actor
    too.

    :param flow_kwargs: The flow's settings on top of :data:`~flowpolicy.sb3.DEFAULT_FLOW_KWARGS`.
    :param mode_samples: Fixed base samples searched for the deterministic action.
    :param mode_bandwidth: Factor on Scott's bandwidth of the deterministic action's mass score.
    :param use_sde: Must be ``False`` (gSDE perturbs a Gaussian's mean).
    """

    actor_class = CrossQFlowActor
    actor: CrossQFlowActor

    # No Dict observations: CrossQ.train concatenates observation batches
    # (sb3-contrib has no MultiInputPolicy for it).

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        lr_schedule: Schedule,
        *args: Any,
        use_sde: bool = False,
        features_extractor_class: type[BaseFeaturesExtractor] = FlattenExtractor,
        flow_kwargs: dict[str, Any] | None = None,
        mode_samples: int = 64,
        mode_bandwidth: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(observation_space, spaces.Dict):
            raise ValueError(
                "FlowCrossQPolicy: CrossQ does not take Dict observations (its train() "
                "concatenates observation batches); flatten them with "
                "gymnasium.wrappers.FlattenObservation, or use SAC or TQC with a MultiInput "
                "flow policy"
            )
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
            *args,
            features_extractor_class=features_extractor_class,
            **kwargs,
        )


class MultiInputFlowTQCPolicy(FlowTQCPolicy):
    """:class:`FlowTQCPolicy` for Dict observations (``CombinedExtractor`` by default)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("features_extractor_class", CombinedExtractor)
        super().__init__(*args, **kwargs)
