"""LakeCrossing: a 2-D navigation task whose best first action is bimodal.

A point agent must get home across a frozen-over lake it cannot enter. Going around the lake
clockwise or counter-clockwise is equally good (the task is exactly mirror-symmetric), and a
policy that averages the two routes walks straight into the water. This is the motivating
example of Jang (2018), a tutorial on normalizing flows, made into a Gymnasium environment.

Registered as ``LakeCrossing-v0`` when :mod:`flowpolicy.envs` (or :mod:`flowpolicy`) is imported.
Where that import may not have run, as in ``SubprocVecEnv``'s workers (started by forkserver or
spawn, without the parent's imports), use Gymnasium's module-qualified id, which imports the
module first: ``gymnasium.make("flowpolicy:LakeCrossing-v0")``, or
``make_vec_env("flowpolicy:LakeCrossing-v0", n_envs=8, vec_env_cls=SubprocVecEnv)``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gymnasium as gym
import numpy as np
from gymnasium import logger, spaces

from .geometry import LakeGeometry, _pair, geodesic_distance
from .rendering import FrameRenderer

if TYPE_CHECKING:
    from flowpolicy.symmetry import Reflection

__all__ = ["LakeCrossingEnv", "geodesic_distance"]


class LakeCrossingEnv(gym.Env[np.ndarray, np.ndarray]):
    r"""
    ## Description

    A point agent starts just south of a circular lake and must reach its home, a disk north of
    the lake. It moves by choosing a velocity; stepping into the lake drowns it. The start, the
    lake centre and home lie on one north-south line, so the task is exactly mirror-symmetric
    about that line: going around the lake on the west (clockwise) or on the east
    (counter-clockwise) is equally good. The start is so close to the shore that the action
    between the two routes, straight ahead, drowns within two steps, so a policy that averages
    the routes fails. This is the motivating example of Jang (2018), a tutorial on normalizing
    flows.

    All lengths are in world units; the default lake is the unit disk at the origin. The
    layout is a :class:`~flowpolicy.envs.LakeGeometry`, ``env.unwrapped.geometry``, which the
    scripted expert and the plotting helpers read too.

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

    | Num | Observation | Min                                | Max                                |
    |-----|-------------|------------------------------------|------------------------------------|
    | 0   | x           | `lake_center[0] - arena_half_size` | `lake_center[0] + arena_half_size` |
    | 1   | y           | `lake_center[1] - arena_half_size` | `lake_center[1] + arena_half_size` |

    Nothing else is observed: the position is a Markov state, and any extra feature would have
    to respect the mirror symmetry, which :meth:`reflection` returns as a map of observations
    and actions.

    ## Rewards

    With `p` the position before and `p'` after the step:

    *r = -step_cost + shaping_weight * (phi(p) - phi(p')) + home_bonus * [success]
    - lake_penalty * [drowned]*

    - `step_cost = 1.5` per step. It exceeds `alpha * log(4) = 1.39`, the entropy bonus that
      SAC, starting at `alpha = 1`, pays per step for a uniform action on the action square,
      so standing still never pays, not even for a policy that is still maximally random.
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
      Moving along the geodesic at speed `max_speed` earns `20 * 0.15 = 3` per step, twice the
      step cost: progress pays from the first step.
    - `home_bonus = 100` on reaching home, `lake_penalty = 25` on drowning. Drowning also
      forfeits the home bonus, so a moderate penalty suffices; a larger one would make the
      start, 0.25 from the shore, look worse to an early critic than fleeing from the lake.

    The weights are on this scale (returns of about a hundred) so that SAC's initial entropy
    bonus, about 1.4 per step, does not outweigh the task. From the default start, following
    the geodesic at speed `max_speed` takes 23 steps and returns about
    `100 + 20 * 3.35 - 1.5 * 23 = 132.5` (moving diagonally, up to `sqrt(2)` times faster, can
    save a few steps). Walking straight ahead into the lake returns about `-26`, hovering
    until the time limit `-90`: an agent that has not found home yet gains nothing by
    standing still. The runs behind these numbers are summarized in BENCHMARKS.md.

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
      `gymnasium.make("LakeCrossing-v0")` (the geodesic at speed `max_speed` takes 23; the
      rest leaves room for detours while keeping episodes short).
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

    The id `"flowpolicy:LakeCrossing-v0"` (Gymnasium's `module:id` form) imports flowpolicy
    before making the environment: use it where `import flowpolicy` may not have run, such as
    in `SubprocVecEnv`'s workers (forkserver or spawn start without the parent's imports):

    ```python
    make_vec_env("flowpolicy:LakeCrossing-v0", n_envs=8, vec_env_cls=SubprocVecEnv)
    ```

    Public attributes: `geometry` (the layout), and from it `lake_center`, `lake_radius`,
    `start`, `home` (float64 arrays or floats), `home_radius`, `max_speed`, `start_noise`,
    `arena_half_size`; the reward weights; `position`, the current position. The task is
    mirror-symmetric whenever `start` and `home` lie on a line through `lake_center` (the
    arena is centred on the lake).

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
        weights = {
            "step_cost": step_cost,
            "shaping_weight": shaping_weight,
            "home_bonus": home_bonus,
            "lake_penalty": lake_penalty,
        }
        for name, value in weights.items():
            real = isinstance(value, numbers.Real) and not isinstance(value, bool)
            if not (real and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        self.geometry = LakeGeometry(
            lake_center=lake_center,
            lake_radius=lake_radius,
            start=start,
            home=home,
            home_radius=home_radius,
            max_speed=max_speed,
            start_noise=start_noise,
            arena_half_size=arena_half_size,
        )
        self.step_cost = float(step_cost)
        self.shaping_weight = float(shaping_weight)
        self.home_bonus = float(home_bonus)
        self.lake_penalty = float(lake_penalty)
        self._renderer = FrameRenderer(self.geometry, render_size)
        self.render_size = self._renderer.size

        g = self.geometry
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.observation_space = spaces.Box(
            low=np.array(g.arena_low, dtype=np.float32),
            high=np.array(g.arena_high, dtype=np.float32),
            dtype=np.float32,
        )
        # The state as Python floats: step() runs on math, several times faster than numpy.
        self._x, self._y = g.start
        self._phi = g.home_distance(self._x, self._y)
        self._along = g.along(self._x, self._y)
        self._route: str | None = None
        self._fig: Any = None  # "human" rendering: a matplotlib figure and its image
        self._image: Any = None

    # ------------------------------------------------------------------ the layout

    @property
    def lake_center(self) -> np.ndarray:
        """The lake's centre (x, y), a float64 copy."""
        return np.array(self.geometry.lake_center)

    @property
    def lake_radius(self) -> float:
        """The lake's radius."""
        return self.geometry.lake_radius

    @property
    def start(self) -> np.ndarray:
        """The default start (x, y), a float64 copy."""
        return np.array(self.geometry.start)

    @property
    def home(self) -> np.ndarray:
        """Home's centre (x, y), a float64 copy."""
        return np.array(self.geometry.home)

    @property
    def home_radius(self) -> float:
        """Home's radius."""
        return self.geometry.home_radius

    @property
    def max_speed(self) -> float:
        """Displacement per step for an action component of 1."""
        return self.geometry.max_speed

    @property
    def start_noise(self) -> float:
        """Half-width of the start offset along the axis."""
        return self.geometry.start_noise

    @property
    def arena_half_size(self) -> float:
        """Half-width of the square arena."""
        return self.geometry.arena_half_size

    def potential(self, position: Sequence[float] | np.ndarray) -> float:
        """The shaping potential phi(p) = max(0, g(p) - home_radius) >= 0 at a position.

        g is :func:`geodesic_distance` from p to the home centre around the lake, so phi is the
        length of the shortest dry path from p into the home disk
        (:meth:`LakeGeometry.home_distance`).
        """
        x, y = _pair(position, "position")
        return self.geometry.home_distance(x, y)

    @property
    def position(self) -> np.ndarray:
        """The agent's current (x, y) position, a float64 copy."""
        return np.array([self._x, self._y])

    def reflection(self) -> Reflection:
        """The task's mirror symmetry as a :class:`flowpolicy.symmetry.Reflection`.

        The mirror about the start-home line through the lake centre, ``x -> 2 * c_x - x``
        with the default vertical line ``x = c_x`` (``y -> 2 * c_y - y`` for a horizontal one),
        maps observations and flips the same component of the action. Stepping from the
        mirrored state with the mirrored action gives the mirrored next observation, the same
        reward and the same termination, exactly for a lake centred on the axis ``c_x = 0``
        (up to rounding otherwise); routes ``"cw"`` and ``"ccw"`` swap. ``ValueError`` when
        the start-home line is neither vertical nor horizontal.
        """
        from flowpolicy.symmetry import Reflection

        k, a = self.geometry.mirror_axis()
        sign = np.ones(2)
        sign[k] = -1.0
        shift = np.zeros(2)
        shift[k] = 2.0 * a
        return Reflection(sign, sign.copy(), obs_shift=shift)

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
        g = self.geometry
        if options.get("start") is not None:
            x, y = _pair(options["start"], "options['start']")
            g.check_start(x, y, "options['start']")
        else:
            x, y = g.start
            if g.start_noise > 0.0:
                # Along the axis only: a sideways offset would tell the agent which side is shorter.
                s = float(self.np_random.uniform(-g.start_noise, g.start_noise))
                x += s * g.axis[0]
                y += s * g.axis[1]
        self._x, self._y = x, y
        self._phi = g.home_distance(x, y)
        self._along = g.along(x, y)
        self._route = None
        if self.render_mode is not None:
            self._renderer.reset(x, y)
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

        g = self.geometry
        x = self._x + g.max_speed * ax
        y = self._y + g.max_speed * ay
        lo, hi = g.arena_low, g.arena_high
        x = lo[0] if x < lo[0] else (hi[0] if x > hi[0] else x)
        y = lo[1] if y < lo[1] else (hi[1] if y > hi[1] else y)
        self._x, self._y = x, y

        # g.in_lake, g.in_home and g.along, inlined: step() is the hot loop.
        rx, ry = x - g.lake_center[0], y - g.lake_center[1]
        drowned = rx * rx + ry * ry < g.lake_radius * g.lake_radius
        dx, dy = rx - g.home_offset[0], ry - g.home_offset[1]
        success = (not drowned) and dx * dx + dy * dy <= g.home_radius * g.home_radius
        u, v = g.axis, g.lateral
        along = rx * u[0] + ry * u[1]
        if self._route is None and not drowned and self._along < 0.0 <= along:
            lateral = rx * v[0] + ry * v[1]
            if lateral > 0.0:
                self._route = "ccw"
            elif lateral < 0.0:
                self._route = "cw"
        self._along = along

        phi = g.home_distance(x, y)
        reward = self.shaping_weight * (self._phi - phi) - self.step_cost
        self._phi = phi
        if success:
            reward += self.home_bonus
        elif drowned:
            reward -= self.lake_penalty

        if self.render_mode is not None:
            self._renderer.add(x, y)
            if self.render_mode == "human":
                self.render()
        info = {"success": success, "drowned": drowned, "is_success": success, "route": self._route}
        return np.array((x, y), dtype=np.float32), reward, success or drowned, False, info

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
        frame = self._renderer.frame(self._x, self._y)
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
