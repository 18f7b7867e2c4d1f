r"""Invertible maps with exact log-determinants, as ``torch.distributions.Transform`` subclasses.

Every bijector here acts on vectors (``event_dim = 1``): it maps ``x`` of shape ``(..., d)`` to
``y`` of the same shape and returns one log-absolute-determinant per vector. Parameters carry
optional batch dimensions that broadcast against the input, so one set of parameters per state
(a policy) works as well as one set for all samples (a density model).

Besides torch's ``__call__``, ``inv`` and ``log_abs_det_jacobian``, each bijector has the fused
calls used on hot paths (as in zuko):

* ``call_and_ladj(x) -> (y, log|det dy/dx|)``: one pass forward;
* ``inv_and_ladj(y) -> (x, log|det dy/dx|)``: one pass backward, log-det of the *forward* map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Transform, constraints

from flowpolicy.coupling import Coupling
from flowpolicy.spline import Spline

__all__ = ["Affine", "Coupling", "PReLU", "Spline", "Tanh", "call_and_ladj", "inv_and_ladj"]

_LOG2 = math.log(2.0)


def _check_finite(name: str, value: Tensor) -> None:
    if not torch.isfinite(value).all():
        raise ValueError(f"{name} has non-finite values (NaN or inf)")


def _check_width(name: str, x: Tensor, d: int) -> None:
    """Inputs are vectors of the bijector's size ``d`` (a Python-level check: no sync)."""
    if x.dim() < 1 or x.shape[-1] != d:
        raise ValueError(f"{name}: expected inputs of shape (..., {d}), got {tuple(x.shape)}")


def _one_batch_dim(matrices: Tensor) -> Tensor:
    """A batch of matrices ``(..., m, n)`` as ``(B, m, n)``, as batched matmuls take them."""
    return matrices if matrices.dim() == 3 else matrices.reshape((-1,) + matrices.shape[-2:])


def _expand_ladj(ladj: Tensor, x: Tensor) -> Tensor:
    """Broadcast a per-parameter log-det to the batch shape of ``x`` (all but its last dim)."""
    if ladj.shape == x.shape[:-1]:  # the common case; torch.broadcast_shapes is slow Python
        return ladj
    return ladj.expand(torch.broadcast_shapes(ladj.shape, x.shape[:-1]))


