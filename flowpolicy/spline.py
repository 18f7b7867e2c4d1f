r"""The monotone rational-quadratic spline bijector (Durkan et al., 2019), re-exported by
:mod:`flowpolicy.bijectors`: use it as ``flowpolicy.bijectors.Spline``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

__all__ = ["Spline"]


class Spline(Transform):
    r"""Element-wise monotone rational-quadratic spline (Durkan et al., 2019), identity outside.

    On :math:`[-B, B]` the map is made of :math:`K` bins with knots :math:`(x_k, y_k)` and
    derivatives :math:`\delta_k` at the knots; inside bin :math:`k`, with
    :math:`s_k = h_k / w_k` and :math:`\xi = (x - x_k)/w_k`,

    .. math:: y = y_k + \frac{h_k\,[s_k \xi^2 + \delta_k \xi(1-\xi)]}{\Delta(\xi)}, \qquad
              \frac{dy}{dx} = \frac{s_k^2\,[\delta_{k+1}\xi^2 + 2 s_k \xi(1-\xi)
                              + \delta_k (1-\xi)^2]}{\Delta(\xi)^2},

    where :math:`\Delta(\xi) = s_k + (\delta_{k+1} + \delta_k - 2 s_k)\,\xi(1-\xi)`.

    Outside :math:`[-B, B]` it is the identity, and the boundary derivatives are 1, so the map is
    continuously differentiable. The inverse solves the quadratic in :math:`\xi` in closed form.
    A PReLU is a two-piece *linear* spline; this is its smooth, many-piece generalization.

    :param widths: unconstrained bin widths, shape ``(..., d, K)`` (softmax inside).
    :param heights: unconstrained bin heights, shape ``(..., d, K)`` (softmax inside).
    :param derivatives: unconstrained interior derivatives, shape ``(..., d, K - 1)``
        (softplus inside). All zeros for widths and heights and ``log(e - 1)`` for the
        derivatives give the identity.
    :param bound: :math:`B > 0`, half-width of the interval the spline acts on.

    References:
        Durkan, Bekasov, Murray, Papamakarios. Neural Spline Flows. NeurIPS 2019.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    min_bin = 1e-3
    min_derivative = 1e-3
    _batch_dim = {"_table": 1}  # the table's rows come first (see __init__)

    def __init__(
        self,
        widths: Tensor,
        heights: Tensor,
        derivatives: Tensor,
        bound: float = 4.0,
        *,
        validate: bool = True,
    ) -> None:
        super().__init__()
        if validate:
            K = widths.shape[-1] if widths.dim() >= 2 else 0
            if (
                K < 2
                or heights.shape[-2:] != widths.shape[-2:]
                or derivatives.shape[-2:] != (widths.shape[-2], K - 1)
            ):
                raise ValueError(
                    "Spline: expected widths and heights of shape (..., d, K) and derivatives of "
                    f"shape (..., d, K - 1) with K >= 2; got {tuple(widths.shape)}, "
                    f"{tuple(heights.shape)}, {tuple(derivatives.shape)}"
                )
            for name, value in (("widths", widths), ("heights", heights), ("derivs", derivatives)):
                if not torch.isfinite(value).all():
                    raise ValueError(f"Spline: {name} has non-finite values (NaN or inf)")
            if not (math.isfinite(bound) and bound > 0):
                raise ValueError(f"Spline: bound must be positive and finite, got {bound}")
        self.bound = float(bound)
        B, K = self.bound, widths.shape[-1]
        # Hot path (a policy builds one spline per state and step): few, fused kernels.
        # Widths and heights are normalized together, and torch.softmax is replaced by its
        # formula because for a last dimension of ~8 it is several times slower on CPU.
        if not widths.shape[:-1] == heights.shape[:-1] == derivatives.shape[:-1]:
            batch = torch.broadcast_shapes(
                widths.shape[:-1], heights.shape[:-1], derivatives.shape[:-1]
            )
            widths, heights = widths.expand(batch + (K,)), heights.expand(batch + (K,))
            derivatives = derivatives.expand(batch + (K - 1,))
        raw = torch.stack([widths, heights])
        e = (raw - raw.detach().amax(-1, keepdim=True)).exp()
        bins = self.min_bin + (1 - self.min_bin * K) * (e / e.sum(-1, keepdim=True))
        inner = 2 * B * torch.cumsum(bins[..., :-1], dim=-1) - B
        knots = F.pad(inner, (1, 1), value=B)
        knots[..., 0] = -B  # ends exactly -B and B
        self.knots_x, self.knots_y = knots.unbind(0)
        sizes = knots[..., 1:] - knots[..., :-1]
        self.bins_x, self.bins_y = sizes.unbind(0)
        # softplus is several times slower on a strided view (a slice of a parameter vector)
        inner = self.min_derivative + F.softplus(derivatives.contiguous())
        self.derivatives = F.pad(inner, (1, 1), value=1.0)
        # one row per quantity of bin k: x_k, y_k, w_k, h_k, delta_k, delta_k+1, s_k = h_k / w_k,
        # c_k = delta_k+1 + delta_k - 2 s_k and 2 log s_k, so that one gather finds them all
        d0, d1 = self.derivatives[..., :-1], self.derivatives[..., 1:]
        slope = self.bins_y / self.bins_x
        rows = torch.stack([d0, d1, slope, d1 + d0 - 2 * slope, 2 * slope.log()])
        # quantities along the first dim: concatenating contiguous blocks is a plain copy (along
        # an inner dim, the same cat was the slowest op of the whole spline on CPU)
        self._table = torch.cat([knots[..., :-1], sizes, rows])  # (9, ..., K)

    def _check_width(self, x: Tensor) -> None:
        d = self.knots_x.shape[-2]
        if x.dim() < 1 or x.shape[-1] != d:
            raise ValueError(f"Spline: expected inputs of shape (..., {d}), got {tuple(x.shape)}")

    def _gather(self, v: Tensor, knots: Tensor) -> Tensor:
        """For each element of ``v``, the rows of its bin's table (knots, sizes, derivatives...),
        shape ``(rows,) + v.shape`` (``v`` broadcast against the parameters' batch)."""
        # broadcast only when needed: torch.broadcast_shapes is slow Python, and every no-op
        # expand is one more autograd node on the hot path
        shape, table = v.shape, self._table
        rows, bins = table.shape[0], table.shape[-1]
        if shape != knots.shape[:-1]:
            shape = torch.broadcast_shapes(shape, knots.shape[:-1])
            v = v.expand(shape)
            lead = (1,) * (len(shape) + 2 - table.dim())  # left-pad the parameters' batch
            table = table.reshape((rows,) + lead + table.shape[1:])
            table = table.expand((rows,) + shape + (bins,))
        k = (v[..., None] >= knots[..., 1:-1]).sum(-1, keepdim=True)
        return table.gather(-1, k.expand((rows,) + shape + (1,))).squeeze(-1)

    @staticmethod
    def _log_derivative(
        xi: Tensor,
        xi2: Tensor,
        t: Tensor,
        s: Tensor,
        d0: Tensor,
        d1: Tensor,
        log_s2: Tensor,
        denominator: Tensor,
    ) -> Tensor:
        """log dy/dx = 2 log s + log(d1 xi^2 + 2 s t + d0 (1 - xi)^2) - 2 log(s + c t), from
        xi2 = xi^2, t = xi (1 - xi), log_s2 = 2 log s and the denominator s + c t."""
        one_minus = 1 - xi
        inner = torch.addcmul(torch.addcmul(d1 * xi2, s, t, value=2.0), d0, one_minus * one_minus)
        return (inner.log() + log_s2).sub(denominator.log(), alpha=2.0)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        # Outside [-B, B] the clamped input sits on an end knot, where xi is exactly 0 or 1 and
        # the derivative exactly 1 (log 0), so the tails need no masks: y = spline(xc) + (x - xc)
        self._check_width(x)
        xc = x.clamp(-self.bound, self.bound)
        x_k, y_k, w, h, d0, d1, s, c, log_s2 = self._gather(xc, self.knots_x).unbind(0)
        xi = ((xc - x_k) / w).clamp(0, 1)
        xi2 = xi * xi
        t = xi - xi2  # xi (1 - xi)
        denominator = torch.addcmul(s, c, t)  # s + (d1 + d0 - 2 s) t
        y_in = torch.addcmul(y_k, h, torch.addcmul(d0 * t, s, xi2) / denominator)
        ladj = self._log_derivative(xi, xi2, t, s, d0, d1, log_s2, denominator)
        return y_in + (x - xc), ladj.sum(-1)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, state = self.inv_and_state(y)
        return x, self._ladj_of_state(*state).sum(-1)

    def inv_and_state(self, y: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """``(x, state)`` with ``x = inv(y)`` and the log-det as ``_ladj_of_state(*state)``
        (element-wise, summed over the last axis): a chain stacks the states of its layers and
        gets all their log-dets in one call."""
        self._check_width(y)
        inside = y.abs() < self.bound
        yc = y.clamp(-self.bound, self.bound)
        params = self._gather(yc, self.knots_y)
        x_k, y_k, w, h, d0, _, s, c, _ = params.unbind(0)
        # xi solves a xi^2 + b xi - s dy = 0 (the root in [0, 1]), in the cancellation-free form
        # 2 s dy / (b + sqrt(b^2 + 4 a s dy))
        dy = yc - y_k
        a = torch.addcmul(h * (s - d0), dy, c)
        b = torch.addcmul(h * d0, dy, c, value=-1.0)
        s_dy = s * dy
        discriminant = torch.addcmul(b * b, a, s_dy, value=4.0).clamp_min(0)
        xi = ((2 * s_dy) / (b + discriminant.sqrt())).clamp(0, 1)
        x = torch.where(inside, torch.addcmul(x_k, xi, w), y)
        return x, (xi, params, inside)

    @staticmethod
    def _ladj_of_state(xi: Tensor, params: Tensor, inside: Tensor) -> Tensor:
        """The element-wise log-det of the inverse's state; also of the states of several layers
        stacked along a dim before those of ``xi`` (the rows of ``params`` come first)."""
        _, _, _, _, d0, d1, s, c, log_s2 = params.unbind(-xi.dim() - 1)
        xi2 = xi * xi
        t = xi - xi2
        ladj = Spline._log_derivative(xi, xi2, t, s, d0, d1, log_s2, torch.addcmul(s, c, t))
        return torch.where(inside, ladj, 0.0)

    def _call(self, x: Tensor) -> Tensor:
        return self.call_and_ladj(x)[0]

    def _inverse(self, y: Tensor) -> Tensor:
        return self.inv_and_ladj(y)[0]

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self.call_and_ladj(x)[1]
