r"""LakeCrossingGoal: LakeCrossing with a goal drawn north of the lake each episode, for HER.

The dynamics are :class:`~flowpolicy.envs.LakeCrossingEnv`'s (the agent, the lake, drowning,
the arena); the home disk moves to a goal drawn at each reset, and the observation becomes the
Dict of Gymnasium-Robotics' goal-conditioned tasks, which Stable-Baselines3's
``HerReplayBuffer`` and ``MultiInputPolicy`` expect. Registered as ``LakeCrossingGoal-v0``
when :mod:`flowpolicy.envs` is imported (``"flowpolicy:LakeCrossingGoal-v0"`` imports it first).

Example:
    >>> from stable_baselines3 import SAC, HerReplayBuffer
    >>> from flowpolicy import MultiInputFlowPolicy
    >>> model = SAC(MultiInputFlowPolicy, "LakeCrossingGoal-v0",
    ...             replay_buffer_class=HerReplayBuffer)
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from .geometry import LakeGeometry, _pair, geodesic_distance
from .lake import LakeCrossingEnv
from .rendering import FrameRenderer

__all__ = ["LakeCrossingGoalEnv"]


class LakeCrossingGoalEnv(LakeCrossingEnv):
    r"""
    ## Description

    LakeCrossing (:class:`~flowpolicy.envs.LakeCrossingEnv`) whose home is a goal drawn anew at
    every reset in a sector north of the lake, so that both routes around the lake reach it: the
    route that is shorter depends on the goal, and for goals near the start-lake axis the two
    are nearly equally good, which is where a unimodal policy averages them into the water.
    The agent, its start, the lake and drowning are LakeCrossing's; only home moves.

    ## Observation Space

    A `Dict` of three float32 `(2,)` arrays in the arena's `Box`:

    - `observation`: the agent's position (a Markov state together with the goal);
    - `achieved_goal`: the agent's position (what the agent has reached);
    - `desired_goal`: the goal, the centre of this episode's home disk.

    ## Goals

    With `c` the lake centre, `u` LakeCrossing's axis from the start to its `home` argument
    ("north") and `v` the axis rotated clockwise ("east"), goals are

    *g = c + d (cos(phi) u + sin(phi) v)*,  *d^2 ~ U(d_min^2, d_max^2)*,  *phi ~ U(-goal_angle,
    goal_angle)*,

    uniform over the annular sector `goal_distance = (d_min, d_max)` (default `(1.4, 2.0)` for a
    unit lake) and `goal_angle` (degrees, default 30). Each goal is rounded to float32 so that
    `desired_goal` is exactly the goal. `reset(options={"goal": (x, y)})` sets the goal instead
    (a home disk overlapping the lake or outside the arena raises `ValueError`).

    ## Rewards

    The reward is a function of the next position `p'` (`achieved_goal`) and the goal alone,
    as HER needs, so LakeCrossing's shaping (which depends on the previous position too) is
    off:

    *r = -step_cost + home_bonus * [|p' - g| <= home_radius and p' dry] - lake_penalty * [p'
    in the lake] - distance_weight * phi_g(p')*

    with `phi_g(p')` the length of the shortest dry path from `p'` into the goal disk
    (LakeCrossing's potential for home at `g`). With the defaults, `distance_weight = 0`: `-1`
    per step, `0` on reaching the goal (Gymnasium-Robotics' sparse convention) and `-51` on
    drowning:
    `lake_penalty = 50` exceeds `1 / (1 - gamma)` for `gamma <= 0.98`, the discounted cost of
    wandering forever, so drowning never pays as a way to stop the step cost.
    `distance_weight > 0` adds a dense term, as Gymnasium-Robotics' `reward_type="dense"` (minus
    the distance), with the distance around the lake. Keep it small: an agent that stays put
    pays `step_cost + distance_weight * phi` per step, and once that exceeds
    `(1 - gamma) * (lake_penalty + step_cost)`, walking into the lake is worth more to the
    critic than waiting (with `gamma = 0.95` and `phi` up to 4 in the default sector,
    `distance_weight <= 0.35`). :meth:`compute_reward` gives the same reward for batches of
    goals.

    ## Episode End

    LakeCrossing's: termination in the goal disk (`info["success"]`, `info["is_success"]`) or
    in the lake (`info["drowned"]`); truncation after `max_episode_steps = 60` steps when made
    with `gymnasium.make("LakeCrossingGoal-v0")`. `info["route"]` is `"ccw"` or `"cw"` after
    crossing the line through the lake centre perpendicular to the start-goal line east or
    west of the centre (LakeCrossing's route label, for this episode's goal).

    ## Arguments

    `goal_distance`, `goal_angle`, `distance_weight` and the reward weights above, and
    LakeCrossing's layout arguments (`lake_center`, `lake_radius`, `start`, `home`, which sets
    "north", `home_radius`, the goal tolerance, `max_speed`, `start_noise`, `arena_half_size`,
    `render_size`).
    """

    def __init__(
        self,
        render_mode: str | None = None,
        *,
        goal_distance: Sequence[float] = (1.4, 2.0),
        goal_angle: float = 30.0,
        step_cost: float = 1.0,
        home_bonus: float = 1.0,
        lake_penalty: float = 50.0,
        distance_weight: float = 0.0,
        **layout: Any,
    ) -> None:
        if "shaping_weight" in layout:
            raise ValueError(
                "LakeCrossingGoal has no shaping_weight: HER recomputes rewards from "
                "(achieved_goal, desired_goal) alone, and the shaping needs the previous "
                "position; use LakeCrossing-v0 for a shaped reward"
            )
        super().__init__(
            render_mode,
            step_cost=step_cost,
            shaping_weight=0.0,
            home_bonus=home_bonus,
            lake_penalty=lake_penalty,
            **layout,
        )
        self._layout = self.geometry  # the layout goals are drawn around; home moves per episode
        d_min, d_max = _pair(goal_distance, "goal_distance")
        angle = float(goal_angle)
        if not (0.0 < d_min <= d_max):
            raise ValueError(
                f"goal_distance must be (d_min, d_max) with 0 < d_min <= d_max, got "
                f"{goal_distance!r}"
            )
        if not (math.isfinite(angle) and 0.0 <= angle < 90.0):
            raise ValueError(
                f"goal_angle must be in [0, 90) degrees (goals north of the lake), got "
                f"{goal_angle!r}"
            )
        weight = float(distance_weight)
        if not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(
                f"distance_weight must be a finite number >= 0, got {distance_weight!r}"
            )
        self.distance_weight = weight
        self.goal_distance = (d_min, d_max)
        self.goal_angle = angle
        # the sector's corners must be valid homes (dry, in the arena): checked once here
        for d in (d_min, d_max):
            for phi in (-angle, 0.0, angle):
                self._with_goal(self._sector_point(d, math.radians(phi)), "goal_distance")
        box = self.observation_space
        self.observation_space = spaces.Dict(
            {key: box for key in ("observation", "achieved_goal", "desired_goal")}
        )
        self.goal = np.array(self.geometry.home)

    def _sector_point(self, d: float, phi: float) -> tuple[float, float]:
        (cx, cy), (ux, uy), (vx, vy) = (
            self._layout.lake_center,
            self._layout.axis,
            self._layout.lateral,
        )
        c, s = math.cos(phi), math.sin(phi)
        return cx + d * (c * ux + s * vx), cy + d * (c * uy + s * vy)

    def _with_goal(self, goal: tuple[float, float], name: str) -> LakeGeometry:
        """The layout with home at ``goal``, a ValueError naming ``name`` if it is invalid."""
        try:
            return dataclasses.replace(self._layout, home=goal)
        except ValueError as error:
            raise ValueError(f"{name}: goal {list(goal)} is not a valid home: {error}") from None

    def sample_goal(self) -> np.ndarray:
        """A goal drawn from the sector with ``np_random`` (float32 values, as float64)."""
        d_min, d_max = self.goal_distance
        d = math.sqrt(self.np_random.uniform(d_min * d_min, d_max * d_max))
        phi = math.radians(self.np_random.uniform(-self.goal_angle, self.goal_angle))
        return np.asarray(self._sector_point(d, phi), dtype=np.float32).astype(np.float64)

    def _observation(self, position: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "observation": position,
            "achieved_goal": position.copy(),
            "desired_goal": self.goal.astype(np.float32),
        }

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Draw a goal and start a new episode.

        :param seed: seeds ``np_random`` (the goal and the start noise) as in Gymnasium.
        :param options: ``{"goal": (x, y)}`` sets the goal, ``{"start": (x, y)}`` the start
            (LakeCrossing's); other keys raise ``ValueError``.
        """
        # seed first, so that the goal comes from the seeded stream; the parent's reset then
        # gets seed=None and continues that stream
        super(LakeCrossingEnv, self).reset(seed=seed)
        options = dict(options or {})
        if options.get("goal") is not None:
            goal = _pair(options.pop("goal"), "options['goal']")
        else:
            options.pop("goal", None)
            goal = tuple(self.sample_goal())
        self.geometry = self._with_goal(goal, "options['goal']")
        self.goal = np.array(self.geometry.home)
        if self.render_mode is not None:  # home moved: a new background
            self._renderer = FrameRenderer(self.geometry, self.render_size)
        position, info = super().reset(options=options)
        return self._observation(position), info

    def step(
        self, action: np.ndarray
    ) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        position, reward, terminated, truncated, info = super().step(action)
        if self.distance_weight > 0.0:
            reward -= self.distance_weight * self._phi  # the parent's potential for home = goal
        return self._observation(position), reward, terminated, truncated, info

    def compute_reward(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """The step's reward for next positions ``achieved_goal`` and goals ``desired_goal``.

        Vectorized over leading dimensions, ``(..., 2)`` -> ``(...)`` (float64), as
        ``HerReplayBuffer`` calls it with relabelled goals; ``info`` is not needed.
        """
        p = np.asarray(achieved_goal, dtype=np.float64)
        g = np.asarray(desired_goal, dtype=np.float64)
        if p.shape[-1:] != (2,) or g.shape[-1:] != (2,):
            raise ValueError(
                f"compute_reward: achieved_goal and desired_goal must end in a dimension of 2 "
                f"(x, y), got shapes {p.shape} and {g.shape}"
            )
        layout = self._layout
        r = p - np.asarray(layout.lake_center)
        drowned = np.einsum("...i,...i->...", r, r) < layout.lake_radius**2
        d = p - g
        success = ~drowned & (np.einsum("...i,...i->...", d, d) <= layout.home_radius**2)
        reward = -self.step_cost + self.home_bonus * success - self.lake_penalty * drowned
        if self.distance_weight > 0.0:
            reward = reward - self.distance_weight * self._goal_distances(p, g)
        return reward

    def _goal_distances(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        """phi_g(p) = max(0, geodesic(p, g) - home_radius) for each pair, shape ``(...)``."""
        layout = self._layout
        shape = np.broadcast_shapes(p.shape, g.shape)
        pairs = zip(
            np.broadcast_to(p, shape).reshape(-1, 2), np.broadcast_to(g, shape).reshape(-1, 2)
        )
        center, radius, tolerance = layout.lake_center, layout.lake_radius, layout.home_radius
        flat = [max(0.0, geodesic_distance(a, b, center, radius) - tolerance) for a, b in pairs]
        return np.asarray(flat, dtype=np.float64).reshape(shape[:-1])
