"""Targets: normalized densities, exact entropies, samplers that match their densities."""

import math

import pytest
import torch

from flowpolicy import targets

torch.set_num_threads(1)

NAMES = targets.names()


def grid(target, n=(1200, 900)):
    """Midpoint grid over the target's bounds: points, cell area."""
    (x_lo, x_hi), (y_lo, y_hi) = target.bounds
    hx, hy = (x_hi - x_lo) / n[0], (y_hi - y_lo) / n[1]
    xs = torch.linspace(x_lo + hx / 2, x_hi - hx / 2, n[0], dtype=torch.float64)
    ys = torch.linspace(y_lo + hy / 2, y_hi - hy / 2, n[1], dtype=torch.float64)
    points = torch.stack(torch.meshgrid(xs, ys, indexing="ij"), -1).reshape(-1, 2)
    return points, hx * hy


def test_names_and_lookup():
    assert {"banana", "two_clusters", "ring"} <= set(NAMES)
    assert targets.get("banana") is targets.banana
    assert targets.get("two-clusters") is targets.two_clusters


def test_unknown_target_lists_valid_names():
    with pytest.raises(ValueError, match="unknown target 'moon'.*banana.*ring.*two_clusters"):
        targets.get("moon")


@pytest.mark.parametrize("name", NAMES)
def test_density_integrates_to_one_and_entropy_matches_grid(name):
    target = targets.get(name)
    points, area = grid(target)
    log_p = target.log_prob(points)
    p = log_p.exp()
    assert (p * area).sum().item() == pytest.approx(1.0, abs=2e-3)
    # an independent check of the closed form / quadrature: -sum p log p on the grid
    grid_entropy = -(p * log_p * area).sum().item()
    assert grid_entropy == pytest.approx(target.entropy(), abs=5e-3)


def test_exact_entropies():
    assert targets.banana.entropy() == pytest.approx(math.log(2 * math.pi * math.e) + math.log(4))
    assert targets.banana.entropy() == pytest.approx(4.2242, abs=1e-4)
    # two modes 20 std apart: the separated-modes limit is exact to far below 1e-10
    separated = math.log(2 * math.pi * math.e * 0.05**2) + math.log(2)
    assert targets.two_clusters.entropy() == pytest.approx(separated, abs=1e-9)
    assert targets.two_clusters.entropy() == pytest.approx(-2.460, abs=1e-3)
    # the ring's neighbours overlap a little: its entropy sits just below the limit
    limit = math.log(2 * math.pi * math.e * 0.2**2) + math.log(8)
    assert 0 < limit - targets.ring.entropy() < 1e-3


def test_mixture_entropy_quadrature_with_strong_overlap():
    # two unit Gaussians 1 apart: compare with a fine 1-D integral (the other axis separates)
    mix = targets.GaussianMixture([[-0.5, 0.0], [0.5, 0.0]], 1.0, quadrature=64)
    u = torch.linspace(-12, 12, 200_001, dtype=torch.float64)
    log_p1 = torch.logsumexp(
        torch.stack([-0.5 * (u + 0.5) ** 2, -0.5 * (u - 0.5) ** 2]) - math.log(2), 0
    ) - 0.5 * math.log(2 * math.pi)
    h1 = -(log_p1.exp() * log_p1).sum().item() * (u[1] - u[0]).item()
    exact = h1 + 0.5 * math.log(2 * math.pi * math.e)
    assert mix.entropy() == pytest.approx(exact, abs=1e-8)


@pytest.mark.parametrize("name", NAMES)
def test_samples_match_density(name):
    target = targets.get(name)
    n = 200_000
    x = target.sample(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (n, 2) and x.dtype == torch.float64
    # E_samples[-log p] is the entropy only if the samples come from p
    neg_log_p = -target.log_prob(x)
    stderr = neg_log_p.std().item() / math.sqrt(n)
    assert abs(neg_log_p.mean().item() - target.entropy()) < 5 * stderr
    # first and second moments against the density's, integrated on the grid
    points, area = grid(target)
    w = target.log_prob(points).exp() * area
    w = w / w.sum()
    mean = (w[:, None] * points).sum(0)
    var = (w[:, None] * (points - mean).square()).sum(0)
    sample_var = x.var(0)
    assert torch.allclose(x.mean(0), mean, atol=5 * (var / n).sqrt().max().item() + 1e-3)
    assert torch.allclose(sample_var, var, rtol=0.03)


def test_banana_moments_closed_form():
    x = targets.banana.sample(400_000, generator=torch.Generator().manual_seed(1))
    # x2 ~ N(0, 16); x1 = x2^2 / 4 + e: mean 4, variance 1 + Var(x2^2) / 16 = 1 + 2 * 16^2 / 16
    assert x[:, 1].mean().item() == pytest.approx(0.0, abs=0.03)
    assert x[:, 1].var().item() == pytest.approx(16.0, rel=0.02)
    assert x[:, 0].mean().item() == pytest.approx(4.0, abs=0.05)
    assert x[:, 0].var().item() == pytest.approx(33.0, rel=0.03)


def test_sampling_is_reproducible_and_checked():
    a = targets.ring.sample(100, generator=torch.Generator().manual_seed(3))
    b = targets.ring.sample(100, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="positive integer"):
        targets.banana.sample(0)
    with pytest.raises(ValueError, match="expected shape"):
        targets.banana.log_prob(torch.zeros(5, 3))


def test_generator_on_another_device_is_an_error():
    with pytest.raises(ValueError, match="generator lives on cpu"):
        targets.banana.sample(10, generator=torch.Generator(), device="meta")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", NAMES)
def test_sampling_on_gpu(name):
    target = targets.get(name)
    generator = torch.Generator("cuda").manual_seed(0)
    x = target.sample(50_000, generator=generator, device="cuda")
    assert x.device.type == "cuda"
    log_p = target.log_prob(x)
    assert log_p.device.type == "cuda"
    assert abs(-log_p.mean().item() - target.entropy()) < 0.05


@pytest.mark.parametrize("name", NAMES)
def test_integer_points_and_dtypes(name):
    """Integer points are scored as floats (a mixture computed in int64 was NaN); a non-floating
    sample dtype or complex points are clear errors."""
    target = targets.get(name)
    points = torch.tensor([[0, 1], [2, -1]])
    assert torch.equal(target.log_prob(points), target.log_prob(points.float()))
    with pytest.raises(TypeError, match="floating dtype"):
        target.sample(3, dtype=torch.int64)
    with pytest.raises(TypeError, match="real tensor"):
        target.log_prob(torch.zeros(3, 2, dtype=torch.complex64))