class Affine(Transform):
    r"""Affine map with a lower-triangular scale times a positive-definite low-rank update.

    .. math:: y = S x + b, \qquad S = L\,(I_d + V D V^\top) = L + (L V) D V^\top

    with :math:`L` lower-triangular with a positive diagonal, :math:`V \in \mathbb{R}^{d\times r}`
    and :math:`D = \mathrm{diag}(D_1..D_r) \ge 0`. The update :math:`I + V D V^\top` is symmetric
    positive definite, so :math:`S` is invertible for every parameter value (Jang (2018)'s
    :math:`L + V D V^\top` can pass through a singular matrix while training). By the matrix
    determinant lemma, with :math:`C = I_r + D^{1/2} V^\top V D^{1/2} = R R^\top` (Cholesky),

    .. math:: \log|\det S| = \sum_i \log L_{ii} + 2 \sum_j \log R_{jj},

    which costs :math:`O(d r^2 + r^3)`. The inverse uses triangular solves and Woodbury:
    :math:`(I + V D V^\top)^{-1} = I - V D^{1/2} C^{-1} D^{1/2} V^\top`.

    :param shift: :math:`b`, shape ``(..., d)``.
    :param scale_tril: :math:`L`, shape ``(..., d, d)``; only its lower triangle is read, and its
        diagonal must be positive.
    :param perturb_factor: :math:`V`, shape ``(..., d, r)``, or ``None`` for :math:`S = L`.
    :param perturb_diag: :math:`D`, shape ``(..., r)``, non-negative; ``None`` means ones.
    :param validate: check shapes and values (positive diagonal, :math:`D \ge 0`, finite).
        Modules that build valid parameters by construction pass ``False`` to skip the checks.
    :param log_diag: :math:`\log L_{ii}`, shape ``(..., d)``, when the caller already has it
        (a module that parametrizes the diagonal); default: computed from ``scale_tril``.

    Example:
        >>> L = torch.tensor([[2.0, 0.0], [0.5, 1.0]])
        >>> f = Affine(torch.zeros(2), L, torch.ones(2, 1), torch.ones(1))
        >>> y, ladj = f.call_and_ladj(torch.randn(5, 2))
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self,
        shift: Tensor,
        scale_tril: Tensor,
        perturb_factor: Tensor | None = None,
        perturb_diag: Tensor | None = None,
        *,
        validate: bool = True,
        log_diag: Tensor | None = None,
    ) -> None:
        super().__init__()
        if validate:
            d = shift.shape[-1] if shift.dim() > 0 else None
            if d is None or scale_tril.dim() < 2 or scale_tril.shape[-2:] != (d, d):
                raise ValueError(
                    f"Affine: scale_tril must have shape (..., d, d) with d = shift.shape[-1]; "
                    f"got shift {tuple(shift.shape)} and scale_tril {tuple(scale_tril.shape)}"
                )
            _check_finite("Affine: shift", shift)
            _check_finite("Affine: scale_tril", scale_tril)
            if not (torch.diagonal(scale_tril, dim1=-2, dim2=-1) > 0).all():
                raise ValueError("Affine: the diagonal of scale_tril must be positive")
            if perturb_factor is not None:
                if perturb_factor.dim() < 2 or perturb_factor.shape[-2] != d:
                    raise ValueError(
                        f"Affine: perturb_factor must have shape (..., d, r) with d = {d}; "
                        f"got {tuple(perturb_factor.shape)}"
                    )
                r = perturb_factor.shape[-1]
                if r > d:
                    raise ValueError(f"Affine: rank r = {r} is larger than dim d = {d}")
                _check_finite("Affine: perturb_factor", perturb_factor)
                if perturb_diag is not None:
                    if perturb_diag.shape[-1:] != (r,):
                        raise ValueError(
                            f"Affine: perturb_diag must have shape (..., r) with r = {r}; "
                            f"got {tuple(perturb_diag.shape)}"
                        )
                    _check_finite("Affine: perturb_diag", perturb_diag)
                    if not (perturb_diag >= 0).all():
                        raise ValueError("Affine: perturb_diag must be non-negative")
            elif perturb_diag is not None:
                raise ValueError("Affine: perturb_diag given without perturb_factor")
            scale_tril = scale_tril.tril()
        self.shift = shift
        self.scale_tril = scale_tril
        if log_diag is None:
            log_diag = torch.diagonal(scale_tril, dim1=-2, dim2=-1).log()
        self.log_diag = log_diag
        # V D^(1/2), so that the update is V D V^T = factor factor^T
        self.factor = perturb_factor
        if perturb_factor is not None and perturb_diag is not None:
            self.factor = perturb_factor * perturb_diag.sqrt()[..., None, :]
        self._capacitance_tril: Tensor | None = None
        self._inverse_matrix: Tensor | None = None
        self._inverse_shift: Tensor | None = None
        self._inverse_scale: Tensor | None = None  # d = 1: the 1 x 1 inverse as a scalar
        # shapes as plain attributes: a flow's layers read them without touching (unbinding)
        # the tensors (fastpath.unbind_layers, which also drops the layer dim here)
        self._size = shift.shape[-1]
        self._rank = 0 if self.factor is None else self.factor.shape[-1]
        self._batch_rank = scale_tril.dim() - 2
        self._matrix: Tensor | None = None
        self._log_det = self._compute_log_det()

    @property
    def matrix(self) -> Tensor:
        """The dense scale S = L (I + F F^T), formed on first use: applying it is then one
        multiply-and-sum. The log-det never needs it (determinant lemma)."""
        if self._matrix is None:
            self._matrix = self.scale_tril
            if self.factor is not None:
                # batched matmuls: on CPU, broadcast-multiply-and-sum was 3.6x slower here
                LF = self.scale_tril @ self.factor
                self._matrix = self.scale_tril + LF @ self.factor.mT
        return self._matrix

    @property
    def capacitance_tril(self) -> Tensor:
        """Cholesky factor R of C = I_r + D^(1/2) V^T V D^(1/2); computed once, when needed."""
        if self._capacitance_tril is None:
            eye = torch.eye(
                self.factor.shape[-1], dtype=self.factor.dtype, device=self.factor.device
            )
            self._capacitance_tril = torch.linalg.cholesky(eye + self.factor.mT @ self.factor)
        return self._capacitance_tril

    def log_det(self) -> Tensor:
        """log|det S| for each parameter set, shape ``batch``."""
        return self._log_det

    def _compute_log_det(self) -> Tensor:
        ladj = self.log_diag.sum(-1)
        if self.factor is None:
            return ladj
        if self.factor.shape[-1] <= 2:
            return ladj + capacitance_log_det(self.factor)
        diag = torch.diagonal(self.capacitance_tril, dim1=-2, dim2=-1)
        return ladj + 2 * diag.log().sum(-1)

    def _call(self, x: Tensor) -> Tensor:
        _check_width("Affine", x, self._size)
        if self.scale_tril.dim() == 2:  # one parameter set: y = x S^T + b in one matmul
            return torch.addmm(self.shift, x.reshape(-1, x.shape[-1]), self.matrix.mT).reshape(
                x.shape
            )
        if self._matrix is None and x.shape[:-1] == self.scale_tril.shape[:-2]:
            # one sample per parameter set (a policy's step): y = L (x + F (F^T x)) + b as
            # batched matrix-vector products costs less than forming S, forward and backward
            v = _one_batch_dim(x.unsqueeze(-1))
            if self.factor is not None:
                factor = _one_batch_dim(self.factor)
                v = torch.baddbmm(v, factor, torch.bmm(factor.mT, v))
            shift = self.shift if self.shift.shape == x.shape else self.shift.expand(x.shape)
            y = torch.baddbmm(
                _one_batch_dim(shift.unsqueeze(-1)), _one_batch_dim(self.scale_tril), v
            )
            return y.view(x.shape)
        # several samples per parameter set: form S once, multiply-and-sum without expanding it
        return (self.matrix * x[..., None, :]).sum(-1) + self.shift

    @property
    def _one_set(self) -> bool:
        return self._batch_rank == 0

    @property
    def _small(self) -> bool:
        """Per-state parameters of size d <= 4, rank r <= 2: inverses in closed form."""
        return self._batch_rank > 0 and self._size <= 4 and self._rank <= 2

    def dense_inverse(self) -> tuple[Tensor, Tensor]:
        """``(S^-T, -b S^-T)``, so that ``x = y S^-T - b S^-T`` for row vectors ``y``; formed once
        (a batch of parameter sets gets a batch of inverses in one call: a flow forms those of
        all its layers for all states at once)."""
        if self._inverse_matrix is None:
            if self._small and self._size == 1:  # S = L (1 + F F^T) is a scalar per state
                scale = self.scale_tril[..., 0]
                if self.factor is not None:
                    scale = scale * (1 + self.factor.square().sum(-1))
                self._inverse_scale = scale.reciprocal()
                self._inverse_shift = -self.shift * self._inverse_scale
                inverse = self._inverse_scale.unsqueeze(-1)
            elif self._small:  # element-wise products: batched matmuls of tiny matrices cost more
                inverse = self._small_inverse()
                self._inverse_shift = -(inverse * self.shift.unsqueeze(-2)).sum(-1)
            else:
                inverse = torch.linalg.inv(self.matrix)
                self._inverse_shift = -(self.shift.unsqueeze(-2) @ inverse.mT).squeeze(-2)
            self._inverse_matrix = inverse.mT
        return self._inverse_matrix, self._inverse_shift

    def _inverse(self, y: Tensor) -> Tensor:
        _check_width("Affine", y, self._size)
        if self._one_set:
            # one parameter set (a density model): x = (y - b) S^-T for all samples in one
            # matmul; S^-1 is formed once, and S = L (I + F F^T) is well conditioned by design
            inverse, shift = self.dense_inverse()
            if y.dim() == 2:
                # x^T = S^-1 y^T - S^-1 b with the samples along the last axis: the result is a
                # transposed view, so the element-wise ops after it run over long rows (a
                # density fit's step: 14.0 -> 9.2 ms with PReLU layers)
                return torch.addmm(shift[:, None], inverse.mT, y.mT).mT
            return torch.addmm(shift, y.reshape(-1, y.shape[-1]), inverse).reshape(y.shape)
        if self._small:
            # per-state parameters (a policy's log-prob of stored actions, PPO's hot path): one
            # batched matrix-vector product with the closed-form inverse
            if self._inverse_shift is None:
                self.dense_inverse()
            if self._inverse_scale is not None:  # d = 1: element-wise
                return torch.addcmul(self._inverse_shift, y, self._inverse_scale)
            inverse, shift = self.dense_inverse()
            if y.shape[:-1] != shift.shape[:-1]:  # several values per parameter set
                return (y.unsqueeze(-1) * inverse).sum(-2) + shift
            x = torch.baddbmm(
                _one_batch_dim(shift.unsqueeze(-2)),
                _one_batch_dim(y.unsqueeze(-2)),
                _one_batch_dim(inverse),
            )
            return x.view(y.shape)
        z = (y - self.shift)[..., None]
        batch = torch.broadcast_shapes(z.shape[:-2], self.scale_tril.shape[:-2])
        L = self.scale_tril.expand(batch + self.scale_tril.shape[-2:])
        x = torch.linalg.solve_triangular(L, z.expand(batch + z.shape[-2:]), upper=False)
        if self.factor is not None:
            u = self.factor.mT @ x
            u = torch.cholesky_solve(u, self.capacitance_tril.expand(u.shape[:-2] + (-1, -1)))
            x = x - self.factor @ u
        return x[..., 0]

    def _small_inverse(self) -> Tensor:
        r""":math:`S^{-1} = (I + F F^\top)^{-1} L^{-1}` for per-state parameters of size
        :math:`2 \le d \le 4` (:meth:`dense_inverse` takes d = 1 as a scalar), rank
        :math:`r \le 2`, without batched LAPACK calls (their per-matrix overhead dominates at
        these sizes): :math:`L^{-1} = (I - A + A^2 - \dots) D^{-1}` with the nilpotent
        :math:`A = D^{-1} L - I` (d - 1 terms, Horner), then Woodbury,
        :math:`(I + F F^\top)^{-1} = I - F C^{-1} F^\top`, with the closed-form inverse of the
        r x r capacitance :math:`C = I + F^\top F`."""
        L = self.scale_tril
        d = L.shape[-1]
        inv_diag = torch.diagonal(L, dim1=-2, dim2=-1).reciprocal()
        eye = torch.eye(d, dtype=L.dtype, device=L.device)
        A = (L * inv_diag.unsqueeze(-1)).tril(-1)
        unit = eye - A
        for _ in range(d - 2):
            unit = eye - A @ unit
        inverse = unit * inv_diag.unsqueeze(-2)
        if self.factor is None:
            return inverse
        factor = self.factor
        if factor.shape[-1] == 1:  # outer products by broadcasting, no batched matmuls
            weights = factor / (1 + factor.square().sum(-2, keepdim=True))  # F C^-1
            return inverse - weights * (factor * inverse).sum(-2, keepdim=True)
        _, _, a, b, c = _gram_of_columns(factor)
        det = ((1 + a) * (1 + c) - b * b).unsqueeze(-1)
        adjugate = torch.cat([1 + c, -b, -b, 1 + a], -1).unflatten(-1, (2, 2))
        return inverse - (factor @ (adjugate / det)) @ (factor.mT @ inverse)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return _expand_ladj(self.log_det(), x)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._call(x), _expand_ladj(self.log_det(), x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._inverse(y), _expand_ladj(self.log_det(), y)


def _gram_of_columns(factor: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The two columns ``f, g`` of a rank-2 factor and their Gram entries ``a = |f|^2,
    b = f . g, c = |g|^2`` (summed over the last axis, kept): cheaper than a batched 2x2 matmul
    on CPU."""
    f, g = factor.unbind(-1)
    a, b, c = ((u * v).sum(-1, keepdim=True) for u, v in ((f, f), (f, g), (g, g)))
    return f, g, a, b, c


