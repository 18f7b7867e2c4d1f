"""Tests of the flow distributions: normalization, exact densities, gradients, errors."""

import math

import pytest
import torch
from torch.distributions import ExpTransform, Independent, LogNormal, Normal

from flowpolicy import ConditionalFlow, Flow, FlowDistribution, flows

NONLINEARITIES = ["prelu", "spline"]


@pytest.fixture(autouse=True)
def float64():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def grid_mass(log_prob, low: float, high: float, n: int) -> float:
    """Midpoint-rule integral of exp(log_prob) over the square [low, high]^2."""
    edges = torch.linspace(low, high, n + 1)
    centres = (edges[1:] + edges[:-1]) / 2
    xy = torch.cartesian_prod(centres, centres)
    with torch.no_grad():
        return float(log_prob(xy).exp().sum() * ((high - low) / n) ** 2)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_2d_density_integrates_to_one(nonlinearity):
    flow = Flow(dim=2, layers=3, rank=1, nonlinearity=nonlinearity, seed=0, init_strength=0.5)
    dist = flow()
    samples = dist.sample((20000,))
    # the grid must hold the mass: cover the samples' range with a margin
    half = float(samples.abs().quantile(0.9999)) * 1.5
    assert grid_mass(dist.log_prob, -half, half, 800) == pytest.approx(1.0, abs=1e-2)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_squashed_density_integrates_to_one_on_the_square(nonlinearity):
    flow = Flow(dim=2, layers=2, rank=1, nonlinearity=nonlinearity, squash=True, seed=1)
    dist = flow()
    # atanh-spaced grid: uniform in u = atanh(x), the density in x is integrated exactly
    n = 600
    u = torch.linspace(-8, 8, n + 1)
    centres, widths = torch.tanh((u[1:] + u[:-1]) / 2), torch.tanh(u[1:]) - torch.tanh(u[:-1])
    xy = torch.cartesian_prod(centres, centres)
    area = torch.outer(widths, widths).flatten()
    with torch.no_grad():
        mass = float((dist.log_prob(xy).exp() * area).sum())
    assert mass == pytest.approx(1.0, abs=1e-2)
    assert (dist.sample((1000,)).abs() < 1).all()


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("squash", [False, True])
def test_rsample_and_log_prob_agrees_with_log_prob(nonlinearity, squash):
    dist = Flow(5, layers=4, rank=2, nonlinearity=nonlinearity, squash=squash, seed=2)()
    x, log_prob = dist.rsample_and_log_prob((256,))
    assert x.shape == (256, 5) and log_prob.shape == (256,)
    if not squash:
        torch.testing.assert_close(dist.log_prob(x), log_prob, rtol=1e-7, atol=1e-6)
        return
    # near saturation atanh loses digits, and where |u| > ~19 tanh(u) = +-1 exactly in float64
    invertible = x.abs().amax(-1) < 1 - 1e-12
    assert invertible.float().mean() > 0.8
    torch.testing.assert_close(
        dist.log_prob(x)[invertible], log_prob[invertible], rtol=1e-5, atol=1e-6
    )


def test_affine_only_flow_is_the_exact_gaussian():
    """With no nonlinear layers the flow is N(b, S S^T): compare densities and entropy."""
    flow = Flow(3, layers=0, rank=2, seed=3)
    dist = flow()
    affine = dist.transforms[0]
    S = (affine(torch.eye(3)) - affine.shift).T  # column i is S e_i
    gaussian = torch.distributions.MultivariateNormal(affine.shift, covariance_matrix=S @ S.T)
    x = gaussian.sample((100,))
    torch.testing.assert_close(dist.log_prob(x), gaussian.log_prob(x))
    entropy, stderr = dist.entropy_and_stderr(20000)
    assert abs(float(entropy - gaussian.entropy().detach())) < 5 * float(stderr) + 1e-9


def test_entropy_estimate_matches_minus_mean_log_prob_of_own_samples():
    dist = Flow(2, layers=4, seed=4)()
    entropy, stderr = dist.entropy_and_stderr(50000)
    with torch.no_grad():
        cross_check = dist.log_prob(dist.sample((50000,))).mean()
    assert abs(float(entropy + cross_check)) < 6 * float(stderr)
    assert float(stderr) > 0


def test_exp_of_normal_through_our_machinery_is_lognormal():
    """The first example of Jang (2018): exp of a standard normal is the log-normal."""
    base = Independent(Normal(torch.zeros(3), torch.ones(3)), 1)
    dist = FlowDistribution(base, [ExpTransform()])
    reference = Independent(LogNormal(torch.zeros(3), torch.ones(3)), 1)
    x, log_prob = dist.rsample_and_log_prob((100,))
    torch.testing.assert_close(log_prob, reference.log_prob(x))
    torch.testing.assert_close(dist.log_prob(x), reference.log_prob(x))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_gradients_reach_every_parameter(nonlinearity):
    flow = Flow(3, layers=2, rank=2, nonlinearity=nonlinearity, seed=5)
    x, log_prob = flow().rsample_and_log_prob((64,))
    (log_prob.mean() + x.pow(2).mean()).backward()
    assert flow.theta.grad is not None
    # every raw parameter of every layer moves the loss (a linear chain would leave slopes dead)
    assert (flow.theta.grad != 0).float().mean() > 0.9
    cflow = ConditionalFlow(2, 4, layers=2, rank=1, hidden=(16,), nonlinearity=nonlinearity)
    dist = cflow(torch.randn(8, 4))
    dist.log_prob(torch.rand(8, 2) - 0.5).sum().backward()
    for name, parameter in cflow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("cls", ["flow", "conditional"])
