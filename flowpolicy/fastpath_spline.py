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


# the rows of a bin's table: left knots x and y, width, height, c = d0 + d1 - 2 s, the
# quadratic's coefficients h (s - d0) and h d0 at dy = 0, slope s = h / w, derivatives d0, d1
_ROWS = 10


def _tables(logits: Tensor, raw_derivs: Tensor, bound: float) -> tuple[Tensor, Tensor, Tensor]:
    """Per spline layer, bin and state, the bin's quantities ``(layers, rows, K, B)``, from the
    raw width and height logits ``(layers, 2, K, B)`` and derivatives ``(layers, K - 1, B)`` as
    :class:`Spline` builds them; also the bins' shares ``(layers, 2, K, B)`` (the softmax) and the
    interior knots of y, ``(layers, B, K - 1)`` (the bin search)."""
    K, B = logits.shape[2], bound
    e = (logits - logits.amax(2, keepdim=True)).exp()
    share = e / e.sum(2, keepdim=True)
    sizes = (2 * B * Spline.min_bin) + (2 * B * (1 - Spline.min_bin * K)) * share
    # left knots -B + sum of the sizes before; the last size is B - its left knot in Spline,
    # the same function of the logits (the shares sum to one)
    left = F.pad(sizes[:, :, :-1].cumsum(2), (0, 0, 1, 0)) - B
    inner = Spline.min_derivative + F.softplus(raw_derivs)
    derivs = F.pad(inner, (0, 0, 1, 1), value=1.0)  # (layers, K + 1, B): ends are 1
    d0, d1 = derivs[:, :-1], derivs[:, 1:]
    w, h = sizes.unbind(1)
    s = h / w
    c = torch.sub(d0 + d1, s, alpha=2.0)
    rows = [*left.unbind(1), w, h, c, h * (s - d0), h * d0, s, d0, d1]
    return torch.stack(rows, 1), share, left[:, 1, 1:].mT.contiguous()


def _invert(table: Tensor, knots_y: Tensor, v: Tensor, bound: float) -> tuple:
    """One spline's inverse at ``v (1, B)``: ``(x, bin, params (rows, 1, B), xi)``, the quadratic
    solved in :meth:`Spline.inv_and_state`'s cancellation-free form. Outside [-B, B] the clamped
    input sits on an end knot, where xi is 0 or 1: ``x = x(vc) + (v - vc)`` is the identity."""
    vc = v.clamp(-bound, bound)
    k = torch.searchsorted(knots_y, vc.mT, right=True).mT  # the number of knots <= vc
    params = table.gather(1, k.expand(_ROWS, 1, -1))
    x_k, y_k, w, _, c, a0, b0, s, _, _ = params
    dy = vc - y_k
    s_dy = s * dy
    b = torch.addcmul(b0, dy, c, value=-1.0)
    discriminant = torch.addcmul(b * b, torch.addcmul(a0, dy, c), s_dy, value=4.0)
    xi = (s_dy + s_dy) / (b + discriminant.clamp_min(0).sqrt())
    return torch.addcmul(x_k, xi, w) + (v - vc), k, params, xi


