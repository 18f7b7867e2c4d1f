r"""What compounds over a flow's layers, bounded: :class:`OutputBound`, the part of
:class:`~flowpolicy.parametrization.FlowParams` behind ``ConditionalFlow(output_bound=...)``.

A clamp on each raw parameter does not bound the chain: scales, shears, low-rank updates and
PReLU slopes multiply over the layers. :meth:`OutputBound.output_scales` scales down the affine
layers of the states whose images could exceed the bound, and :meth:`OutputBound.within` is the
cheap pre-check that lets a batch whose every state is far inside skip it.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from flowpolicy.bijectors import Affine
from flowpolicy.fastpath import unbind_layers

__all__ = ["OutputBound"]


class OutputBound:
    """Output-bound checks of a :class:`~flowpolicy.parametrization.FlowParams` (its base
    class): they read its layout (``chain``, ``dim``, ``nonlinearity``, ``affine_index``,
    ``signed``, ``layer_views``, ``_nonlinear_layers``)."""

    # what within adds to a batch's worst raw vector before it remembers it, over the layers
    within_margin = 1.0

    def output_scales(
        self, theta: Tensor, output_bound: float, parts: tuple[Tensor | None, ...] | None = None
    ) -> Tensor:
        r"""Per affine layer, the factor :math:`c_k \in (0, 1]` that bounds what compounds.

        A bound on each raw parameter does not bound the chain: scales, shears, low-rank updates
        and slopes multiply over the layers (raw values of 10 take five 2-D affine layers to
        1e20, and a tanh-squashed log-density to 1e10). Two steps, without gradient:

        1. an upper bound :math:`m_k` on :math:`|x_k|` for base samples :math:`|z| \le \sqrt{d}
           + 3` is propagated through the chain (affine: :math:`m \to \|S\|_2 m + |b|` with
           :math:`\|S\|_2 \le \sqrt{\|S\|_1 \|S\|_\infty}`; PReLU: :math:`m
           \max(1, \alpha_{max})`; spline: :math:`m + B\sqrt{d}`), and an inner affine layer
           whose :math:`m_k` exceeds ``1e4 * output_bound`` is scaled down to it (no overflow);
        2. where :math:`m_{K}` exceeds ``output_bound`` (the bound is loose, so this flags a
           superset), the exact images of the probes :math:`0, \pm 3 e_i` are computed, and the
           last affine layer is scaled by ``output_bound / max |image|`` where that is below 1,
           and by ``1e3 * output_bound / m_K`` where that is smaller (the probes can miss the
           direction a PReLU stretches most: the rigorous bound caps it).

        A scaled layer is :math:`c_k (S_k x + b_k)`; elsewhere :math:`c_k = 1` exactly and the
        flow is unchanged (trained policies have images far below the bound).

        :return: ``log c``, shape ``(K + 1, ...)`` (zeros where nothing is scaled).
        """
        with torch.no_grad():
            theta = theta.detach()
            raw_affine, raw_nonlinear = self.layer_views(theta)
            if parts is None:
                parts = self.chain[0].parts(raw_affine)
            screened, log_norm, log_shift = self._screen(parts, raw_nonlinear, output_bound)
            if theta.is_meta or not screened.any():
                return torch.zeros_like(log_norm)
            shift, diag, L, factor = (None if p is None else p.detach() for p in parts)
            nonlinear = self.chain[1] if len(self.chain) > 1 else None
            log_spread = math.log(getattr(nonlinear, "bound", 0.0) * math.sqrt(self.dim) + 1e-30)
            log_r = math.log(math.sqrt(self.dim) + 3)
            log_m = torch.full_like(log_norm[0], log_r)
            log_c = torch.zeros_like(log_norm)
            for k in range(len(log_norm)):
                log_m = torch.logaddexp(log_norm[k] + log_m, log_shift[k])
                if k == len(log_norm) - 1:
                    break
                log_c[k] = -(log_m - math.log(1e4 * output_bound)).clamp_min(0)
                log_m = log_m + log_c[k]
                if nonlinear is not None and self.nonlinearity == "prelu":
                    log_m = log_m + raw_nonlinear[k].amax(-1).clamp_min(0)
                else:  # a spline maps [-B, B] into itself, the identity elsewhere
                    log_m = torch.logaddexp(log_m, log_m.new_tensor(log_spread))
            # the rigorous bound caps the last layer at 1e3 * output_bound (where the probes
            # miss a direction that a PReLU's other orthant stretches), the probes at output_bound
            capped = -(log_m - math.log(1e3 * output_bound)).clamp_min(0)
            flagged = log_m > math.log(output_bound)
            if flagged.any():
                c = log_c.exp()[:, flagged]
                affine = Affine(
                    shift[:, flagged] * c[..., None],
                    L[:, flagged] * c[..., None, None],
                    None if factor is None else factor[:, flagged],
                    validate=False,
                    log_diag=diag[:, flagged].log(),
                )
                gs = self._nonlinear_layers(raw_nonlinear[:, flagged]) if nonlinear else []
                eye = 3 * torch.eye(self.dim, dtype=theta.dtype, device=theta.device)
                x = torch.cat([eye, -eye, eye[:1] * 0])[:, None]  # (2d + 1, 1, d)
                affines = unbind_layers(affine)
                x = affines[0](x)
                for g, a in zip(gs, affines[1:]):
                    x = a(g(x))
                extent = x.norm(dim=-1).amax(0)
                probed = -(extent.log() - math.log(output_bound)).clamp_min(0)
                capped[flagged] = torch.minimum(capped[flagged], probed)
            log_c[-1] = capped
            return log_c

    def within(self, theta: Tensor, output_bound: float) -> bool:
        """Whether :meth:`output_scales` leaves every state of ``theta (..., P)`` unchanged, by a
        sufficient test that costs one reduction over the states: base samples ``|z| <= sqrt(d)
        + 3`` stay below ``1e4 * output_bound`` at every layer and below ``output_bound`` at the
        end for the entrywise worst raw vector of the batch (a diagonal and a log-slope by their
        largest value, every other entry by its largest magnitude), since every bound of the
        chain grows with these. The one vector is screened in numpy: torch's per-op overhead
        would dominate.

        As the test is monotone, a vector that passed (the batch's worst raw vector plus a
        margin, remembered per bound) passes every batch whose worst vector lies below it: a
        policy's consecutive batches then cost one comparison instead of the screen."""
        if theta.is_meta:
            return False
        with torch.no_grad():
            low, high = torch.aminmax(theta.detach().reshape(-1, theta.shape[-1]), dim=0)
            worst = torch.where(self.signed, high, torch.maximum(high, -low))
            key = (output_bound, worst.dtype, worst.device)
            passed = self._passed.get(key)
            if passed is not None and bool((worst <= passed).all()):
                return True
            # the margin compounds over the layers: spread it
            relaxed = worst + self.within_margin / (len(self.chain) // 2 + 1)
        for candidate in (relaxed, worst):
            if self._screen_worst(candidate.cpu().double().numpy(), output_bound):
                self._passed[key] = candidate
                return True
        return False

    def _screen_worst(self, w: np.ndarray, output_bound: float) -> bool:
        """The test of :meth:`within` for one raw vector ``w``."""
        affine = self.chain[0]
        d, index = self.dim, self.affine_index
        L = np.zeros(index["diag"].shape + (d,))
        L[:, range(d), range(d)] = np.logaddexp(0.0, w[index["diag"]] + affine.diag_offset)
        L[:, range(d), range(d)] += affine.eps  # AffineParams.parts' diagonal, entries >= 0
        L[:, affine.rows.tolist(), affine.cols.tolist()] = w[index["lower"]]
        factor = w[index["factor"]].reshape(len(L), d, -1)
        S = L + L @ factor @ factor.swapaxes(-1, -2)  # >= |S| entrywise for every state
        norm = np.sqrt(S.sum(-2).max(-1) * S.sum(-1).max(-1))
        shift = np.sqrt(np.square(w[index["shift"]]).sum(-1))
        nonlinear = self.chain[1] if len(self.chain) > 1 else None
        if nonlinear is not None and self.nonlinearity == "prelu":
            growth, spread = np.exp(w[index["slope"]].max(-1).clip(min=0)), 0.0
        else:  # a spline maps [-B, B] into itself and is the identity elsewhere
            growth, spread = np.ones(len(norm) - 1), getattr(nonlinear, "bound", 0.0)
        m = math.sqrt(self.dim) + 3
        for k in range(len(norm) - 1):
            m = (norm[k] * m + shift[k]) * growth[k] + spread * math.sqrt(self.dim)
            if not m <= 1e4 * output_bound:
                return False
        return bool(norm[-1] * m + shift[-1] <= output_bound)

    def _screen(
        self, parts: tuple[Tensor | None, ...], raw_nonlinear: Tensor, output_bound: float
    ) -> tuple[Tensor, Tensor, Tensor]:
        """Which states :meth:`output_scales` must look at, from upper bounds on the chain
        (``True`` may be a false alarm, ``False`` is certain), with each affine layer's
        ``log ||S||_2`` bound and ``log |b|``."""
        shift, _, L, factor = (None if p is None else p.detach() for p in parts)
        S = L if factor is None else L + (L @ factor) @ factor.mT
        abs_s = S.abs()  # |S|_2 <= sqrt(|S|_1 |S|_inf), the largest column and row sums
        log_norm = 0.5 * (abs_s.sum(-2).amax(-1) * abs_s.sum(-1).amax(-1)).log()
        log_shift = 0.5 * (shift.square().sum(-1) + 1e-30).log()
        nonlinear = self.chain[1] if len(self.chain) > 1 else None
        log_spread = math.log(getattr(nonlinear, "bound", 0.0) * math.sqrt(self.dim) + 1e-30)
        log_r = math.log(math.sqrt(self.dim) + 3)
        # the final bound m_K, and a bound on every m_k from the expanding factors alone
        log_lip = torch.zeros_like(log_norm)
        if nonlinear is not None and self.nonlinearity == "prelu":
            log_lip[:-1] = raw_nonlinear.amax(-1).clamp_min(0)
        step = torch.cat([log_norm[1:] + log_lip[:-1], log_lip[-1:]])
        suffix = step.flip(0).cumsum(0).flip(0)  # growth after affine layer k
        terms = [(log_r + log_norm[0] + suffix[0])[None], log_shift + suffix]
        if nonlinear is not None and self.nonlinearity in ("spline", "coupling"):
            terms.append(log_spread + suffix[:-1])
        final = torch.cat(terms)
        # every m_k <= (R + sum |b| + K B sqrt(d)) times the product of the expanding factors
        offset = torch.logaddexp(torch.logsumexp(log_shift, 0), torch.tensor(log_r))
        offset = torch.logaddexp(offset, torch.tensor(log_spread + math.log(len(log_norm))))
        inner = (log_norm + log_lip).clamp_min(0).sum(0) + offset
        screened = (torch.logsumexp(final, 0) > math.log(output_bound)) | (
            inner > math.log(1e4 * output_bound)
        )
        return screened, log_norm, log_shift
