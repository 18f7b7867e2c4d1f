r"""LakeCrossingGoal: LakeCrossing with a goal drawn north of the lake each episode, for HER.

The dynamics are :class:`~flowpolicy.envs.LakeCrossingEnv`'s (the agent, the lake, drowning,
the arena); the home disk moves to a goal drawn at each reset, and the observation becomes the
Dict of Gymnasium-Robotics' goal-conditioned tasks, which Stable-Baselines3's
``HerReplayBuffer`` and ``MultiInputPolicy`` expect. Registered as ``LakeCrossingGoal-v0``
when :mod:`flowpolicy.envs` is imported (``"flowpolicy:LakeCrossingGoal-v0"`` imports it first).

Example:
    >>> from stable_baselines3 import SAC, HerReplayBuffer
    >>> from flowpolicy import MultiInputFlowPolicy
    >>> model = SAC(MultiInputFlowPolicy, "LakeCrossingGoal-v0", gamma=0.9,
    ...             replay_buffer_class=HerReplayBuffer,
    ...             replay_buffer_kwargs=dict(copy_info_dict=True))
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from gymnasium import spaces

from .geometry import LakeGeometry, _pair, geodesic_distances
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
    unit lake) and `goal_angle` (degrees, default 30). `reset(options={"goal": (x, y)})` sets
    the goal instead (a home disk overlapping the lake or outside the arena raises
    `ValueError`). Each goal, drawn or given, is rounded to float32 so that `desired_goal` is
    exactly the goal.

    ## Rewards

    LakeCrossing's reward, with this episode's goal as home. With `p` the position before and
    `p'` after the step:

    *r = -step_cost + shaping_weight * (phi_g(p) - phi_g(p')) + home_bonus * [|p' - g| <=
    home_radius and p' dry] - lake_penalty * [p' in the lake]*

    with `phi_g` the length of the shortest dry path into the goal disk (LakeCrossing's
    potential for home at `g`). The defaults are LakeCrossing's (`step_cost = 1.5`,
    `shaping_weight = 20`, `lake_penalty = 25`) except `home_bonus = 1.5 = step_cost`, so that
    a step that ends in the goal disk earns exactly `0` (the shaping is `0` there too). HER
    relabels a stored transition with a goal reached later in its episode but keeps the
    stored `terminated` flag, so relabelled transitions can end in a goal disk and carry on;
    with a reward of `0` there, carrying on is worth what termination is worth (`0`), whereas
    a large bonus would be paid again at every relabelled step spent in the disk. A return
    from the default start along the geodesic (23 steps) is about
    `20 * 3.35 + 1.5 - 1.5 * 23 = 34`; drowning costs `lake_penalty`, and waiting forever
    costs `step_cost / (1 - gamma) = 15` at `gamma = 0.9`, less than drowning.

    The shaping needs `p`, which is not in (`achieved_goal`, `desired_goal`): the step puts it
    in `info["previous_position"]`, and :meth:`compute_reward` reads it from `info` (one dict,
    or an array of dicts for a batch). With `HerReplayBuffer`, pass
    `replay_buffer_kwargs=dict(copy_info_dict=True)` so that it hands the infos over (without
    them `compute_reward` raises `ValueError` saying so). `shaping_weight = 0` gives the
    sparse reward (`-1.5` per step, `0` on reaching the goal, `-26.5` on drowning), which
    needs no info but learns far slower: random actions from the start drown in about 60% of
    episodes and never come within `home_radius` of a goal in the sector, so HER's
    relabelled goals all lie close to the start.

    ## Episode End

    LakeCrossing's: termination in the goal disk (`info["success"]`, `info["is_success"]`) or
    in the lake (`info["drowned"]`); truncation after `max_episode_steps = 60` steps when made
    with `gymnasium.make("LakeCrossingGoal-v0")`. `info["route"]` is `"ccw"` or `"cw"` after
    crossing the line through the lake centre perpendicular to the start-goal line east or
    west of the centre (LakeCrossing's route label, for this episode's goal).

    ## Arguments

    `goal_distance`, `goal_angle`, the reward weights above, and
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
        step_cost: float = 1.5,
        shaping_weight: float = 20.0,
        home_bonus: float = 1.5,
        lake_penalty: float = 25.0,
        **layout: Any,
    ) -> None:
        super().__init__(
            render_mode,
            step_cost=step_cost,
            shaping_weight=shaping_weight,
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
            # rounded as the drawn goals are, so that desired_goal is exactly the goal
            goal = tuple(np.asarray(goal, dtype=np.float32).astype(np.float64).tolist())
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
        # the position before the step, as the float32 observation had it: compute_reward reads
        # it from info, since the shaping term needs it and HER passes only info along
        previous = np.array((self._x, self._y), dtype=np.float32)
        position, _, terminated, truncated, info = super().step(action)
        info["previous_position"] = previous
        observation = self._observation(position)
        # the reward from the float32 positions and goal that HER stores, so that relabelling
        # a transition with its own goal gives back exactly this reward
        reward = float(self.compute_reward(observation["achieved_goal"], self.goal, info))
        return observation, reward, terminated, truncated, info

    def compute_reward(
        self, achieved_goal: np.ndarray, desired_goal: np.ndarray, info: Any = None
    ) -> np.ndarray:
        """The step's reward for next positions ``achieved_goal`` and goals ``desired_goal``.

        Vectorized over leading dimensions, ``(..., 2)`` -> ``(...)`` (float64), as
        ``HerReplayBuffer`` calls it with relabelled goals. With ``shaping_weight > 0``,
        ``info`` must carry the step's ``"previous_position"``: one info dict (a single step) or
        an array of them shaped as the leading dimensions, which ``HerReplayBuffer`` passes
        with ``copy_info_dict=True``.
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
        if self.shaping_weight > 0.0:
            before = self._previous_positions(info, np.broadcast_shapes(p.shape, g.shape))
            reward = reward + self.shaping_weight * (
                self._goal_distances(before, g) - self._goal_distances(p, g)
            )
        return reward

    def _previous_positions(self, info: Any, shape: tuple[int, ...]) -> np.ndarray:
        """``info["previous_position"]`` of each step, shape ``shape`` (``(..., 2)``)."""
        infos = np.asarray(info if not isinstance(info, dict) else [info], dtype=object)
        try:
            flat = [step["previous_position"] for step in infos.reshape(-1)]
        except (KeyError, TypeError):
            flat = None
        if not flat or len(flat) * 2 != math.prod(shape):
            raise ValueError(
                "compute_reward: the shaped reward (shaping_weight > 0) needs each step's "
                "info['previous_position']; pass the step infos (with HerReplayBuffer: "
                "replay_buffer_kwargs=dict(copy_info_dict=True)), or make the environment "
                "with shaping_weight=0 for the sparse reward"
            )
        return np.asarray(flat, dtype=np.float64).reshape(shape)

    def _goal_distances(self, p: np.ndarray, g: np.ndarray) -> np.ndarray:
        """phi_g(p) = max(0, geodesic(p, g) - home_radius) for each pair, shape ``(...)``
        (batched: HER calls this twice per gradient step)."""
        layout = self._layout
        geodesic = geodesic_distances(p, g, layout.lake_center, layout.lake_radius)
        return np.maximum(geodesic - layout.home_radius, 0.0)