def _log_derivative(params: Tensor, xi: Tensor) -> Tensor:
    """log dy/dx of the splines at their states (stacked over layers); 0 up to rounding outside
    [-B, B] (xi 0 or 1 on an end knot, whose derivative is 1)."""
    _, _, _, _, c, _, _, s, d0, d1 = params.unbind(1)
    one_minus, xi2 = 1 - xi, xi * xi
    t = xi - xi2
    m = torch.addcmul(torch.addcmul(d1 * xi2, s, t, value=2.0), d0, one_minus * one_minus)
    return (m * (s / torch.addcmul(s, c, t)).square()).log()  # one log: a slow op on CPU


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
        # contiguous rows: softplus is several times slower on a strided view
        raw = theta.index_select(-1, rows).mT.contiguous()  # (len(rows), B)
        n_affine = len(rows) - layers * (3 * bins - 1)
        c, inv_s, log_det, affine = scalar_affine_forward(raw[:n_affine], layers, diag_offset, eps)
        logits, raw_derivs = raw[n_affine:].split([2 * bins * layers, (bins - 1) * layers])
        logits, raw_derivs = (
            logits.unflatten(0, (layers, 2, bins)),
            raw_derivs.unflatten(0, (layers, bins - 1)),
        )
        table, share, knots_y = _tables(logits, raw_derivs, bound)
        # the inverse chain, last layer first; per spline its input, bin, bin's row and xi;
        # values are (1, B): a spline's gather keeps that dim
        u, inputs, states = value, [], []
        cs, inv_ss = c[:, None].unbind(0), inv_s[:, None].unbind(0)
        tables, knots = table.unbind(0), knots_y.unbind(0)
        for k in range(layers, 0, -1):
            inputs.append(u)
            v = torch.addcmul(cs[k], u, inv_ss[k])
            u, *state = _invert(tables[k - 1], knots[k - 1], v, bound)
            states.append((v, *state))
        z = torch.addcmul(cs[0], u, inv_ss[0])[0]
        inputs = torch.stack([u.expand(1, -1) for u in [u, *inputs[::-1]]])[:, 0]  # (K+1, B)
        ladj = log_det
        if layers:
            v, k, params, xi = (torch.stack(p[::-1]) for p in zip(*states))
            ladj = ladj + _log_derivative(params, xi).sum(0)[0]
            ctx.spline = (v, k, params, xi, share, raw_derivs)
        log_prob = torch.sub(-0.5 * _LOG_2PI - ladj, z.square(), alpha=0.5)
        ctx.save_for_backward(rows, z, inputs, *affine)
        ctx.layers, ctx.bound, ctx.theta_shape = layers, bound, theta.shape
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, z, inputs, *affine = ctx.saved_tensors
        d_out = (-z * grad)[None]  # the gradient at each affine layer's inverse's output
        parts = []
        if ctx.layers:
            v, k, params, xi, share, raw_derivs = ctx.spline
            inside = v.abs() < ctx.bound
            d_out, d_bins = _spline_backward(params, xi, inside, grad, d_out, affine[-1])
            parts = [_raw_grads(d_bins, k, share, raw_derivs, ctx.bound)]
        parts = scalar_affine_backward(d_out, grad, inputs, affine) + parts
        raw = torch.cat(parts).mT
        d_theta = raw.new_zeros(ctx.theta_shape).index_copy_(-1, rows, raw)
        return d_theta, None, None, None, None, None, None, None


