"""The geometry of LakeCrossing: the lake, start, home and arena, and distances around the lake.

One :class:`LakeGeometry` is owned by each environment (``env.unwrapped.geometry``) and read by
the scripted expert and the plotting helpers, so that the three agree on every number.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["LakeGeometry", "geodesic_distance"]


def _pair(value: Any, name: str) -> tuple[float, float]:
    """Validate a finite (x, y) pair and return it as Python floats."""
    arr = np.asarray(value, dtype=np.float64)
    if arr.shape != (2,):
        raise ValueError(f"{name} must be an (x, y) pair, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return float(arr[0]), float(arr[1])


def _around(
    px: float, py: float, d2: float, qx: float, qy: float, q_tan: float, q_ang: float, r: float
) -> float:
    """Shortest-path length from p to q around the disk |z| < r (coordinates relative to it).

    Both points lie outside the open disk; ``d2 = |p|^2``, and q's tangent length
    ``q_tan = sqrt(|q|^2 - r^2)`` and tangent angle ``q_ang = acos(r / |q|)`` are given (the
    environment's home is fixed, so it computes them once). The straight segment is the shortest
    path when it does not cut the disk, which happens exactly when the angle theta between p and
    q seen from the centre satisfies theta <= acos(r/|p|) + acos(r/|q|) (each term is the angle
    between a point and its tangent points). Otherwise the path is tangent + arc + tangent:

        sqrt(|p|^2 - r^2) + sqrt(|q|^2 - r^2) + r * (theta - acos(r/|p|) - acos(r/|q|)).
    """
    # atan2 of (|cross|, dot) is accurate at all angles and exactly mirror-symmetric.
    theta = math.atan2(abs(px * qy - py * qx), px * qx + py * qy)
    ap = math.acos(min(r / math.sqrt(d2), 1.0))
    if theta <= ap + q_ang:
        return math.hypot(px - qx, py - qy)
    return math.sqrt(max(d2 - r * r, 0.0)) + q_tan + r * (theta - ap - q_ang)


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
    :return: the geodesic distance, a Python float (0 from a point to itself, the centre
        included).
    :raises ValueError: for a point, target or centre that is not a finite (x, y) pair, or a
        radius that is not finite and > 0.
    """
    (x, y), (tx, ty) = _pair(point, "point"), _pair(target, "target")
    center, r = _pair(center, "center"), _positive("radius", radius)
    if (x, y) == (tx, ty):
        return 0.0
    return float(geodesic_distances(np.array((x, y)), np.array((tx, ty)), center, r))


def geodesic_distances(
    points: np.ndarray,
    targets: np.ndarray,
    center: Sequence[float] | np.ndarray = (0.0, 0.0),
    radius: float = 1.0,
) -> np.ndarray:
    """:func:`geodesic_distance` for arrays of pairs, ``(..., 2)`` -> ``(...)`` (broadcast,
    float64, unchecked): the same formula in numpy, for batches."""
    c = np.asarray(center, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64) - c
    q = np.asarray(targets, dtype=np.float64) - c
    p, q = np.broadcast_arrays(p, q)
    p, q = _project_out_batch(p, q, radius), _project_out_batch(q, p, radius)
    p2 = np.einsum("...i,...i->...", p, p)
    q2 = np.einsum("...i,...i->...", q, q)
    # atan2 of (|cross|, dot), as _around: accurate at all angles, exactly mirror-symmetric
    theta = np.arctan2(
        np.abs(p[..., 0] * q[..., 1] - p[..., 1] * q[..., 0]), np.einsum("...i,...i->...", p, q)
    )
    p_ang = np.arccos(np.minimum(radius / np.sqrt(p2), 1.0))
    q_ang = np.arccos(np.minimum(radius / np.sqrt(q2), 1.0))
    around = (
        np.sqrt(np.maximum(p2 - radius**2, 0.0))
        + np.sqrt(np.maximum(q2 - radius**2, 0.0))
        + radius * (theta - p_ang - q_ang)
    )
    straight = np.linalg.norm(p - q, axis=-1)
    return np.where(theta <= p_ang + q_ang, straight, around)


def _project_out_batch(p: np.ndarray, q: np.ndarray, radius: float) -> np.ndarray:
    """:func:`_project_out` for arrays: points of ``p`` inside the disk onto its shore."""
    d = np.linalg.norm(p, axis=-1, keepdims=True)
    away = -q / np.maximum(np.linalg.norm(q, axis=-1, keepdims=True), 1e-300)
    direction = np.where(d > 0.0, p / np.where(d > 0.0, d, 1.0), away)
    return np.where(d >= radius, p, radius * direction)


def _positive(name: str, value: float, strict: bool = True) -> float:
    value = float(value)
    if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
        raise ValueError(f"{name} must be finite and {'>' if strict else '>='} 0, got {value}")
    return value


@dataclass(frozen=True)
class LakeGeometry:
    """The lake, the start, home, the arena and the agent's speed, in world units.

    The lake is the open disk ``|p - lake_center| < lake_radius``, home the closed disk
    ``|p - home| <= home_radius`` and the arena the square ``lake_center ± arena_half_size``.
    Episodes start at ``start`` plus a uniform offset in ``[-start_noise, start_noise]`` along
    the start-home axis, and the agent moves by up to ``max_speed`` per step and axis.
    Construction validates the layout (``ValueError``: home overlapping the lake or outside
    the arena, a start in the lake, in home or outside the arena).

    Derived, for the environment, the expert and the plots (not constructor arguments):

    - ``axis``: the unit vector from start to home ("north" of the route labels), and
      ``lateral``: ``axis`` rotated clockwise ("east", the counter-clockwise side);
    - ``home_offset``: home relative to the lake centre; ``arena_low``/``arena_high``: the
      arena's corners.

    The task is mirror-symmetric about the start-home line when that line passes through the
    lake centre.
    """

    lake_center: tuple[float, float] = (0.0, 0.0)
    lake_radius: float = 1.0
    start: tuple[float, float] = (0.0, -1.25)
    home: tuple[float, float] = (0.0, 1.6)
    home_radius: float = 0.25
    max_speed: float = 0.15
    start_noise: float = 0.05
    arena_half_size: float = 3.0

    axis: tuple[float, float] = field(init=False, repr=False, compare=False)
    lateral: tuple[float, float] = field(init=False, repr=False, compare=False)
    home_offset: tuple[float, float] = field(init=False, repr=False, compare=False)
    arena_low: tuple[float, float] = field(init=False, repr=False, compare=False)
    arena_high: tuple[float, float] = field(init=False, repr=False, compare=False)
    _home_tangent: float = field(init=False, repr=False, compare=False)
    _home_angle: float = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("lake_radius", "home_radius", "max_speed", "arena_half_size"):
            put(name, _positive(name, getattr(self, name)))
        put("start_noise", _positive("start_noise", self.start_noise, strict=False))
        for name in ("lake_center", "start", "home"):
            put(name, _pair(getattr(self, name), name))
        (cx, cy), (hx, hy), (sx, sy) = self.lake_center, self.home, self.start
        r, half = self.lake_radius, self.arena_half_size
        put("home_offset", (hx - cx, hy - cy))
        put("arena_low", (cx - half, cy - half))
        put("arena_high", (cx + half, cy + half))

        home_dist = math.hypot(*self.home_offset)
        if home_dist <= r + self.home_radius:
            raise ValueError(
                f"the home disk (centre {list(self.home)}, radius {self.home_radius}) "
                f"overlaps the lake (centre {list(self.lake_center)}, radius {r})"
            )
        if not self.in_arena(hx, hy):
            raise ValueError(f"home {list(self.home)} lies outside the arena")
        # The home terms of the geodesic (see _around), fixed for the task.
        put("_home_tangent", math.sqrt(home_dist * home_dist - r * r))
        put("_home_angle", math.acos(r / home_dist))

        ax, ay = hx - sx, hy - sy
        norm = math.hypot(ax, ay)
        if norm == 0.0:
            raise ValueError("start and home must differ")
        put("axis", (ax / norm, ay / norm))
        put("lateral", (self.axis[1], -self.axis[0]))
        self.check_start(sx, sy, "start")
        for sign in (-1.0, 1.0):  # the noisy starts must be valid too
            nx = sx + sign * self.start_noise * self.axis[0]
            ny = sy + sign * self.start_noise * self.axis[1]
            self.check_start(nx, ny, "start ± start_noise")

    # ------------------------------------------------------------------ regions

    def in_arena(self, x: float, y: float) -> bool:
        """Whether (x, y) lies in the closed arena square."""
        lo, hi = self.arena_low, self.arena_high
        return lo[0] <= x <= hi[0] and lo[1] <= y <= hi[1]

    def in_lake(self, x: float, y: float) -> bool:
        """Whether (x, y) lies in the open lake disk (the agent drowns there)."""
        rx, ry = x - self.lake_center[0], y - self.lake_center[1]
        return rx * rx + ry * ry < self.lake_radius * self.lake_radius

    def in_home(self, x: float, y: float) -> bool:
        """Whether (x, y) lies in the closed home disk (the agent is home there)."""
        dx = x - self.lake_center[0] - self.home_offset[0]
        dy = y - self.lake_center[1] - self.home_offset[1]
        return dx * dx + dy * dy <= self.home_radius * self.home_radius

    def check_start(self, x: float, y: float, name: str = "start") -> None:
        """Raise ``ValueError`` unless (x, y) is a valid start: in the arena, dry, not home."""
        if not self.in_arena(x, y):
            lo, hi = self.arena_low, self.arena_high
            raise ValueError(
                f"{name} ({x}, {y}) lies outside the arena [{lo[0]}, {hi[0]}] x [{lo[1]}, {hi[1]}]"
            )
        if self.in_lake(x, y):
            raise ValueError(f"{name} ({x}, {y}) lies inside the lake")
        if self.in_home(x, y):
            raise ValueError(f"{name} ({x}, {y}) lies inside home")

    def along(self, x: float, y: float) -> float:
        """Coordinate of (x, y) along ``axis``, from the lake centre (> 0: north of the lake)."""
        return (x - self.lake_center[0]) * self.axis[0] + (y - self.lake_center[1]) * self.axis[1]

    # ------------------------------------------------------------------ distances

    def geodesic(self, point: Sequence[float], target: Sequence[float]) -> float:
        """:func:`geodesic_distance` from ``point`` to ``target`` around this lake."""
        return geodesic_distance(point, target, self.lake_center, self.lake_radius)

    def home_distance(self, x: float, y: float) -> float:
        """Length of the shortest dry path from (x, y) into the home disk, >= 0.

        ``max(0, g - home_radius)`` with g the geodesic distance to the home centre around the
        lake; a point in the lake counts as the shore point radially outward of it. This is the
        environment's shaping potential phi.
        """
        px, py = x - self.lake_center[0], y - self.lake_center[1]
        r = self.lake_radius
        r2 = r * r
        hx, hy = self.home_offset
        d2 = px * px + py * py
        if d2 < r2:  # drowned: use the shore point radially outward
            px, py = _project_out(px, py, r, hx, hy)
            d2 = r2
        g = _around(px, py, d2, hx, hy, self._home_tangent, self._home_angle, r)
        g -= self.home_radius
        return g if g > 0.0 else 0.0

    # ------------------------------------------------------------------ symmetry

    def mirror_axis(self) -> tuple[int, float]:
        """The mirror line of the task as ``(k, a)``: the line ``p[k] = a`` (k = 0: x = a).

        The start-home line must pass through the lake centre and be vertical (k = 0) or
        horizontal (k = 1), the mirrors expressible as a sign flip of one coordinate;
        ``ValueError`` otherwise.
        """
        (cx, cy), (sx, sy), (hx, hy) = self.lake_center, self.start, self.home
        if sx == cx == hx:
            return 0, cx
        if sy == cy == hy:
            return 1, cy
        raise ValueError(
            "the task is mirror-symmetric as a sign flip only when start, lake centre and home "
            f"lie on a vertical or horizontal line; got start {list(self.start)}, centre "
            f"{list(self.lake_center)}, home {list(self.home)}"
        )
