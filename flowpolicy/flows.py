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

import math
from collections.abc import Sequence

import torch
import torch.nn as nn
from torch import Size, Tensor
from torch.distributions import Distribution, Independent, Normal, Transform

from flowpolicy.bijectors import Affine, Tanh
from flowpolicy.distribution import (
    FlowDistribution,
    quasi_normal,
    squashed_gaussian,
)
from flowpolicy.fastpath import ScalarPReLULogProb
from flowpolicy.fastpath_spline import ScalarSplineLogProb
from flowpolicy.parametrization import FlowParams

__all__ = ["ConditionalFlow", "Flow", "FlowDistribution", "quasi_normal", "squashed_gaussian"]

_LOG_2PI = math.log(2 * math.pi)
_TANH = Tanh()
# log_prob defers the element-wise layers' log-dets to one call for values of at most this many
# entries (a policy's minibatch: fewer ops); larger batches (a density fit) compute each layer's
# at once, as stacking their states copies them (measured 6% slower at 4096 x 2)
_DEFER_LIMIT = 2048


class _LayeredFlowDistribution(FlowDistribution):
    """The :class:`FlowDistribution` of a :class:`FlowParams` layout and its raw parameters.

    The base is standard normal, drawn and scored without building it; the bijectors are built
    when first used, each kind of layer in one call.
    """

    def __init__(
        self,
        layout: FlowParams,
        theta: Tensor,
        validate_args: bool | None,
        kink_bandwidth: float = 0.0,
        output_bound: float | None = None,
    ) -> None:
        self.layout, self.theta, self.kink_bandwidth = layout, theta, kink_bandwidth
        self.output_bound = output_bound
        self._built: tuple[list[Affine], list[Transform], Tensor] | None = None
        self._base: Distribution | None = None
        # built on first use, perhaps under no_grad (sample()): with the grad mode of creation
        self._grad_enabled = torch.is_grad_enabled()
        Distribution.__init__(self, theta.shape[:-1], (layout.dim,), validate_args=validate_args)
        # What must never pass (non-finite parameters, overflowing samples) is checked unless
        # the caller says validate_args=False: not torch's global default, which torch.compile
        # turns off for the whole process. Meta tensors have no values to check.
        self._check_params = validate_args is not False and not theta.is_meta
        if self._check_params and not torch.isfinite(theta).all():
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

    def _dtype_and_device(self) -> tuple[torch.dtype, torch.device]:
        return self.theta.dtype, self.theta.device

    @property
    def transforms(self) -> list[Transform]:
        affines, nonlinear, _ = self._layers()
        return self.layout.chain_of(affines, nonlinear)

    def _layers(self, inverse: bool = False) -> tuple[list[Affine], list[Transform], Tensor]:
        if self._built is None:
            with torch.set_grad_enabled(self._grad_enabled):
                self._built = self.layout.layers(
                    self.theta, self.kink_bandwidth, self.output_bound, inverse
                )
        return self._built

    def _check_output(self, x: Tensor, log_prob: Tensor | None = None) -> None:
        if not self._check_params:
            return
        finite = torch.isfinite(x).all()
        if log_prob is not None:
            finite = finite & torch.isfinite(log_prob).all()
        if not finite:  # one sync
            raise ValueError(
                "the flow's samples overflowed to NaN or inf although its parameters are finite "
                "(a context far outside the training range, e.g. unnormalized observations): "
                "normalize the context, or bound the flow with ConditionalFlow(param_bound=10)"
            )

    def push_forward(self, z: Tensor) -> tuple[Tensor, Tensor]:
        # the chain of bijectors, with the affine layers' log-dets summed once
        affines, nonlinear, affine_log_det = self._layers()
        log_prob = self._base_log_prob(z) - affine_log_det
        x = affines[0](z)
        for g, affine in zip(nonlinear, affines[1:]):
            x, ladj = g.call_and_ladj(x)
            log_prob = log_prob - ladj
            x = affine(x)
        unsquashed = x  # checked before tanh, which would hide an infinite value
        if self.layout.squash:
            x, ladj = _TANH.call_and_ladj(x)
            log_prob = log_prob - ladj
        self._check_output(unsquashed, log_prob)
        return x, log_prob

    def rsample(self, sample_shape: Size | Sequence[int] = ()) -> Tensor:
        affines, nonlinear, _ = self._layers()
        x = affines[0](self._base_rsample(Size(sample_shape)))
        for g, affine in zip(nonlinear, affines[1:]):
            x = affine(g(x))
        self._check_output(x)
        return torch.tanh(x) if self.layout.squash else x

    def _squashed(self) -> bool:
        return self.layout.squash

    def log_prob(self, value: Tensor) -> Tensor:
        value, outside = self._check_value(value)
        if self.layout.squash:
            value, ladj = _TANH.inv_and_ladj(value)
            return self._outside_support(self._chain_log_prob(value) - ladj, outside)
        return self._outside_support(self._chain_log_prob(value), outside)

    def _chain_log_prob(self, value: Tensor) -> Tensor:
        """The log-density of the chain before tanh."""
        log_prob = self._scalar_log_prob(value)
        if log_prob is not None:
            return log_prob
        affines, nonlinear, log_det = self._layers(inverse=True)
        # element-wise layers return what their log-dets need, and all layers' log-dets are
        # computed at once at the end: fewer ops (PPO's update is per-op-overhead bound)
        states = []
        for g, affine in zip(reversed(nonlinear), reversed(affines[1:])):
            value = affine.inv(value)
            if hasattr(g, "inv_and_state") and value.numel() <= _DEFER_LIMIT:
                value, state = g.inv_and_state(value)
                states.append(state)
            else:
                value, ladj = g.inv_and_ladj(value)
                log_det = log_det + ladj
        if states:
            dim = -value.dim() - 1  # the layers' dim, just before the value's
            stacked = [torch.stack(parts, dim) for parts in zip(*states)]
            log_det = log_det + nonlinear[0]._ladj_of_state(*stacked).sum((dim, -1))
        return self._base_log_prob(affines[0].inv(value)) - log_det

    # the fused 1-D PReLU and spline log-densities (fastpath.py, fastpath_spline.py); tests turn
    # them off to compare with the chain
    fused = True

    def _scalar_log_prob(self, value: Tensor) -> Tensor | None:
        """The log-density of a 1-D PReLU or spline flow with one value per state in one autograd
        node (:class:`~flowpolicy.fastpath.ScalarPReLULogProb`,
        :class:`~flowpolicy.fastpath_spline.ScalarSplineLogProb`), or ``None`` where it does not
        apply."""
        layout, theta = self.layout, self.theta
        applies = (
            self.fused
            and layout.scalar_rows is not None
            and theta.dim() == 2
            and value.shape == theta.shape[:-1] + (1,)
            and not value.requires_grad
            and self.kink_bandwidth == 0
            and not theta.is_meta
        )
        if not applies:
            return None
        if self.output_bound is not None and not layout.within(theta, self.output_bound):
            return None  # some states are scaled down (output_scales): the chain handles them
        affine, spline = layout.chain[0], layout.scalar_spline
        args = (theta, value[:, 0], layout.scalar_rows, len(layout.chain) // 2)
        function = ScalarPReLULogProb if spline is None else ScalarSplineLogProb
        args += () if spline is None else spline  # bins and bound
        with torch.set_grad_enabled(self._grad_enabled and torch.is_grad_enabled()):
            return function.apply(*args, affine.diag_offset, affine.eps)

    # the base is standard normal: drawn and scored without Normal's ops (a policy's step)
    def _base_rsample(self, sample_shape: Size) -> Tensor:
        shape = sample_shape + self.batch_shape + self.event_shape
        return torch.randn(shape, dtype=self.theta.dtype, device=self.theta.device)

    def _base_log_prob(self, z: Tensor) -> Tensor:
        # -|z|^2 / 2 - d log(2 pi) / 2 in three ops: rsub(t, c, alpha) is c - alpha t
        return torch.rsub(z.square().sum(-1), -0.5 * z.shape[-1] * _LOG_2PI, alpha=0.5)


def _seeded_layout(seed: int | None, *args, **kwargs) -> FlowParams:
    """A :class:`FlowParams`; with a seed, the coupling conditioners' initial weights come from
    it (without touching torch's global generator), so one seed gives one flow."""
    if seed is None:
        return FlowParams(*args, **kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return FlowParams(*args, **kwargs)


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
    :param nonlinearity: ``"prelu"`` (a two-piece linear spline), ``"spline"`` (monotone
        rational-quadratic, the choice for well-separated modes) or ``"coupling"`` (a spline
        whose bins for half of the coordinates are an MLP of the other half,
        :class:`~flowpolicy.coupling.Coupling`: the choice for data, and for many dimensions).
    :param squash: end the chain with :class:`~flowpolicy.bijectors.Tanh` (support ``(-1, 1)^d``).
    :param bins: spline bins ``K``.
    :param bound: spline interval ``[-B, B]``; identity outside.
    :param init_strength: spread of the random initialization (``0`` starts at the identity map).
    :param seed: seed of the initialization (``None``: from torch's global generator).
    :param coupling_hidden: hidden sizes of each coupling layer's conditioner MLP.

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
        coupling_hidden: Sequence[int] = (64, 64),
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
        if nonlinearity == "coupling":  # (other configs stay as they were: saves compare them)
            self.config["coupling_hidden"] = list(coupling_hidden)
        self.layout = _seeded_layout(
            seed, dim, layers, rank, nonlinearity, squash, bins, bound, tuple(coupling_hidden)
        )
        self.theta = nn.Parameter(self.layout.init(seed, init_strength))

    def forward(
        self, validate_args: bool | None = None, kink_bandwidth: float = 0.0
    ) -> FlowDistribution:
        """The distribution of the current parameters.

        :param validate_args: see :class:`FlowDistribution`.
        :param kink_bandwidth: when positive, the gradient of ``log_prob`` holds the PReLU kinks'
            boundary term (see :class:`~flowpolicy.bijectors.PReLU`); the values are unchanged.
        """
        return _LayeredFlowDistribution(self.layout, self.theta, validate_args, kink_bandwidth)

    def layer(self, i: int) -> Transform:
        """Bijector ``i`` of the chain with the current parameters: index ``2k`` is an
        :class:`~flowpolicy.bijectors.Affine`, ``2k + 1`` a nonlinear layer, the last an affine
        layer (the optional tanh is not counted; negative indices count from the end)."""
        return self.layout.layer(self.theta, i)

    @torch.no_grad()
    def set_layer_(self, i: int, **parts: Tensor) -> Flow:
        """Set bijector ``i`` (indexed as in :meth:`layer`) to the map given by ``parts``, in place.

        Affine layers take ``shift (d,)``, ``scale_tril (d, d)`` (lower-triangular, positive
        diagonal) and ``factor (d, r)`` or ``None``, for ``y = L (I + F F^T) x + shift``; PReLU
        layers ``alpha (d,)``; spline layers ``knots_x`` and ``knots_y`` ``(d, K + 1)``
        (increasing from ``-B`` to ``B``) and ``derivatives (d, K - 1)`` (positive, at the
        interior knots). Returns the flow.

        Example:
            >>> flow.set_layer_(0, shift=mean, scale_tril=torch.diag(std), factor=None)
        """
        parts = {k: v.to(self.theta) if torch.is_tensor(v) else v for k, v in parts.items()}
        where, raw = self.layout.encode(i, **parts)
        self.theta[where] = raw.to(self.theta)
        return self


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
    :param nonlinearity: ``"prelu"``, ``"spline"`` or ``"coupling"`` (see :class:`Flow`; the
        hypernetwork outputs each coupling layer's base splines and a code of
        ``coupling_code`` values that its conditioner reads with the coordinates).
    :param squash: end with tanh (actions in ``(-1, 1)^d``).
    :param activation: activation class of the MLP.
    :param bins: spline bins.
    :param bound: spline interval ``[-B, B]``.
    :param init_strength: spread of the initialization (``0``: identity map plus a tiny
        context-dependent part).
    :param head_scale: scale of the output layer's initial weights.
    :param seed: seed of the flow's initial parameters (``None``: torch's global generator).
    :param param_bound: clamp the hypernetwork's raw output to ``[-param_bound, param_bound]``
        (log-slopes, shifts, scale entries, spline logits), as SB3 clamps a Gaussian's
        ``log_std``. ``None``: no clamp; a sample that overflows raises a ``ValueError`` (unless
        ``validate_args=False``).
    :param output_bound: also bound what compounds over the layers (a clamp of each parameter
        does not: five affine layers of raw values 10 reach 1e20): where the chain could map base
        samples ``|z| <= sqrt(d) + 3`` beyond ``output_bound``, its affine layers are scaled
        down (:meth:`~flowpolicy.parametrization.FlowParams.output_scales`), so that samples and
        log-densities stay finite and moderate for any finite context (1000: |log pi| below
        about 2e3 for observations of 1e6). A batch first gets a test of one reduction (about
        0.1 ms, :meth:`~flowpolicy.parametrization.FlowParams.within`); only a batch that fails
        it is screened state by state (about 0.5 ms for 256 states). ``None`` (the default
        here; :class:`~flowpolicy.FlowPolicy` sets 1000): no bound, which normalized contexts
        never need.
    :param coupling_hidden: hidden sizes of each coupling layer's conditioner MLP.
    :param coupling_code: size of the context code each coupling conditioner reads.

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
        param_bound: float | None = None,
        output_bound: float | None = None,
        coupling_hidden: Sequence[int] = (64, 64),
        coupling_code: int = 16,
    ) -> None:
        super().__init__()
        if not isinstance(context_dim, int) or context_dim < 1:
            raise ValueError(f"context_dim must be a positive integer, got {context_dim!r}")
        if param_bound is not None and not (0 < param_bound < math.inf):
            raise ValueError(
                f"param_bound must be positive and finite or None, got {param_bound!r}"
            )
        hidden = tuple(hidden)
        if not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden):
            raise ValueError(f"hidden must be a sequence of positive integers, got {hidden!r}")
        if output_bound is not None and not (0 < output_bound < math.inf):
            raise ValueError(
                f"output_bound must be positive and finite or None, got {output_bound!r}"
            )
        self.context_dim, self.param_bound = context_dim, param_bound
        self.output_bound = output_bound
        if not isinstance(coupling_code, int) or coupling_code < 0:
            raise ValueError(f"coupling_code must be a non-negative int, got {coupling_code!r}")
        self.layout = _seeded_layout(
            seed,
            dim,
            layers,
            rank,
            nonlinearity,
            squash,
            bins,
            bound,
            tuple(coupling_hidden),
            coupling_code if nonlinearity == "coupling" else 0,
        )
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
        theta = self.hyper(context)
        if self.param_bound is not None:
            theta = theta.clamp(-self.param_bound, self.param_bound)
        try:  # the distribution checks its parameters; only a failure looks at the context
            return _LayeredFlowDistribution(
                self.layout, theta, validate_args, output_bound=self.output_bound
            )
        except ValueError:
            if not torch.isfinite(context).all():
                raise ValueError("ConditionalFlow: the context contains NaN or inf") from None
            raise
