r"""Coupling spline layers: monotone rational-quadratic splines (:class:`~flowpolicy.spline.Spline`)
whose bins, for half of the coordinates, depend on the other half through a small network.

A chain of element-wise splines mixed by affine maps needs many layers for what one coupling
(or autoregressive) layer does: bend one coordinate by an arbitrary function of the others.
:class:`Coupling` is the bijector; :class:`CouplingParams` is its layer of a
:class:`~flowpolicy.parametrization.FlowParams` layout.

Layout choice: a coupling layer has its own network (the *conditioner*), which does not fit a
flat vector of raw parameters per distribution. The conditioner's weights are therefore
ordinary ``nn.Module`` parameters of the layer (of :class:`~flowpolicy.flows.Flow` and
:class:`~flowpolicy.flows.ConditionalFlow` through their layout), shared by every distribution,
and the raw vector keeps what may vary per distribution: the element-wise spline that the
conditioner's output is added to, and a *code* fed to the conditioner with the coordinates. For
a :class:`~flowpolicy.flows.Flow` the code is empty (the network's biases play its part); for a
:class:`~flowpolicy.flows.ConditionalFlow` the hypernetwork outputs it, so the context steers the
conditioner as well as the base spline.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.distributions import Transform, constraints

from flowpolicy.spline import Spline

__all__ = ["Coupling", "CouplingParams", "coupling_blocks"]


def coupling_blocks(dim: int, parity: int) -> tuple[list[int], list[int]]:
    """The conditioning and transformed coordinates of layer ``parity``: alternating halves
    (even then odd indices transformed), so consecutive layers bend complementary blocks. A 1-D
    flow has no conditioning block: its layers are plain element-wise splines."""
    transformed = [i for i in range(dim) if (i + parity) % 2 == 1 or dim == 1]
    return [i for i in range(dim) if i not in transformed], transformed


class Coupling(Transform):
    r"""Spline coupling: with the coordinates split into a conditioning block :math:`a` and a
    transformed block :math:`b`,

    .. math:: y_a = s(x_a;\ \phi_a), \qquad y_b = s\big(x_b;\ \phi_b + g(y_a, h)\big),
              \qquad \log|\det J| = \sum_i \log s'(x_i),

    where :math:`s(\cdot; \phi)` is the element-wise monotone rational-quadratic spline with raw
    bins :math:`\phi` (:class:`~flowpolicy.spline.Spline`), :math:`g` a network (the
    conditioner) and :math:`h` a code. The Jacobian is block-triangular, hence the log-det.
    Because :math:`g` reads the *output* :math:`y_a`, the inverse is one spline pass over all
    coordinates, :math:`x = s^{-1}(y;\ \phi + [0, g(y_a, h)])` (the density's direction, used in
    training); the forward pass takes two (block :math:`a`, then :math:`b`).

    :param raw: :math:`\phi`, shape ``(..., d, 3K - 1)``: per coordinate ``K`` width logits,
        ``K`` height logits and ``K - 1`` raw interior derivatives (as :class:`Spline`).
    :param code: :math:`h`, shape ``(..., C)``, or ``None`` (no code).
    :param conditioner: maps ``(..., d_a + C)`` to ``(..., d_b (3K - 1))``.
    :param conditioning: indices of block :math:`a`; ``transformed``: those of block :math:`b`
        (together a permutation of ``range(d)``).
    :param bound: :math:`B`, the splines act on :math:`[-B, B]` (identity outside).
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        raw: Tensor,
        code: Tensor | None,
        conditioner: nn.Module,
        conditioning: Sequence[int],
        transformed: Sequence[int],
        bound: float,
    ) -> None:
        super().__init__()
        self.raw, self.code, self.conditioner, self.bound = raw, code, conditioner, float(bound)
        self.bins = (raw.shape[-1] + 1) // 3
        self.a, self.b = list(conditioning), list(transformed)
        order = self.a + self.b
        self.order = None if order == sorted(order) else order
        self.undo = None if self.order is None else [order.index(i) for i in range(len(order))]
        self.raw_a, self.raw_b = raw[..., self.a, :], raw[..., self.b, :]

    def _check_width(self, x: Tensor) -> None:
        d = self.raw.shape[-2]
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"Coupling: expected inputs of shape (..., {d}), got {tuple(x.shape)}")

    def _spline(self, raw: Tensor) -> Spline:
        K = self.bins
        widths, heights, derivatives = raw.split([K, K, K - 1], -1)
        return Spline(widths, heights, derivatives, self.bound, validate=False)

    def _raw_b(self, y_a: Tensor) -> Tensor:
        """:math:`\\phi_b + g(y_a, h)`, shape ``(..., d_b, 3K - 1)``."""
        inputs = y_a
        if self.code is not None and self.code.shape[-1] > 0:
            batch = torch.broadcast_shapes(y_a.shape[:-1], self.code.shape[:-1])
            code = self.code.expand(batch + self.code.shape[-1:])
            inputs = torch.cat([y_a.expand(batch + y_a.shape[-1:]), code], -1)
        delta = self.conditioner(inputs).unflatten(-1, self.raw_b.shape[-2:])
        return self.raw_b + delta

    def _split(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x[..., self.a], x[..., self.b]

    def _join(self, x_a: Tensor, x_b: Tensor) -> Tensor:
        x = torch.cat([x_a, x_b.expand(x_a.shape[:-1] + x_b.shape[-1:])], -1)
        return x if self.undo is None else x[..., self.undo]

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check_width(x)
        x_a, x_b = self._split(x)
        if self.a:
            y_a, ladj_a = self._spline(self.raw_a).call_and_ladj(x_a)
        else:
            y_a, ladj_a = x_a, 0.0
        raw_b = self._raw_b(y_a)
        y_b, ladj_b = self._spline(raw_b).call_and_ladj(x_b)
        y_a = y_a.expand(y_b.shape[:-1] + y_a.shape[-1:])
        return self._join(y_a, y_b), ladj_a + ladj_b

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check_width(y)
        y_a, _ = self._split(y)
        raw_b = self._raw_b(y_a)
        raw = raw_b
        if self.a:  # one spline over all coordinates, in the order (a, b)
            raw_a = self.raw_a.expand(raw_b.shape[:-2] + self.raw_a.shape[-2:])
            raw = torch.cat([raw_a, raw_b], -2)
        ordered = y if self.order is None else y[..., self.order]
        x, ladj = self._spline(raw).inv_and_ladj(ordered)
        return (x if self.undo is None else x[..., self.undo]), ladj

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inv_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]


