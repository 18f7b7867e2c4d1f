r"""What makes a policy's flow fast on small batches, where every op costs its dispatch and its
autograd node (a few microseconds at a batch of 64) more than its arithmetic.

* :func:`unbind_layers`: the per-layer bijectors of a flow are views of bijectors built for all
  layers at once, each attribute split into its layers' views when a layer first reads it.
* :class:`ScalarPReLULogProb`: the log-density of a one-dimensional PReLU flow with per-state
  parameters (Pendulum, many 1-D control tasks: PPO's log-prob of stored actions) in one
  autograd node. For ``d = 1`` every affine layer is a scalar map :math:`y = s x + b` with
  :math:`s = L (1 + f^2)`, and the whole log-density of the chain,

  .. math:: \log q(y) = \log\mathcal{N}(z; 0, 1) - \sum_k \log s_k
            - \sum_k [v_k < 0] \log\alpha_k,

  is computed from the raw parameters with the forward pass outside autograd's graph and a
  hand-written backward pass (vectorized over the layers: the chain's gradient is a cumulative
  product). It is the map of the general chain (``FlowParams.layers`` and the bijectors'
  inverses), which the tests compare it with in float64, values and gradients. Its affine part
  (``scalar_affine_forward`` / ``scalar_affine_backward``) is shared with the spline flows'
  :class:`~flowpolicy.fastpath_spline.ScalarSplineLogProb`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.distributions import Transform

_LOG_2PI = math.log(2 * math.pi)


class _LayerViews:
    """The per-layer views of a stacked bijector's tensor attributes, each attribute unbound (one
    op, one autograd node) the first time any layer reads it: a pass that reads few of them (a
    log-prob needs an affine layer's inverse, not its scale) makes no others."""

    def __init__(self, transform: Transform) -> None:
        self.transform, self.views = transform, {}
        self.dims = getattr(transform, "_batch_dim", {})
        self.names = {k for k, v in vars(transform).items() if isinstance(v, Tensor)}
        # views carry gradients as the stacked bijector does, whatever the mode of first use
        # (a sample under no_grad first, a score-function log-prob after)
        self.grad_enabled = torch.is_grad_enabled()

    def get(self, name: str, i: int) -> Tensor:
        if name not in self.views:
            with torch.set_grad_enabled(self.grad_enabled):
                self.views[name] = getattr(self.transform, name).unbind(self.dims.get(name, 0))
        return self.views[name][i]


_LAZY_CLASSES: dict[type, type] = {}


def _plain(cls: type, state: dict) -> object:
    layer = object.__new__(cls)
    layer.__dict__.update(state, _inv=None)
    return layer


def _lazy_class(cls: type) -> type:
    """``cls`` whose instances read the tensor attributes they lack from their ``_LayerViews``."""
    if cls not in _LAZY_CLASSES:

        def __getattr__(self, name: str):  # only called for attributes the instance lacks
            views, i = self.__dict__.get("_layer_views", (None, 0))
            if views is None or name not in views.names:
                raise AttributeError(name)
            value = views.get(name, i)
            setattr(self, name, value)
            return value

        def __reduce_ex__(self, protocol):  # copies and pickles are plain ``cls`` instances
            views, i = self.__dict__["_layer_views"]
            state = {k: v for k, v in self.__dict__.items() if k not in ("_layer_views", "_inv")}
            return _plain, (cls, {**state, **{k: views.get(k, i) for k in views.names}})

        methods = {"__getattr__": __getattr__, "__reduce_ex__": __reduce_ex__}
        _LAZY_CLASSES[cls] = type(cls.__name__, (cls,), methods)
    return _LAZY_CLASSES[cls]


def unbind_layers(transform: Transform) -> list[Transform]:
    """Split a bijector whose parameters carry a leading layer dimension into one per layer.

    Every tensor attribute is split along its first batch dim: dim 0, or the dim a bijector
    names in ``_batch_dim`` for attributes with leading non-batch dims; each is unbound when a
    layer first reads it (:class:`_LayerViews`). A ``_batch_rank`` (the parameters' number of
    batch dims, kept as a plain int so that shape checks read no tensor) drops by one.
    """
    views = _LayerViews(transform)
    state = {k: v for k, v in vars(transform).items() if k not in views.names}
    if "_batch_rank" in state:  # a bijector's count of batch dims: one less per layer
        state["_batch_rank"] -= 1
    sizes = {getattr(transform, k).shape[views.dims.get(k, 0)] for k in views.names}
    if len(sizes) != 1:
        raise RuntimeError(f"{type(transform).__name__}: attributes disagree on the layer count")
    cls, layers = _lazy_class(type(transform)), []
    for i in range(sizes.pop()):
        layer = object.__new__(cls)
        layer.__dict__.update(state, _inv=None, _layer_views=(views, i))
        layers.append(layer)
    return layers


def scalar_affine_forward(raw: Tensor, layers: int, diag_offset: float, eps: float) -> tuple:
    """The ``K + 1`` scalar affine layers of a 1-D flow, all at once, from their raw rows
    ``[shift (K+1), raw diagonal (K+1), factor (K+1 or 0)]`` of shape ``(rows, B)``: each inverse
    is ``x = c + s^-1 y``. Returns ``(c, inv_s, log_det, saved)``, ``saved`` for the backward."""
    n = layers + 1
    shift, raw_diag, factor = raw[:n], raw[n : 2 * n], raw[2 * n :]  # factor empty for rank 0
    diag_in = raw_diag + diag_offset
    L = F.softplus(diag_in) + eps  # AffineParams' diagonal
    f2 = factor.square()
    q = 1 + f2 if len(factor) else torch.ones_like(L)
    inv_s = (L * q).reciprocal()
    c = -shift * inv_s  # x = c + s^-1 y, as Affine's inverse
    log_det = -inv_s.log().sum(0)  # log L + log1p(f^2): one log (a slow op) for all
    return c, inv_s, log_det, (shift, diag_in, L, factor, q, inv_s)


def scalar_affine_backward(
    d_out: Tensor, grad: Tensor, inputs: Tensor, saved: tuple
) -> list[Tensor]:
    """Gradients of the affine layers' raw rows (as ``scalar_affine_forward`` reads them) from
    ``d_out (K+1, B)``, the gradient at each layer's inverse's output, ``grad``, the log-prob's
    (each log-det enters with -1), and ``inputs (K+1, B)``, each inverse's input y."""
    shift, diag_in, L, factor, q, inv_s = saved
    # c = -b s^-1, s^-1 = 1 / (L q), log-det log L + log1p(f^2)
    d_shift = -d_out * inv_s
    d_inv_s = d_out * (inputs - shift)
    d_s = -d_inv_s * inv_s.square()
    d_L = d_s * q - grad / L
    parts = [d_shift, d_L * torch.sigmoid(diag_in)]
    if len(factor):
        parts.append((d_s * L - grad / q) * 2 * factor)
    return parts


class ScalarPReLULogProb(torch.autograd.Function):
    """``log q(value)`` of a 1-D PReLU flow from its raw parameters ``theta (B, P)``.

    ``rows`` lists the raw entries as ``[shift (K+1), raw diagonal (K+1), factor (K+1 or 0),
    log-slope (K)]`` of ``K`` layers; ``value (B,)`` needs no gradient. The affine layers'
    diagonals are ``softplus(raw + diag_offset) + eps``, as :class:`AffineParams`'.
    """

    @staticmethod
    def forward(
        ctx, theta: Tensor, value: Tensor, rows: Tensor, layers: int, diag_offset: float, eps: float
    ) -> Tensor:
        raw = theta.index_select(-1, rows).mT.contiguous()  # (len(rows), B)
        log_slope = raw[len(rows) - layers :]
        c, inv_s, log_det, affine = scalar_affine_forward(
            raw[: len(rows) - layers], layers, diag_offset, eps
        )
        # the inverse chain, last layer first; per layer its input u, and the PReLU's factor
        inv_slope = (-log_slope).exp()
        u, inputs, scales, negatives = value, [], [], []
        cs, inv_ss, inv_slopes = c.unbind(0), inv_s.unbind(0), inv_slope.unbind(0)
        for k in range(layers, 0, -1):
            inputs.append(u)
            v = torch.addcmul(cs[k], u, inv_ss[k])
            negative = v < 0
            scale = torch.where(negative, inv_slopes[k - 1], 1.0)
            u = v * scale
            negatives.append(negative)
            scales.append(scale)
        inputs.append(u)
        z = torch.addcmul(cs[0], u, inv_ss[0])
        ladj = log_det
        if layers:
            negative, scale = torch.stack(negatives[::-1]), torch.stack(scales[::-1])
            ladj = ladj + torch.where(negative, log_slope, 0.0).sum(0)
        else:
            negative, scale = z.new_empty(0, len(z), dtype=torch.bool), z.new_empty(0, len(z))
        log_prob = torch.sub(-0.5 * _LOG_2PI - ladj, z.square(), alpha=0.5)
        inputs = torch.stack(inputs[::-1])  # (K+1, B), layer order
        ctx.save_for_backward(rows, z, inputs, *affine)
        ctx.prelu, ctx.theta_shape = (negative, scale), theta.shape
        return log_prob

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):
        rows, z, inputs, *affine = ctx.saved_tensors
        inv_s = affine[-1]
        negative, scale = ctx.prelu
        layers = len(negative)
        # the gradient at each affine layer's output (z first): from one to the next it is
        # multiplied by that layer's s^-1 and the PReLU's factor, a cumulative product
        factors = inv_s[:layers] * scale
        d_out = (-z * grad) * torch.cat([torch.ones_like(inv_s[:1]), factors.cumprod(0)])
        d_in = d_out[:layers] * inv_s[:layers]  # at each PReLU's output u = v e^{-a} (v < 0)
        d_slope = torch.where(negative, -(d_in * inputs[:layers]) - grad, 0.0)
        parts = scalar_affine_backward(d_out, grad, inputs, affine)
        raw = torch.cat(parts + [d_slope]).mT
        d_theta = raw.new_zeros(ctx.theta_shape).index_copy_(-1, rows, raw)
        return d_theta, None, None, None, None, None