def capacitance_log_det(factor: Tensor) -> Tensor:
    r""":math:`\log\det C` of the capacitance :math:`C = I_r + F^\top F` for rank
    :math:`r \le 2`, in closed form (no batched LAPACK call, which costs more at these sizes):
    :math:`1 + |f|^2` for one column, :math:`(1 + a)(1 + c) - b^2 \ge 1` for two, with the Gram
    entries :math:`a = |f|^2, b = f \cdot g, c = |g|^2` of the columns :math:`f, g`."""
    if factor.shape[-1] == 1:
        return torch.log1p(factor.pow(2).sum((-2, -1)))
    _, _, a, b, c = _gram_of_columns(factor)
    return torch.log((1 + a) * (1 + c) - b * b).squeeze(-1)


class _KinkLogDet(torch.autograd.Function):
    r"""The PReLU's log-det :math:`\sum_i [y_i < 0] \log\alpha_i` with its boundary term.

    The per-sample log-det jumps by :math:`\log\alpha_i` where a sample crosses the kink
    :math:`y_i = 0`, so its pathwise gradient in :math:`y` is zero although the *expected* log-det
    moves: :math:`\frac{d}{dy} E\,[y_i < 0] = -p_i(0)`, the density of :math:`y_i` at the kink.
    The backward estimates it over the batch with a Gaussian kernel of width
    :math:`h_i = \text{bandwidth} \cdot \mathrm{std}(y_i)`, so that

    .. math:: \frac{\partial \ell}{\partial y_i} = -\frac{1}{\sqrt{2\pi} h_i}
              e^{-y_i^2 / (2 h_i^2)} \log\alpha_i;

    the value and the gradient in :math:`\log\alpha` are those of the plain log-det.
    """

    @staticmethod
    def forward(ctx, y: Tensor, log_alpha: Tensor, bandwidth: float) -> Tensor:
        negative = y < 0
        ctx.save_for_backward(y, log_alpha, negative)
        ctx.bandwidth = bandwidth
        return torch.where(negative, log_alpha, 0.0).sum(-1)

    @staticmethod
    def backward(ctx, grad: Tensor):
        y, log_alpha, negative = ctx.saved_tensors
        grad = grad.unsqueeze(-1)
        grad_y = grad_log_alpha = None
        if ctx.needs_input_grad[0]:
            flat = y.detach().reshape(-1, y.shape[-1])
            width = ctx.bandwidth * flat.std(0).clamp_min(1e-12)  # (d,), over the batch
            kernel = torch.exp(-0.5 * (y / width).square()) / (math.sqrt(2 * math.pi) * width)
            grad_y = (-kernel * log_alpha * grad).sum_to_size(y.shape)
        if ctx.needs_input_grad[1]:
            grad_log_alpha = torch.where(negative, grad, 0.0).sum_to_size(log_alpha.shape)
        return grad_y, grad_log_alpha, None


