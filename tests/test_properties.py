"""Property-based tests (hypothesis): every bijector and random chains, in float64.

Inverse round trips, log-determinants against the autograd Jacobian (``slogdet``), and the
one-pass ``rsample_and_log_prob`` against ``log_prob`` of the same samples. Derandomized and
bounded (``max_examples``), so the file runs in well under a minute and the same way in CI.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.autograd.functional import jacobian

from flowpolicy.bijectors import Affine, PReLU, Spline, Tanh, call_and_ladj, inv_and_ladj
from flowpolicy.coupling import Coupling, CouplingParams
from flowpolicy.flows import ConditionalFlow, Flow

SETTINGS = settings(derandomize=True, deadline=None, max_examples=60, database=None)
DTYPE = torch.float64
seeds = st.integers(0, 2**31 - 1)


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=DTYPE)


def _check_bijector(f, x: torch.Tensor, atol: float = 1e-8) -> None:
    """Round trip both ways, and the fused log-dets against slogdet of the autograd Jacobian."""
    y, ladj = call_and_ladj(f, x)
    x_back, ladj_back = inv_and_ladj(f, y)
    torch.testing.assert_close(x_back, x, atol=atol, rtol=1e-7)
    torch.testing.assert_close(ladj_back, ladj, atol=atol, rtol=1e-7)
    for i in range(min(len(x), 3)):
        J = jacobian(lambda v: call_and_ladj(f, v[None])[0][0], x[i])
        sign, logdet = torch.linalg.slogdet(J)
        assert sign > 0, "an orientation-preserving bijector"
        torch.testing.assert_close(ladj[i], logdet, atol=atol, rtol=1e-7)


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 5), rank_fraction=st.floats(0, 1), diag=st.booleans())
def test_affine(seed, dim, rank_fraction, diag):
    g = _generator(seed)
    rank = round(rank_fraction * dim)
    L = torch.tril(_randn(g, dim, dim), -1) + torch.diag(_randn(g, dim).mul(0.5).exp())
    factor = _randn(g, dim, rank) if rank else None
    perturb_diag = _randn(g, rank).exp() if rank and diag else None
    f = Affine(_randn(g, dim), L, factor, perturb_diag)
    _check_bijector(f, 2 * _randn(g, 7, dim))
    # one parameter set: the density model's transposed inverse equals the batched solve
    batched = Affine(f.shift[None], f.scale_tril[None], f.factor if rank else None)
    y = _randn(g, 9, dim)
    torch.testing.assert_close(f.inv(y), batched.inv(y[:, None])[:, 0], atol=1e-9, rtol=1e-9)


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 5), spread=st.floats(0, 4))
def test_prelu(seed, dim, spread):
    g = _generator(seed)
    f = PReLU((spread * _randn(g, dim)).exp())
    _check_bijector(f, 3 * _randn(g, 6, dim))


@SETTINGS
@given(
    seed=seeds,
    dim=st.integers(1, 4),
    bins=st.integers(2, 10),
    spread=st.floats(0, 3),
    bound=st.floats(0.5, 5),
)
def test_spline(seed, dim, bins, spread, bound):
    g = _generator(seed)
    widths, heights = spread * _randn(g, dim, bins), spread * _randn(g, dim, bins)
    f = Spline(widths, heights, spread * _randn(g, dim, bins - 1), bound)
    x = 1.5 * bound * (2 * torch.rand(8, dim, generator=g, dtype=DTYPE) - 1)  # inside and out
    _check_bijector(f, x, atol=1e-7)


def _perturb_conditioners_(module: torch.nn.Module, seed: int, scale: float = 0.5) -> None:
    """Random weights for every coupling conditioner (they start with a zero output layer,
    which would leave the coupling untested)."""
    g = _generator(seed + 1)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, CouplingParams):
                for p in layer.conditioner.parameters():  # weights by 1/sqrt(fan-in)
                    fan_in = p.shape[-1] if p.dim() == 2 else 1
                    noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
                    p.copy_(scale * noise / math.sqrt(max(fan_in, 1)))


@SETTINGS
@given(
    seed=seeds,
    dim=st.integers(1, 5),
    bins=st.integers(2, 8),
    code=st.integers(0, 3),
    batched=st.booleans(),
    spread=st.floats(0, 2),
)
def test_coupling(seed, dim, bins, code, batched, spread):
    """Coupling: round trips and exact log-dets, with one parameter set for all samples (a
    density) or one per sample (a conditional flow's hypernetwork), for any conditioner."""
    g = _generator(seed)
    layer = CouplingParams(dim, bins, bound=2.0, hidden=(6,), code=code, parity=seed % 2)
    _perturb_conditioners_(layer, seed, scale=2 * spread)
    n, layer = 7, layer.double()
    theta = spread * _randn(g, *((n,) if batched else ()), layer.num_params)
    f, x = layer(theta), 2.0 * _randn(g, n, dim)
    assert isinstance(f, Coupling)
    if not batched:
        _check_bijector(f, x, atol=1e-7)
        return
    y, ladj = f.call_and_ladj(x)
    x_back, ladj_back = f.inv_and_ladj(y)
    torch.testing.assert_close(x_back, x, atol=1e-7, rtol=1e-7)
    torch.testing.assert_close(ladj_back, ladj, atol=1e-7, rtol=1e-7)
    for i in range(3):  # sample i under parameter set i alone
        one = layer(theta[i])
        y_i, ladj_i = one.call_and_ladj(x[i : i + 1])
        torch.testing.assert_close(y_i[0], y[i], atol=1e-9, rtol=1e-9)
        torch.testing.assert_close(ladj_i[0], ladj[i], atol=1e-9, rtol=1e-9)
        _check_bijector(one, x[i : i + 1], atol=1e-7)


@SETTINGS
@given(seed=seeds, dim=st.integers(1, 5), scale=st.floats(0.1, 6))
def test_tanh(seed, dim, scale):
    g = _generator(seed)
    x = scale * (2 * torch.rand(6, dim, generator=g, dtype=DTYPE) - 1)
    _check_bijector(Tanh(), x, atol=1e-7)


def _flow(seed, dim, layers, rank_fraction, nonlinearity, squash) -> Flow:
    rank = round(rank_fraction * dim)
    strength = 0.5 if squash else 1.0  # squashed: keep tanh away from saturation
    flow = Flow(dim, layers, rank, nonlinearity, squash, bins=5, init_strength=strength, seed=seed)
    _perturb_conditioners_(flow, seed, scale=0.3 if squash else 0.5)
    return flow.double()


chains = dict(
    seed=seeds,
    dim=st.integers(1, 4),
    layers=st.integers(0, 4),
    rank_fraction=st.floats(0, 1),
    nonlinearity=st.sampled_from(["prelu", "spline", "coupling"]),
    squash=st.booleans(),
)


@SETTINGS
@given(**chains)
def test_chain_log_det_and_round_trip(seed, dim, layers, rank_fraction, nonlinearity, squash):
    """The whole chain: log q(x) = log N(z) - log|det J(z)| with J from autograd, and
    log_prob(x) of a sample equals the density of its forward pass."""
    dist = _flow(seed, dim, layers, rank_fraction, nonlinearity, squash)()
    z = 0.7 * _randn(_generator(seed), 5, dim)
    with torch.no_grad():
        x, log_prob = dist.push_forward(z)
        torch.testing.assert_close(dist.log_prob(x), log_prob, atol=1e-6, rtol=1e-6)
    for i in range(2):
        J = jacobian(lambda v: dist.push_forward(v[None])[0][0], z[i])
        sign, logdet = torch.linalg.slogdet(J)
        assert sign > 0
        base = -0.5 * z[i].square().sum() - 0.5 * dim * math.log(2 * math.pi)
        torch.testing.assert_close(log_prob[i].detach(), base - logdet, atol=1e-7, rtol=1e-7)


@SETTINGS
@given(**chains)
def test_rsample_and_log_prob_equals_log_prob(
    seed, dim, layers, rank_fraction, nonlinearity, squash
):
    flow = _flow(seed, dim, layers, rank_fraction, nonlinearity, squash)
    torch.manual_seed(seed)
    with torch.no_grad():
        x, log_prob = flow().rsample_and_log_prob((16,))
        if squash:  # away from +-1, where float64 tanh itself loses the sample
            keep = x.abs().amax(-1) < 1 - 1e-6
            x, log_prob = x[keep], log_prob[keep]
        torch.testing.assert_close(flow().log_prob(x), log_prob, atol=1e-6, rtol=1e-6)


@SETTINGS
@given(
    seed=seeds,
    dim=st.integers(1, 3),
    layers=st.integers(0, 3),
    nonlinearity=st.sampled_from(["prelu", "spline", "coupling"]),
    squash=st.booleans(),
    param_bound=st.sampled_from([None, 10.0]),
)
def test_conditional_rsample_and_log_prob(seed, dim, layers, nonlinearity, squash, param_bound):
    """Per context (a policy's step: one sample per parameter set), the forward pass's density
    equals log_prob, bounded or not."""
    cflow = ConditionalFlow(
        dim,
        3,
        layers,
        hidden=(8,),
        nonlinearity=nonlinearity,
        squash=squash,
        seed=seed,
        init_strength=0.5,
        param_bound=param_bound,
    ).double()
    _perturb_conditioners_(cflow, seed, scale=0.3)
    torch.manual_seed(seed)
    dist = cflow(_randn(_generator(seed), 6, 3))
    with torch.no_grad():
        x, log_prob = dist.rsample_and_log_prob()
        torch.testing.assert_close(dist.log_prob(x), log_prob, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("nonlinearity", ["prelu", "spline", "coupling"])
@SETTINGS
@given(seed=seeds, exponent=st.integers(0, 30))
def test_bounded_conditional_flow_stays_finite_for_any_context(nonlinearity, seed, exponent):
    """output_bound bounds what compounds: any finite context, float32, gives finite samples and
    a moderate log-density."""
    torch.manual_seed(seed)  # the hypernetwork's weights and the samples
    cflow = ConditionalFlow(
        2, 3, nonlinearity=nonlinearity, squash=True, param_bound=10, output_bound=1000, seed=0
    )
    _perturb_conditioners_(cflow, seed)
    context = 10.0**exponent * torch.randn(8, 3, generator=_generator(seed))
    x, log_prob = cflow(context).rsample_and_log_prob((4,))
    assert torch.isfinite(x).all() and torch.isfinite(log_prob).all()
    assert log_prob.abs().max() < 1e4


@pytest.mark.parametrize("nonlinearity", ["prelu", "spline", "coupling"])
@SETTINGS
@given(seed=seeds, exponent=st.integers(-2, 3), rank=st.integers(0, 2))
def test_batch_precheck_implies_no_state_is_scaled(nonlinearity, seed, exponent, rank):
    """FlowParams.within, the one-reduction test that lets a batch skip output_scales, is
    sufficient: where it passes, no state's layer would have been scaled (and for large raw
    values it fails, so the per-state screen runs)."""
    layout = ConditionalFlow(3, 1, rank=rank, nonlinearity=nonlinearity, seed=0).double().layout
    theta = 10.0**exponent * torch.randn(16, layout.num_params, generator=_generator(seed))
    theta = theta.clamp(-10, 10).double()
    for bound in (10.0, 1000.0):
        if layout.within(theta, bound):
            assert (layout.output_scales(theta, bound) == 0).all()
    assert not layout.within(torch.full((4, layout.num_params), 10.0), 1000.0)