def test_state_dict_round_trip(cls):
    if cls == "flow":
        a, b = Flow(2, layers=3, seed=6), Flow(2, layers=3, seed=7)
        args = ()
    else:
        a = ConditionalFlow(2, 3, layers=2, hidden=(8,), nonlinearity="spline", seed=6)
        b = ConditionalFlow(2, 3, layers=2, hidden=(8,), nonlinearity="spline", seed=7)
        args = (torch.randn(5, 3),)
    x = torch.randn(5, 2)
    assert not torch.allclose(a(*args).log_prob(x), b(*args).log_prob(x))
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a(*args).log_prob(x), b(*args).log_prob(x), rtol=0, atol=0)


def test_conditional_flow_shape_depends_on_context():
    cflow = ConditionalFlow(2, 5, layers=2, rank=1, hidden=(32, 32), head_scale=1.0, seed=8)
    context = torch.randn(7, 3, 5)
    dist = cflow(context)
    assert dist.batch_shape == (7, 3) and dist.event_shape == (2,)
    x, log_prob = dist.rsample_and_log_prob((4,))
    assert x.shape == (4, 7, 3, 2) and log_prob.shape == (4, 7, 3)
    torch.testing.assert_close(dist.log_prob(x), log_prob, rtol=1e-7, atol=1e-6)
    # different contexts give differently *shaped* densities, not only shifted ones
    one, two = cflow(context[0, 0]), cflow(context[0, 1])
    assert not torch.allclose(one.transforms[1].alpha, two.transforms[1].alpha)


def test_flow_initialization_is_not_linear():
    """Slopes all equal to 1 keep a chain linear forever: the initialization spreads them."""
    dist = Flow(2, layers=4, seed=9)()
    slopes = torch.cat([t.alpha for t in dist.transforms[1::2]])
    assert slopes.min() < 0.8 and slopes.max() > 1.25
    # init_strength = 0 is the identity map: the standard normal density at 0
    identity = Flow(2, layers=4, init_strength=0.0)()
    log_prob_at_zero = identity.log_prob(torch.zeros(2)).item()
    assert math.isclose(log_prob_at_zero, -math.log(2 * math.pi), rel_tol=1e-6)