class PReLU(Transform):
    r"""Element-wise parametric ReLU with positive slopes.

    .. math:: y_i = x_i \ (x_i \ge 0), \qquad y_i = \alpha_i x_i \ (x_i < 0), \qquad
              \log|\det J| = \sum_{i: x_i < 0} \log \alpha_i

    The inverse divides the negative part by :math:`\alpha`. The slopes :math:`\alpha > 0`
    keep it bijective; with all slopes equal to 1 it is the identity.

    :param alpha: slopes, shape ``(..., d)``, all positive and finite.
    :param validate: check the slopes (modules that build them as ``exp(.)`` pass ``False``).
    :param kink_bandwidth: when positive, the log-det returned by :meth:`inv_and_ladj` (the
        density's pass) has the same value, and its gradient with respect to the input also holds
        the kinks' boundary term (see :class:`_KinkLogDet`), estimated over the batch with a
        Gaussian kernel of width ``kink_bandwidth * std``. Maximum-likelihood fits use it: the
        pathwise gradient misses what samples crossing a kink change.
    """

    domain = constraints.real_vector
    codomain = constraints.real_vector
    bijective = True
    sign = +1

    def __init__(
        self, alpha: Tensor, *, validate: bool = True, kink_bandwidth: float = 0.0
    ) -> None:
        super().__init__()
        if validate:
            alpha = torch.as_tensor(alpha)
            _check_finite("PReLU: alpha", alpha)
            if not (alpha > 0).all():
                raise ValueError("PReLU: slopes alpha must be positive (alpha > 0)")
        self.alpha = alpha
        self.log_alpha = alpha.log()
        self.kink_bandwidth = float(kink_bandwidth)

    @classmethod
    def from_log_slopes(cls, log_alpha: Tensor, kink_bandwidth: float = 0.0) -> PReLU:
        """The PReLU with slopes ``exp(log_alpha)``: valid for any finite ``log_alpha``."""
        prelu = cls.__new__(cls)
        Transform.__init__(prelu)
        prelu.alpha, prelu.log_alpha = log_alpha.exp(), log_alpha
        prelu.kink_bandwidth = float(kink_bandwidth)
        return prelu

    def _call(self, x: Tensor) -> Tensor:
        return torch.where(x >= 0, x, self.alpha * x)

    def _inverse(self, y: Tensor) -> Tensor:
        return torch.where(y >= 0, y, y / self.alpha)

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return torch.where(x >= 0, 0.0, self.log_alpha).sum(-1)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        if self.alpha.dim():
            _check_width("PReLU", x, self.alpha.shape[-1])
        negative = x < 0
        y = torch.where(negative, self.alpha * x, x)
        return y, torch.where(negative, self.log_alpha, 0.0).sum(-1)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x, (ladj,) = self.inv_and_state(y)
        return x, ladj.sum(-1)

    def inv_and_state(self, y: Tensor) -> tuple[Tensor, tuple[Tensor]]:
        """``(x, state)`` with ``x = inv(y)`` and the log-det as ``_ladj_of_state(*state)``
        (element-wise, summed over the last axis): a chain stacks the states of its layers and
        gets all their log-dets in one call."""
        if self.alpha.dim():
            _check_width("PReLU", y, self.alpha.shape[-1])
        negative = y < 0
        x = torch.where(negative, y / self.alpha, y)
        if self.kink_bandwidth > 0 and torch.is_grad_enabled():
            return x, (_KinkLogDet.apply(y, self.log_alpha, self.kink_bandwidth).unsqueeze(-1),)
        return x, (torch.where(negative, self.log_alpha, 0.0),)

    @staticmethod
    def _ladj_of_state(ladj: Tensor) -> Tensor:
        return ladj  # the state is the element-wise log-det


