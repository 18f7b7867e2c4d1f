r"""SAC whose actor update can be the score-function (likelihood-ratio) gradient.

SAC's actor minimizes, at each state :math:`s` of a replay batch,

.. math:: J_s(\theta) = \mathbb{E}_{a \sim \pi_\theta(\cdot \mid s)}
          \big[\alpha \log \pi_\theta(a \mid s) - Q(s, a)\big],
          \qquad Q = \min_k Q_k,

whose minimizer over all policies is the Boltzmann policy :math:`e^{Q/\alpha}/Z`. Three unbiased
estimates of :math:`\nabla_\theta J_s` are offered (``FlowSAC(actor_gradient=...)``):

* ``"reparam"``, SAC's: :math:`a = g_\theta(z)`, :math:`z \sim \mathcal{N}(0, I)`, and
  :math:`\nabla_\theta [\alpha \log\pi_\theta(g_\theta(z)) - Q(s, g_\theta(z))]`. It sees how
  the mass is shared between separated modes only through the few samples that the map sends
  between them, so at small :math:`\alpha` the split can drift until a mode is empty.
* ``"score"``: with :math:`K` actions :math:`a_1, \dots, a_K \sim \pi_\theta(\cdot \mid s)` held
  fixed, :math:`f_k = \alpha \log\pi_\theta(a_k \mid s) - Q(s, a_k)` (no gradient through it)
  and the leave-one-out baseline :math:`b_k = \frac{1}{K-1} \sum_{j \ne k} f_j`,

  .. math:: \hat g = \frac1K \sum_{k=1}^K (f_k - b_k)\,
            \nabla_\theta \log \pi_\theta(a_k \mid s).

  Unbiased: :math:`\nabla_\theta J = \mathbb{E}[f\,\nabla_\theta \log\pi_\theta]
  + \alpha\,\mathbb{E}[\nabla_\theta \log\pi_\theta]` and the second term is zero (the score
  has mean zero), as is :math:`\mathbb{E}[b_k \nabla_\theta \log\pi_\theta(a_k)]`, since
  :math:`b_k` does not depend on :math:`a_k`. Every sample carries the weights of the modes:
  a mode holding too much mass has a higher :math:`\alpha \log \pi` there. It needs no
  :math:`\nabla_a Q` and costs :math:`K` critic evaluations per state (without gradients).

For a tanh-squashed policy, :math:`a = \tanh(u)` with :math:`u = g_\theta(z) \sim q_\theta`,

.. math:: \alpha \log\pi_\theta(a) - Q(s, a) = \alpha \log q_\theta(u) + \alpha\, c(u) - Q(s, a),
          \qquad c(u) = -\textstyle\sum_i \log(1 - \tanh^2 u_i) \ge 0,

and :math:`c` is a known function of :math:`u`, like :math:`Q`. The score update takes the
score-function estimate for :math:`\alpha \log q_\theta(u) - Q` (so :math:`f_k` leaves out
:math:`\alpha c(u_k)`) and the pathwise gradient :math:`\alpha \nabla_\theta c(g_\theta(z))` for
the tanh term: both unbiased, and the second pulls samples out of the saturated tails at every
step. (With :math:`c` inside :math:`f_k` instead, the flow sometimes sent its samples to
:math:`|u|` of a hundred and more in one jump, start-state entropy -270 nats, and SAC's
automatic :math:`\alpha` and critic diverged after it: 1 of 5 LakeCrossing seeds with the
symmetry tools.) The score :math:`\nabla_\theta \log q_\theta(u_k)` is computed from the forward
pass that drew the samples (the implicit-function form, :func:`_samples_and_score_surrogate`),
not through the inverse, which float32 cannot evaluate for samples far out in a flow's tails.

* ``"combined"``: the score function for :math:`-Q` alone (:math:`f_k = -Q(s, a_k)`, same
  baseline) and SAC's pathwise gradient for all of :math:`\alpha \log \pi_\theta`. The critic
  enters only through its values at the sampled actions, so every sample still carries the
  weights of the modes; the entropy's gradient is SAC's. Why: in ``"score"`` the density's
  gradient rewards samples far out in the pre-tanh tails (low :math:`\log q`, high entropy of
  :math:`u`) while only the bounded pull of the pathwise tanh term brings them back, and on
  Pendulum-v1 that balance broke: in 20 gradient steps the largest :math:`|u|` of a batch went
  from 17 to the output bound 1000 and the entropy from -1.6 to -100 nats (after 17k steps of
  normal learning). Against the fixed symmetric critic this update keeps both modes (at least
  35% on each, 3 seeds, where ``"reparam"`` empties one at :math:`\alpha = 0.1`), so the drift
  of ``"reparam"``'s split comes from :math:`\nabla_a Q`, not from the entropy's gradient. It
  does not cure everything: on Hopper-v5 a flow trained with it still collapsed late, with
  saturated actions and a climbing :math:`\alpha`, as with ``"score"``.

The critics, the target networks and the entropy coefficient's update are SAC's. Works with
:class:`~flowpolicy.sb3.FlowPolicy` and SB3's Gaussian ``MlpPolicy`` (without gSDE), with the
symmetry tools of :mod:`flowpolicy.symmetry`, and with ``save``/``load``.

Example:
    >>> from flowpolicy import FlowPolicy
    >>> from flowpolicy.flowsac import FlowSAC
    >>> model = FlowSAC(FlowPolicy, "Pendulum-v1", actor_gradient="score", score_samples=4)
    >>> model.learn(5_000)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.type_aliases import PyTorchObs, ReplayBufferSamples
from stable_baselines3.common.utils import polyak_update
from torch import Tensor
from torch.nn import functional as F

from flowpolicy.bijectors import Tanh
from flowpolicy.distribution import FlowDistribution, squashed_gaussian

__all__ = ["ACTOR_GRADIENTS", "FlowSAC", "policy_distribution", "soft_actor_loss"]

ACTOR_GRADIENTS = ("reparam", "score", "combined")
"""The actor updates of :class:`FlowSAC` (see the module docstring)."""

# a critic as SB3's: (obs, actions) -> one (n, 1) tensor per Q-network
Critic = Callable[[PyTorchObs, Tensor], tuple[Tensor, ...]]


def policy_distribution(actor: Any, obs: PyTorchObs) -> FlowDistribution:
    r""":math:`\pi(\cdot \mid s)` over squashed actions in :math:`(-1, 1)^d`, batch ``(n,)``.

    :param actor: a :class:`~flowpolicy.sb3.FlowActor` (its ``action_distribution``), SB3's
        Gaussian SAC ``Actor`` (its tanh-squashed Gaussian, rebuilt with an exact log-density),
        or any callable mapping observations to a tanh-squashed
        :class:`~flowpolicy.distribution.FlowDistribution` (a ``ConditionalFlow(squash=True)``).
    :param obs: a batch of observations.
    """
    if hasattr(actor, "action_distribution"):
        return actor.action_distribution(obs)
    if hasattr(actor, "get_action_dist_params"):
        if getattr(actor, "use_sde", False):
            raise ValueError(
                "the score-function actor update needs the policy's log-density of given "
                "actions, which gSDE's does not give; use use_sde=False"
            )
        mean, log_std, _ = actor.get_action_dist_params(obs)
        return squashed_gaussian(mean, log_std.exp())
    if callable(actor):
        return actor(obs)
    raise TypeError(
        f"actor: expected a FlowActor, SB3's SAC Actor or a callable obs -> FlowDistribution, "
        f"got {type(actor).__name__}"
    )


def _unsquashed(dist: FlowDistribution) -> FlowDistribution:
    """The distribution of the pre-tanh value ``u`` of a tanh-squashed flow."""
    transforms = list(getattr(dist, "transforms", ()))
    if not (isinstance(dist, FlowDistribution) and transforms and isinstance(transforms[-1], Tanh)):
        raise ValueError(
            f"the score-function actor update needs a tanh-squashed FlowDistribution (FlowPolicy, "
            f"SB3's Gaussian actor, ConditionalFlow(squash=True)), got {type(dist).__name__}"
        )
    return FlowDistribution(dist.base, transforms[:-1], validate_args=False)


def _repeat(obs: PyTorchObs, times: int) -> PyTorchObs:
    """``times`` copies of the batch, one after the other (row ``k n + i`` is ``obs[i]``)."""
    if isinstance(obs, dict):
        return {key: _repeat(value, times) for key, value in obs.items()}
    return obs.repeat(times, *([1] * (obs.dim() - 1)))


def _min_q(critic: Critic, obs: PyTorchObs, actions: Tensor) -> Tensor:
    """SAC's pessimistic value :math:`\\min_k Q_k(s, a)`, shape ``(n,)``."""
    return torch.cat(tuple(critic(obs, actions)), dim=1).min(dim=1).values


