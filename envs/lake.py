"""LakeCrossing: a 2-D navigation task whose best first action is bimodal.

A point agent must get home across a frozen-over lake it cannot enter. Going around the lake
clockwise or counter-clockwise is equally good (the task is exactly mirror-symmetric), and a
policy that averages the two routes walks straight into the water. This is the motivating
example of Eric Jang's normalizing-flows tutorial (2018), made into a Gymnasium environment.

Registered as ``LakeCrossing-v0`` when :mod:`flowpolicy.envs` (or :mod:`flowpolicy`) is imported.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import logger, spaces

__all__ = ["LakeCrossingEnv", "geodesic_distance"]


def _geodesic(px: float, py: float, qx: float, qy: float, r: float) -> float:
    """Shortest-path length from p to q around the disk |z| < r (coordinates relative to it).

    Both points are assumed outside the open disk (|p|, |q| >= r). The straight segment is the
    shortest path when it does not cut the disk, which happens exactly when the angle theta
    between p and q seen from the centre satisfies theta <= acos(r/|p|) + acos(r/|q|) (each term
    is the angle between a point and its tangent points). Otherwise the path is
    tangent + arc + tangent:

        sqrt(|p|^2 - r^2) + sqrt(|q|^2 - r^2) + r * (theta - acos(r/|p|) - acos(r/|q|)).
    """
    dp = math.sqrt(px * px + py * py)
    dq = math.sqrt(qx * qx + qy * qy)
    # atan2 of (|cross|, dot) is accurate at all angles and exactly mirror-symmetric.
    theta = math.atan2(abs(px * qy - py * qx), px * qx + py * qy)
    ap = math.acos(min(r / dp, 1.0))
    aq = math.acos(min(r / dq, 1.0))
    if theta <= ap + aq:
        return math.hypot(px - qx, py - qy)
    return (
        math.sqrt(max(dp * dp - r * r, 0.0))
        + math.sqrt(max(dq * dq - r * r, 0.0))
        + r * (theta - ap - aq)
    )


def _project_out(px: float, py: float, r: float, qx: float, qy: float) -> tuple[float, float]:
    """Project a point inside the disk radially onto the shore (the centre: opposite q)."""
    d = math.sqrt(px * px + py * py)
    if d >= r:
        return px, py
    if d == 0.0:  # any shore point is as close; take the one opposite q, which is symmetric
        dq = math.sqrt(qx * qx + qy * qy)
        return -qx * r / dq, -qy * r / dq
    return px * r / d, py * r / d


def geodesic_distance(
    point: Sequence[float] | np.ndarray,
    target: Sequence[float] | np.ndarray,
    center: Sequence[float] | np.ndarray = (0.0, 0.0),
    radius: float = 1.0,
) -> float:
    """Length of the shortest path from ``point`` to ``target`` that does not enter a disk.

    The disk is ``|z - center| < radius``. With p, q the points relative to the centre and
    theta the angle between them, the distance is |p - q| when the segment clears the disk
    (theta <= acos(r/|p|) + acos(r/|q|)), and otherwise

        sqrt(|p|^2 - r^2) + sqrt(|q|^2 - r^2) + r * (theta - acos(r/|p|) - acos(r/|q|))

    (tangent line, arc along the shore, tangent line). A point inside the disk is first
    projected radially onto the shore, which keeps the function continuous.

    :param point: (x, y) start of the path.
    :param target: (x, y) end of the path.
    :param center: (x, y) centre of the disk.
    :param radius: radius of the disk, > 0.
    :return: the geodesic distance, a Python float.
    """
    cx, cy = float(center[0]), float(center[1])
    qx, qy = float(target[0]) - cx, float(target[1]) - cy
    r = float(radius)
    px, py = _project_out(float(point[0]) - cx, float(point[1]) - cy, r, qx, qy)
    qx, qy = _project_out(qx, qy, r, px, py)
    return _geodesic(px, py, qx, qy, r)


def _pair(value: Any, name: str) -> tuple[float, float]:
    """Validate a finite (x, y) pair and return it as Python floats."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (2,):
        raise ValueError(f"{name} must be an (x, y) pair, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return float(arr[0]), float(arr[1])


class LakeCrossingEnv(gym.Env[np.ndarray, np.ndarray]):
    r"""
    ## Description

    A point agent starts just south of a circular lake and must reach its home, a disk north of
    the lake. It moves by choosing a velocity; stepping into the lake drowns it. The start, the
    lake centre and home lie on one north-south line, so the task is exactly mirror-symmetric
    about that line: going around the lake on the west (clockwise) or on the east
    (counter-clockwise) is equally good. The start is so close to the shore that the action
    between the two routes, straight ahead, drowns within two steps, so a policy that averages
    the routes fails. This is the motivating example of Jang's normalizing-flows tutorial (2018).

    All lengths are in world units; the default lake is the unit disk at the origin.

    ## Action Space

    The action is a `ndarray` of shape `(2,)`, a velocity, in `Box(-1, 1, (2,), float32)`:

    | Num | Action            | Min  | Max |
    |-----|-------------------|------|-----|
    | 0   | velocity along x  | -1.0 | 1.0 |
    | 1   | velocity along y  | -1.0 | 1.0 |

    The position moves by `max_speed * clip(action, -1, 1)` per step (so up to `sqrt(2) *
    max_speed` along a diagonal). A non-finite action or one of the wrong shape raises
    `ValueError`.

    ## Observation Space

    The observation is a float32 `ndarray` of shape `(2,)`, the agent's position in world units:

    | Num | Observation | Min                         | Max                         |
    |-----|-------------|-----------------------------|-----------------------------|
    | 0   | x           | `lake_center[0] - arena_half_size` | `lake_center[0] + arena_half_size` |
    | 1   | y           | `lake_center[1] - arena_half_size` | `lake_center[1] + arena_half_size` |

    Nothing else is observed: the position is a Markov state, and any extra feature would have
    to respect the mirror symmetry.

    ## Rewards

    With `p` the position before and `p'` after the step:

    *r = -step_cost + shaping_weight * (phi(p) - phi(p')) + home_bonus * [success]
    - lake_penalty * [drowned]*

    - `step_cost = 1.5` per step. It exceeds `alpha * log(4) = 1.39`, the entropy bonus that
      SAC, starting at `alpha = 1`, pays per step for a uniform action on the action square,
      so hovering never pays (with a step cost of 0.5, two of three SAC seeds learned to
      hover away from the shore and never got home in 15k steps).
    - `phi(p) = max(0, g(p) - home_radius)` is the geodesic distance from `p` to the home disk
      around the lake, where `g` is the shortest-path length to the home centre that does not
      enter the lake (tangent line, arc along the shore, tangent line; see
      `geodesic_distance`). `phi` is symmetric under the mirror and `phi = 0` inside home. A
      drowned agent's `phi` is that of the shore point radially outward of it.
    - `shaping_weight = 20`: the shaping is potential-based in the gamma-free form
      `c * (phi(p) - phi(p'))`, so over an episode it sums to `c * (phi(start) - phi(end))`.
      Every successful episode ends at `phi = 0` and receives exactly `c * phi(start)`, so the
      shaping changes no ranking between successful episodes; a drowned episode returns at
      most `-lake_penalty + c * phi(start)`, less than any successful one (at least
      `home_bonus + c * phi(start) - 60 * step_cost`), so no optimal policy changes either.
      Moving along the geodesic at speed `max_speed` earns `20 * 0.15 = 3` per step.
    - `home_bonus = 100` on reaching home, `lake_penalty = 25` on drowning. The penalty is
      deliberately moderate: drowning also forfeits the home bonus, and with the start 0.25
      from the shore, early random episodes drown within a few steps, so the critic learns
      the penalty long before it learns what hovering costs. With a penalty of 100, two of
      three SAC seeds fled south and hovered at the arena's edge for all 15k steps.

    These are the "x10" reward scale: with rewards ten times smaller, SAC's initial entropy bonus
    outweighed the task and the agent hovered at the start. From the default start, following
    the geodesic at speed `max_speed` takes 23 steps and returns about
    `100 + 20 * 3.35 - 1.5 * 23 = 132.5` (moving diagonally, up to `sqrt(2)` times faster, can
    save a few steps). Walking straight ahead into the lake returns about `-26`, hovering
    until the time limit `-90`: an agent that has not found home yet gains nothing by
    standing still.

    ## Starting State

    The agent starts at `start = (0, -1.25)`, 0.25 from the shore, plus a uniform offset in
    `[-start_noise, start_noise]` with `start_noise = 0.05` **along the start-home axis only**
    (drawn from `np_random`): noise across the axis would reveal which side is closer and make
    the state no longer ambiguous. `reset(options={"start": (x, y)})` starts exactly at
    `(x, y)` instead; a start inside the lake, inside home or outside the arena raises
    `ValueError`.

    ## Episode End

    - Termination: the agent is inside the lake (`|p - lake_center| < lake_radius`, checked at
      the position after each step), `info["drowned"]`; or it is home
      (`|p - home| <= home_radius`), `info["success"]`.
    - Truncation: after `max_episode_steps = 60` steps when made with
      `gymnasium.make("LakeCrossing-v0")` (the geodesic at speed `max_speed` takes 23).
    - The arena is the square `lake_center ± arena_half_size`; a step that would leave it is
      clipped to its edge (no termination, the step cost keeps running).

    `info` on every step has `success` (bool), `drowned` (bool), `is_success` (= `success`,
    read by SB3's `EvalCallback`) and `route`: `None` until the agent, outside the lake,
    first crosses the lake's equator (the line through `lake_center` perpendicular to the
    start-home axis, `y = 0` by default) going north; then `"ccw"` if it crossed east of the
    centre (`x > 0`: counter-clockwise around the lake from south to north) or `"cw"` if west
    (`x < 0`). The route then stays fixed for the episode.

    ## Arguments

    ```python
    >>> import gymnasium as gym
    >>> import flowpolicy.envs
    >>> env = gym.make("LakeCrossing-v0", render_mode="rgb_array", max_speed=0.15)
    >>> obs, info = env.reset(seed=0, options={"start": (0.0, -1.25)})
    >>> obs
    array([ 0.  , -1.25], dtype=float32)

    ```

    - `render_mode`: `None`, `"rgb_array"` (returns an HxWx3 uint8 frame) or `"human"`
      (matplotlib window).
    - `lake_center = (0, 0)`, `lake_radius = 1.0`: the lake, an open disk.
    - `start = (0, -1.25)`: default start, 0.25 south of the shore (straight ahead at full
      speed drowns at the second step).
    - `home = (0, 1.6)`, `home_radius = 0.25`: the home disk, 0.35 north of the shore.
    - `max_speed = 0.15`: displacement per step for an action component of 1.
    - `start_noise = 0.05`: half-width of the uniform start offset along the axis.
    - `arena_half_size = 3.0`: half-width of the square arena around the lake centre.
    - `step_cost = 1.5`, `shaping_weight = 20.0`, `home_bonus = 100.0`,
      `lake_penalty = 25.0`: the reward weights above.
    - `render_size = 400`: side of the rendered frame in pixels.

    Public attributes: `lake_center`, `lake_radius`, `start`, `home` (float64 arrays or
    floats), `home_radius`, `max_speed`, `start_noise`, `arena_half_size` and the reward
    weights; `position` is the current position. The task is mirror-symmetric whenever `start`
    and `home` lie on a line through `lake_center` (and the arena is centred on the lake).

    ## Version History

    * v0: Initial version.
    """

    metadata = {"render_modes": ["human", "rgb_array"], "render_fps": 15}

    def __init__(
        self,
        render_mode: str | None = None,
        *,
        lake_center: Sequence[float] = (0.0, 0.0),
        lake_radius: float = 1.0,
        start: Sequence[float] = (0.0, -1.25),
        home: Sequence[float] = (0.0, 1.6),
        home_radius: float = 0.25,
        max_speed: float = 0.15,
        start_noise: float = 0.05,
        arena_half_size: float = 3.0,
        step_cost: float = 1.5,
        shaping_weight: float = 20.0,
        home_bonus: float = 100.0,
        lake_penalty: float = 25.0,
        render_size: int = 400,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be None or one of {self.metadata['render_modes']}, "
                f"got {render_mode!r}"
            )
        self.render_mode = render_mode

        scalars = {
            "lake_radius": lake_radius,
            "home_radius": home_radius,
            "max_speed": max_speed,
            "arena_half_size": arena_half_size,
        }
        for name, value in scalars.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be finite and > 0, got {value}")
        weights = {
            "start_noise": start_noise,
            "step_cost": step_cost,
            "shaping_weight": shaping_weight,
            "home_bonus": home_bonus,
            "lake_penalty": lake_penalty,
        }
        for name, value in weights.items():
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be finite and >= 0, got {value}")

        cx, cy = _pair(lake_center, "lake_center")
        hx, hy = _pair(home, "home")
        sx, sy = _pair(start, "start")
        self.lake_center = np.array([cx, cy])
        self.lake_radius = float(lake_radius)
        self.home = np.array([hx, hy])
        self.home_radius = float(home_radius)
        self.max_speed = float(max_speed)
        self.arena_half_size = float(arena_half_size)
        self.start_noise = float(start_noise)
        self.step_cost = float(step_cost)
        self.shaping_weight = float(shaping_weight)
        self.home_bonus = float(home_bonus)
        self.lake_penalty = float(lake_penalty)
        self.render_size = int(render_size)
        if self.render_size < 16:
            raise ValueError(f"render_size must be >= 16 pixels, got {render_size}")

        # Core geometry as plain floats relative to the lake centre: step() runs on Python
        # floats and math, which is several times faster than small-array numpy.
        self._c = (cx, cy)
        self._r = self.lake_radius
        self._r2 = self._r * self._r
        self._h = (hx - cx, hy - cy)
        self._hr2 = self.home_radius * self.home_radius
        self._lo = (cx - self.arena_half_size, cy - self.arena_half_size)
        self._hi = (cx + self.arena_half_size, cy + self.arena_half_size)

        home_dist = math.hypot(*self._h)
        if home_dist <= self._r + self.home_radius:
            raise ValueError(
                f"the home disk (centre {self.home.tolist()}, radius {self.home_radius}) "
                f"overlaps the lake (centre {self.lake_center.tolist()}, radius {self._r})"
            )
        if not self._in_arena(hx, hy):
            raise ValueError(f"home {self.home.tolist()} lies outside the arena")
        # Precomputed home terms of the geodesic (see _geodesic): the home is fixed.
        self._h_dist = home_dist
        self._h_tan = math.sqrt(home_dist * home_dist - self._r2)
        self._h_ang = math.acos(self._r / home_dist)

        # Start-home axis u (route "north") and its clockwise normal v (route "east").
        ax, ay = hx - sx, hy - sy
        norm = math.hypot(ax, ay)
        if norm == 0.0:
            raise ValueError("start and home must differ")
        self._u = (ax / norm, ay / norm)
        self._v = (self._u[1], -self._u[0])
        self._check_start(sx, sy, "start")
        for sign in (-1.0, 1.0):  # the noisy starts must be valid too
            nx = sx + sign * self.start_noise * self._u[0]
            ny = sy + sign * self.start_noise * self._u[1]
            self._check_start(nx, ny, "start ± start_noise")
        self.start = np.array([sx, sy])

        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(
            low=np.array(self._lo, dtype=np.float32),
            high=np.array(self._hi, dtype=np.float32),
            dtype=np.float32,
        )

        self._x, self._y = sx, sy
        self._phi = self._potential(sx, sy)
        self._along = self._along_of(sx, sy)
        self._route: str | None = None
        # Rendering state (only touched when render_mode is set).
        self._trail: list[tuple[float, float]] = []
        self._background: np.ndarray | None = None
        self._canvas: np.ndarray | None = None
        self._drawn = 0
        self._fig: Any = None
        self._image: Any = None

    # ------------------------------------------------------------------ geometry helpers

    def _in_arena(self, x: float, y: float) -> bool:
        return self._lo[0] <= x <= self._hi[0] and self._lo[1] <= y <= self._hi[1]

    def _along_of(self, x: float, y: float) -> float:
        return (x - self._c[0]) * self._u[0] + (y - self._c[1]) * self._u[1]

    def _check_start(self, x: float, y: float, name: str) -> None:
        if not self._in_arena(x, y):
            raise ValueError(
                f"{name} ({x}, {y}) lies outside the arena "
                f"[{self._lo[0]}, {self._hi[0]}] x [{self._lo[1]}, {self._hi[1]}]"
            )
        rx, ry = x - self._c[0], y - self._c[1]
        if rx * rx + ry * ry < self._r2:
            raise ValueError(f"{name} ({x}, {y}) lies inside the lake")
        dx, dy = rx - self._h[0], ry - self._h[1]
        if dx * dx + dy * dy <= self._hr2:
            raise ValueError(f"{name} ({x}, {y}) lies inside home")

    def _potential(self, x: float, y: float) -> float:
        """phi = max(0, geodesic distance to the home centre - home_radius), see the docstring."""
        px, py = x - self._c[0], y - self._c[1]
        r = self._r
        hx, hy = self._h
        d2 = px * px + py * py
        if d2 < self._r2:  # drowned: use the shore point radially outward
            px, py = _project_out(px, py, r, hx, hy)
            d2 = self._r2
        d = math.sqrt(d2)
        theta = math.atan2(abs(px * hy - py * hx), px * hx + py * hy)
        ap = math.acos(min(r / d, 1.0))
        if theta <= ap + self._h_ang:
            g = math.hypot(px - hx, py - hy)
        else:
            g = math.sqrt(max(d2 - self._r2, 0.0)) + self._h_tan + r * (theta - ap - self._h_ang)
        g -= self.home_radius
        return g if g > 0.0 else 0.0

    def potential(self, position: Sequence[float] | np.ndarray) -> float:
        """The shaping potential phi(p) = max(0, g(p) - home_radius) >= 0 at a position.

        g is :func:`geodesic_distance` from p to the home centre around the lake, so phi is the
        length of the shortest dry path from p into the home disk.
        """
        x, y = _pair(position, "position")
        return self._potential(x, y)

    @property
    def position(self) -> np.ndarray:
        """The agent's current (x, y) position, a float64 copy."""
        return np.array([self._x, self._y])

    # ------------------------------------------------------------------ gymnasium API

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start a new episode.

        :param seed: seeds ``np_random`` (the start noise) as in Gymnasium.
        :param options: ``{"start": (x, y)}`` starts exactly there (no noise). Other keys are
            rejected so that a typo does not silently start from the default.
        """
        super().reset(seed=seed)
        options = {} if options is None else options
        unknown = set(options) - {"start"}
        if unknown:
            raise ValueError(f"unknown reset options {sorted(unknown)}; only 'start' is supported")
        if options.get("start") is not None:
            x, y = _pair(options["start"], "options['start']")
            self._check_start(x, y, "options['start']")
        else:
            x, y = float(self.start[0]), float(self.start[1])
            if self.start_noise > 0.0:
                # Along the axis only: a sideways offset would tell the agent which side is shorter.
                s = float(self.np_random.uniform(-self.start_noise, self.start_noise))
                x += s * self._u[0]
                y += s * self._u[1]
        self._x, self._y = x, y
        self._phi = self._potential(x, y)
        self._along = self._along_of(x, y)
        self._route = None
        if self.render_mode is not None:
            self._trail = [(x, y)]
            self._canvas = None
            self._drawn = 0
        info = {"success": False, "drowned": False, "is_success": False, "route": None}
        if self.render_mode == "human":
            self.render()
        return np.array((x, y), dtype=np.float32), info

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if type(action) is np.ndarray and action.shape == (2,):
            ax, ay = action.tolist()  # Python floats: the arithmetic below stays in math
        else:
            ax, ay = self._coerce_action(action)
        if not (math.isfinite(ax) and math.isfinite(ay)):
            raise ValueError(f"action must be finite, got {[ax, ay]}")
        ax = 1.0 if ax > 1.0 else (-1.0 if ax < -1.0 else ax)
        ay = 1.0 if ay > 1.0 else (-1.0 if ay < -1.0 else ay)

        x = self._x + self.max_speed * ax
        y = self._y + self.max_speed * ay
        lo, hi = self._lo, self._hi
        x = lo[0] if x < lo[0] else (hi[0] if x > hi[0] else x)
        y = lo[1] if y < lo[1] else (hi[1] if y > hi[1] else y)
        self._x, self._y = x, y

        rx, ry = x - self._c[0], y - self._c[1]
        drowned = rx * rx + ry * ry < self._r2
        dx, dy = rx - self._h[0], ry - self._h[1]
        success = (not drowned) and dx * dx + dy * dy <= self._hr2

        along = rx * self._u[0] + ry * self._u[1]
        if self._route is None and not drowned and self._along < 0.0 <= along:
            lateral = rx * self._v[0] + ry * self._v[1]
            if lateral > 0.0:
                self._route = "ccw"
            elif lateral < 0.0:
                self._route = "cw"
        self._along = along

        phi = self._potential(x, y)
        reward = self.shaping_weight * (self._phi - phi) - self.step_cost
        self._phi = phi
        if success:
            reward += self.home_bonus
        elif drowned:
            reward -= self.lake_penalty

        if self.render_mode is not None:
            self._trail.append((x, y))
            if self.render_mode == "human":
                self.render()
        info = {"success": success, "drowned": drowned, "is_success": success, "route": self._route}
        return (
            np.array((x, y), dtype=np.float32),
            reward,
            success or drowned,
            False,
            info,
        )

    @staticmethod
    def _coerce_action(action: Any) -> tuple[float, float]:
        try:
            arr = np.asarray(action, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise ValueError(
                f"action must be a numeric array of shape (2,), got {action!r}"
            ) from err
        if arr.shape != (2,):
            raise ValueError(f"action must have shape (2,), got shape {arr.shape}")
        return float(arr[0]), float(arr[1])

    # ------------------------------------------------------------------ rendering

    def _to_pixels(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[Any, Any]:
        """World (x, y) -> (column, row) in pixels; north is up."""
        scale = (self.render_size - 1) / (2.0 * self.arena_half_size)
        return (x - self._lo[0]) * scale, (self._hi[1] - y) * scale

    def _make_background(self) -> np.ndarray:
        n = self.render_size
        span = 2.0 * self.arena_half_size
        coords = (np.arange(n) + 0.5) / n * span
        xs = self._lo[0] + coords
        ys = self._hi[1] - coords
        gx, gy = np.meshgrid(xs, ys)
        img = np.empty((n, n, 3), dtype=np.uint8)
        img[:] = (236, 229, 206)  # sand
        rx, ry = gx - self._c[0], gy - self._c[1]
        img[rx * rx + ry * ry < self._r2] = (74, 134, 201)  # water
        hx, hy = gx - self.home[0], gy - self.home[1]
        img[hx * hx + hy * hy <= self._hr2] = (96, 178, 96)  # home
        sx, sy = gx - self.start[0], gy - self.start[1]
        marker = max(0.02 * self.arena_half_size, 1.5 * span / n)
        img[sx * sx + sy * sy <= marker * marker] = (90, 90, 90)  # default start
        return img

    def _draw_disk(self, img: np.ndarray, col: float, row: float, radius: float, color) -> None:
        n = img.shape[0]
        r0, r1 = max(int(row - radius), 0), min(int(row + radius) + 2, n)
        c0, c1 = max(int(col - radius), 0), min(int(col + radius) + 2, n)
        if r0 >= r1 or c0 >= c1:
            return
        rr, cc = np.ogrid[r0:r1, c0:c1]
        mask = (rr - row) ** 2 + (cc - col) ** 2 <= radius * radius
        img[r0:r1, c0:c1][mask] = color

    def _render_frame(self) -> np.ndarray:
        if self._background is None:
            self._background = self._make_background()
        if self._canvas is None:
            self._canvas = self._background.copy()
            self._drawn = 0
        trail = self._trail if self._trail else [(self._x, self._y)]
        # Draw only the trail segments added since the last frame.
        if len(trail) - 1 > self._drawn:
            pts = np.asarray(trail[self._drawn :], dtype=np.float64)
            cols, rows = self._to_pixels(pts[:, 0], pts[:, 1])
            n = self.render_size
            for i in range(len(pts) - 1):
                k = int(max(abs(cols[i + 1] - cols[i]), abs(rows[i + 1] - rows[i]))) + 2
                cc = np.rint(np.linspace(cols[i], cols[i + 1], k)).astype(np.intp)
                rr = np.rint(np.linspace(rows[i], rows[i + 1], k)).astype(np.intp)
                for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1)):  # 2-pixel-wide line
                    r2, c2 = np.clip(rr + dr, 0, n - 1), np.clip(cc + dc, 0, n - 1)
                    self._canvas[r2, c2] = (200, 60, 40)
            self._drawn = len(trail) - 1
        frame = self._canvas.copy()
        col, row = self._to_pixels(self._x, self._y)
        self._draw_disk(frame, col, row, max(3.0, self.render_size / 70), (20, 20, 20))
        return frame

    def render(self) -> np.ndarray | None:
        """``"rgb_array"``: an HxWx3 uint8 frame (lake, home, start, trail, agent).

        ``"human"``: shows the same frame in a matplotlib window (imported lazily).
        """
        if self.render_mode is None:
            logger.warn(
                "You are calling render method without specifying any render mode. "
                'Set render_mode="rgb_array" or "human" at initialization.'
            )
            return None
        frame = self._render_frame()
        if self.render_mode == "rgb_array":
            return frame
        import matplotlib.pyplot as plt  # lazily: only "human" needs a GUI backend

        if self._fig is None or not plt.fignum_exists(self._fig.number):
            plt.ion()
            self._fig, ax = plt.subplots(figsize=(5, 5))
            ax.set_axis_off()
            self._image = ax.imshow(frame)
        else:
            self._image.set_data(frame)
        self._fig.canvas.draw_idle()
        plt.pause(1.0 / self.metadata["render_fps"])
        return None

    def close(self) -> None:
        if self._fig is not None:
            import matplotlib.pyplot as plt

            plt.close(self._fig)
            self._fig = None
            self._image = None
