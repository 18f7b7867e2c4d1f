"""Numpy frames of LakeCrossing: sand, lake, home, the default start, the trail and the agent."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from .geometry import LakeGeometry

__all__ = ["FrameRenderer"]

SAND, WATER, HOME, START = (236, 229, 206), (74, 134, 201), (96, 178, 96), (90, 90, 90)
TRAIL, AGENT = (200, 60, 40), (20, 20, 20)


class FrameRenderer:
    """Draws HxWx3 uint8 frames of one episode; north is up.

    The static background is drawn once, and each frame adds only the trail segments that are
    new since the previous frame.

    :param geometry: the task's geometry.
    :param size: side of the frame in pixels, >= 16.
    """

    def __init__(self, geometry: LakeGeometry, size: int) -> None:
        self.geometry = geometry
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 16:
            raise ValueError(f"render_size must be an integer >= 16 (pixels), got {size!r}")
        self.size = int(size)
        self._background: np.ndarray | None = None
        self._canvas: np.ndarray | None = None
        self._trail: list[tuple[float, float]] = []
        self._drawn = 0

    def reset(self, x: float, y: float) -> None:
        """Start a new trail at (x, y)."""
        self._trail = [(x, y)]
        self._canvas = None
        self._drawn = 0

    def add(self, x: float, y: float) -> None:
        """Extend the trail to (x, y)."""
        self._trail.append((x, y))

    def to_pixels(self, x: np.ndarray | float, y: np.ndarray | float) -> tuple[Any, Any]:
        """World (x, y) -> (column, row) in pixels."""
        g = self.geometry
        scale = (self.size - 1) / (2.0 * g.arena_half_size)
        return (x - g.arena_low[0]) * scale, (g.arena_high[1] - y) * scale

    def _make_background(self) -> np.ndarray:
        g, n = self.geometry, self.size
        span = 2.0 * g.arena_half_size
        coords = (np.arange(n) + 0.5) / n * span
        gx, gy = np.meshgrid(g.arena_low[0] + coords, g.arena_high[1] - coords)
        img = np.empty((n, n, 3), dtype=np.uint8)
        img[:] = SAND
        rx, ry = gx - g.lake_center[0], gy - g.lake_center[1]
        img[rx * rx + ry * ry < g.lake_radius * g.lake_radius] = WATER
        hx, hy = gx - g.home[0], gy - g.home[1]
        img[hx * hx + hy * hy <= g.home_radius * g.home_radius] = HOME
        sx, sy = gx - g.start[0], gy - g.start[1]
        marker = max(0.02 * g.arena_half_size, 1.5 * span / n)
        img[sx * sx + sy * sy <= marker * marker] = START  # the default start
        return img

    @staticmethod
    def _draw_disk(img: np.ndarray, col: float, row: float, radius: float, color) -> None:
        n = img.shape[0]
        r0, r1 = max(int(row - radius), 0), min(int(row + radius) + 2, n)
        c0, c1 = max(int(col - radius), 0), min(int(col + radius) + 2, n)
        if r0 >= r1 or c0 >= c1:
            return
        rr, cc = np.ogrid[r0:r1, c0:c1]
        mask = (rr - row) ** 2 + (cc - col) ** 2 <= radius * radius
        img[r0:r1, c0:c1][mask] = color

    def _draw_trail(self, trail: list[tuple[float, float]]) -> None:
        """Draw the segments of ``trail`` after the first ``self._drawn``, 2 pixels wide."""
        pts = np.asarray(trail[self._drawn :], dtype=np.float64)
        cols, rows = self.to_pixels(pts[:, 0], pts[:, 1])
        n = self.size
        for i in range(len(pts) - 1):
            k = int(max(abs(cols[i + 1] - cols[i]), abs(rows[i + 1] - rows[i]))) + 2
            cc = np.rint(np.linspace(cols[i], cols[i + 1], k)).astype(np.intp)
            rr = np.rint(np.linspace(rows[i], rows[i + 1], k)).astype(np.intp)
            for dr, dc in ((0, 0), (1, 0), (0, 1), (1, 1)):
                r2, c2 = np.clip(rr + dr, 0, n - 1), np.clip(cc + dc, 0, n - 1)
                self._canvas[r2, c2] = TRAIL
        self._drawn = len(trail) - 1

    def frame(self, x: float, y: float) -> np.ndarray:
        """The frame with the trail so far and the agent at (x, y)."""
        if self._background is None:
            self._background = self._make_background()
        if self._canvas is None:
            self._canvas = self._background.copy()
            self._drawn = 0
        trail = self._trail if self._trail else [(x, y)]
        if len(trail) - 1 > self._drawn:
            self._draw_trail(trail)
        frame = self._canvas.copy()
        col, row = self.to_pixels(x, y)
        self._draw_disk(frame, col, row, max(3.0, self.size / 70), AGENT)
        return frame