def soft_actor_loss(
    actor: Any,
    critic: Critic,
    obs: PyTorchObs,
    alpha: Tensor | float,
    gradient: str = "reparam",
    samples: int = 4,
) -> tuple[Tensor, Tensor]:
    r"""A surrogate loss whose gradient estimates :math:`\frac1n \sum_s \nabla_\theta J_s` (the
    module docstring), and the log-densities of the actions drawn (for the entropy coefficient).

    :param actor: the policy (see :func:`policy_distribution`); for ``"reparam"``, an actor with
        ``action_log_prob(obs)`` (SB3's and FlowActor's) is used as SAC uses it.
    :param critic: ``critic(obs, actions)`` returning one ``(n, 1)`` tensor per Q-network
        (SB3's ``ContinuousCritic``); the minimum is taken. Its parameters get gradients only
        from ``"reparam"`` (SAC's actor optimizer leaves them alone).
    :param obs: the batch of ``n`` states.
    :param alpha: the entropy coefficient (not differentiated).
    :param gradient: one of :data:`ACTOR_GRADIENTS`.
    :param samples: :math:`K`, actions per state of ``"score"`` and ``"combined"`` (at least 2).
    :return: ``(loss, log_prob)``, ``log_prob`` detached, shape ``(n,)`` or ``(K, n)``.
    """
    if gradient == "reparam":
        if hasattr(actor, "action_log_prob"):
            actions, log_prob = actor.action_log_prob(obs)
        else:
            actions, log_prob = policy_distribution(actor, obs).rsample_and_log_prob()
        loss = (alpha * log_prob - _min_q(critic, obs, actions)).mean()
        return loss, log_prob.detach()
    if gradient not in ACTOR_GRADIENTS:
        raise ValueError(f"gradient must be one of {ACTOR_GRADIENTS}, got {gradient!r}")
    dist = _unsquashed(policy_distribution(actor, obs))
    u, log_q, score = _samples_and_score_surrogate(dist, samples)  # (K, n, d), (K, n), (K, n)
    squash = Tanh().log_abs_det_jacobian(u, None)  # log|d tanh/du|, a known function of u
    with torch.no_grad():
        actions = torch.tanh(u)
        q = _min_q(critic, _repeat(obs, samples), actions.flatten(0, 1)).view(samples, -1)
        # the part of alpha log pi - Q taken by the score function; the rest is pathwise
        cost = alpha * log_q - q if gradient == "score" else -q
        baseline = (cost.sum(0) - cost) / (samples - 1)  # the mean of the other K - 1
    # pathwise: the tanh term alone ("score"), or all of alpha log pi ("combined")
    pathwise = -squash if gradient == "score" else log_q - squash
    loss = ((cost - baseline) * score).mean() + (alpha * pathwise).mean()
    return loss, (log_q - squash).detach()