class _Offset(nn.Module):
    """The conditioner of a layer without inputs: a learned vector (zero at first)."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(size))

    def forward(self, x: Tensor) -> Tensor:
        return self.bias.expand(x.shape[:-1] + self.bias.shape)


class CouplingParams(nn.Module):
    """Raw vector of size ``d (3K - 1) + C`` (the base splines :math:`\\phi`, then the code
    :math:`h`) to a :class:`Coupling` whose conditioner is this module's MLP
    ``(d_a + C) -> hidden -> d_b (3K - 1)`` (ReLU). The MLP's output layer starts at zero, so
    a new layer is the element-wise spline :math:`\\phi` (near the identity)."""

    def __init__(
        self, dim: int, bins: int, bound: float, hidden: Sequence[int], code: int, parity: int
    ) -> None:
        super().__init__()
        self.dim, self.bins, self.bound, self.code = dim, bins, bound, code
        self.conditioning, self.transformed = coupling_blocks(dim, parity)
        self.spline_size = dim * (3 * bins - 1)
        self.num_params = self.spline_size + code
        self.identity_derivative = math.log(math.expm1(1.0 - Spline.min_derivative))
        out = len(self.transformed) * (3 * bins - 1)
        width = len(self.conditioning) + code
        if width == 0:  # nothing to condition on (a 1-D flow): a learned offset
            self.conditioner = _Offset(out)
            return
        layers: list[nn.Module] = []
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        head = nn.Linear(width, out)
        nn.init.zeros_(head.weight)
        nn.init.zeros_(head.bias)
        self.conditioner = nn.Sequential(*layers, head)

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        theta = torch.zeros(self.dim, 3 * self.bins - 1)
        theta[:, 2 * self.bins :] = self.identity_derivative
        theta += strength * 0.1 * torch.randn(theta.shape, generator=generator)
        code = strength * torch.randn(self.code, generator=generator)
        return torch.cat([theta.flatten(), code])

    def forward(self, theta: Tensor) -> Coupling:
        raw, code = theta.split([self.spline_size, self.code], -1)
        raw = raw.unflatten(-1, (self.dim, 3 * self.bins - 1))
        return Coupling(
            raw, code, self.conditioner, self.conditioning, self.transformed, self.bound
        )

    def encode(
        self, knots_x: Tensor, knots_y: Tensor, derivatives: Tensor, code: Tensor | None = None
    ) -> Tensor:
        """The raw parameters whose base splines :math:`\\phi` pass through the knots (as
        :meth:`SplineParams.encode <flowpolicy.parametrization.SplineParams.encode>`), with the
        code ``code (..., C)`` (default zeros). The layer is then that element-wise spline plus
        what the conditioner adds to block :math:`b`."""
        from flowpolicy.parametrization import SplineParams  # it imports this module

        raw = SplineParams(self.dim, self.bins, self.bound).encode(knots_x, knots_y, derivatives)
        if code is None:
            code = raw.new_zeros(raw.shape[:-1] + (self.code,))
        if code.shape[-1:] != (self.code,):
            raise ValueError(f"code must have shape (..., {self.code}), got {tuple(code.shape)}")
        batch = torch.broadcast_shapes(raw.shape[:-1], code.shape[:-1])
        parts = [raw.expand(batch + raw.shape[-1:]), code.expand(batch + (self.code,))]
        return torch.cat(parts, -1)
