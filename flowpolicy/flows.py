r"""Flow distributions and the modules that hold their parameters.

A flow pushes a standard Gaussian base :math:`z \sim \mathcal{N}(0, I_d)` through a chain of
bijectors :math:`x = f_K \circ \dots \circ f_1(z)`; by the change of variables

.. math:: \log q(x) = \log \mathcal{N}(z; 0, I) - \sum_k \log|\det J_{f_k}(z_{k-1})|.

The chain alternates :class:`~flowpolicy.bijectors.Affine` layers and an element-wise
nonlinearity (:class:`~flowpolicy.bijectors.PReLU` or :class:`~flowpolicy.bijectors.Spline`) and
ends on an affine layer, optionally followed by :class:`~flowpolicy.bijectors.Tanh`.

As in zuko, modules are lazy: :class:`Flow` and :class:`ConditionalFlow` hold parameters, and
calling them returns a :class:`FlowDistribution`. Both share one parametrization: a flat vector
of raw parameters per distribution, learnable for :class:`Flow` and the output of an MLP of the
context (a hypernetwork) for :class:`ConditionalFlow`, so that the *shape* of the distribution,
not only its location, depends on the context.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Size, Tensor
from torch.distributions import Distribution, Independent, Normal, Transform, constraints

from flowpolicy._compiled import cpu_kernel
from flowpolicy.bijectors import (
    Affine,
    PReLU,
    Spline,
    Tanh,
    call_and_ladj,
    capacitance_log_det,
    capacitance_log_det_grad,
    inv_and_ladj,
)

__all__ = ["ConditionalFlow", "Flow", "FlowDistribution"]

NONLINEARITIES = ("prelu", "spline")
_LOG_2PI = math.log(2 * math.pi)
_KERNEL_DTYPES = (torch.float32, torch.float64)


class FlowDistribution(Distribution):
    r"""A base distribution pushed through a chain of bijectors, with exact log-densities.

    .. math:: x = f(z),\ z \sim p_0, \qquad \log q(x) = \log p_0(f^{-1}(x))
              - \log|\det J_f(f^{-1}(x))|

    :param base: a distribution over vectors of size ``d`` (``event_shape == (d,)``).
    :param transforms: the chain, applied first to last; any ``torch.distributions.Transform``
        on vectors or scalars works, the bijectors of :mod:`flowpolicy.bijectors` use fused calls.
    :param validate_args: check the values given to :meth:`log_prob` (shape, finiteness); a
        flow module's distribution also checks that its parameters are finite. ``None``: torch's
        default (on, unless ``Distribution.set_default_validate_args(False)``).

    Example:
        >>> dist = Flow(dim=2, layers=4)()
        >>> x, log_prob = dist.rsample_and_log_prob((512,))
    """

    has_rsample = True
    arg_constraints: dict = {}

    def __init__(
        self,
        base: Distribution,
        transforms: Sequence[Transform],
        validate_args: bool | None = None,
    ) -> None:
        if len(base.event_shape) != 1:
            raise ValueError(
                f"FlowDistribution: the base must have vector events, got {base.event_shape}"
            )
        self.base = base
        self.transforms = list(transforms)
        super().__init__(base.batch_shape, base.event_shape, validate_args=validate_args)

    @constraints.dependent_property(is_discrete=False, event_dim=1)
    def support(self):
        return self.transforms[-1].codomain if self.transforms else constraints.real_vector

    def push_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Map base samples ``z`` to ``(x, log q(x))`` in one forward pass (no inverse).

        Useful with noise you hold yourself (fixed noise gives reproducible samples).
        """
        log_prob = self.base.log_prob(z)
        x = z
        for transform in self.transforms:
            x, ladj = call_and_ladj(transform, x)
            log_prob = log_prob - ladj
        return x, log_prob

    def rsample_and_log_prob(
        self, sample_shape: Size | Sequence[int] = ()
    ) -> tuple[Tensor, Tensor]:
        """Reparameterized samples and their exact log-density, in one pass without inverses."""
        return self.push_forward(self.base.rsample(Size(sample_shape)))

    def rsample(self, sample_shape: Size | Sequence[int] = ()) -> Tensor:
        x = self.base.rsample(Size(sample_shape))
        for transform in self.transforms:
            x = transform(x)
        return x

    def sample(self, sample_shape: Size | Sequence[int] = ()) -> Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            d = self.event_shape[0]
            if value.dim() < 1 or value.shape[-1] != d:
                raise ValueError(
                    f"log_prob: expected values of shape (..., {d}), got {tuple(value.shape)}"
                )
            if not torch.isfinite(value).all():
                raise ValueError("log_prob: the values contain NaN or inf")
        log_det = 0.0
        for transform in reversed(self.transforms):
            value, ladj = inv_and_ladj(transform, value)
            log_det = log_det + ladj
        return self.base.log_prob(value) - log_det

    def entropy_and_stderr(self, num_samples: int = 4096) -> tuple[Tensor, Tensor]:
        r"""Monte-Carlo entropy :math:`H \approx -\frac{1}{n}\sum_i \log q(x_i)` and its standard
        error :math:`\hat\sigma/\sqrt{n}`, per batch element."""
        with torch.no_grad():
            _, log_prob = self.rsample_and_log_prob((num_samples,))
        return -log_prob.mean(0), log_prob.std(0) / math.sqrt(num_samples)

    def entropy(self, num_samples: int = 4096) -> Tensor:
        """Monte-Carlo estimate of the entropy (no gradient); see :meth:`entropy_and_stderr`."""
        return self.entropy_and_stderr(num_samples)[0]

    def expand(self, batch_shape, _instance=None):
        raise NotImplementedError("FlowDistribution does not support expand()")


