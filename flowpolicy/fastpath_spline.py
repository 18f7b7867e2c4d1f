r"""The log-density of a one-dimensional spline flow with per-state parameters in one autograd
node (PPO's log-prob of stored 1-D actions), as :class:`~flowpolicy.fastpath.ScalarPReLULogProb`
is for PReLU flows: the affine layers are shared with it (``scalar_affine_*``), and between
them sit rational-quadratic splines (:class:`~flowpolicy.spline.Spline`, identity outside
:math:`[-B, B]`).

The forward pass runs outside autograd's graph. The backward is written by hand: a spline's
inverse :math:`x = x_k + w\,\xi` solves :math:`F(\xi) = y_k + h\,N(\xi)/\Delta(\xi) - y = 0`, so
by implicit differentiation every gradient through :math:`\xi` is :math:`-g_y\,\partial F /
\partial p` with :math:`g_y = g_\xi / F'(\xi)`; the log-derivative :math:`\ell = \log dy/dx` is
differentiated directly. Per-bin gradients are scattered onto the selected bins (one-hot), then
through the knots' cumulative sums and the softmax. The tests compare it with the general chain
in float64, values and gradients.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .fastpath import scalar_affine_backward, scalar_affine_forward
from .spline import Spline

_LOG_2PI = math.log(2 * math.pi)


def _tables(raw: Tensor, bins: int, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per spline layer and state, the bins' quantities ``(layers, 6, K, B)``: left knots x and y,
    widths, heights and the derivatives at both ends, from raw rows ``(layers, 3K - 1, B)`` as
    :class:`Spline` builds them; also the bins' shares ``(layers, 2, K, B)`` (the softmax)."""
    layers, K, B = len(raw), bins, bound
    logits = raw[:, : 2 * K].unflatten(1, (2, K))
    e = (logits - logits.amax(2, keepdim=True)).exp()
    share = e / e.sum(2, keepdim=True)
    sizes = (2 * B) * (Spline.min_bin + (1 - Spline.min_bin * K) * share)
    # left knots -B + sum of the sizes before; the last size is B - its left knot in Spline,
    # the same function of the logits (the shares sum to one)
    left = F.pad(sizes[:, :, :-1].cumsum(2), (0, 0, 1, 0)) - B
    inner = Spline.min_derivative + F.softplus(raw[:, 2 * K :])
    derivs = F.pad(inner, (0, 0, 1, 1), value=1.0)  # (layers, K + 1, B): ends are 1
    table = torch.cat([left, sizes, derivs[:, None, :-1], derivs[:, None, 1:]], 1)
    return table, share, left[:, 1, 1:]  # the last: interior knots of y, for the bin search


def _invert(table: Tensor, knots_y: Tensor, v: Tensor, bound: float) -> tuple:
    """One spline's inverse at ``v (B,)``: ``(x, bin, params (6, B), xi, inside)``, the quadratic
    solved in :meth:`Spline.inv_and_state`'s cancellation-free form."""
    inside = v.abs() < bound
    vc = v.clamp(-bound, bound)
    k = (vc >= knots_y).sum(0, keepdim=True)
    params = table.gather(1, k.expand(6, 1, -1)).squeeze(1)
    x_k, y_k, w, h, d0, d1 = params
    s = h / w
    c = d0 + d1 - 2 * s
    dy = vc - y_k
    a = torch.addcmul(h * (s - d0), dy, c)
    b = torch.addcmul(h * d0, dy, c, value=-1.0)
    s_dy = s * dy
    discriminant = torch.addcmul(b * b, a, s_dy, value=4.0).clamp_min(0)
    xi = ((2 * s_dy) / (b + discriminant.sqrt())).clamp(0, 1)
    x = torch.where(inside, torch.addcmul(x_k, xi, w), v)
    return x, k[0], params, xi, inside


def _log_derivative(params: Tensor, xi: Tensor, inside: Tensor) -> Tensor:
    """log dy/dx of the splines at their states (stacked over layers), 0 outside [-B, B]."""
    _, _, w, h, d0, d1 = params.unbind(1)
    s = h / w
    t = xi - xi * xi
    delta = torch.addcmul(s, d0 + d1 - 2 * s, t)
    m = d1 * xi.square() + 2 * s * t + d0 * (1 - xi).square()
    return torch.where(inside, 2 * s.log() + m.log() - 2 * delta.log(), 0.0)