def _samples_and_score_surrogate(
    dist: FlowDistribution, samples: int
) -> tuple[Tensor, Tensor, Tensor]:
    r"""``K`` samples :math:`u = f_\theta(z)` and their log-density :math:`\ell(\theta, z) =
    \log q_\theta(f_\theta(z))` (both differentiable along the path: pathwise terms use them),
    and :math:`\log q_\theta(u)` again, whose gradient is the score :math:`\nabla_\theta \log
    q_\theta(u)` at :math:`u` held fixed, computed from the forward pass alone.

    With :math:`\ell(\theta, z) = \log q_\theta(f_\theta(z))` (the forward pass's log-density)
    and :math:`z^*(\theta) = f_\theta^{-1}(u)`, the implicit function theorem gives
    :math:`\partial_\theta z^* = -J^{-1} \partial_\theta f_\theta` with :math:`J =
    \partial f_\theta / \partial z`, so

    .. math:: \nabla_\theta \log q_\theta(u) = \partial_\theta \ell(\theta, z)
              - \lambda^\top \partial_\theta f_\theta(z), \qquad J^\top \lambda =
              \nabla_z \ell(\theta, z).

    The inverse pass would give the same in exact arithmetic, but a flow can send a few samples
    so far out (pre-tanh values in the hundreds, the actions saturated at :math:`\pm 1`, so the
    critic does not object) that float32 cannot invert them: their log-density through the
    inverse came out as -1e20 where the forward pass gives -8, and one such term made a whole
    step's loss :math:`-\infty` on LakeCrossing. Here the value is the forward pass's, and those
    samples keep their gradient, which pulls the tails back in. Cost: :math:`d + 1` backward
    passes over the samples' graph to form :math:`J` and :math:`\nabla_z \ell` (``d`` the
    action size); the :math:`d \times d` solves run in float64, by least squares where
    :math:`J` is singular in float32.
    """
    z = dist._base_rsample(torch.Size((samples,))).requires_grad_()
    u, log_q = dist.push_forward(z)
    outputs = [u[..., i].sum() for i in range(u.shape[-1])] + [log_q.sum()]
    grads = [torch.autograd.grad(y, z, retain_graph=True)[0] for y in outputs]
    jacobian, grad_z = torch.stack(grads[:-1], -2), grads[-1]  # J[..., i, j] = du_i / dz_j
    system, rhs = jacobian.double().mT, grad_z.double()
    adjoint, info = torch.linalg.solve_ex(system, rhs)
    singular = info != 0
    if singular.any():
        # J underflowed to singular in float32 (layers that compress by 1e-20 and more; seen on
        # Hopper-v5) although the log-det, a sum of logs, is finite: least squares there
        pinv = torch.linalg.pinv(system[singular])
        adjoint[singular] = (pinv @ rhs[singular].unsqueeze(-1)).squeeze(-1)
    adjoint = adjoint.to(u.dtype)
    # value log_q; gradient d_theta log_q - adjoint . d_theta u (z is not a parameter)
    return u, log_q, log_q - (adjoint * (u - u.detach())).sum(-1)