class _FusedPReLUFlow(torch.autograd.Function):
    r"""A policy's step through an affine/PReLU flow: raw parameters ``theta (B, P)`` and base
    noise ``z (B, d)``, one sample per parameter set, to the sample ``x (B, d)`` and the log-det
    of the whole chain ``(B,)``, in one autograd node with a hand-written backward.

    Autograd would record about ten nodes per layer, and on CPU their overhead, not the
    arithmetic, is what a small flow costs (``benchmarks/bench_flows.py``). Affine layer ``k``
    maps its input :math:`x` by :math:`S = L(I + VV^\top)` without forming :math:`S` (a tiny matmul
    per sample costs more than the vector products); all but the last are followed by a PReLU
    with mask :math:`m = [p < 0]`; an optional tanh ends the chain:

    .. math:: u = V^\top x, \quad w = x + V u, \quad p = L w + b, \quad
              x' = p \odot (m\,a + 1 - m),

    .. math:: \ell = \textstyle\sum_k \big(\sum_i \log L_{ii} + \log\det(I + V^\top V)\big)
              + \sum_k \sum_i m_i \log a_i\ [+ \text{tanh's log-det}].

    With bars for gradients, the backward is

    .. math:: \bar x = \bar y\,(1 - y^2) - 2\bar\ell\,y, \qquad
              \bar p = \bar x' \odot (m\,a + 1 - m), \qquad
              \overline{\log a} = m \odot (\bar x' \odot x' + \bar\ell),

    .. math:: \bar b = \bar p,\ \bar L = \bar p\, w^\top,\ \bar w = L^\top \bar p,\
              t = V^\top \bar w,\ \bar V = \bar w u^\top + x t^\top
              + 2 \bar\ell\, V (I + V^\top V)^{-1},\ \bar x = \bar w + V t,

    then through the parametrization (:meth:`_AffineParams.parts_backward`);
    tanh's log-det has derivative :math:`-2\tanh x`, and :math:`\log L_{ii}` gives
    :math:`\bar\ell / L_{ii}`. ``tests/test_flows.py`` checks it against autograd through the
    bijectors and with ``gradcheck``.
    """

    @staticmethod
    def run(z: Tensor, theta: Tensor, layout: _FlowParams) -> tuple[Tensor, Tensor, tuple]:
        """The forward pass: ``(x, log-det, what the backward needs)``; no graph is recorded
        here, so that without gradients it also serves as a plain function."""
        # each kind of layer in one contiguous block: strided views slow every op that reads them
        raw, log_alpha = (v.contiguous() for v in layout.layer_views(theta))
        shift, diag, L, V = layout.chain[0].parts(raw)
        ladj = diag.log().sum((0, -1))
        if V is not None:
            ladj = ladj + capacitance_log_det(V).sum(0)
        n, (B, d), r = L.shape[0], z.shape, 0 if V is None else V.shape[-1]
        alpha = log_alpha.exp()
        # vectors are columns (B, d, 1), so that every product is one batched matmul; u and w
        # of every layer are written into one buffer each (no stacking for the backward)
        us, ws = z.new_empty(n, B, r, 1), z.new_empty(n, B, d, 1)
        L_k, shift_k, u_k, w_k = L.unbind(), shift.unsqueeze(-1).unbind(), us.unbind(), ws.unbind()
        if V is not None:
            V_k, VT_k = V.unbind(), V.mT.unbind()
        alpha_k = alpha.flatten(1).unbind()
        x = z.unsqueeze(-1)
        xs = [x]  # the input of each affine layer
        for k in range(n):
            if V is not None:
                torch.bmm(VT_k[k], x, out=u_k[k])
                x = torch.baddbmm(x, V_k[k], u_k[k], out=w_k[k])
            else:
                w_k[k].copy_(x)
            x = torch.baddbmm(shift_k[k], L_k[k], x)
            if k < n - 1:
                # one slope per element: prelu's channels are dim 1 of a (1, B d) view
                x = F.prelu(x.view(1, -1), alpha_k[k]).view(B, d, 1)
                xs.append(x)
        xs = torch.stack(xs)
        masks = xs[1:] < 0  # PReLU keeps the sign of its input
        if n > 1:
            ladj = ladj + torch.where(masks, log_alpha.unsqueeze(-1), 0.0).sum((0, 2, 3))
        x = x.squeeze(-1)
        if layout.squash:
            ladj = ladj + Tanh._ladj(x)
            x = torch.tanh(x)
        return x, ladj, (theta, diag, L, V, alpha, x, xs, us, ws, masks)

    @staticmethod
    def forward(ctx, z, theta, layout):
        x, ladj, saved = _FusedPReLUFlow.run(z, theta, layout)
        ctx.layout = layout
        ctx.save_for_backward(*saved)
        return x, ladj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_ladj):
        theta, diag, L, V, alpha, y, xs, us, ws, masks = ctx.saved_tensors
        layout, n, affine = ctx.layout, L.shape[0], ctx.layout.chain[0]
        g = grad_y
        if layout.squash:
            g = g * (1 - y * y) - 2 * grad_ladj.unsqueeze(-1) * y
        slopes = torch.where(masks, alpha.unsqueeze(-1), 1.0).unbind()  # of each PReLU
        # grad_p[k]: of the output of affine layer k; grad_x[k]: of its input
        grad_p, grad_x = torch.empty_like(ws), torch.empty_like(xs)
        grad_w, grad_t = torch.empty_like(ws), torch.empty_like(us)
        grad_p_k, grad_x_k = grad_p.unbind(), grad_x.unbind()
        grad_w_k, grad_t_k, LT_k = grad_w.unbind(), grad_t.unbind(), L.mT.unbind()
        if V is not None:
            V_k, VT_k = V.unbind(), V.mT.unbind()
        grad_p_k[-1].copy_(g.unsqueeze(-1))
        for k in reversed(range(n)):
            if V is not None:
                g = torch.bmm(LT_k[k], grad_p_k[k], out=grad_w_k[k])
                torch.bmm(VT_k[k], g, out=grad_t_k[k])
                g = torch.baddbmm(g, V_k[k], grad_t_k[k], out=grad_x_k[k])
            else:
                g = torch.bmm(LT_k[k], grad_p_k[k], out=grad_x_k[k])
            if k > 0:
                torch.mul(g, slopes[k - 1], out=grad_p_k[k - 1])
        grad_V = None
        if V is not None:
            # column j of grad_w u^T + x t^T + 2 l V C^-1, from vectors (on CPU broadcast outer
            # products cost more)
            grad_w2, x2, u2, t2 = (v.squeeze(-1) for v in (grad_w, xs, us, grad_t))
            columns = [
                grad_w2 * u2[..., j, None] + x2 * t2[..., j, None] + grad_ladj[:, None] * column
                for j, column in enumerate(capacitance_log_det_grad(V))
            ]
            grad_V = torch.stack(columns, -1)
        # of L's strictly lower entries (grad_p w^T at them) and of its diagonal, which the
        # log-det also holds
        grad_p2, w2 = grad_p.squeeze(-1), ws.squeeze(-1)
        grad_lower = grad_p2.index_select(-1, affine.rows) * w2.index_select(-1, affine.cols)
        grad_diag = grad_p2 * w2 + grad_ladj[:, None] / diag
        # written layer by layer into views of theta's gradient (no concatenation)
        grad_theta = torch.empty_like(theta)
        grad_affine, grad_log_alpha = layout.layer_views(grad_theta)
        raw = layout.layer_views(theta)[0]
        affine.parts_backward(raw, grad_p2, grad_diag, grad_lower, grad_V, out=grad_affine)
        if n > 1:
            # of log a: the PReLU output x' = a p on the mask, and its log-det term
            grad = (grad_x[1:] * xs[1:] + grad_ladj[:, None, None]).squeeze(-1)
            torch.where(masks.squeeze(-1), grad, grad.new_zeros(()), out=grad_log_alpha)
        return grad_x[0].squeeze(-1), grad_theta, None