class ScalarSplineLogProb(torch.autograd.Function):
    """``log q(value)`` of a 1-D spline flow from its raw parameters ``theta (B, P)``.

    ``rows`` lists the raw entries as ``[shift (K+1), raw diagonal (K+1), factor (K+1 or 0)]``
    of the affine layers, then each of the ``K`` splines' ``3 bins - 1`` entries (width logits,
    height logits, raw interior derivatives, as :class:`SplineParams` reads them); ``value (B,)``
    needs no gradient.
    """

    @staticmethod
    def forward(
        ctx,
        theta: Tensor,
        value: Tensor,
        rows: Tensor,
        layers: int,
        bins: int,
        bound: float,
        diag_offset: float,
        eps: float,
    ) -> Tensor:
        raw = theta.index_select(-1, rows).mT  # (len(rows), B)
        n_affine = len(rows) - layers * (3 * bins - 1)
        c, inv_s, log_det, affine = scalar_affine_forward(raw[:n_affine], layers, diag_offset, eps)
        raw_spline = raw[n_affine:].unflatten(0, (layers, 3 * bins - 1))
        table, share, knots_y = _tables(raw_spline, bins, bound)
        # the inverse chain, last layer first; per spline its bin, bin quantities, xi, inside
        u, inputs, states = value, [], []
        for k in range(layers, 0, -1):
            inputs.append(u)
            x, *state = _invert(table[k - 1], knots_y[k - 1], c[k] + inv_s[k] * u, bound)
            states.append(state)
            u = x
        inputs.append(u)
        z = c[0] + inv_s[0] * u
        inputs = torch.stack(inputs[::-1])  # (K+1, B), layer order
        ladj = log_det
        if layers:
            k, params, xi, inside = (torch.stack(p[::-1]) for p in zip(*states))
            ladj = ladj + _log_derivative(params, xi, inside).sum(0)
        log_prob = torch.sub(-0.5 * _LOG_2PI - ladj, z.square(), alpha=0.5)
        ctx.save_for_backward(rows, z, inputs, *affine)
        if layers:
            ctx.spline = (k, params, xi, inside, share, raw_spline[:, 2 * bins :])
        ctx.layers, ctx.bound, ctx.theta_shape = layers, bound, theta.shape
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, z, inputs, *affine = ctx.saved_tensors
        inv_s, layers = affine[-1], ctx.layers
        d_out = [-z * grad]  # the gradient at each affine layer's inverse's output, z first
        parts = []
        if layers:
            k, params, xi, inside, share, raw_derivs = ctx.spline
            partials = _spline_partials(params, xi, inside, grad)
            slope, offset = partials[:2]
            d_in = []  # at each spline's output x: from its input y it is a x' + b (y = v)
            for j in range(layers):
                d_in.append(d_out[-1] * inv_s[j])
                d_out.append(torch.addcmul(offset[j], d_in[-1], slope[j]))
            d_y, d_x = torch.stack(d_out[1:]), torch.stack(d_in)
            d_bins = _spline_param_grads(params, xi, inside, grad, d_x, d_y, partials)
            parts = [_raw_grads(d_bins, k, share, raw_derivs, ctx.bound)]
        d_out = torch.stack(d_out)
        parts = scalar_affine_backward(d_out, grad, inputs, affine) + parts
        raw = torch.cat(parts).mT
        d_theta = raw.new_zeros(ctx.theta_shape).index_copy_(-1, rows, raw)
        return d_theta, None, None, None, None, None, None, None


