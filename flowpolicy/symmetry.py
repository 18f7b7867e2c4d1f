r"""Task symmetry for SAC: a reflection of the task, a replay buffer and a critic that respect it.

Many control tasks look the same in a mirror: Pendulum-v1 with the angle and the torque negated,
LakeCrossing-v0 with the position and the lateral action reflected about the lake's axis. For such
a task, with an involution :math:`M` of the observations and :math:`M_a` of the actions that keep
the dynamics and the rewards, the optimal soft value is symmetric,
:math:`Q^*(Ms, M_a a) = Q^*(s, a)`, and every transition's mirror image is as valid as the
transition itself. Three tools use this:

* :class:`Reflection`: the pair of maps (sign flips, permutations and, for observations, a shift).
* :class:`MirrorReplayBuffer`: stores each transition and its mirror image
  (``replay_buffer_class=MirrorReplayBuffer, replay_buffer_kwargs=dict(symmetry=reflection)``).
* :class:`SymmetricCritic`: :math:`Q(s, a) = \tfrac12[Q'(s, a) + Q'(Ms, M_a a)]`, symmetric by
  construction, built by :class:`SymmetricSACPolicy` and by
  :class:`~flowpolicy.sb3.FlowPolicy` when ``policy_kwargs=dict(symmetry=reflection)`` is given.
  The reflection is one of the policy's constructor arguments, so ``SAC.load`` rebuilds the same
  symmetric critic (and critic target).

Example:
    >>> reflection = Reflection(obs_sign=[1, -1, -1], action_sign=[-1])  # Pendulum-v1
    >>> model = SAC(
    ...     SymmetricSACPolicy,  # or flowpolicy.FlowPolicy
    ...     "Pendulum-v1",
    ...     policy_kwargs=dict(symmetry=reflection),
    ...     replay_buffer_class=MirrorReplayBuffer,
    ...     replay_buffer_kwargs=dict(symmetry=reflection),
    ... )

The maps act on what the networks and the buffer hold: observations as the environment returns
them (so not together with ``VecNormalize``'s observation normalization, whose running mean is not
mirror-symmetric), and actions rescaled to ``[-1, 1]`` (the same map as in the environment's units
when the action space is mapped onto itself, which :meth:`Reflection.check_spaces` verifies).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.policies import ContinuousCritic
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.sac.policies import SACPolicy
from torch import Tensor

__all__ = ["MirrorReplayBuffer", "Reflection", "SymmetricCritic", "SymmetricSACPolicy"]


def _signs(values: Any, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1 or array.size == 0 or not np.all(np.abs(array) == 1.0):
        raise ValueError(
            f"Reflection: {name}_sign must be a non-empty 1-D array of +1 and -1, got {values!r}"
        )
    return array


def _permutation(values: Any, sign: np.ndarray, name: str) -> np.ndarray | None:
    """The permutation as an index array (``None`` for the identity), checked to be made of
    swaps between entries of equal sign, so that the map applied twice is the identity."""
    if values is None:
        return None
    size, array = len(sign), np.asarray(values)
    if not (array.shape == (size,) and np.issubdtype(array.dtype, np.integer)):
        raise ValueError(f"Reflection: {name}_perm must be {size} integers, got {values!r}")
    if not np.array_equal(np.sort(array), np.arange(size)):
        raise ValueError(
            f"Reflection: {name}_perm must be a permutation of 0..{size - 1}, got {values!r}"
        )
    if not np.array_equal(array[array], np.arange(size)):
        raise ValueError(
            f"Reflection: {name}_perm {array.tolist()} applied twice is not the identity, so the "
            f"map is not a reflection (an involution); use a permutation made of swaps"
        )
    if not np.array_equal(sign[array], sign):
        raise ValueError(
            f"Reflection: {name}_sign must be equal on entries that {name}_perm swaps (else the "
            f"map applied twice flips them), got {name}_sign {sign.tolist()} and {name}_perm "
            f"{array.tolist()}"
        )
    return None if np.array_equal(array, np.arange(size)) else array.astype(np.int64)


def _shift(values: Any, sign: np.ndarray, perm: np.ndarray | None) -> np.ndarray | None:
    """The observation shift (``None`` for zero), checked to keep the map an involution."""
    if values is None:
        return None
    shift = np.asarray(values, dtype=np.float64)
    if shift.shape != sign.shape or not np.all(np.isfinite(shift)):
        raise ValueError(
            f"Reflection: obs_shift must be {len(sign)} finite numbers, got {values!r}"
        )
    if not np.any(shift != 0):
        return None
    moved = (shift if perm is None else shift[perm]) * sign + shift  # where 0 goes, twice
    if not np.allclose(moved, 0.0, rtol=0.0, atol=1e-9 * (1.0 + np.abs(shift).max())):
        raise ValueError(
            f"Reflection: with obs_shift {shift.tolist()} the observation map applied twice "
            f"moves 0 to {moved.tolist()}, so it is not a reflection; an involution needs "
            f"obs_shift[obs_perm] * obs_sign + obs_shift == 0"
        )
    return shift


class Reflection:
    r"""An involution of a task: observations :math:`s \mapsto P s \odot \sigma + c`, actions
    :math:`a \mapsto P_a a \odot \sigma_a`.

    ``obs(x) = x[..., obs_perm] * obs_sign + obs_shift`` and
    ``action(a) = a[..., action_perm] * action_sign``; both take numpy arrays or torch tensors
    with any leading batch dimensions and keep their type, dtype and device. Applied twice, each
    map is the identity (checked here: a ``ValueError`` names the failing part). Sign flips and
    permutations are exact in floating point, so with ``obs_shift`` zero (or ``None``) applying
    a map twice gives back the same bits; a non-zero shift, e.g. a mirror axis
    :math:`x \mapsto 2x_0 - x` at :math:`x_0 \neq 0`, is exact up to one rounding.

    A Reflection holds only numpy arrays: it pickles, compares (``==``) and prints.

    :param obs_sign: ``(obs_dim,)`` entries +1 or -1.
    :param action_sign: ``(action_dim,)`` entries +1 or -1.
    :param obs_shift: ``(obs_dim,)`` shift added after the sign (``None``: zero). For an
        involution, ``obs_shift[obs_perm] * obs_sign + obs_shift == 0``.
    :param obs_perm: permutation of the observation entries (``None``: identity), made of swaps.
    :param action_perm: permutation of the action entries (``None``: identity), made of swaps.

    Example:
        >>> pendulum = Reflection(obs_sign=[1, -1, -1], action_sign=[-1])  # θ -> -θ, u -> -u
        >>> lake = Reflection(obs_sign=[-1, 1], action_sign=[-1, 1], obs_shift=[2 * x0, 0])
    """

    def __init__(
        self,
        obs_sign: Any,
        action_sign: Any,
        obs_shift: Any = None,
        obs_perm: Any = None,
        action_perm: Any = None,
    ) -> None:
        self.obs_sign = _signs(obs_sign, "obs")
        self.action_sign = _signs(action_sign, "action")
        self.obs_perm = _permutation(obs_perm, self.obs_sign, "obs")
        self.action_perm = _permutation(action_perm, self.action_sign, "action")
        self.obs_shift = _shift(obs_shift, self.obs_sign, self.obs_perm)
        # torch copies of the arrays per (device, dtype), made on first use; not pickled
        self._cache: dict[tuple, tuple] = {}

    @property
    def obs_dim(self) -> int:
        return len(self.obs_sign)

    @property
    def action_dim(self) -> int:
        return len(self.action_sign)

    def _obs_parts(self) -> tuple:
        return self.obs_sign, self.obs_shift, self.obs_perm

    def _apply(self, x: Any, sign: np.ndarray, shift: np.ndarray | None, perm: np.ndarray | None):
        if x.shape[-1:] != sign.shape:
            raise ValueError(
                f"Reflection: expected values of shape (..., {len(sign)}), got {tuple(x.shape)}"
            )
        if isinstance(x, Tensor):
            sign, shift, perm = self._tensors(x, sign, shift, perm)
            out = (x if perm is None else x.index_select(-1, perm)) * sign
        else:
            x = np.asarray(x)
            dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.float64
            out = (x if perm is None else x[..., perm]) * sign.astype(dtype)
            shift = None if shift is None else shift.astype(dtype)
        return out if shift is None else out + shift

    def _tensors(self, x: Tensor, *arrays: np.ndarray | None) -> tuple:
        key = (x.device, x.dtype) + tuple(id(a) for a in arrays)
        if key not in self._cache:
            dtype = x.dtype if x.is_floating_point() else torch.float32
            self._cache[key] = tuple(
                None
                if a is None
                else torch.as_tensor(
                    a, device=x.device, dtype=torch.long if a.dtype == np.int64 else dtype
                )
                for a in arrays
            )
        return self._cache[key]

    def obs(self, x: Any) -> Any:
        """The mirror image of observations ``x`` of shape ``(..., obs_dim)``."""
        return self._apply(x, *self._obs_parts())

    def action(self, a: Any) -> Any:
        """The mirror image of actions ``a`` of shape ``(..., action_dim)``."""
        return self._apply(a, self.action_sign, None, self.action_perm)

    def check_spaces(self, observation_space: spaces.Space, action_space: spaces.Space) -> None:
        """Raise a ``ValueError`` unless the reflection fits these (flat ``Box``) spaces and maps
        the action box onto itself (so it means the same on actions rescaled to ``[-1, 1]``)."""
        for name, space, dim in (
            ("observation", observation_space, self.obs_dim),
            ("action", action_space, self.action_dim),
        ):
            if not (isinstance(space, spaces.Box) and space.shape == (dim,)):
                raise ValueError(
                    f"Reflection: the {name} space must be a Box of shape ({dim},) for a "
                    f"reflection of {name}s of size {dim}, got {space}"
                )
        low, high = (
            self.action(action_space.low.astype(np.float64)),
            self.action(action_space.high.astype(np.float64)),
        )
        if not (
            np.allclose(np.minimum(low, high), action_space.low)
            and np.allclose(np.maximum(low, high), action_space.high)
        ):
            raise ValueError(
                f"Reflection: the action map does not map the action space {action_space} onto "
                f"itself (e.g. a sign flip of an asymmetric interval); reflect the task in "
                f"coordinates where it does"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_cache"] = {}  # tensors on devices are rebuilt on use
        return state

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Reflection):
            return NotImplemented
        return all(
            (a is None and b is None) or (a is not None and b is not None and np.array_equal(a, b))
            for a, b in zip(self._key(), other._key())
        )

    def __hash__(self) -> int:
        return hash(tuple(None if a is None else a.tobytes() for a in self._key()))

    def _key(self) -> tuple:
        return self.obs_sign, self.action_sign, self.obs_shift, self.obs_perm, self.action_perm

    def __repr__(self) -> str:
        names = ("obs_sign", "action_sign", "obs_shift", "obs_perm", "action_perm")
        parts = [f"{n}={a.tolist()}" for n, a in zip(names, self._key()) if a is not None]
        return f"Reflection({', '.join(parts)})"


class MirrorReplayBuffer(ReplayBuffer):
    """A replay buffer that stores each transition and its mirror image.

    ``add(obs, next_obs, action, reward, done, infos)`` stores the transition, then
    ``(M obs, M next_obs, M_a action, reward, done)``: rewards, ends and time-outs are kept, as a
    symmetry of the task leaves them unchanged. Each call takes two of the buffer's rows, so
    ``buffer_size`` counts the mirrored transitions too. Works with any number of environments.

    :param symmetry: the task's :class:`Reflection`.
    :param args: the arguments of SB3's :class:`~stable_baselines3.common.buffers.ReplayBuffer`
        (``optimize_memory_usage`` must stay off: it stores a transition's next observation in
        the following row, which here holds the mirror image).

    Example:
        >>> SAC(policy, env, replay_buffer_class=MirrorReplayBuffer,
        ...     replay_buffer_kwargs=dict(symmetry=reflection))
    """

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: torch.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        *,
        symmetry: Reflection,
    ) -> None:
        if not isinstance(symmetry, Reflection):
            raise ValueError(f"MirrorReplayBuffer: symmetry must be a Reflection, got {symmetry!r}")
        symmetry.check_spaces(observation_space, action_space)
        if optimize_memory_usage:
            raise ValueError(
                "MirrorReplayBuffer does not support optimize_memory_usage=True (the row after a "
                "transition holds its mirror image, not its next observation)"
            )
        super().__init__(
            buffer_size,
            observation_space,
            action_space,
            device,
            n_envs=n_envs,
            optimize_memory_usage=False,
            handle_timeout_termination=handle_timeout_termination,
        )
        self.symmetry = symmetry

    def add(  # type: ignore[override]
        self,
        obs: np.ndarray,
        next_obs: np.ndarray,
        action: np.ndarray,
        reward: np.ndarray,
        done: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> None:
        super().add(obs, next_obs, action, reward, done, infos)
        mirror = self.symmetry
        super().add(
            mirror.obs(obs), mirror.obs(next_obs), mirror.action(action), reward, done, infos
        )


class SymmetricCritic(ContinuousCritic):
    r"""SB3's SAC/TD3 critic made symmetric: :math:`Q_k(s, a) = \tfrac12[Q'_k(s, a) +
    Q'_k(Ms, M_a a)]` for each of the ``n_critics`` networks :math:`Q'_k`.

    Hence :math:`Q_k(Ms, M_a a) = Q_k(s, a)`, exactly (bit for bit) when the reflection applied
    twice gives back the same inputs (sign flips, permutations, zero shift): the two terms are
    computed by two calls of the same shape, so each term's rounding does not depend on which of
    the pair came in. At a state on the mirror (:math:`Ms = s`) an action and its mirror image
    get the same value: a symmetric task's tie between two routes stays a tie, whatever the
    critic's fitting noise. The extra cost is a second forward pass of the networks.

    :param symmetry: the task's :class:`Reflection`.
    :param kwargs: the arguments of :class:`~stable_baselines3.common.policies.ContinuousCritic`.
    """

    def __init__(self, *args: Any, symmetry: Reflection, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.symmetry = symmetry

    def forward(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, ...]:
        values = super().forward(obs, actions)
        mirrored = super().forward(self.symmetry.obs(obs), self.symmetry.action(actions))
        return tuple(0.5 * (q + m) for q, m in zip(values, mirrored))

    def q1_forward(self, obs: Tensor, actions: Tensor) -> Tensor:
        value = super().q1_forward(obs, actions)
        mirrored = super().q1_forward(self.symmetry.obs(obs), self.symmetry.action(actions))
        return 0.5 * (value + mirrored)


class SymmetricSACPolicy(SACPolicy):
    """SB3's SAC policy (squashed Gaussian actor) with an optional symmetric critic.

    Takes every argument of :class:`~stable_baselines3.sac.policies.SACPolicy`, plus
    ``symmetry``: with a :class:`Reflection`, the critic and the critic target are
    :class:`SymmetricCritic` networks; without, this is SB3's ``SACPolicy``. The reflection is a
    constructor argument, saved with the model and used again by ``SAC.load``.
    :class:`~flowpolicy.sb3.FlowPolicy` derives from this class and takes the same argument.

    :param symmetry: the task's :class:`Reflection`, or ``None``.

    Example:
        >>> SAC(SymmetricSACPolicy, "Pendulum-v1", policy_kwargs=dict(symmetry=reflection))
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Box,
        *args: Any,
        symmetry: Reflection | None = None,
        **kwargs: Any,
    ) -> None:
        if symmetry is not None:
            if not isinstance(symmetry, Reflection):
                raise ValueError(
                    f"symmetry must be a flowpolicy.symmetry.Reflection, got {symmetry!r}"
                )
            symmetry.check_spaces(observation_space, action_space)
        self.symmetry = symmetry  # read by make_critic, which SACPolicy.__init__ calls
        super().__init__(observation_space, action_space, *args, **kwargs)

    def make_critic(
        self, features_extractor: BaseFeaturesExtractor | None = None
    ) -> ContinuousCritic:
        if self.symmetry is None:
            return super().make_critic(features_extractor)
        critic_kwargs = self._update_features_extractor(self.critic_kwargs, features_extractor)
        return SymmetricCritic(**critic_kwargs, symmetry=self.symmetry).to(self.device)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data["symmetry"] = self.symmetry
        # SACPolicy leaves this one out, but it changes the networks
        data["share_features_extractor"] = self.share_features_extractor
        return data
