"""A scripted, near-optimal demonstrator for LakeCrossing, and demonstration collection.

The expert follows the geodesic around the lake on a side that it picks *independently of
the state* (fixed, or 50/50 from its own generator), so its demonstrations are genuinely
bimodal given the state: from the symmetric start, half of them go west and half go east.
That is what behaviour cloning of a multimodal policy needs to learn from.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np

from .geometry import LakeGeometry
from .lake import LakeCrossingEnv
from .rollout import check_count, rollout

__all__ = ["Demonstrations", "LakeExpert", "collect_demonstrations"]

ROUTES = ("cw", "ccw")


def _real(name: str, value: Any) -> float:
    """``value`` as a float if it is a real number (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class LakeExpert:
    r"""Follows the shortest dry path home around one chosen side of the lake, at full speed.

    With R = ``lake_radius + margin`` the path is the geodesic around the circle of radius R
    (tangent line, arc, straight line home; see :func:`flowpolicy.envs.geodesic_distance`).
    At each step the expert aims at the point one step (``max_speed``) ahead along that path
    and returns the unit vector towards it scaled by ``scale``:

        a = scale * (target - p) / |target - p|,   |a| = scale = 0.999.

    Its actions thus lie on a circle strictly inside the action box: a tanh-squashed policy
    cannot put density at exactly +-1. (The box would allow up to sqrt(2) times faster moves
    along diagonals; the expert does not use them, which costs about 3 steps on the default
    task, 4.5 reward, and keeps the two action modes clean.)

    The side is chosen per episode by :meth:`reset`: ``side="cw"`` (west of the lake, seen
    from the start looking home), ``"ccw"`` (east), or ``None``: 50/50 from the expert's own
    generator, independent of the start. The computation runs in a frame mirrored for
    ``"cw"``, so from mirrored starts the two sides produce exactly mirrored actions.

    :param env: a LakeCrossing environment (wrappers are looked through) whose
        :class:`~flowpolicy.envs.LakeGeometry` the expert follows.
    :param side: ``"cw"``, ``"ccw"`` or ``None`` (random side each episode).
    :param margin: distance kept from the shore, in world units, at least
        ``scale * (1 - scale) * max_speed**2 / lake_radius`` (2.2e-5 by default; a step aimed
        at the look-ahead point lands short of it, inside the circle, and smaller margins drown:
        ``ValueError``), and small enough that home lies outside. With the default 0.01
        the expert is 100% successful from anywhere in the arena, and the average of its two
        sides' actions, from the default start, walks into the lake in 4-5 steps (the failure of
        an averaging policy in Jang (2018)); from a margin of 0.02 on, that average
        instead stalls at the shore.
    :param scale: action norm, < 1.
    :param seed: seed of the expert's own generator (used only when ``side`` is ``None``).

    Example::

        env = gymnasium.make("LakeCrossing-v0")
        expert = LakeExpert(env, seed=0)
        obs, info = env.reset(seed=0)
        expert.reset()  # a side for this episode
        obs, reward, terminated, truncated, info = env.step(expert(obs))
        # or 10 whole episodes; rollout resets the expert before each one
        episodes = flowpolicy.envs.rollout(env, expert, 10, seed=0)
    """

    def __init__(
        self,
        env: gym.Env | LakeCrossingEnv,
        side: str | None = None,
        *,
        margin: float = 0.01,
        scale: float = 0.999,
        seed: int | np.random.SeedSequence | None = None,
    ) -> None:
        if side is not None and side not in ROUTES:
            raise ValueError(f"side must be 'cw', 'ccw' or None, got {side!r}")
        scale, margin = _real("scale", scale), _real("margin", margin)
        if not (0.0 < scale < 1.0):
            raise ValueError(f"scale must lie in (0, 1), got {scale}")
        geometry = getattr(getattr(env, "unwrapped", env), "geometry", None)
        if not isinstance(geometry, LakeGeometry):
            raise ValueError(
                f"LakeExpert needs a LakeCrossing environment (with unwrapped.geometry), got "
                f"{type(env).__name__}"
            )
        # From a point of the circle of radius R = lake_radius + margin, a step of norm `scale`
        # (< 1) towards the look-ahead point one step ahead on the circle lands short of it, at
        # up to scale (1 - scale) step^2 / (2 R) inside the circle; twice that (float32
        # observations) keeps every step dry (measured: half of it drowns 6% of episodes).
        min_margin = scale * (1.0 - scale) * geometry.max_speed**2 / geometry.lake_radius
        if not margin >= min_margin:
            raise ValueError(
                f"margin must be >= {min_margin:.3g} (with scale {scale} and max_speed "
                f"{geometry.max_speed}; smaller margins step into the lake), got {margin}"
            )
        # The same axis as the environment's route labels: u points from start to home and
        # v = u rotated clockwise points "east", the counter-clockwise side.
        self._u, self._v = geometry.axis, geometry.lateral
        self._c = geometry.lake_center
        self._hrel = geometry.home_offset
        self._radius = geometry.lake_radius + float(margin)
        self._step = geometry.max_speed
        if math.hypot(*self._hrel) <= self._radius:
            raise ValueError("margin too large: home lies within lake_radius + margin")
        self.side = side
        self.margin = margin
        self.scale = scale
        self.rng = np.random.default_rng(seed)
        self.route: str | None = side

    def reset(self) -> str:
        """Choose the side for a new episode (random 50/50 if ``side`` is None) and return it."""
        self.route = self.side if self.side is not None else ROUTES[int(self.rng.integers(2))]
        return self.route

    def __call__(self, observation: np.ndarray) -> np.ndarray:
        """The action, float32 of shape (2,), from an observation that begins with (x, y)."""
        if self.route is None:
            self.reset()
        s = 1.0 if self.route == "ccw" else -1.0
        rx = float(observation[0]) - self._c[0]
        ry = float(observation[1]) - self._c[1]
        if not (math.isfinite(rx) and math.isfinite(ry)):
            raise ValueError(
                f"LakeExpert: the observation's position must be finite, got {observation}"
            )
        u, v = self._u, self._v
        # Canonical frame: e = lateral (mirrored for "cw"), n = along the axis. In it the
        # expert always goes counter-clockwise, i.e. east.
        e = s * (rx * v[0] + ry * v[1])
        n = rx * u[0] + ry * u[1]
        he = s * (self._hrel[0] * v[0] + self._hrel[1] * v[1])
        hn = self._hrel[0] * u[0] + self._hrel[1] * u[1]
        de, dn = self._direction(e, n, he, hn)
        norm = math.hypot(de, dn)
        if norm == 0.0:
            return np.zeros(2, dtype=np.float32)
        de, dn = self.scale * de / norm, self.scale * dn / norm
        lateral = s * de
        return np.array((lateral * v[0] + dn * u[0], lateral * v[1] + dn * u[1]), dtype=np.float32)

    act = __call__

    def _direction(self, e: float, n: float, he: float, hn: float) -> tuple[float, float]:
        """Vector from p = (e, n) to the point one step ahead along the counter-clockwise path."""
        big_r, step = self._radius, self._step
        d = math.hypot(e, n)
        dh = math.hypot(he, hn)
        ah = math.acos(big_r / dh)
        ap = math.acos(big_r / d) if d > big_r else 0.0
        theta = math.atan2(abs(e * hn - n * he), e * he + n * hn)
        if theta <= ap + ah:  # home is in sight past the (enlarged) lake: go straight
            return he - e, hn - n
        phi_p = math.atan2(n, e)
        leave = math.atan2(hn, he) - ah  # where the path leaves the circle towards home
        if d > big_r:
            tangent = math.sqrt(d * d - big_r * big_r)
            if tangent >= step:  # on the tangent line: aim at its touching point
                ang = phi_p + ap
                return big_r * math.cos(ang) - e, big_r * math.sin(ang) - n
            ang0, rest = phi_p + ap, step - tangent
        else:  # within the margin: follow the circle (this also steers back out onto it)
            ang0, rest = phi_p, step
        arc_left = (leave - ang0) % (2.0 * math.pi)
        ang = ang0 + min(rest / big_r, arc_left)
        return big_r * math.cos(ang) - e, big_r * math.sin(ang) - n


@dataclass(frozen=True)
class Demonstrations:
    """Transitions from :func:`collect_demonstrations`; N transitions from E episodes.

    Per transition (length N, in episode order):

    - ``observations``, ``next_observations``: float32 (N, obs_dim).
    - ``actions``: float32 (N, 2), strictly inside (-1, 1).
    - ``rewards``: float64 (N,). ``terminated``: bool (N,) (home or lake, not the time limit).
    - ``episode_index``: int64 (N,), which episode each transition belongs to.
    - ``routes``: str (N,), the side ``"cw"``/``"ccw"`` the expert was driving on.

    Per episode (length E):

    - ``episode_returns`` float64, ``episode_lengths`` int64, ``episode_success`` bool.
    - ``episode_routes``: str, the route the environment reported at the end
      (``info["route"]``; ``"none"`` if it never passed the lake).
    """

    observations: np.ndarray
    actions: np.ndarray
    next_observations: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    episode_index: np.ndarray
    routes: np.ndarray
    episode_returns: np.ndarray
    episode_lengths: np.ndarray
    episode_success: np.ndarray
    episode_routes: np.ndarray

    def __len__(self) -> int:
        return len(self.actions)


def collect_demonstrations(
    n_episodes: int,
    seed: int,
    env_kwargs: dict[str, Any] | None = None,
    *,
    side: str | None = None,
    margin: float = 0.01,
) -> Demonstrations:
    """Roll out :class:`LakeExpert` in ``gymnasium.make("LakeCrossing-v0", **env_kwargs)``.

    The environment is reset with ``seed`` once (then continues its stream), and the expert's
    side comes from a separate generator derived from the same seed, so starts and sides are
    independent and the whole data set is reproducible from ``seed``.

    :param n_episodes: number of episodes, an integer >= 1 (``ValueError`` otherwise).
    :param seed: seed for the environment's start noise and the expert's side choice, an
        integer >= 0.
    :param env_kwargs: keyword arguments for the environment (geometry, reward weights).
    :param side: ``"cw"``/``"ccw"`` to demonstrate one side only; ``None`` for 50/50.
    :param margin: the expert's distance from the shore (see :class:`LakeExpert`).
    :return: a :class:`Demonstrations` of numpy arrays.
    """
    n_episodes = check_count("n_episodes", n_episodes, minimum=1)
    seed = check_count("seed", seed)
    env = gym.make("LakeCrossing-v0", **(env_kwargs or {}))
    env_seed, expert_seed = np.random.SeedSequence(seed).spawn(2)
    try:  # the expert checks side and margin against the environment's geometry
        expert = LakeExpert(env, side=side, margin=margin, seed=expert_seed)
    except ValueError:
        env.close()
        raise
    reset_seed = int(env_seed.generate_state(1)[0])
    episodes, sides = [], []
    for i in range(n_episodes):  # one at a time: rollout resets the expert, which picks a side
        episodes += rollout(env, expert, 1, seed=reset_seed if i == 0 else None)
        sides.append(expert.route)
    env.close()
    lengths = np.array([ep["length"] for ep in episodes], dtype=np.int64)
    terminated = np.zeros(lengths.sum(), dtype=bool)  # only an episode's last step can be
    terminated[np.cumsum(lengths) - 1] = [ep["terminated"] for ep in episodes]
    return Demonstrations(
        observations=np.concatenate([ep["observations"][:-1] for ep in episodes]),
        actions=np.concatenate([ep["actions"] for ep in episodes]),
        next_observations=np.concatenate([ep["observations"][1:] for ep in episodes]),
        rewards=np.concatenate([ep["rewards"] for ep in episodes]),
        terminated=terminated,
        episode_index=np.repeat(np.arange(n_episodes, dtype=np.int64), lengths),
        routes=np.repeat(np.asarray(sides, dtype="<U4"), lengths),
        # summed in step order (np.sum's pairwise order could differ in the last bit)
        episode_returns=np.array([ep["rewards"].cumsum()[-1] for ep in episodes]),
        episode_lengths=lengths,
        episode_success=np.array([ep["success"] for ep in episodes], dtype=bool),
        episode_routes=np.array([ep["route"] or "none" for ep in episodes], dtype="<U4"),
    )