def _spline_backward(params, xi, inside, grad, d_out, inv_s) -> tuple[Tensor, Tensor]:
    r"""The gradients at the affine layers' inverses' outputs ``(K+1, B)``, from the first's
    ``d_out``, and of each spline's selected bin's ``x_k, y_k, w, h, d0, d1``, ``(layers, 6, 1,
    B)``. With :math:`F(\xi) = y_k + h\,n/\Delta - y`, a gradient through xi is
    :math:`-g_y\,\partial F/\partial p`, and :math:`g_y = (g_x w + g_\ell\,\ell_\xi)/F_\xi`; the
    log-derivative :math:`\ell` enters the log-prob with -1 (0 outside [-B, B], x = y there)."""
    _, _, w, h, c, _, _, s, d0, d1 = params.unbind(1)
    inside = inside.to(xi.dtype)
    one_minus, xi2 = 1 - xi, xi * xi
    t, dt = xi * one_minus, one_minus - xi  # t = xi (1 - xi) and dt/dxi
    om2 = one_minus * one_minus
    inv_delta = torch.addcmul(s, c, t).reciprocal()
    r = torch.addcmul(s * xi2, d0, t) * inv_delta  # y = y_k + h r
    inv_m = torch.addcmul(torch.addcmul(d1 * xi2, s, t, value=2.0), d0, om2).reciprocal()
    d_delta = c * dt
    # F_xi = h (n' - r delta') / delta, l_xi = m'/m - 2 delta'/delta (m' = 2 (...))
    f_xi = torch.addcmul(torch.addcmul(d0 * dt, s, xi, value=2.0), r, d_delta, value=-1.0)
    inv_f = (f_xi * h * inv_delta).reciprocal()
    m_xi = torch.addcmul(torch.addcmul(d1 * xi, s, dt), d0, one_minus, value=-1.0)
    l_xi = 2 * (m_xi * inv_m - d_delta * inv_delta)
    d_l = inside * -grad
    slope = torch.addcmul(1 - inside, inside, w * inv_f)  # 1 outside
    offset = d_l * l_xi * inv_f
    d_outs, d_ins = [d_out[0]], []
    for j, (a, b) in enumerate(zip(slope[:, 0].unbind(0), offset[:, 0].unbind(0))):
        d_ins.append(d_outs[-1] * inv_s[j])
        d_outs.append(torch.addcmul(b, d_ins[-1], a))
    d_out = torch.stack(d_outs)
    d_f, d_x = -d_out[1:, None] * inside, torch.stack(d_ins)[:, None] * inside
    # dr/ds = (xi^2 - r (1 - 2t)) / delta, dl/ds = 2 (1/s + t/m - (1 - 2t)/delta)
    q, two_t = 1 - 2 * t, 2 * t * inv_delta
    fh = d_f * h * inv_delta
    d_s = torch.addcmul(
        fh * torch.addcmul(xi2, r, q, value=-1.0),
        d_l,
        torch.addcmul(torch.addcmul(s.reciprocal(), t, inv_m), q, inv_delta, value=-1.0),
        value=2.0,
    )
    # dr/dd0 = t (1 - r) / delta, dr/dd1 = -t r / delta; dl/dd0 = (1 - xi)^2/m - 2t/delta, ...
    fht = fh * t
    d_d0 = torch.addcmul(fht * (1 - r), d_l, om2 * inv_m - two_t)
    d_d1 = torch.addcmul(-fht * r, d_l, xi2 * inv_m - two_t)
    d_s_w = d_s / w  # s = h / w
    d_h = torch.addcmul(d_s_w, d_f, r)
    d_w = torch.addcmul(d_x * xi, d_s_w, s, value=-1.0)
    return d_out, torch.stack([d_x, d_f, d_w, d_h, d_d0, d_d1], 1)


def _raw_grads(d_bins: Tensor, k: Tensor, share: Tensor, raw_derivs: Tensor, bound: float):
    """The raw rows' gradients (all logits, then all derivatives, as ``forward`` reads them)
    from the selected bins' (``d_bins``, bins ``k (layers, 1, B)``): scattered onto the bins,
    then through the cumulative sums (a left knot is the sum of the sizes before it), the
    softmax and the derivatives' softplus."""
    layers, _, K, B = share.shape
    index = k[:, None].expand(layers, 6, 1, B)
    d_table = d_bins.new_zeros(layers, 6, K + 1, B).scatter_(2, index, d_bins)
    d_left, d_sizes = d_table[:, 0:2, :K], d_table[:, 2:4, :K]  # (layers, 2, K, B)
    d_sizes = d_sizes + d_left.sum(2, keepdim=True) - d_left.cumsum(2)  # sum over later knots
    d_share = d_sizes * (2 * bound * (1 - Spline.min_bin * K))
    d_logits = share * (d_share - (d_share * share).sum(2, keepdim=True))
    # d0 is the derivative at the bin's left end, d1 at its right (the next entry)
    d_derivs = d_table[:, 4, 1:K] + d_table[:, 5, : K - 1]
    d_raw = d_derivs * torch.sigmoid(raw_derivs)
    return torch.cat([d_logits.flatten(0, 2), d_raw.flatten(0, 1)])