class _CompiledPReLUFlow(torch.autograd.Function):
    """:class:`_FusedPReLUFlow` on the CPU through the compiled kernel of ``csrc/prelu_flow.cpp``:
    the same maths and layout, the arithmetic of each sample in one loop through the chain."""

    @staticmethod
    def run(z: Tensor, theta: Tensor, layout: _FlowParams) -> tuple[Tensor, Tensor, tuple]:
        """The forward pass: ``(x, log-det, what the backward needs)``, as
        :meth:`_FusedPReLUFlow.run`."""
        x, ladj, *saved = cpu_kernel().prelu_flow_forward(z, theta, *layout.kernel_config)
        return x, ladj, (theta, x, *saved)

    @staticmethod
    def forward(ctx, z, theta, layout):
        x, ladj, saved = _CompiledPReLUFlow.run(z, theta, layout)
        ctx.layout = layout
        ctx.save_for_backward(*saved)
        return x, ladj

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_x, grad_ladj):
        grad_z, grad_theta = cpu_kernel().prelu_flow_backward(
            grad_x, grad_ladj, *ctx.saved_tensors, *ctx.layout.kernel_config
        )
        return grad_z, grad_theta, None


class _AffineParams(nn.Module):
    r"""Raw vector :math:`\theta` of size :math:`d + d(d+1)/2 + d r` to an :class:`Affine`.

    The diagonal of :math:`L` is :math:`\mathrm{softplus}(\theta + c) + \epsilon` (1 at
    :math:`\theta = 0`), so every :math:`\theta` is valid. The low-rank factor is learned as
    :math:`F = V D^{1/2}` directly (``perturb_diag`` is redundant for a learned parametrization).
    """

    eps = 1e-4

    def __init__(self, dim: int, rank: int) -> None:
        super().__init__()
        self.dim, self.rank = dim, rank
        n_tril = dim * (dim + 1) // 2
        self.sizes = (dim, n_tril, dim * rank)
        self.num_params = sum(self.sizes)
        # strictly lower entries @ scatter: one matmul places them in every L of the batch
        rows, cols = torch.tril_indices(dim, dim, offset=-1)
        scatter = torch.zeros(len(rows), dim * dim)
        scatter[torch.arange(len(rows)), rows * dim + cols] = 1.0
        self.register_buffer("scatter", scatter, persistent=False)
        self.register_buffer("rows", rows, persistent=False)
        self.register_buffer("cols", cols, persistent=False)
        self.diag_offset = math.log(math.expm1(1.0 - self.eps))

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        shift, tril, factor = torch.zeros(self.num_params).split(self.sizes)
        noise = torch.randn(tril.numel() - self.dim, generator=generator)
        tril[self.dim :] = strength * noise / math.sqrt(self.dim)
        # a mild update, |F|^2 ~ 0.05: strong updates compound over layers into huge scales
        noise = torch.randn(factor.numel(), generator=generator)
        factor.copy_(min(strength, 1.0) * 0.22 * noise / math.sqrt(self.dim))
        return torch.cat([shift, tril, factor])

    def parts(self, theta: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """``(shift, diag, L, V)`` of the raw parameters: ``diag`` is the diagonal of ``L``."""
        shift, raw_diag, lower, factor = self.split(theta)
        d, r = self.dim, self.rank
        diag = F.softplus(raw_diag + self.diag_offset) + self.eps
        L = lower @ self.scatter
        L[..., :: d + 1] = diag  # the diagonal of the flattened d x d matrices
        return shift, diag, L.unflatten(-1, (d, d)), factor.unflatten(-1, (d, r)) if r > 0 else None

    def split(self, theta: Tensor) -> tuple[Tensor, ...]:
        """Views of the raw parameters: shift, raw diagonal, strictly lower entries, factor."""
        d = self.dim
        return theta.split((d, d, self.sizes[1] - d, self.sizes[2]), -1)

    def parts_backward(
        self,
        theta: Tensor,
        grad_shift: Tensor,
        grad_diag: Tensor,
        grad_lower: Tensor,
        grad_V: Tensor | None,
        out: Tensor,
    ) -> None:
        """Write into ``out`` the gradient of :meth:`parts` with respect to ``theta``, given those
        of the shift, of the diagonal of ``L`` (all of it: ``diag`` is both an output and in
        ``L``), of the strictly lower entries of ``L`` (in the order of ``theta``) and of ``V``."""
        out_shift, out_diag, out_lower, out_factor = self.split(out)
        raw_diag = self.split(theta)[1]
        out_shift.copy_(grad_shift)
        # softplus' derivative is the sigmoid
        torch.mul(grad_diag, torch.sigmoid(raw_diag + self.diag_offset), out=out_diag)
        out_lower.copy_(grad_lower)
        if grad_V is not None:
            out_factor.copy_(grad_V.flatten(-2))

    def forward(self, theta: Tensor) -> Affine:
        shift, diag, L, V = self.parts(theta)
        return Affine(shift, L, V, validate=False, log_diag=diag.log())


class _PReLUParams(nn.Module):
    r"""Raw :math:`\theta \in \mathbb{R}^d` to a :class:`PReLU` with slopes :math:`e^\theta`."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.num_params = dim

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        # slopes log-uniform in [e^-s, e^s]: all-ones slopes keep the chain linear forever
        return strength * (2 * torch.rand(self.num_params, generator=generator) - 1)

    def forward(self, theta: Tensor) -> PReLU:
        return PReLU.from_log_slopes(theta)


class _SplineParams(nn.Module):
    """Raw vector of size ``d (3K - 1)`` to a :class:`Spline` with ``K`` bins on [-B, B]."""

    def __init__(self, dim: int, bins: int, bound: float) -> None:
        super().__init__()
        self.dim, self.bins, self.bound = dim, bins, bound
        self.num_params = dim * (3 * bins - 1)
        self.identity_derivative = math.log(math.expm1(1.0 - Spline.min_derivative))

    def init(self, generator: torch.Generator, strength: float) -> Tensor:
        theta = torch.zeros(self.dim, 3 * self.bins - 1)
        theta[:, 2 * self.bins :] = self.identity_derivative
        theta += strength * 0.1 * torch.randn(theta.shape, generator=generator)
        return theta.flatten()

    def forward(self, theta: Tensor) -> Spline:
        theta = theta.unflatten(-1, (self.dim, 3 * self.bins - 1))
        widths, heights, derivatives = theta.split([self.bins, self.bins, self.bins - 1], -1)
        return Spline(widths, heights, derivatives, self.bound, validate=False)


def _unbind_layers(transform: Transform) -> list[Transform]:
    """Split a bijector whose parameters carry a leading layer dimension into one per layer.

    Every tensor attribute is unbound along its first batch dim: dim 0, or the dim a bijector
    names in ``_batch_dim`` for attributes with leading non-batch dims (views, one autograd
    node per attribute).
    """
    dims = getattr(transform, "_batch_dim", {})
    fields = {
        k: v.unbind(dims.get(k, 0)) for k, v in vars(transform).items() if isinstance(v, Tensor)
    }
    sizes = {len(v) for v in fields.values()}
    if len(sizes) != 1:
        raise RuntimeError(f"{type(transform).__name__}: attributes disagree on the layer count")
    layers = []
    for i in range(sizes.pop()):
        layer = copy.copy(transform)
        for name, values in fields.items():
            setattr(layer, name, values[i])
        layers.append(layer)
    return layers


class _FlowParams(nn.Module):
    """The chain's layout: raw parameter vector ``(..., P)`` to a :class:`FlowDistribution`."""

    def __init__(
        self,
        dim: int,
        layers: int,
        rank: int,
        nonlinearity: str,
        squash: bool,
        bins: int,
        bound: float,
    ) -> None:
        super().__init__()
        if not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not isinstance(layers, int) or layers < 0:
            raise ValueError(f"layers must be a non-negative integer, got {layers!r}")
        if not isinstance(rank, int) or not 0 <= rank <= dim:
            raise ValueError(f"rank must be an integer in [0, dim = {dim}], got {rank!r}")
        if nonlinearity not in NONLINEARITIES:
            raise ValueError(f"nonlinearity must be one of {NONLINEARITIES}, got {nonlinearity!r}")
        if nonlinearity == "spline" and (bins < 2 or not bound > 0):
            raise ValueError(f"spline needs bins >= 2 and bound > 0, got {bins} and {bound}")
        self.dim, self.squash = dim, squash
        chain: list[nn.Module] = []
        for _ in range(layers):
            chain.append(_AffineParams(dim, rank))
            if nonlinearity == "prelu":
                chain.append(_PReLUParams(dim))
            else:
                chain.append(_SplineParams(dim, bins, bound))
        chain.append(_AffineParams(dim, rank))
        self.chain = nn.ModuleList(chain)
        self.sizes = [layer.num_params for layer in chain]
        self.num_params = sum(self.sizes)
        # whether one sample per parameter set can take the fused step (_CompiledPReLUFlow on
        # the CPU, _FusedPReLUFlow elsewhere)
        self.fused = (nonlinearity == "prelu" or layers == 0) and rank <= 2
        # the layout as the compiled kernel takes it (csrc/prelu_flow.cpp)
        affine = self.chain[0]
        self.kernel_config = (rank, layers, squash, affine.diag_offset, affine.eps)
        self.register_buffer("zero", torch.zeros(dim), persistent=False)
        self.register_buffer("one", torch.ones(dim), persistent=False)

    def init(self, seed: int | None, strength: float) -> Tensor:
        generator = torch.Generator()
        if seed is None:
            # draw from the global generator: torch.seed() would re-seed it non-deterministically
            seed = int(torch.randint(0, 2**62, ()).item())
        generator.manual_seed(seed)
        return torch.cat([layer.init(generator, strength) for layer in self.chain])

    def forward(self, theta: Tensor, validate_args: bool | None) -> FlowDistribution:
        return _LayeredFlowDistribution(self, theta, validate_args)

    def layer_views(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        """Views, without copies, of raw parameters ``theta (..., P)`` as every affine layer
        ``(K+1, ..., P_affine)`` and every nonlinear layer ``(K, ..., P_nonlinear)``: the chain
        alternates them, so each kind repeats with a period of ``P_affine + P_nonlinear``."""
        size = self.sizes[0]
        period = size + (self.sizes[1] if len(self.sizes) > 1 else 0)
        affine = theta.unfold(-1, size, period).movedim(-2, 0)
        if len(self.sizes) == 1:
            return affine, theta.new_empty(0, *theta.shape[:-1], self.dim)
        return affine, theta[..., size:].unfold(-1, period - size, period).movedim(-2, 0)

    def transforms(self, theta: Tensor) -> list[Transform]:
        """The chain of bijectors for raw parameters ``theta (..., P)``."""
        # All affine layers share one layout, and so do all nonlinear layers: build each kind in
        # one call with a leading layer dimension and split it, instead of one call per layer
        # (on CPU the many tiny kernels of per-layer builds dominate a small policy's step).
        raw_affine, raw_nonlinear = self.layer_views(theta)
        affines = _unbind_layers(self.chain[0](raw_affine.contiguous()))
        transforms: list[Transform] = [affines[0]]
        if len(self.chain) > 1:
            nonlinear = _unbind_layers(self.chain[1](raw_nonlinear.contiguous()))
            for g, affine in zip(nonlinear, affines[1:]):
                transforms += [g, affine]
        if self.squash:
            transforms.append(Tanh())
        return transforms


class _LayeredFlowDistribution(FlowDistribution):
    """The :class:`FlowDistribution` of a :class:`_FlowParams` layout and its raw parameters.

    The base and the bijectors are built only when they are used; one sample per parameter set
    (a policy's step) through an affine/PReLU chain takes the compiled kernel on the CPU
    (:class:`_CompiledPReLUFlow`) and :class:`_FusedPReLUFlow` elsewhere instead.
    """

    def __init__(self, layout: _FlowParams, theta: Tensor, validate_args: bool | None) -> None:
        self.layout, self.theta = layout, theta
        self._transforms: list[Transform] | None = None
        self._base: Distribution | None = None
        # built on first use, perhaps under no_grad (sample()): with the grad mode of creation
        self._grad_enabled = torch.is_grad_enabled()
        # the base is built on first use too: a policy's step draws it without Normal's ops
        Distribution.__init__(self, theta.shape[:-1], (layout.dim,), validate_args=validate_args)
        if self._validate_args and not torch.isfinite(theta).all():
            raise ValueError(
                "the flow's parameters contain NaN or inf (from a non-finite context, or weights "
                "that diverged in training)"
            )

    @property
    def base(self) -> Distribution:
        """The standard normal base over R^d."""
        if self._base is None:
            shape = self.batch_shape + self.event_shape
            zero, one = self.layout.zero.expand(shape), self.layout.one.expand(shape)
            self._base = Independent(Normal(zero, one, validate_args=False), 1, validate_args=False)
        return self._base

    @property
    def transforms(self) -> list[Transform]:
        if self._transforms is None:
            with torch.set_grad_enabled(self._grad_enabled):
                self._transforms = self.layout.transforms(self.theta)
        return self._transforms

    def push_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        if z.shape[:-1] != self.batch_shape or not self.layout.fused:
            return super().push_forward(z)
        d = z.shape[-1]
        z2d, theta2d = z.reshape(-1, d), self.theta.reshape(-1, self.theta.shape[-1])
        compiled = z.device.type == "cpu" and z.dtype in _KERNEL_DTYPES and cpu_kernel()
        step = _CompiledPReLUFlow if compiled else _FusedPReLUFlow
        if torch.is_grad_enabled() and (z.requires_grad or self.theta.requires_grad):
            x, ladj = step.apply(z2d, theta2d, self.layout)
        else:  # acting: nothing to differentiate, so no autograd node and nothing saved
            x, ladj, _ = step.run(z2d, theta2d, self.layout)
        # the base is standard normal: its density without Normal's ops
        log_base = z.pow(2).sum(-1).mul(-0.5).sub(0.5 * d * _LOG_2PI)
        return x.reshape(z.shape), log_base - ladj.reshape(z.shape[:-1])

    def rsample_and_log_prob(
        self, sample_shape: Size | Sequence[int] = ()
    ) -> tuple[Tensor, Tensor]:
        if Size(sample_shape):
            return super().rsample_and_log_prob(sample_shape)
        # the base is standard normal: draw it without Normal's ops
        shape = self.batch_shape + self.event_shape
        return self.push_forward(
            torch.randn(shape, dtype=self.theta.dtype, device=self.theta.device)
        )

    def rsample(self, sample_shape: Size | Sequence[int] = ()) -> Tensor:
        if Size(sample_shape):
            return super().rsample(sample_shape)
        return self.rsample_and_log_prob()[0]


class Flow(nn.Module):
    r"""A learnable flow distribution over :math:`\mathbb{R}^d` (or :math:`(-1, 1)^d` with
    ``squash``): ``flow()`` returns a :class:`FlowDistribution`.

    The chain is ``layers`` blocks of (affine, nonlinearity) followed by a final affine layer:

    .. math:: f = A_{L+1} \circ g_L \circ A_L \circ \dots \circ g_1 \circ A_1 \ [\circ\ \tanh]

    Initialization matters more than depth: PReLU slopes start log-uniform in
    :math:`[e^{-s}, e^{s}]` with ``s = init_strength`` (slopes all equal to 1 start a linear chain
    that stays linear), the affine layers start as random shears, splines start near the identity.

    :param dim: event size ``d``.
    :param layers: number of nonlinear layers; the chain has ``layers + 1`` affine layers.
    :param rank: rank ``r`` of the low-rank update in each affine layer, ``0 <= r <= d``.
    :param nonlinearity: ``"prelu"`` (a two-piece linear spline) or ``"spline"`` (monotone
        rational-quadratic, the choice for well-separated modes).
    :param squash: end the chain with :class:`~flowpolicy.bijectors.Tanh` (support ``(-1, 1)^d``).
    :param bins: spline bins ``K``.
    :param bound: spline interval ``[-B, B]``; identity outside.
    :param init_strength: spread of the random initialization (``0`` starts at the identity map).
    :param seed: seed of the initialization (``None``: from torch's global generator).

    Example:
        >>> flow = Flow(dim=2, layers=16, rank=1)
        >>> loss = -flow().log_prob(data).mean()
    """

    def __init__(
        self,
        dim: int,
        layers: int = 8,
        rank: int = 1,
        nonlinearity: str = "prelu",
        squash: bool = False,
        bins: int = 8,
        bound: float = 4.0,
        init_strength: float = 1.0,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        self.config = dict(
            dim=dim,
            layers=layers,
            rank=rank,
            nonlinearity=nonlinearity,
            squash=squash,
            bins=bins,
            bound=bound,
        )
        self.layout = _FlowParams(dim, layers, rank, nonlinearity, squash, bins, bound)
        self.theta = nn.Parameter(self.layout.init(seed, init_strength))

    def forward(self, validate_args: bool | None = None) -> FlowDistribution:
        return self.layout(self.theta, validate_args)


class ConditionalFlow(nn.Module):
    r"""A flow whose every bijector parameter is a function of a context vector ``c``.

    .. math:: \theta(c) = W\,\mathrm{MLP}(c) + b, \qquad q(x \mid c) = \text{flow}_{\theta(c)}(x)

    ``cflow(context)`` returns a :class:`FlowDistribution` with
    ``batch_shape == context.shape[:-1]``. The output layer starts with small weights and its
    bias at the initialization of :class:`Flow`, so at first every context gets nearly the same
    well-initialized flow, and training makes its shape context-dependent.

    :param dim: event size ``d``.
    :param context_dim: size of the context vector.
    :param layers: number of nonlinear layers (see :class:`Flow`).
    :param rank: rank of the low-rank update of each affine layer.
    :param hidden: hidden sizes of the MLP; ``()`` makes the hypernetwork a single linear head
        (for a context that is already a learned feature, such as a policy's latent).
    :param nonlinearity: ``"prelu"`` or ``"spline"``.
    :param squash: end with tanh (actions in ``(-1, 1)^d``).
    :param activation: activation class of the MLP.
    :param bins: spline bins.
    :param bound: spline interval ``[-B, B]``.
    :param init_strength: spread of the initialization (``0``: identity map plus a tiny
        context-dependent part).
    :param head_scale: scale of the output layer's initial weights.
    :param seed: seed of the flow's initial parameters (``None``: torch's global generator).

    Example:
        >>> cflow = ConditionalFlow(dim=2, context_dim=5, layers=4, rank=1, hidden=(256, 256))
        >>> dist = cflow(torch.randn(32, 5))   # batch_shape (32,)
        >>> actions, log_prob = dist.rsample_and_log_prob()
    """

    def __init__(
        self,
        dim: int,
        context_dim: int,
        layers: int = 4,
        rank: int = 1,
        hidden: Sequence[int] = (256, 256),
        nonlinearity: str = "prelu",
        squash: bool = False,
        activation: type[nn.Module] = nn.ReLU,
        bins: int = 8,
        bound: float = 4.0,
        init_strength: float = 1.0,
        head_scale: float = 1e-2,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim!r}")
        self.context_dim = context_dim
        self.layout = _FlowParams(dim, layers, rank, nonlinearity, squash, bins, bound)
        modules: list[nn.Module] = []
        width = context_dim
        for size in hidden:
            modules += [nn.Linear(width, size), activation()]
            width = size
        head = nn.Linear(width, self.layout.num_params)
        with torch.no_grad():
            head.weight.mul_(head_scale)
            head.bias.copy_(self.layout.init(seed, init_strength))
        self.hyper = nn.Sequential(*modules, head)

    def forward(self, context: Tensor, validate_args: bool | None = None) -> FlowDistribution:
        if context.dim() < 1 or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"ConditionalFlow: expected a context of shape (..., {self.context_dim}), "
                f"got {tuple(context.shape)}"
            )
        try:  # the distribution checks its parameters; only a failure looks at the context
            return self.layout(self.hyper(context), validate_args)
        except ValueError:
            if not torch.isfinite(context).all():
                raise ValueError("ConditionalFlow: the context contains NaN or inf") from None
            raise
