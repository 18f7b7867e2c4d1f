"""Tests of the flow distributions: normalization, exact densities, gradients, errors."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from torch.distributions import ExpTransform, Independent, LogNormal, Normal

from flowpolicy import ConditionalFlow, Flow, FlowDistribution, _compiled, flows

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
    """The seed's first example: exp of a standard normal is the log-normal."""
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
    """Slopes all equal to 1 would keep the chain linear forever (DESIGN.md §3)."""
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


@pytest.fixture
def kernel():
    """The compiled CPU kernel (csrc/prelu_flow.cpp): it must build wherever there is a compiler."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the kernel cannot be built here")
    ops = _compiled.cpu_kernel()
    assert ops is not None, "the CPU kernel did not build"
    return ops


@pytest.fixture(params=["compiled", "pytorch"])
def policy_step(request, monkeypatch):
    """Each implementation of the fused policy step on the CPU (its autograd Function): the
    compiled kernel and the PyTorch one it falls back to."""
    if request.param == "pytorch":
        monkeypatch.setattr(flows, "cpu_kernel", lambda: None)
        return flows._FusedPReLUFlow
    request.getfixturevalue("kernel")
    return flows._CompiledPReLUFlow


@pytest.mark.parametrize("squash", [False, True])
@pytest.mark.parametrize(("dim", "layers", "rank"), [(1, 1, 1), (3, 0, 2), (3, 3, 0), (6, 4, 2)])
@pytest.mark.parametrize("batch", [(7,), (2, 3), (1,)])
def test_fused_policy_step_equals_the_chain_of_bijectors(
    squash, dim, layers, rank, batch, policy_step
):
    """One sample per state takes the hand-written forward and backward of the affine/PReLU
    chain: values and every parameter's gradient equal autograd through the bijectors."""
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

    def graph(node):  # names of the autograd nodes behind a tensor's grad_fn
        names = {type(node).__name__}
        for child, _ in node.next_functions if node is not None else ():
            names |= graph(child) if child is not None else set()
        return names

    assert f"{policy_step.__name__}Backward" in graph(cflow(context).push_forward(z)[0].grad_fn)
    fused = values_and_grads(lambda dist, z: dist.push_forward(z))
    chain = values_and_grads(
        lambda dist, z: FlowDistribution(dist.base, dist.transforms).push_forward(z)
    )
    assert fused[0].shape == (*batch, dim) and fused[1].shape == batch
    for a, b in zip(fused, chain):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-9)
    with torch.no_grad():  # acting: the same forward, without an autograd node
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
def test_fused_flow_passes_gradcheck(squash, layers, rank, policy_step):
    flow = Flow(3, layers, rank, squash=squash, seed=0)
    theta = (flow.theta + 0.3 * torch.randn(5, flow.theta.numel())).detach().requires_grad_()
    z = torch.randn(5, 3, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda z, theta: policy_step.apply(z, theta, flow.layout), (z, theta)
    )


@pytest.mark.parametrize(("dim", "layers", "rank"), [(2, 1, 2), (6, 4, 2), (17, 3, 1), (5, 2, 0)])
@pytest.mark.parametrize("squash", [False, True])
def test_compiled_policy_step_equals_the_pytorch_one(dim, layers, rank, squash, kernel):
    """Both implementations agree to rounding on values and gradients, far from the initial
    flow (raw parameters of every sign and size), in float64 and in float32 (there relative to
    each tensor's norm: large scales compound over layers, and rounding with them)."""
    flow = Flow(dim, layers, rank, squash=squash, seed=2)
    g = torch.Generator().manual_seed(0)
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        flow.to(dtype)
        noise = torch.randn(64, flow.theta.numel(), generator=g, dtype=dtype)
        theta = (flow.theta.detach() + noise).requires_grad_()
        z = torch.randn(64, dim, generator=g, dtype=dtype, requires_grad=True)
        weights = torch.randn(64, dim, generator=g, dtype=dtype), torch.randn(64, dtype=dtype)
        results = []
        for step in (flows._CompiledPReLUFlow, flows._FusedPReLUFlow):
            x, ladj = step.apply(z, theta, flow.layout)
            loss = (x * weights[0]).sum() + (ladj * weights[1]).sum()
            results.append((x, ladj, *torch.autograd.grad(loss, (z, theta))))
        for a, b in zip(*results):
            assert torch.linalg.vector_norm(a - b) <= tol * torch.linalg.vector_norm(b)


def test_cpu_kernel_builds_into_an_empty_cache_and_later_processes_load_it(tmp_path, kernel):
    """As on a new machine: the first process builds the library into the cache (only the
    library is left there) and may ask for it again; the next process loads it, no build."""
    first_use = """
import torch
from flowpolicy import ConditionalFlow, _compiled
assert _compiled.cpu_kernel() is not None
_compiled.cpu_kernel.cache_clear()  # asked again: must not load a second copy of the library
assert _compiled.cpu_kernel() is not None
ConditionalFlow(2, 3, layers=1, rank=1, hidden=(8,))(torch.randn(4, 3)).rsample_and_log_prob()
"""
    cached = """
from torch.utils import cpp_extension
def rebuilt(*args, **kwargs):
    raise SystemExit("built again instead of loaded from the cache")
cpp_extension.load = rebuilt
from flowpolicy import _compiled
assert _compiled.cpu_kernel() is not None
"""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": str(tmp_path)}
    for code in (first_use, cached):
        command = [sys.executable, "-W", "error::RuntimeWarning", "-c", code]
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
    assert [p.suffix for p in tmp_path.iterdir()] == [".so"]


def test_cpu_kernel_falls_back_to_pytorch_with_a_warning(monkeypatch):
    """No compiler (or a failed build): one warning, and flows run on the PyTorch path."""

    def fail():
        raise OSError("no C++ compiler")

    monkeypatch.setattr(_compiled, "_load", fail)
    _compiled.cpu_kernel.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="could not build the CPU flow kernel.*compiler"):
            assert _compiled.cpu_kernel() is None
        cflow = ConditionalFlow(2, 3, layers=2, rank=1, hidden=(8,), seed=0)
        x, log_prob = cflow(torch.randn(4, 3)).rsample_and_log_prob()
        assert type(x.grad_fn.next_functions[0][0]).__name__ == "_FusedPReLUFlowBackward"
        monkeypatch.setenv("FLOWPOLICY_CPU_KERNEL", "0")  # switched off: no attempt at all
        _compiled.cpu_kernel.cache_clear()
        monkeypatch.setattr(_compiled, "_load", lambda: pytest.fail("tried to build"))
        assert _compiled.cpu_kernel() is None
    finally:
        _compiled.cpu_kernel.cache_clear()


def test_bijectors_built_under_no_grad_still_carry_gradients():
    """A module's distribution builds its bijectors on first use: sampling under no_grad first
    (a score-function gradient) must not leave log_prob without a graph."""
    cflow = ConditionalFlow(2, 3, layers=2, rank=1, hidden=(8,), nonlinearity="spline", seed=0)
    dist = cflow(torch.randn(4, 3))
    with torch.no_grad():
        actions = dist.sample((5,))
    dist.log_prob(actions).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in cflow.parameters())