class FlowSAC(SAC):
    r"""SAC with a choice of actor update: ``FlowSAC(policy, env, actor_gradient="score")``.

    Takes every argument of SB3's :class:`~stable_baselines3.SAC`, plus:

    :param actor_gradient: ``"reparam"`` (SAC's, the default), ``"score"``, the
        likelihood-ratio gradient with a leave-one-out baseline over ``score_samples`` actions
        per state, or ``"combined"``, the likelihood ratio for the critic's term and SAC's
        pathwise gradient for the entropy's (module docstring). Saved with the model and
        restored by ``FlowSAC.load``.
    :param score_samples: :math:`K`, actions per state of ``"score"`` and ``"combined"`` (at
        least 2); the critics are evaluated on :math:`K` times the batch, without gradients. A
        larger :math:`K` lowers the variance of the baseline, not the bias (there is none). A
        gradient step of the flow on Pendulum (batch 256) cost 1.15x SAC's with ``K=4`` and
        1.86x with ``K=16`` (1.16x for ``"combined"``); forming the score costs :math:`d + 1`
        backward passes over the samples, so it grows with the action size :math:`d`.

    The entropy coefficient's update uses the log-densities of the actor update's actions (all
    :math:`K` per state with ``"score"`` and ``"combined"``), and runs after the critic and actor
    updates of the gradient step, with SAC's loss; the coefficient used by both is, as in SAC, its
    value before that update. ``train/entropy`` (mean of :math:`-\log\pi`) is logged with SAC's
    keys.
    """

    def __init__(
        self,
        policy: Any,
        env: Any,
        *args: Any,
        actor_gradient: str = "reparam",
        score_samples: int = 4,
        **kwargs: Any,
    ) -> None:
        if actor_gradient not in ACTOR_GRADIENTS:
            raise ValueError(
                f"actor_gradient must be one of {ACTOR_GRADIENTS}, got {actor_gradient!r}"
            )
        if isinstance(score_samples, bool) or not isinstance(score_samples, int):
            raise TypeError(f"score_samples must be an integer >= 2, got {score_samples!r}")
        if score_samples < 2:
            raise ValueError(
                f"score_samples must be >= 2 (the leave-one-out baseline needs another action "
                f"per state), got {score_samples}"
            )
        if actor_gradient != "reparam" and kwargs.get("use_sde", False):
            raise ValueError(
                f"actor_gradient={actor_gradient!r} needs the log-density of given actions, "
                "which gSDE's does not give; use use_sde=False"
            )
        self.actor_gradient = actor_gradient
        self.score_samples = score_samples
        super().__init__(policy, env, *args, **kwargs)

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        # SAC.train's structure (one method in SB3, so repeated here), with the actor's loss
        # from soft_actor_loss and the entropy coefficient updated from its log-densities
        self.policy.set_training_mode(True)
        optimizers = [self.actor.optimizer, self.critic.optimizer]
        if self.ent_coef_optimizer is not None:
            optimizers += [self.ent_coef_optimizer]
        self._update_learning_rate(optimizers)

        logs: dict[str, list[float]] = {}
        for gradient_step in range(gradient_steps):
            replay_data = self.replay_buffer.sample(batch_size, env=self._vec_normalize_env)  # type: ignore[union-attr]
            if self.use_sde:
                self.actor.reset_noise()
            if self.log_ent_coef is not None:
                ent_coef = torch.exp(self.log_ent_coef.detach())
            else:
                ent_coef = self.ent_coef_tensor

            critic_loss = self._critic_step(replay_data, ent_coef)
            actor_loss, log_prob = soft_actor_loss(
                self.actor,
                self.critic,
                replay_data.observations,
                ent_coef,
                self.actor_gradient,
                self.score_samples,
            )
            self.actor.optimizer.zero_grad()
            actor_loss.backward()
            self.actor.optimizer.step()

            step_logs = dict(
                ent_coef=ent_coef.item(),
                actor_loss=actor_loss.item(),
                critic_loss=critic_loss,
                entropy=-log_prob.mean().item(),
            )
            if self.ent_coef_optimizer is not None and self.log_ent_coef is not None:
                assert isinstance(self.target_entropy, float)
                ent_coef_loss = -(self.log_ent_coef * (log_prob + self.target_entropy)).mean()
                self.ent_coef_optimizer.zero_grad()
                ent_coef_loss.backward()
                self.ent_coef_optimizer.step()
                step_logs["ent_coef_loss"] = ent_coef_loss.item()
            for key, value in step_logs.items():
                logs.setdefault(key, []).append(value)

            if gradient_step % self.target_update_interval == 0:
                polyak_update(self.critic.parameters(), self.critic_target.parameters(), self.tau)
                polyak_update(self.batch_norm_stats, self.batch_norm_stats_target, 1.0)

        self._n_updates += gradient_steps
        self.logger.record("train/n_updates", self._n_updates, exclude="tensorboard")
        for key, values in logs.items():
            self.logger.record(f"train/{key}", np.mean(values))

    def _critic_step(self, replay_data: ReplayBufferSamples, ent_coef: Tensor) -> float:
        """SAC's critic update (soft TD target from the critic target); returns the loss."""
        discounts = replay_data.discounts if replay_data.discounts is not None else self.gamma
        with torch.no_grad():
            next_actions, next_log_prob = self.actor.action_log_prob(replay_data.next_observations)
            next_q = torch.cat(self.critic_target(replay_data.next_observations, next_actions), 1)
            next_q = next_q.min(dim=1, keepdim=True).values - ent_coef * next_log_prob.view(-1, 1)
            target_q = replay_data.rewards + (1 - replay_data.dones) * discounts * next_q
        current_q = self.critic(replay_data.observations, replay_data.actions)
        critic_loss = 0.5 * sum(F.mse_loss(q, target_q) for q in current_q)
        assert isinstance(critic_loss, Tensor)
        self.critic.optimizer.zero_grad()
        critic_loss.backward()
        self.critic.optimizer.step()
        return critic_loss.item()