def test_bad_input_gets_clear_errors():
    dist = Flow(2, layers=1)()
    with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
        dist.log_prob(torch.zeros(5, 3))
    with pytest.raises(ValueError, match="NaN"):
        dist.log_prob(torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(ValueError, match="rank"):
        Flow(2, rank=3)
    with pytest.raises(ValueError, match="nonlinearity"):
        Flow(2, nonlinearity="relu")
    with pytest.raises(ValueError, match="dim"):
        Flow(0)
    cflow = ConditionalFlow(2, 4, hidden=())
    with pytest.raises(ValueError, match=r"context of shape \(\.\.\., 4\)"):
        cflow(torch.zeros(3, 5))
    # a non-finite context or diverged parameters, not a silent NaN log-density
    context = torch.zeros(3, 4)
    context[1, 2] = float("nan")
    with pytest.raises(ValueError, match="context contains NaN or inf"):
        cflow(context)
    flow = Flow(2, layers=1)
    with torch.no_grad():
        flow.theta[0] = float("inf")
    with pytest.raises(ValueError, match="parameters contain NaN or inf"):
        flow()
    # validation off (a policy's hot path): no check, no sync
    assert torch.isnan(cflow(context, validate_args=False).rsample_and_log_prob()[1][1])


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize(("dim", "layers", "rank"), [(1, 1, 1), (3, 0, 2), (3, 3, 0), (6, 4, 2)])
@pytest.mark.parametrize("batch", [(7,), (2, 3), (1,)])
def test_policy_step_equals_the_generic_chain(squash, dim, layers, rank, batch):
    """One sample per state (a policy's step): values and every parameter's gradient equal the
    generic FlowDistribution over the same bijectors."""
    cflow = ConditionalFlow(dim, 4, layers, rank, hidden=(16,), squash=squash, seed=1)
    with torch.no_grad():
        cflow.hyper[-1].weight.mul_(30)  # context-dependent, mixed-sign flows
    context, z = torch.randn(*batch, 4), torch.randn(*batch, dim)
    weights = torch.randn(*batch, dim), torch.randn(batch)

    def values_and_grads(push_forward):
        cflow.zero_grad()
        x, log_prob = push_forward(cflow(context), z)
        ((x * weights[0]).sum() + (log_prob * weights[1]).sum()).backward()
        return [x, log_prob] + [p.grad.clone() for p in cflow.parameters()]

    fused = values_and_grads(lambda dist, z: dist.push_forward(z))
    chain = values_and_grads(
        lambda dist, z: FlowDistribution(dist.base, dist.transforms).push_forward(z)
    )
    assert fused[0].shape == (*batch, dim) and fused[1].shape == batch
    for a, b in zip(fused, chain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    with torch.no_grad():  # acting: the same forward, without a graph
        x, log_prob = cflow(context).push_forward(z)
    assert x.grad_fn is None
    torch.testing.assert_close((x, log_prob), (fused[0].detach(), fused[1].detach()))
    # rsample_and_log_prob draws its noise and takes the same path
    torch.manual_seed(3)
    x, log_prob = cflow(context).rsample_and_log_prob()
    torch.manual_seed(3)
    torch.testing.assert_close((x, log_prob), cflow(context).push_forward(torch.randn(*batch, dim)))
    torch.manual_seed(3)
    torch.testing.assert_close(cflow(context).rsample(), x)


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize(("layers", "rank"), [(2, 2), (1, 1), (0, 0)])
def test_policy_step_passes_gradcheck(squash, layers, rank):
    flow = Flow(3, layers, rank, squash=squash, seed=0)
    theta = (flow.theta + 0.3 * torch.randn(5, flow.theta.numel())).detach().requires_grad_()
    z = torch.randn(5, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, theta: flows._LayeredFlowDistribution(flow.layout, theta, False).push_forward(z),
        (z, theta),
    )


def test_bijectors_built_under_no_grad_still_carry_gradients():
    """A module's distribution builds its bijectors on first use: sampling under no_grad first
    (a score-function gradient) must not leave log_prob without a graph."""
    cflow = ConditionalFlow(2, 3, layers=2, rank=1, hidden=(8,), nonlinearity="spline", seed=0)
    dist = cflow(torch.randn(4, 3))
    with torch.no_grad():
        actions = dist.sample((5,))
    dist.log_prob(actions).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cflow.parameters())


# --- layers: what each one is, and setting it -----------------------------------------------


def random_parts(kind: str, dim: int, rank: int, g, bins: int = 6, bound: float = 3.0) -> dict:
    """Valid parts of a layer, as ``Flow.set_layer_`` takes them."""
    if kind == "affine":
        L = torch.randn(dim, dim, generator=g).tril(-1) + torch.diag(torch.rand(dim, generator=g))
        L.diagonal().add_(0.2)
        factor = torch.randn(dim, rank, generator=g) if rank else None
        return dict(shift=torch.randn(dim, generator=g), scale_tril=L, factor=factor)
    if kind == "prelu":
        return dict(alpha=torch.randn(dim, generator=g).exp())
    knots = []
    for _ in range(2):
        sizes = torch.rand(dim, bins, generator=g) + 0.05
        inner = torch.cumsum(sizes / sizes.sum(-1, keepdim=True), -1)[:, :-1]
        knots.append(
            bound * (2 * torch.cat([torch.zeros(dim, 1), inner, torch.ones(dim, 1)], 1) - 1)
        )
    derivatives = torch.rand(dim, bins - 1, generator=g) * 3 + 0.05
    return dict(knots_x=knots[0], knots_y=knots[1], derivatives=derivatives)


def reference_bijector(kind: str, parts: dict, bound: float = 3.0):
    """The bijector of ``parts`` built directly (not through the raw parameters)."""
    from flowpolicy.bijectors import Affine, PReLU, Spline

    if kind == "affine":
        return Affine(parts["shift"], parts["scale_tril"], parts["factor"])
    if kind == "prelu":
        return PReLU(parts["alpha"])
    widths = (parts["knots_x"].diff(dim=-1) / (2 * bound) - Spline.min_bin).log()
    heights = (parts["knots_y"].diff(dim=-1) / (2 * bound) - Spline.min_bin).log()
    raw = torch.log(torch.expm1(parts["derivatives"] - Spline.min_derivative))
    return Spline(widths, heights, raw, bound=bound)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("rank", [0, 1, 2])
def test_set_layer_then_layer_gives_the_same_map(nonlinearity, rank):
    """Round trip in float64: the map written into the raw vector is the map read back."""
    g = torch.Generator().manual_seed(rank)
    flow = Flow(3, layers=2, rank=rank, nonlinearity=nonlinearity, bins=6, bound=3.0, seed=0)
    x = 4 * torch.randn(200, 3, generator=g)
    for i, kind in enumerate(["affine", nonlinearity, "affine", nonlinearity, "affine"]):
        parts = random_parts(kind, 3, rank, g)
        assert flow.set_layer_(i, **parts) is flow
        layer = flow.layer(i)
        if kind == "affine":
            torch.testing.assert_close(layer.shift, parts["shift"])
            torch.testing.assert_close(layer.scale_tril, parts["scale_tril"])
            if rank:
                torch.testing.assert_close(layer.factor, parts["factor"])
        elif kind == "prelu":
            torch.testing.assert_close(layer.alpha, parts["alpha"])
        else:
            torch.testing.assert_close(layer.knots_x, parts["knots_x"])
            torch.testing.assert_close(layer.knots_y, parts["knots_y"])
            torch.testing.assert_close(layer.derivatives[:, 1:-1], parts["derivatives"])
        y, ladj = layer.call_and_ladj(x)
        y_ref, ladj_ref = reference_bijector(kind, parts).call_and_ladj(x)
        torch.testing.assert_close((y, ladj), (y_ref, ladj_ref))
    # the chain of the flow is the chain of its layers
    dist = flow()
    for i, transform in enumerate(dist.transforms):
        torch.testing.assert_close(transform(x), flow.layer(i)(x))
    assert type(flow.layer(-1)).__name__ == "Affine"
    with pytest.raises(IndexError):
        flow.layer(5)


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_encode_inverts_the_parametrization(nonlinearity):
    """encode(decode(theta)) == theta for affine and PReLU layers (batched, far from the start);
    spline logits are defined up to a constant per row, so the map is compared there."""
    flow = Flow(4, layers=1, rank=2, nonlinearity=nonlinearity, seed=0)
    theta = flow.theta.detach() + torch.randn(5, flow.theta.numel())
    affine_module, nonlinear_module = flow.layout.chain[0], flow.layout.chain[1]
    raw = theta[:, : flow.layout.sizes[0]]
    affine = affine_module(raw)
    torch.testing.assert_close(
        affine_module.encode(affine.shift, affine.scale_tril, affine.factor), raw
    )
    raw = theta[:, flow.layout.sizes[0] : sum(flow.layout.sizes[:2])]
    layer = nonlinear_module(raw)
    if nonlinearity == "prelu":
        torch.testing.assert_close(nonlinear_module.encode(layer.alpha), raw)
        return
    encoded = nonlinear_module.encode(layer.knots_x, layer.knots_y, layer.derivatives[..., 1:-1])
    again = nonlinear_module(encoded)
    for name in ("knots_x", "knots_y", "derivatives"):
        torch.testing.assert_close(getattr(again, name), getattr(layer, name))


def test_set_layer_refuses_invalid_parts():
    flow = Flow(2, layers=1, rank=1, seed=0)
    with pytest.raises(ValueError, match="diagonal"):
        flow.set_layer_(0, shift=torch.zeros(2), scale_tril=-torch.eye(2), factor=None)
    with pytest.raises(ValueError, match="shape"):
        flow.set_layer_(0, shift=torch.zeros(3), scale_tril=torch.eye(2), factor=None)
    with pytest.raises(ValueError, match="positive"):
        flow.set_layer_(1, alpha=torch.tensor([1.0, 0.0]))
    spline = Flow(2, layers=1, nonlinearity="spline", bins=4, bound=2.0, seed=0)
    knots = torch.linspace(-1, 2, 5).expand(2, 5)
    with pytest.raises(ValueError, match="start at"):
        spline.set_layer_(1, knots_x=knots, knots_y=knots, derivatives=torch.ones(2, 3))
    # nothing written by the failed calls
    torch.testing.assert_close(flow.theta, Flow(2, layers=1, rank=1, seed=0).theta)


# --- ConditionalFlow's parameter bound ---------------------------------------------------------


def test_param_bound_clamps_the_raw_parameters():
    cflow = ConditionalFlow(2, 3, layers=2, hidden=(8,), param_bound=0.5, seed=0)
    with torch.no_grad():
        cflow.hyper[-1].weight.mul_(1000)
    context = 100 * torch.randn(6, 3)
    dist = cflow(context)
    torch.testing.assert_close(dist.theta, cflow.hyper(context).clamp(-0.5, 0.5))
    assert dist.theta.abs().max() == 0.5
    x, log_prob = dist.rsample_and_log_prob()
    assert torch.isfinite(x).all() and torch.isfinite(log_prob).all()
    unbounded = ConditionalFlow(2, 3, layers=2, hidden=(8,), seed=0)
    unbounded.load_state_dict(cflow.state_dict())
    assert unbounded(context).theta.abs().max() > 0.5
    with pytest.raises(ValueError, match="param_bound"):
        ConditionalFlow(2, 3, param_bound=0.0)


# --- the kinks' boundary term through a flow ------------------------------------------------


def test_kink_bandwidth_changes_the_gradient_not_the_value():
    """flow(kink_bandwidth=h).log_prob(x): the same log-densities; the gradient differs by the
    kinks' boundary term, and matches a finite difference of the mean NLL better."""
    flow = Flow(2, layers=1, rank=1, seed=0)
    flow.set_layer_(1, alpha=torch.tensor([0.2, 3.0]))  # kinks where the data is dense
    flow.set_layer_(2, shift=torch.zeros(2), scale_tril=torch.eye(2), factor=None)
    x = torch.randn(200_000, 2, generator=torch.Generator().manual_seed(0)) + 0.3

    def loss(kink_bandwidth=0.0):
        return -flow(kink_bandwidth=kink_bandwidth).log_prob(x).mean()

    plain, kernel = loss(), loss(0.2)
    assert torch.equal(plain, kernel)
    (grad_plain,) = torch.autograd.grad(plain, flow.theta)
    (grad_kernel,) = torch.autograd.grad(kernel, flow.theta)
    direction, h = grad_plain / grad_plain.norm(), 1e-3
    theta = flow.theta.detach().clone()
    with torch.no_grad():
        flow.theta.copy_(theta + h * direction)
        up = loss()
        flow.theta.copy_(theta - h * direction)
        down = loss()
        flow.theta.copy_(theta)
    fd = float(up - down) / (2 * h)
    plain_error = abs(fd - float(grad_plain @ direction))
    kernel_error = abs(fd - float(grad_kernel @ direction))
    assert plain_error > 0.1 and kernel_error < 0.25 * plain_error


# --- the high-density sample ----------------------------------------------------------------


def test_quasi_normal_is_deterministic_and_standard():
    z = flows.quasi_normal(4096, 3)
    assert z.shape == (4096, 3) and z.dtype == torch.get_default_dtype()
    torch.testing.assert_close(z, flows.quasi_normal(4096, 3))
    assert not torch.equal(z, flows.quasi_normal(4096, 3, seed=1))
    torch.testing.assert_close(z.mean(0), torch.zeros(3), atol=0.01, rtol=0)
    torch.testing.assert_close(z.std(0), torch.ones(3), atol=0.02, rtol=0)


def test_high_density_sample_of_a_gaussian_is_near_its_mean():
    flow = Flow(2, layers=0, rank=1, seed=3)
    flow.set_layer_(0, shift=torch.tensor([1.0, -2.0]), scale_tril=0.3 * torch.eye(2), factor=None)
    dist = flow()
    mode = dist.high_density_sample()
    assert mode.shape == (2,)
    assert (mode - torch.tensor([1.0, -2.0])).norm() < 0.15
    torch.testing.assert_close(dist.mode, mode)
    # given noise: the same selection among its images
    noise = flows.quasi_normal(16, 2, seed=5)
    assert dist.high_density_sample(noise).shape == (2,)
    with pytest.raises(ValueError, match="noise"):
        dist.high_density_sample(torch.zeros(16, 3))


def test_high_density_sample_is_per_batch_element_and_deterministic():
    cflow = ConditionalFlow(2, 3, layers=2, hidden=(8,), squash=True, seed=0)
    context = torch.randn(4, 5, 3)
    dist = cflow(context)
    mode = dist.high_density_sample(bandwidth=0.8)
    assert mode.shape == (4, 5, 2) and (mode.abs() < 1).all()
    torch.testing.assert_close(mode, cflow(context).high_density_sample(bandwidth=0.8))
    torch.testing.assert_close(mode[1, 2], cflow(context[1, 2]).high_density_sample(bandwidth=0.8))
    # it is one of the noise's images, the same noise for every element
    z = flows.quasi_normal(64, 2).view(64, 1, 1, 2)
    images = dist.push_forward(z.expand(64, 4, 5, 2))[0]
    assert ((images - mode).abs().amax(-1) < 1e-12).any(0).all()


def test_squashed_gaussian_is_the_tanh_of_a_gaussian():
    mean = torch.tensor([[0.3, -0.2], [-1.5, 0.1], [0.0, 0.4]])
    std = torch.tensor([[0.3, 0.4], [0.2, 0.2], [0.5, 0.3]])
    dist = flows.squashed_gaussian(mean, std)
    assert dist.batch_shape == (3,) and dist.event_shape == (2,)
    a, log_prob = dist.rsample_and_log_prob((500,))
    assert a.shape == (500, 3, 2) and (a.abs() < 1).all()
    u = torch.atanh(a)
    expected = Independent(Normal(mean, std), 1).log_prob(u) - torch.log1p(-a * a).sum(-1)
    torch.testing.assert_close(log_prob, expected)
    torch.testing.assert_close(dist.log_prob(a), expected)
    # a narrow Gaussian: the high-density sample is tanh(mean)
    narrow = flows.squashed_gaussian(mean, 1e-3)
    torch.testing.assert_close(narrow.mode, torch.tanh(mean), atol=5e-3, rtol=0)
    with pytest.raises(ValueError, match="std"):
        flows.squashed_gaussian(mean, torch.zeros(2))


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_layered_chain_equals_the_generic_chain(nonlinearity, squash, conditional):
    """A flow module's distribution runs its chain layer kind by layer kind (affine log-dets
    summed once, inverses formed in one call): values and gradients equal the
    generic FlowDistribution over the same bijectors, forward and inverse."""
    if conditional:
        module = ConditionalFlow(3, 4, 3, 2, (8,), nonlinearity, squash, head_scale=1.0, seed=0)
        args = (torch.randn(5, 4),)
    else:
        module = Flow(3, 3, 2, nonlinearity, squash, seed=0)
        args = ()
    z = torch.randn(7, *((5,) if conditional else ()), 3)
    weights = torch.randn(7, *((5,) if conditional else ()))

    def values_and_grads(generic: bool):
        module.zero_grad()
        dist = module(*args)
        if generic:
            dist = FlowDistribution(dist.base, dist.transforms)
        x, log_prob = dist.push_forward(z)
        inside = x.detach().clamp(-0.999, 0.999)  # the inverse of tanh is finite inside
        back = dist.log_prob(inside)
        ((x.sum(-1) + log_prob + back) * weights).sum().backward()
        return [x, log_prob, back] + [p.grad.clone() for p in module.parameters()]

    for a, b in zip(values_and_grads(False), values_and_grads(True)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


# --- issue 15: what must never pass silently ----------------------------------------------------


@pytest.mark.parametrize(("nonlinearity", "scale"), [("prelu", 1e8), ("spline", 1e8)])
def test_unbounded_conditional_flow_refuses_overflowing_samples(nonlinearity, scale):
    """Finite parameters can still overflow the chain: a clear error naming the fix, never
    +-inf/NaN samples with a finite log-density."""
    torch.manual_seed(0)  # the hypernetwork's weights
    cflow = ConditionalFlow(2, 3, nonlinearity=nonlinearity, seed=0).float()
    context = torch.full((2, 3), scale, dtype=torch.float32)
    with pytest.raises(ValueError, match="overflowed.*param_bound"):
        cflow(context).rsample_and_log_prob()
    with pytest.raises(ValueError, match="overflowed"):
        cflow(context).rsample()
    squashed = ConditionalFlow(2, 3, nonlinearity=nonlinearity, squash=True, seed=0).float()
    with pytest.raises(ValueError, match="overflowed"):  # tanh would hide the infinity
        squashed(context).rsample()


@pytest.mark.parametrize("nonlinearity", NONLINEARITIES)
def test_output_bound_bounds_what_compounds(nonlinearity):
    """Raw parameters at the bound of 10 compound over the layers (log pi of 1e10 for SAC's
    policy on observations of 1e6): with output_bound the flow keeps its output and log-density
    moderate for any finite context, and leaves the normal range exactly as it was."""
    cflow = ConditionalFlow(
        2, 3, nonlinearity=nonlinearity, squash=True, param_bound=10, output_bound=1000, seed=0
    )
    for scale in (1e3, 1e6, 1e30):
        context = scale * torch.randn(64, 3, generator=torch.Generator().manual_seed(0))
        x, log_prob = cflow(context).rsample_and_log_prob((8,))
        assert torch.isfinite(x).all() and torch.isfinite(log_prob).all()
        assert log_prob.abs().max() < 1e4  # was 1e10 and more
    # the normal range is untouched: every layer's factor is exactly 1
    context = torch.randn(256, 3)
    theta = cflow.hyper(context).clamp(-10, 10)
    assert (cflow.layout.output_scales(theta, cflow.output_bound) == 0).all()
    unbounded = ConditionalFlow(2, 3, nonlinearity=nonlinearity, squash=True, seed=0)
    assert unbounded.output_bound is None  # ConditionalFlow's default (FlowPolicy sets 1000)
    unbounded.load_state_dict(cflow.state_dict())
    torch.manual_seed(1)
    a = cflow(context).rsample_and_log_prob()
    torch.manual_seed(1)
    b = unbounded(context).rsample_and_log_prob()
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_flow_arguments_are_validated():
    for bound in (math.inf, math.nan, 0.0, -1.0):
        with pytest.raises(ValueError, match="bound must be positive and finite"):
            Flow(2, nonlinearity="spline", bound=bound)
        with pytest.raises(ValueError, match="bound must be positive and finite"):
            ConditionalFlow(2, 3, nonlinearity="spline", bound=bound)
    with pytest.raises(ValueError, match="bins must be an integer"):
        Flow(2, nonlinearity="spline", bins=2.5)
    with pytest.raises(ValueError, match="hidden must be a sequence of positive integers"):
        ConditionalFlow(2, 3, hidden=(-5,))
    with pytest.raises(ValueError, match="param_bound"):
        ConditionalFlow(2, 3, param_bound=math.inf)
    with pytest.raises(ValueError, match="output_bound"):
        ConditionalFlow(2, 3, output_bound=-1.0)
    # wrong widths: a clear error with validation off too
    flow = Flow(2, nonlinearity="spline", layers=2, seed=0)
    for validate in (None, False):
        with pytest.raises(ValueError, match=r"shape \(\.\.\., 2\)"):
            flow(validate_args=validate).log_prob(torch.zeros(4, 3))


@pytest.mark.parametrize("conditional", [False, True])
def test_squashed_log_prob_refuses_values_outside_the_support(conditional):
    """tanh's inverse clamps: log_prob([3, 0]) used to equal log_prob([1, 0])."""
    if conditional:
        module, args = ConditionalFlow(2, 3, squash=True, seed=0), (torch.zeros(1, 3),)
    else:
        module, args = Flow(2, squash=True, seed=0), ()
    values = torch.tensor([[3.0, 0.0], [1.0, 0.0], [-1.0, 0.5], [0.2, -0.3]])
    with pytest.raises(ValueError, match=r"outside the support \[-1, 1\]\^d"):
        module(*args).log_prob(values)
    log_prob = module(*args, validate_args=False).log_prob(values)
    assert log_prob[0] == -math.inf
    assert torch.isfinite(log_prob[1:]).all()  # exactly at +-1: finite
    torch.testing.assert_close(module(*args).log_prob(values[1:]), log_prob[1:])
    gaussian = flows.squashed_gaussian(torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="outside the support"):
        gaussian.log_prob(values)
    assert flows.squashed_gaussian(torch.zeros(2), torch.ones(2), False).log_prob(values)[0] == (
        -math.inf
    )


def test_guards_hold_when_torch_compile_turns_validation_off():
    """Dynamo calls Distribution.set_default_validate_args(False) for the whole process: what
    must never pass is checked unless validate_args=False is explicit."""
    from torch.distributions import Distribution

    before = Distribution._validate_args
    Distribution.set_default_validate_args(False)
    try:
        cflow = ConditionalFlow(2, 3, hidden=(), seed=0)
        context = torch.zeros(3, 3)
        context[1, 0] = math.nan
        with pytest.raises(ValueError, match="context contains NaN or inf"):
            cflow(context)
        flow = Flow(2, layers=1)
        with torch.no_grad():
            flow.theta[0] = math.inf
        with pytest.raises(ValueError, match="parameters contain NaN or inf"):
            flow()
        with pytest.raises(ValueError, match="overflowed"):
            overflowing = ConditionalFlow(2, 3, seed=0).float()
            overflowing(torch.full((2, 3), 1e8, dtype=torch.float32)).rsample()
        with pytest.raises(ValueError, match="std"):
            flows.squashed_gaussian(torch.zeros(2), torch.zeros(2))
        # only an explicit False skips the checks (a hot path that checked its inputs)
        assert torch.isnan(cflow(context, validate_args=False).rsample()[1]).all()
    finally:
        Distribution.set_default_validate_args(before)


def test_empty_batches():
    flow = Flow(2, layers=2, seed=0)
    assert flow().log_prob(torch.zeros(0, 2)).shape == (0,)
    x, log_prob = flow().rsample_and_log_prob((0,))
    assert x.shape == (0, 2) and log_prob.shape == (0,)
    for kwargs in ({}, dict(param_bound=10.0, squash=True), dict(nonlinearity="spline")):
        dist = ConditionalFlow(2, 3, **kwargs)(torch.zeros(0, 3))
        x, log_prob = dist.rsample_and_log_prob()
        assert x.shape == (0, 2) and log_prob.shape == (0,)
        assert dist.rsample().shape == (0, 2) and dist.log_prob(torch.zeros(0, 2)).shape == (0,)
        assert dist.mode.shape == (0, 2)


def test_half_precision_mixed_dtypes_and_meta():
    flow = Flow(2, layers=2, nonlinearity="spline", seed=0).float()
    value = torch.tensor([[0.5, -0.25], [1.0, 2.0]], dtype=torch.float32)
    expected = flow().log_prob(value)
    for dtype in (torch.float16, torch.bfloat16):  # exact in float32: cast
        torch.testing.assert_close(flow().log_prob(value.to(dtype)), expected)
    with pytest.raises(TypeError, match="float64 but the flow is torch.float32"):
        flow().log_prob(value.double())
    # float32's tolerance: the float32 result carries float32 rounding
    torch.testing.assert_close(flow.double()().log_prob(value.double()).float(), expected)
    # the meta device: shapes only, no value checks needed
    cflow = ConditionalFlow(2, 3, squash=True, param_bound=10.0).to("meta")
    dist = cflow(torch.zeros(4, 3, device="meta"))
    x, log_prob = dist.rsample_and_log_prob()
    assert x.shape == (4, 2) and log_prob.shape == (4,) and log_prob.is_meta
    assert dist.log_prob(torch.zeros(4, 2, device="meta")).shape == (4,)


# --- issue 19: coupling splines ---------------------------------------------------------------


def _perturbed_coupling_flow(dim: int = 2, seed: int = 0, **kwargs) -> Flow:
    """A coupling flow whose conditioners have random output layers (they start at zero)."""
    flow = Flow(dim, layers=3, rank=1, nonlinearity="coupling", seed=seed, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in flow.layout.chain[1::2]:
            head = layer.conditioner[-1]
            head.weight.copy_(0.3 * torch.randn(head.weight.shape, generator=g))
    return flow


def test_coupling_density_integrates_to_one_and_samples_match():
    flow = Flow(2, layers=2, rank=1, nonlinearity="coupling", seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # mild conditioners: a coarse grid resolves the density
        for layer in flow.layout.chain[1::2]:
            torch.nn.init.normal_(layer.conditioner[-1].weight, 0, 0.05, generator=g)
    dist = flow()
    assert grid_mass(dist.log_prob, -8, 8, 300) == pytest.approx(1.0, abs=1e-2)
    x, log_prob = dist.rsample_and_log_prob((64,))
    torch.testing.assert_close(dist.log_prob(x), log_prob)


def test_coupling_conditioner_bends_one_coordinate_by_the_other():
    """The second coordinate's spline depends on the first: a single coupling layer (no affine
    mixing) maps a vertical line to a curve, which element-wise splines never do."""
    flow = _perturbed_coupling_flow()
    layer = flow.layer(1)
    a, b = layer.a, layer.b
    assert a and b and sorted(a + b) == [0, 1]
    x = torch.zeros(50, 2)
    x[:, a[0]] = torch.linspace(-2, 2, 50)
    y = layer(x)
    assert y[:, b[0]].std() > 1e-3  # x_b fixed at 0, y_b varies with x_a
    # consecutive layers bend complementary coordinates
    assert flow.layer(3).b == a


def test_coupling_flow_is_seeded_and_leaves_the_global_generator_alone():
    state = torch.random.get_rng_state()
    one, two = (Flow(2, 2, nonlinearity="coupling", seed=3) for _ in range(2))
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(one.parameters(), two.parameters()):
        assert torch.equal(p, q)


def test_coupling_gradients_reach_every_parameter():
    flow = _perturbed_coupling_flow(dim=3)
    x, log_prob = flow().rsample_and_log_prob((64,))
    (log_prob.mean() + x.pow(2).mean()).backward()
    for name, parameter in flow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name
    cflow = ConditionalFlow(3, 4, layers=2, hidden=(16,), nonlinearity="coupling", seed=0)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in cflow.layout.chain[1::2]:
            torch.nn.init.normal_(layer.conditioner[-1].weight, 0, 0.3, generator=g)
    cflow(torch.randn(8, 4)).log_prob(torch.randn(8, 3)).sum().backward()
    for name, parameter in cflow.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize("conditional", [False, True])
def test_coupling_layered_chain_equals_the_generic_chain(squash, conditional):
    test_layered_chain_equals_the_generic_chain("coupling", squash, conditional)


def test_coupling_arguments_are_validated():
    with pytest.raises(ValueError, match="coupling_hidden"):
        Flow(2, nonlinearity="coupling", coupling_hidden=(0,))
    with pytest.raises(ValueError, match="coupling_code"):
        ConditionalFlow(2, 3, nonlinearity="coupling", coupling_code=-1)
    with pytest.raises(ValueError, match="bins"):
        Flow(2, nonlinearity="coupling", bins=1)


# --- issue 18: PPO's log-prob of stored actions, fewer ops -----------------------------------


def _assert_fused_equals_chain(cflow, context, value, output_bound, monkeypatch):
    """The fused 1-D log-density and the chain of bijectors agree in float64: values and every
    parameter's gradient of a weighted sum; the fused path builds no bijectors, except where
    ``output_bound=2`` scales some state and the chain runs instead."""
    weights = torch.randn(len(context))

    def values_and_grads(fused: bool):
        monkeypatch.setattr(flows._LayeredFlowDistribution, "fused", fused)
        cflow.zero_grad()
        dist = cflow(context)
        log_prob = dist.log_prob(value)
        (log_prob * weights).sum().backward()
        assert (dist._built is None) == (fused and output_bound != 2.0)
        return [log_prob] + [p.grad.clone() for p in cflow.parameters()]

    for a, b in zip(values_and_grads(True), values_and_grads(False)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize(("layers", "rank"), [(4, 1), (2, 0), (0, 1)])
@pytest.mark.parametrize("output_bound", [None, 1000.0, 2.0])
def test_scalar_prelu_log_prob_equals_the_chain(squash, layers, rank, output_bound, monkeypatch):
    """The 1-D PReLU log-density in one autograd node (fastpath.py: PPO's evaluate_actions on a
    1-D action) equals the chain of bijectors in float64, values and every parameter's
    gradient; where output_bound scales some state, the chain runs instead."""
    cflow = ConditionalFlow(
        1, 4, layers, rank, (8,), squash=squash, init_strength=1.5, output_bound=output_bound
    )
    with torch.no_grad():
        cflow.hyper[-1].weight.mul_(30)  # context-dependent, mixed-sign flows
    context = torch.randn(50, 4)
    value = 0.999 * (2 * torch.rand(50, 1) - 1) if squash else 3 * torch.randn(50, 1)
    _assert_fused_equals_chain(cflow, context, value, output_bound, monkeypatch)


@pytest.mark.parametrize(("layers", "rank"), [(3, 1), (1, 0)])
def test_scalar_prelu_log_prob_passes_gradcheck(layers, rank):
    flow = Flow(1, layers, rank, init_strength=1.5, seed=0)
    theta = (flow.theta + 0.5 * torch.randn(6, flow.theta.numel())).detach().requires_grad_()
    value = 2 * torch.randn(6, 1)

    def log_prob(theta):
        return flows._LayeredFlowDistribution(flow.layout, theta, False).log_prob(value)

    assert log_prob(theta).grad_fn.name() == "ScalarPReLULogProbBackward"
    assert torch.autograd.gradcheck(log_prob, (theta,))


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize(("layers", "rank"), [(4, 1), (4, 0), (2, 0), (2, 1), (0, 1)])
@pytest.mark.parametrize("output_bound", [None, 1000.0, 2.0])
def test_scalar_spline_log_prob_equals_the_chain(squash, layers, rank, output_bound, monkeypatch):
    """The 1-D spline log-density in one autograd node (fastpath_spline.py) equals the chain of
    bijectors in float64, values and every parameter's gradient, with the splines' inputs in
    many bins and outside [-B, B] (the identity tails); where output_bound scales some state,
    the chain runs instead."""
    from flowpolicy import fastpath_spline

    cflow = ConditionalFlow(
        1, 4, layers, rank, (8,), "spline", squash, bins=5, bound=1.5, init_strength=1.5,
        output_bound=output_bound,
    )  # fmt: skip
    with torch.no_grad():
        cflow.hyper[-1].weight.mul_(10)  # context-dependent, varied splines
    context = torch.randn(200, 4)
    value = 0.999 * (2 * torch.rand(200, 1) - 1) if squash else 2 * torch.randn(200, 1)
    bins, inside = [], []
    invert = fastpath_spline._invert

    def spy(table, knots_y, v, bound):  # the splines' inputs' bins, and if within [-B, B]
        out = invert(table, knots_y, v, bound)
        bins.append(out[1]), inside.append(v.abs() < bound)
        return out

    monkeypatch.setattr(fastpath_spline, "_invert", spy)
    _assert_fused_equals_chain(cflow, context, value, output_bound, monkeypatch)
    if layers and output_bound != 2.0:
        inside = torch.cat(inside)
        assert inside.any() and not inside.all()
        assert len(torch.cat(bins)[inside].unique()) == 5


@pytest.mark.parametrize(("layers", "rank"), [(3, 1), (1, 0), (0, 1)])
def test_scalar_spline_log_prob_passes_gradcheck(layers, rank):
    flow = Flow(1, layers, rank, "spline", bins=4, bound=2.0, init_strength=1.5, seed=0)
    theta = (flow.theta + 0.5 * torch.randn(6, flow.theta.numel())).detach().requires_grad_()
    value = 2 * torch.randn(6, 1)

    def log_prob(theta):
        return flows._LayeredFlowDistribution(flow.layout, theta, False).log_prob(value)

    assert log_prob(theta).grad_fn.name() == "ScalarSplineLogProbBackward"
    assert torch.autograd.gradcheck(log_prob, (theta,))


def test_scalar_spline_log_prob_falls_back_where_it_does_not_apply():
    """Several values per state, a value that needs a gradient, or d = 2: the general chain."""
    flow = Flow(1, 2, 1, "spline", seed=0)
    theta = flow.theta.expand(5, -1)
    dist = flows._LayeredFlowDistribution(flow.layout, theta, False)
    assert dist.log_prob(torch.randn(5, 1)).grad_fn.name() == "ScalarSplineLogProbBackward"
    for value in (torch.randn(3, 5, 1), torch.randn(5, 1, requires_grad=True)):
        assert dist._scalar_log_prob(value) is None
        assert dist.log_prob(value).grad_fn.name() != "ScalarSplineLogProbBackward"
    assert Flow(2, 2, 1, "spline", seed=0).layout.scalar_rows is None


def test_within_remembers_a_vector_that_passed():
    """within's test is monotone in the batch's worst raw vector: it remembers the last vector
    that passed (plus a margin) and passes batches below it without the screen, and still
    screens, and fails, a batch with one state beyond it."""
    layout = ConditionalFlow(2, 3, rank=1, seed=0).layout
    theta = 0.1 * torch.randn(16, layout.num_params)
    assert layout.within(theta, 1000.0)
    screened = []
    screen = layout._screen_worst
    layout._screen_worst = lambda *args: screened.append(1) or screen(*args)
    assert layout.within(0.5 * theta, 1000.0) and not screened
    beyond = theta.clone()
    beyond[3] = 10.0
    assert not layout.within(beyond, 1000.0) and screened
    assert not layout.within(torch.full((4, layout.num_params), 10.0), 1000.0)


def test_layers_unbind_an_attribute_when_first_read():
    """A flow's layers are views of bijectors built for all layers at once; each attribute is
    split into its layers' views when a layer first reads it (a log-prob reads few)."""
    cflow = ConditionalFlow(2, 3, layers=3, rank=1, nonlinearity="spline", seed=0)
    theta = cflow.hyper(torch.randn(5, 3))
    affines, nonlinear, _ = cflow.layout.layers(theta)
    assert "scale_tril" not in vars(affines[1])
    for i, layer in enumerate(affines):
        reference = cflow.layout.layer(theta, 2 * i)
        torch.testing.assert_close(layer.scale_tril, reference.scale_tril)
        torch.testing.assert_close(layer.log_det(), reference.log_det())
    assert "scale_tril" in vars(affines[1]) and "shift" not in vars(affines[1])
    for i, layer in enumerate(nonlinear):
        reference = cflow.layout.layer(theta, 2 * i + 1)
        torch.testing.assert_close(layer.knots_y, reference.knots_y)
        y = torch.randn(5, 2)
        torch.testing.assert_close(layer.inv_and_ladj(y), reference.inv_and_ladj(y))


def test_layer_views_first_read_under_no_grad_still_carry_gradients():
    """Sampling under no_grad first reads (and splits) the layers' attributes; a log-prob after
    it (a score-function update) still reaches every parameter."""
    cflow = ConditionalFlow(2, 3, layers=2, rank=1, seed=0)
    dist = cflow(torch.randn(5, 3))
    with torch.no_grad():
        u = dist.rsample((4,))
    FlowDistribution(dist.base, dist.transforms).log_prob(u).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cflow.parameters())


def test_layer_views_copy_and_pickle_as_plain_bijectors():
    import copy
    import pickle

    cflow = ConditionalFlow(2, 3, layers=2, rank=1, nonlinearity="spline", seed=0)
    with torch.no_grad():
        affines, nonlinear, _ = cflow.layout.layers(cflow.hyper(torch.randn(4, 3)))
    y = torch.randn(4, 2)
    for layer in (affines[1], nonlinear[0]):
        for twin in (copy.deepcopy(layer), pickle.loads(pickle.dumps(layer))):
            assert type(twin) is type(layer).__mro__[1]  # the bijector's own class
            torch.testing.assert_close(twin.inv(y), layer.inv(y))
