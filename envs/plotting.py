"""Plotting helpers for LakeCrossing: the lake, and trajectories coloured by route.

matplotlib is imported lazily by the drawing functions, so importing this module is cheap.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .geometry import LakeGeometry

__all__ = ["ROUTE_COLORS", "draw_lake", "plot_trajectories"]

#: Colours of the trajectory labels used by :func:`plot_trajectories`.
ROUTE_COLORS = {
    "cw": "tab:purple",
    "ccw": "tab:orange",
    "drowned": "tab:red",
    "none": "tab:gray",
}


def _geometry(env_or_geometry: Any) -> dict[str, Any]:
    """The layout of an environment (wrappers are looked through), a geometry or a mapping."""
    if isinstance(env_or_geometry, Mapping):
        geo = dict(env_or_geometry)
    else:
        geometry = env_or_geometry
        if not isinstance(geometry, LakeGeometry):
            geometry = getattr(env_or_geometry, "unwrapped", env_or_geometry).geometry
        geo = dataclasses.asdict(geometry)
    missing = [k for k in ("lake_center", "lake_radius", "home", "home_radius") if k not in geo]
    if missing:
        raise ValueError(f"geometry is missing {missing}")
    return geo


def draw_lake(ax: Any, env_or_geometry: Any, *, show_arena: bool = False) -> None:
    """Draw the lake (blue disk), home (green disk) and default start (black cross) on ``ax``.

    :param ax: a matplotlib ``Axes``.
    :param env_or_geometry: a LakeCrossing environment, its
        :class:`~flowpolicy.envs.LakeGeometry`, or a mapping with ``lake_center``,
        ``lake_radius``, ``home``, ``home_radius`` and optionally ``start`` and
        ``arena_half_size``.
    :param show_arena: also outline the arena square and use it as the axis limits
        (otherwise the limits frame the lake, start and home with a margin).
    """
    from matplotlib.patches import Circle, Rectangle

    geo = _geometry(env_or_geometry)
    center = np.asarray(geo["lake_center"], dtype=float)
    home = np.asarray(geo["home"], dtype=float)
    radius, home_radius = float(geo["lake_radius"]), float(geo["home_radius"])
    ax.add_patch(Circle(center, radius, facecolor="#4a86c9", edgecolor="#2a5a8a", zorder=1))
    ax.add_patch(Circle(home, home_radius, facecolor="#60b260", edgecolor="#2f7a2f", zorder=1))
    ax.annotate("home", home, ha="center", va="center", fontsize=8, zorder=2)
    points = [center - radius, center + radius, home - home_radius, home + home_radius]
    if geo.get("start") is not None:
        start = np.asarray(geo["start"], dtype=float)
        ax.plot(*start, marker="x", color="black", markersize=7, zorder=3)
        points.append(start)
    if show_arena and geo.get("arena_half_size") is not None:
        half = float(geo["arena_half_size"])
        ax.add_patch(
            Rectangle(center - half, 2 * half, 2 * half, fill=False, edgecolor="0.4", lw=0.8)
        )
        lo, hi = center - half, center + half
    else:
        pts = np.stack(points)
        pad = 0.3 * radius
        lo, hi = pts.min(axis=0) - pad, pts.max(axis=0) + pad
    ax.set_xlim(lo[0], hi[0])
    ax.set_ylim(lo[1], hi[1])
    ax.set_aspect("equal")


def plot_trajectories(
    ax: Any,
    trajectories: Sequence[np.ndarray],
    routes: Sequence[str | None],
    *,
    alpha: float = 0.6,
    linewidth: float = 1.2,
    legend: bool = True,
) -> None:
    """Plot (T, 2) position arrays on ``ax``, coloured by label (see :data:`ROUTE_COLORS`).

    :param ax: a matplotlib ``Axes`` (typically after :func:`draw_lake`).
    :param trajectories: one (T, 2) array of positions per episode.
    :param routes: one label per trajectory: ``"cw"``, ``"ccw"``, ``"drowned"``, or
        ``"none"``/``None`` (an episode's ``label`` from :func:`~flowpolicy.envs.rollout`).
    :param legend: add a legend with the count of each label.
    """
    if len(trajectories) != len(routes):
        raise ValueError(f"got {len(trajectories)} trajectories but {len(routes)} routes")
    labels = ["none" if r is None else str(r) for r in routes]
    unknown = sorted(set(labels) - set(ROUTE_COLORS))
    if unknown:
        raise ValueError(f"unknown route labels {unknown}; expected {sorted(ROUTE_COLORS)}")
    for traj, label in zip(trajectories, labels, strict=True):
        pts = np.asarray(traj, dtype=float)
        if pts.ndim != 2 or pts.shape[1] < 2:
            raise ValueError(f"each trajectory must have shape (T, 2), got {pts.shape}")
        ax.plot(pts[:, 0], pts[:, 1], color=ROUTE_COLORS[label], alpha=alpha, lw=linewidth)
        ax.plot(*pts[-1, :2], marker=".", color=ROUTE_COLORS[label], alpha=alpha)
    if legend and labels:
        from matplotlib.lines import Line2D

        handles = [
            Line2D([], [], color=color, label=f"{name} ({labels.count(name)})")
            for name, color in ROUTE_COLORS.items()
            if name in labels
        ]
        ax.legend(handles=handles, loc="best", fontsize=8)