class Tanh(Transform):
    r"""Element-wise hyperbolic tangent, :math:`y = \tanh(x)`, onto the open cube :math:`(-1, 1)^d`.

    .. math:: \log\left|\frac{d\tanh(x)}{dx}\right| = 2\,(\log 2 - x - \mathrm{softplus}(-2x))

    which is finite for every float (never ``log(1 - tanh^2 + eps)``). The inverse clamps ``y``
    into the open interval first, so that ``log_prob`` of an action exactly at +-1 is finite.
    """

    domain = constraints.real_vector
    codomain = constraints.independent(constraints.interval(-1.0, 1.0), 1)
    bijective = True
    sign = +1

    @staticmethod
    def _ladj(x: Tensor) -> Tensor:
        return (2.0 * (_LOG2 - x - F.softplus(-2.0 * x))).sum(-1)

    def _call(self, x: Tensor) -> Tensor:
        return torch.tanh(x)

    def _inverse(self, y: Tensor) -> Tensor:
        bound = 1.0 - torch.finfo(y.dtype).eps
        return torch.atanh(y.clamp(-bound, bound))

    def log_abs_det_jacobian(self, x: Tensor, y: Tensor) -> Tensor:
        return self._ladj(x)

    def call_and_ladj(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return torch.tanh(x), self._ladj(x)

    def inv_and_ladj(self, y: Tensor) -> tuple[Tensor, Tensor]:
        x = self._inverse(y)
        return x, self._ladj(x)


def call_and_ladj(transform: Transform, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(y, log|det dy/dx|)`` for any torch transform; element-wise log-dets are summed."""
    if hasattr(transform, "call_and_ladj"):
        return transform.call_and_ladj(x)
    y = transform(x)
    ladj = transform.log_abs_det_jacobian(x, y)
    return y, ladj.sum(-1) if transform.domain.event_dim == 0 else ladj


def inv_and_ladj(transform: Transform, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(x, log|det dy/dx|)`` with ``x = transform.inv(y)``, for any torch transform."""
    if hasattr(transform, "inv_and_ladj"):
        return transform.inv_and_ladj(y)
    x = transform.inv(y)
    ladj = transform.log_abs_det_jacobian(x, y)
    return x, ladj.sum(-1) if transform.domain.event_dim == 0 else ladj