def _spline_partials(params: Tensor, xi: Tensor, inside: Tensor, grad: Tensor) -> tuple:
    r"""What the backward needs of each spline at its state, ``(layers, B)`` each: the map from
    the gradient at its output x to the one at its input y (``a g_x + b``), and the pieces of
    :math:`\partial F / \partial p` and :math:`\partial \ell / \partial p`. The log-derivative
    :math:`\ell` enters the log-prob with -1, so its gradient is ``-grad`` (0 outside)."""
    _, _, w, h, d0, d1 = params.unbind(1)
    s = h / w
    one_minus = 1 - xi
    t = xi * one_minus
    c = d0 + d1 - 2 * s
    delta = torch.addcmul(s, c, t)
    n = s * xi.square() + d0 * t  # y = y_k + h n / delta
    m = d1 * xi.square() + 2 * s * t + d0 * one_minus.square()  # dy/dx = s^2 m / delta^2
    r = n / delta
    dt = 1 - 2 * xi  # dt / dxi
    # dF/dxi = h (n' delta - n delta') / delta^2, and dl/dxi = m'/m - 2 delta'/delta
    d_delta = c * dt
    f_xi = h * ((2 * s * xi + d0 * dt) - r * d_delta) / delta
    l_xi = 2 * (d1 * xi + s * dt - d0 * one_minus) / m - 2 * d_delta / delta
    d_l = torch.where(inside, -grad, 0.0)
    # x = x_k + w xi and g_y = (g_x w + g_l l_xi) / F'(xi); outside, x = y
    slope = torch.where(inside, w / f_xi, 1.0)
    offset = torch.where(inside, d_l * l_xi / f_xi, 0.0)
    return slope, offset, s, t, delta, n, m, r, d_l


def _spline_param_grads(
    params: Tensor, xi: Tensor, inside: Tensor, grad: Tensor, d_x: Tensor, d_y: Tensor, partials
) -> Tensor:
    """The gradients of each spline's selected bin's ``x_k, y_k, w, h, d0, d1``, ``(layers, 6,
    B)``, from those at its output ``d_x`` and input ``d_y``: through xi, ``-d_y dF/dp``."""
    _, _, w, h, d0, d1 = params.unbind(1)
    _, _, s, t, delta, n, m, r, d_l = partials
    d_f = torch.where(inside, -d_y, 0.0)  # the gradient of F through xi
    d_x = torch.where(inside, d_x, 0.0)
    inv_delta = delta.reciprocal()
    two_t_delta = 2 * t * inv_delta
    # dr/ds = (xi^2 - r (1 - 2t)) / delta, dl/ds = 2/s + 2t/m - 2 (1 - 2t)/delta
    d_s = d_f * h * (xi.square() - r * (1 - 2 * t)) * inv_delta
    d_s = d_s + d_l * (2 / s + 2 * t / m - 2 * (1 - 2 * t) * inv_delta)
    # dr/dd0 = t (1 - r)/delta, dr/dd1 = -t r/delta; dl/dd0 = (1-xi)^2/m - 2t/delta, ...
    d_d0 = d_f * h * t * (1 - r) * inv_delta + d_l * ((1 - xi).square() / m - two_t_delta)
    d_d1 = -d_f * h * t * r * inv_delta + d_l * (xi.square() / m - two_t_delta)
    d_h = d_f * r + d_s / w  # s = h / w
    d_w = d_x * xi - d_s * s / w
    return torch.stack([d_x, d_f, d_w, d_h, d_d0, d_d1], 1)


def _raw_grads(d_bins: Tensor, k: Tensor, share: Tensor, raw_derivs: Tensor, bound: float):
    """The raw rows' gradients ``(layers * (3K - 1), B)`` from the selected bins' (``d_bins``,
    bins ``k (layers, B)``): scattered onto the bins, then through the cumulative sums (a left
    knot is the sum of the sizes before it), the softmax and the derivatives' softplus."""
    layers, _, K, B = share.shape
    index = torch.arange(K + 1, device=k.device)[:, None]
    at_k = (index == k[:, None]).to(d_bins.dtype)  # (layers, K + 1, B)
    at_next = (index == k[:, None] + 1).to(d_bins.dtype)
    d_left = d_bins[:, 0:2, None] * at_k[:, None, :K]  # (layers, 2, K, B)
    d_sizes = d_bins[:, 2:4, None] * at_k[:, None, :K]
    d_sizes = d_sizes + d_left.sum(2, keepdim=True) - d_left.cumsum(2)  # sum over later knots
    d_share = d_sizes * (2 * bound * (1 - Spline.min_bin * K))
    d_logits = share * (d_share - (d_share * share).sum(2, keepdim=True))
    d_derivs = d_bins[:, 4:5] * at_k + d_bins[:, 5:6] * at_next  # (layers, K + 1, B)
    d_raw = d_derivs[:, 1:K] * torch.sigmoid(raw_derivs)
    return torch.cat([d_logits.flatten(1, 2), d_raw], 1).flatten(0, 1)
