"""Property tests of every bijector, in float64: inverse, log-det, fused calls, broadcasting."""

import math

import pytest
import torch
from torch.autograd.functional import jacobian
from torch.distributions import ComposeTransform, Independent, Normal, TransformedDistribution

from flowpolicy.bijectors import Affine, PReLU, Spline, Tanh, call_and_ladj, inv_and_ladj

DTYPE = torch.float64
SHAPES = [(1, 0), (2, 1), (3, 3), (6, 2), (17, 1), (17, 5)]  # (d, r)


def affine_params(d: int, r: int, batch=(), g=None) -> tuple[torch.Tensor, ...]:
    L = torch.randn(*batch, d, d, generator=g, dtype=DTYPE).tril(-1) / d**0.5
    L = L + torch.diag_embed(torch.rand(*batch, d, generator=g, dtype=DTYPE) + 0.5)
    shift = torch.randn(*batch, d, generator=g, dtype=DTYPE)
    if r == 0:
        return shift, L
    V = torch.randn(*batch, d, r, generator=g, dtype=DTYPE)
    return shift, L, V, torch.rand(*batch, r, generator=g, dtype=DTYPE)


def prelu_params(d: int, r: int, batch=(), g=None) -> tuple[torch.Tensor, ...]:
    return (torch.exp(torch.randn(*batch, d, generator=g, dtype=DTYPE)),)


def spline_params(d: int, r: int, batch=(), g=None) -> tuple[torch.Tensor, ...]:
    K = 5
    w, h = (torch.randn(*batch, d, K, generator=g, dtype=DTYPE) for _ in range(2))
    return w, h, torch.randn(*batch, d, K - 1, generator=g, dtype=DTYPE)


def make(name: str, params: tuple[torch.Tensor, ...]):
    if name == "spline":
        return Spline(*params, bound=3.0)
    return {"affine": Affine, "prelu": PReLU, "tanh": Tanh}[name](*params)


PARAMS = {
    "affine": affine_params,
    "prelu": prelu_params,
    "spline": spline_params,
    "tanh": lambda d, r, batch=(), g=None: (),
}


def make_random(name: str, d: int, r: int, batch=(), g=None):
    return make(name, PARAMS[name](d, r, batch, g))


def inputs(d: int, n: int, g) -> torch.Tensor:
    # scale 2.5 puts spline inputs both inside and outside [-3, 3]
    return 2.5 * torch.randn(n, d, generator=g, dtype=DTYPE)


@pytest.fixture
def g() -> torch.Generator:
    return torch.Generator().manual_seed(0)


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("d,r", SHAPES)
def test_inverse_round_trip(name, d, r, g):
    f = make_random(name, d, r, g=g)
    x = inputs(d, 64, g)
    y = f(x)
    assert y.shape == x.shape
    torch.testing.assert_close(f.inv(y), x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("d,r", SHAPES)
def test_log_det_matches_autograd_jacobian(name, d, r, g):
    f = make_random(name, d, r, g=g)
    for x in inputs(d, 8, g):
        J = jacobian(f, x)
        sign, expected = torch.linalg.slogdet(J)
        assert sign > 0  # every bijector here preserves orientation
        ladj = f.log_abs_det_jacobian(x, f(x))
        assert ladj.shape == ()
        torch.testing.assert_close(ladj, expected, rtol=0, atol=1e-8)


@pytest.mark.parametrize("name", PARAMS)
@pytest.mark.parametrize("d,r", [(2, 1), (6, 2)])
def test_fused_calls_equal_separate_calls(name, d, r, g):
    f = make_random(name, d, r, g=g)
    x = inputs(d, 32, g)
    y, ladj = call_and_ladj(f, x)
    torch.testing.assert_close(y, f(x))
    torch.testing.assert_close(ladj, f.log_abs_det_jacobian(x, y))
    x_back, ladj_back = inv_and_ladj(f, y)
    torch.testing.assert_close(x_back, x, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(ladj_back, ladj, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("name", ["affine", "prelu", "spline"])
def test_batched_parameters_broadcast(name, g):
    """One parameter set per batch element (a policy's states) against extra sample dims."""
    d, r, B, S = 3, 2, 4, 5
    params = PARAMS[name](d, r, (B,), g)
    f = make(name, params)
    x = inputs(d, S * B, g).reshape(S, B, d)
    y, ladj = call_and_ladj(f, x)
    assert y.shape == (S, B, d) and ladj.shape == (S, B)
    for b in range(B):
        yb, lb = call_and_ladj(make(name, tuple(p[b] for p in params)), x[:, b])
        torch.testing.assert_close(y[:, b], yb)
        torch.testing.assert_close(ladj[:, b], lb)
    torch.testing.assert_close(inv_and_ladj(f, y)[0], x, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("d,r", [(3, 0), (6, 2), (17, 5)])
def test_affine_one_sample_per_parameter_set(d, r, g):
    """A policy's step (one sample per state) applies L (x + F F^T x) without forming S; it must
    agree with the dense S = L (I + V D V^T) and with one parameter set at a time."""
    B = 7
    params = affine_params(d, r, (B,), g)
    x = inputs(d, B, g)
    y, ladj = Affine(*params).call_and_ladj(x)
    dense = Affine(*params)
    torch.testing.assert_close(y, (dense.matrix @ x[..., None])[..., 0] + params[0])
    torch.testing.assert_close(dense(x), y)  # S already formed: the broadcasting path
    for b in range(B):
        yb, lb = Affine(*(p[b] for p in params)).call_and_ladj(x[b : b + 1])
        torch.testing.assert_close(y[b : b + 1], yb)
        torch.testing.assert_close(ladj[b], lb[0])


def test_works_inside_torch_transformed_distribution(g):
    """The bijectors are plain torch Transforms: torch's own machinery gives the same density."""
    d = 3
    chain = [make_random(name, d, 1, g=g) for name in ("affine", "prelu", "spline")]
    base = Independent(Normal(torch.zeros(d, dtype=DTYPE), torch.ones(d, dtype=DTYPE)), 1)
    dist = TransformedDistribution(base, [ComposeTransform(chain)])
    z = torch.randn(16, d, generator=g, dtype=DTYPE)
    x = dist.transforms[0](z)
    expected = base.log_prob(z)
    for f in chain:
        z, ladj = call_and_ladj(f, z)
        expected = expected - ladj
    torch.testing.assert_close(dist.log_prob(x), expected, rtol=1e-8, atol=1e-8)


def test_spline_is_identity_outside_bound_and_at_zero_parameters(g):
    d, K = 2, 6
    zeros = torch.zeros(d, K, dtype=DTYPE)
    identity_derivative = math.log(math.expm1(1.0 - Spline.min_derivative))
    f = Spline(zeros, zeros, torch.full((d, K - 1), identity_derivative, dtype=DTYPE), 2.0)
    x = inputs(d, 50, g)
    y, ladj = f.call_and_ladj(x)
    torch.testing.assert_close(y, x)
    torch.testing.assert_close(ladj, torch.zeros(50, dtype=DTYPE), atol=1e-12, rtol=0)
    f = make_random("spline", d, 0, g=g)
    outside = torch.tensor([[-7.0, 3.5], [4.0, -3.0001]], dtype=DTYPE)
    y, ladj = f.call_and_ladj(outside)
    torch.testing.assert_close(y, outside)
    assert (ladj == 0).all()


def test_tanh_is_stable_at_extremes():
    f = Tanh()
    x = torch.tensor([[-1e4, 50.0], [0.0, 1e4]], dtype=torch.float32)
    y, ladj = f.call_and_ladj(x)
    assert torch.isfinite(ladj).all()
    # log(1 - tanh(50)^2) = log(4) - 100 - 2 softplus(-100) ~ -98.61
    torch.testing.assert_close(ladj[0], torch.tensor(-1e4 * 2 - 98.6137), rtol=1e-4, atol=1e-2)
    x_back, ladj_back = f.inv_and_ladj(torch.tensor([[1.0, -1.0]], dtype=torch.float32))
    assert torch.isfinite(x_back).all() and torch.isfinite(ladj_back).all()


def test_affine_is_never_singular():
    """S = L (I + V D V^T) stays invertible even where L + V D V^T would be singular."""
    L = torch.eye(2, dtype=DTYPE)
    V = torch.tensor([[1.0], [-1.0]], dtype=DTYPE)
    D = torch.tensor([1e6], dtype=DTYPE)
    f = Affine(torch.zeros(2, dtype=DTYPE), L, V, D)
    expected = torch.log(torch.tensor(1 + 2e6, dtype=DTYPE))
    torch.testing.assert_close(f.log_det(), expected)
    x = torch.randn(10, 2, dtype=DTYPE)
    torch.testing.assert_close(f.inv(f(x)), x, rtol=1e-6, atol=1e-6)


def test_bad_parameters_get_clear_errors():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="positive"):
        PReLU(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="positive"):
        PReLU(torch.tensor([1.0, -2.0]))
    with pytest.raises(ValueError, match="non-finite"):
        PReLU(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="diagonal"):
        Affine(z, torch.diag(torch.tensor([1.0, -1.0])))
    with pytest.raises(ValueError, match="shape"):
        Affine(z, torch.eye(3))
    with pytest.raises(ValueError, match="rank"):
        Affine(z, torch.eye(2), torch.ones(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="non-negative"):
        Affine(z, torch.eye(2), torch.ones(2, 1), -torch.ones(1))
    with pytest.raises(ValueError, match="non-finite"):
        Affine(torch.tensor([0.0, float("inf")]), torch.eye(2))
    with pytest.raises(ValueError, match="shape"):
        Spline(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="bound"):
        Spline(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3), bound=0.0)


def test_prelu_kink_term_keeps_values_and_adds_the_boundary_gradient(g):
    """With a kink bandwidth, the inverse pass's log-det has the same value and the same gradient
    in log(alpha); its gradient in the input is minus the kernel density at 0 times log(alpha)."""
    d, n, bandwidth = 3, 1000, 0.3
    log_alpha = torch.randn(d, generator=g, dtype=DTYPE).requires_grad_()
    y = (torch.randn(n, d, generator=g, dtype=DTYPE) + 0.2).requires_grad_()
    weights = torch.randn(n, generator=g, dtype=DTYPE)
    results = []
    for kink_bandwidth in (0.0, bandwidth):
        f = PReLU.from_log_slopes(log_alpha, kink_bandwidth)
        x, ladj = f.inv_and_ladj(y)
        loss = (ladj * weights).sum()
        grads = torch.autograd.grad(loss, (y, log_alpha), allow_unused=True, materialize_grads=True)
        results.append((x, ladj, *grads))
    (x0, ladj0, grad_y0, grad_a0), (x1, ladj1, grad_y1, grad_a1) = results
    assert torch.equal(x0, x1) and torch.equal(ladj0, ladj1) and torch.equal(grad_a0, grad_a1)
    assert (grad_y0 == 0).all()
    width = bandwidth * y.detach().std(0)
    kernel = torch.exp(-0.5 * (y.detach() / width) ** 2) / (math.sqrt(2 * math.pi) * width)
    torch.testing.assert_close(grad_y1, -kernel * log_alpha.detach() * weights[:, None])
    # no gradient asked for: the plain log-det, no custom node
    with torch.no_grad():
        assert torch.equal(PReLU.from_log_slopes(log_alpha, bandwidth).inv_and_ladj(y)[1], ladj0)


def test_prelu_kink_term_estimates_the_expected_log_det_gradient(g):
    """For y = mu + noise, E [y < 0] log(alpha) = Phi(-mu) log(alpha): its derivative in mu,
    -phi(mu) log(alpha), is what the kernel term recovers from samples (the pathwise gradient
    is 0)."""
    mu = torch.tensor([0.3, -0.8], dtype=DTYPE, requires_grad=True)
    log_alpha = torch.tensor([0.7, -1.2], dtype=DTYPE)
    y = mu + torch.randn(200_000, 2, generator=g, dtype=DTYPE)
    ladj = PReLU.from_log_slopes(log_alpha, kink_bandwidth=0.2).inv_and_ladj(y)[1]
    (grad,) = torch.autograd.grad(ladj.mean(), mu)
    expected = -Normal(0.0, 1.0).log_prob(mu.detach()).exp() * log_alpha
    torch.testing.assert_close(grad, expected, rtol=0.05, atol=0)


def test_prelu_kink_term_broadcasts_batched_slopes(g):
    """One set of slopes per state (a conditional flow) against several samples per state."""
    log_alpha = torch.randn(4, 3, generator=g, dtype=DTYPE).requires_grad_()
    y = torch.randn(5, 4, 3, generator=g, dtype=DTYPE).requires_grad_()
    ladj = PReLU.from_log_slopes(log_alpha, 0.5).inv_and_ladj(y)[1]
    assert ladj.shape == (5, 4)
    grad_y, grad_a = torch.autograd.grad(ladj.sum(), (y, log_alpha))
    assert grad_y.shape == y.shape and grad_a.shape == log_alpha.shape
    torch.testing.assert_close(grad_a, (y < 0).to(DTYPE).sum(0))


def test_wrong_width_inputs_raise_a_clear_error():
    spline = Spline(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 3))
    prelu = PReLU(torch.ones(2))
    affine = Affine(torch.zeros(2), torch.eye(2))
    for f in (spline, prelu, affine):
        name = type(f).__name__
        with pytest.raises(ValueError, match=rf"{name}: expected inputs of shape \(\.\.\., 2\)"):
            call_and_ladj(f, torch.zeros(5, 3))
        with pytest.raises(ValueError, match=rf"{name}: expected inputs of shape \(\.\.\., 2\)"):
            inv_and_ladj(f, torch.zeros(5, 3))


def test_one_parameter_set_inverse_runs_over_samples_along_the_last_axis():
    """The density model's inverse, x^T = S^-1 y^T - S^-1 b (a transposed view), equals the
    batched triangular solve in float64, values and gradients."""
    torch.manual_seed(0)
    L = torch.tril(torch.randn(3, 3, dtype=torch.float64), -1) + torch.eye(3, dtype=torch.float64)
    shift = torch.randn(3, dtype=torch.float64, requires_grad=True)
    factor = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    y = torch.randn(50, 3, dtype=torch.float64)
    one = Affine(shift, L, factor, validate=False).inv(y)
    assert one.shape == (50, 3)
    batched = Affine(shift[None], L[None], factor[None], validate=False).inv(y[:, None])[:, 0]
    torch.testing.assert_close(one, batched, rtol=1e-13, atol=1e-13)
    g1 = torch.autograd.grad(one.sin().sum(), (shift, factor))
    g2 = torch.autograd.grad(batched.sin().sum(), (shift, factor))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("d", "r"), [(1, 0), (1, 1), (2, 1), (2, 2), (3, 0), (4, 2)])
def test_per_state_inverse_equals_a_dense_solve(d, r):
    """Per-state parameters of size d <= 4 and rank r <= 2 invert through a closed-form S^-1
    (no LAPACK call; d = 1 a scalar): values and gradients equal torch.linalg.solve of the dense
    S = L (I + V D V^T), one value per state and several."""
    g = torch.Generator().manual_seed(10 * d + r)
    params = [p.requires_grad_() for p in affine_params(d, r, (6,), g)]
    for y in (torch.randn(6, d, generator=g, dtype=DTYPE), torch.randn(3, 6, d, dtype=DTYPE)):
        weights = torch.randn(y.shape, generator=g, dtype=DTYPE)
        f = Affine(*params, validate=False)
        assert f._small
        x = f.inv(y)
        shift, L = params[0], params[1].tril()  # (the upper triangle is never read)
        S = L
        if r:
            V, D = params[2:]
            S = L @ (torch.eye(d, dtype=DTYPE) + (V * D[..., None, :]) @ V.mT)
        expected = torch.linalg.solve(S, (y - shift).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(x, expected, rtol=1e-12, atol=1e-12)
        grads = torch.autograd.grad((x * weights).sum(), params)
        reference = torch.autograd.grad((expected * weights).sum(), params)
        for a, b in zip(grads, reference):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
