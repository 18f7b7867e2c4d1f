"""Density fitting: the training objective, initialization, fit, save/load, the command line."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.distributions import TransformedDistribution
from torch.func import functional_call

from flowpolicy import Flow, density, targets

torch.set_num_threads(1)

ROOT = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


@pytest.mark.parametrize("layers,rank", [(0, 0), (1, 1), (3, 2), (6, 1)])
def test_training_objective_equals_torch_log_prob(layers, rank):
    """fit's objective (the inverse pass with the kinks' boundary term) against torch's own
    TransformedDistribution over the same bijectors (their inv and log_abs_det_jacobian)."""
    flow = Flow(2, layers=layers, rank=rank, init_strength=1.5, seed=layers).double()
    density.init_layers_(flow, 0.5, seed=1)
    x = targets.banana.sample(2000, generator=torch.Generator().manual_seed(0)).double()
    density.standardize_(flow, x)
    dist = flow()
    reference = TransformedDistribution(dist.base, dist.transforms).log_prob(x)
    trained = flow(kink_bandwidth=0.2).log_prob(x)
    assert torch.allclose(trained, reference, atol=1e-9, rtol=0)
    # without the boundary term, the gradients agree too (the objective is what fit differentiates)
    (g_fit,) = torch.autograd.grad(flow(kink_bandwidth=0.0).log_prob(x).mean(), flow.theta)
    (g_ref,) = torch.autograd.grad(reference.mean(), flow.theta)
    assert torch.allclose(g_fit, g_ref, atol=1e-8)


def test_standardize_matches_moments_and_init_layers_scatters_kinks():
    flow = Flow(2, layers=5, rank=2, seed=0).double()
    density.init_layers_(flow, spread=0.5, seed=0)
    data = targets.banana.sample(50_000, generator=torch.Generator().manual_seed(1)).double()
    density.standardize_(flow, data)
    with torch.no_grad():
        x = flow().sample((50_000,))
    assert torch.allclose(x.mean(0), data.mean(0), atol=0.15)
    assert torch.allclose(x.std(0), data.std(0), rtol=0.05)
    # the first PReLU sees unit-scale inputs, with its kink inside the bulk
    with torch.no_grad():
        z = torch.randn(50_000, 2, dtype=torch.float64)
        pre = flow().transforms[0](z)
    assert torch.allclose(pre.std(0), torch.ones(2, dtype=torch.float64), atol=0.05)
    assert ((pre < 0).double().mean(0) - 0.5).abs().max() < 0.45


def test_init_hinges_starts_near_the_banana_from_samples_alone():
    flow = Flow(2, layers=24, rank=2, seed=0)
    data = targets.banana.sample(65536, generator=torch.Generator().manual_seed(1))
    before = density.evaluate(flow, targets.banana, 20_000)["kl"]
    density.init_hinges_(flow, data)
    after = density.evaluate(flow, targets.banana, 20_000)
    # a hinge regression of one coordinate on the other: far better than any Gaussian (1.7)
    assert after["kl"] < 0.1 < before
    with pytest.raises(ValueError, match="rank >= 1"):
        density.init_hinges_(Flow(2, layers=4, rank=0), data)


@pytest.mark.parametrize("layers", [2, 4])
def test_init_splines_starts_near_the_banana_from_samples_alone(layers):
    flow = Flow(2, layers=layers, rank=1, nonlinearity="spline", bins=8, seed=0)
    data = targets.banana.sample(65536, generator=torch.Generator().manual_seed(1))
    before = density.evaluate(flow, targets.banana, 20_000)["kl"]
    density.init_splines_(flow, data)
    after = density.evaluate(flow, targets.banana, 20_000)
    # two pairs add the convex and concave parts of the regression; one pair a refitted piece
    assert after["kl"] < 0.005 < 0.1 < before
    with pytest.raises(ValueError, match="rank >= 1"):
        density.init_splines_(Flow(2, layers=4, rank=0, nonlinearity="spline"), data)
    with pytest.raises(ValueError, match="init_hinges_ for PReLU"):
        density.init_splines_(Flow(2, layers=4, rank=1), data)
    with pytest.raises(ValueError, match="init_splines_ for splines"):
        density.init_hinges_(flow, data)
    squashed = Flow(2, layers=4, rank=1, nonlinearity="spline", squash=True)
    with pytest.raises(ValueError, match="squashed"):
        density.init_splines_(squashed, data)


@pytest.mark.parametrize("layers", [2, 5])
def test_init_splines_finds_a_lower_shear_in_3d(layers):
    """x_2 = x_0^2 / 2 + noise, x_1 independent: the pair (t, s) = (2, 0) is a lower shear."""
    g = torch.Generator().manual_seed(0)
    a, b, noise = torch.randn(3, 100_000, generator=g, dtype=torch.float64)
    x = torch.stack([a, 2 * b + 1, a**2 / 2 + 0.2 * noise], 1)
    normal = torch.distributions.Normal
    log_p = normal(0.0, 1.0).log_prob(a) + normal(1.0, 2.0).log_prob(x[:, 1])
    log_p = log_p + normal(a**2 / 2, 0.2).log_prob(x[:, 2])
    flow = Flow(3, layers=layers, rank=1, nonlinearity="spline", bins=16, seed=0).double()
    density.init_splines_(flow, x[:50_000])
    with torch.no_grad():
        kl = (log_p[50_000:] - flow().log_prob(x[50_000:])).mean()
    assert kl < 0.005


def test_set_layer_spline_reproduces_knots_and_derivatives():
    """The initializers write splines by their knots: the layer read back goes through them."""
    generator = torch.Generator().manual_seed(0)
    bound, bins = 3.0, 6
    flow = Flow(2, layers=1, rank=1, nonlinearity="spline", bins=bins, bound=bound).double()
    sizes_x, sizes_y = torch.rand(2, bins, generator=generator, dtype=torch.float64) + 0.1
    knots_x = torch.cat([torch.zeros(1, dtype=torch.float64), sizes_x.cumsum(0)])
    knots_y = torch.cat([torch.zeros(1, dtype=torch.float64), sizes_y.cumsum(0)])
    knots_x = 2 * bound * knots_x / knots_x[-1] - bound
    knots_y = 2 * bound * knots_y / knots_y[-1] - bound
    slopes = torch.rand(bins - 1, generator=generator, dtype=torch.float64) * 3 + 0.2
    flow.set_layer_(
        1,
        knots_x=knots_x.repeat(2, 1),
        knots_y=knots_y.repeat(2, 1),
        derivatives=slopes.repeat(2, 1),
    )
    spline = flow.layer(1)
    assert torch.allclose(spline(knots_x[:, None].repeat(1, 2))[:, 0], knots_y, atol=1e-9)
    inner = knots_x[1:-1, None].repeat(1, 2).requires_grad_()
    (grad,) = torch.autograd.grad(spline(inner)[:, 0].sum(), inner)
    assert torch.allclose(grad[:, 0], slopes, atol=1e-6)


def test_kink_boundary_term_matches_finite_differences():
    """The per-sample log-det of a PReLU chain jumps by log(alpha) where a sample crosses a kink:
    backpropagation misses that part of the expected NLL's gradient, the kernel term does not."""
    flow = Flow(2, layers=4, rank=2, seed=0).double()
    data = targets.banana.sample(20_000, generator=torch.Generator().manual_seed(1)).double()
    density.init_hinges_(flow, data)
    x = targets.banana.sample(400_000, generator=torch.Generator().manual_seed(2)).double()
    theta = flow.theta.detach().clone().requires_grad_()

    def loss(theta, bandwidth=0.0):
        dist = functional_call(flow, {"theta": theta}, (False, bandwidth))
        return -dist.log_prob(x).mean()

    (plain,) = torch.autograd.grad(loss(theta), theta)
    (kernel,) = torch.autograd.grad(loss(theta, 0.2), theta)
    assert torch.equal(loss(theta, 0.2), loss(theta))  # the value is the same
    v, h = plain / plain.norm(), 1e-3
    with torch.no_grad():  # common samples: the difference quotient sees the jumps
        fd = float(loss(theta + h * v) - loss(theta - h * v)) / (2 * h)
    plain_error, kernel_error = abs(fd - float(plain @ v)), abs(fd - float(kernel @ v))
    assert plain_error > 0.1 and kernel_error < 0.25 * plain_error


def test_fit_lowers_kl_on_a_short_run():
    flow = Flow(2, layers=6, rank=2, seed=0)
    density.init_layers_(flow, 0.5, seed=0)
    before = density.evaluate(
        density.standardize_(flow, targets.banana.sample(20_000)), "banana", 20_000
    )
    history = density.fit(
        flow,
        targets.banana,
        steps=300,
        batch_size=512,
        lr=3e-3,
        device="cpu",
        progress=False,
        eval_every=100,
        eval_samples=5000,
    )
    after = density.evaluate(flow, targets.banana, 20_000)
    assert history.steps == 300 and len(history.loss) == 300
    assert history.eval_step == [100, 200, 300] and len(history.kl) == 3
    assert history.entropy == pytest.approx(4.2242, abs=1e-4)
    assert after["kl"] < before["kl"] - 0.3
    assert after["kl"] > -5 * after["kl_stderr"]  # a KL is non-negative, up to noise
    assert after["nll"] - after["entropy"] == pytest.approx(
        after["kl"], abs=6 * after["nll_stderr"]
    )


def test_fit_spline_on_two_clusters():
    flow = Flow(2, layers=2, rank=2, nonlinearity="spline", bins=8, bound=4.0, seed=0)
    history = density.fit(
        flow,
        "two_clusters",
        steps=200,
        batch_size=512,
        lr=1e-2,
        progress=False,
        eval_every=100,
        eval_samples=5000,
    )
    assert history.kl[-1] < history.kl[0]
    assert history.kl[-1] < 1.0


def test_fit_from_a_data_tensor(tmp_path):
    data = targets.ring.sample(5000, generator=torch.Generator().manual_seed(0))
    flow = Flow(2, layers=4, rank=2, seed=0)
    history = density.fit(flow, data, steps=200, batch_size=256, progress=False, eval_every=50)
    assert history.kl == [] and history.entropy is None
    assert all(math.isfinite(v) for v in history.nll)
    assert history.nll[-1] < history.nll[0]
    written = density.save_figures(flow, data, history, tmp_path)
    assert [p.name for p in written] == ["density.png", "training.png", "deformation.png"]
    assert all(p.stat().st_size > 1000 for p in written)


def test_time_limit_stops_and_anneals():
    flow = Flow(2, layers=2, rank=1, seed=0)
    history = density.fit(
        flow, "banana", steps=10**6, batch_size=64, time_limit=0.5, progress=False
    )
    assert 0 < history.steps < 10**6
    assert history.train_seconds < 5
    assert history.lr[-1] < 0.05 * history.lr[len(history.lr) // 10]


def test_save_load_round_trip(tmp_path):
    flow = Flow(2, layers=3, rank=1, nonlinearity="spline", bins=5, bound=3.0, seed=0)
    with torch.no_grad():
        flow.theta.add_(0.1 * torch.randn_like(flow.theta))
    path = density.save(flow, tmp_path / "flow")
    loaded = density.load(path)
    assert loaded.config == flow.config
    x = targets.ring.sample(500)
    assert torch.equal(loaded().log_prob(x), flow().log_prob(x))
    meta = json.loads((path / "config.json").read_text())
    assert meta["config"]["bins"] == 5


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        density.load(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a saved flow"):
        density.load(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text('{"format": "something else"}')
    (tmp_path / "bad" / "weights.pt").write_bytes(b"")
    with pytest.raises(ValueError, match="does not describe"):
        density.load(tmp_path / "bad")


def test_errors():
    flow = Flow(2, layers=1, seed=0)
    with pytest.raises(ValueError, match="steps must be a positive int"):
        density.fit(flow, "banana", steps=0, progress=False)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        density.fit(flow, "banana", steps=10, batch_size=-4, progress=False)
    with pytest.raises(ValueError, match="unknown target 'moon'"):
        density.fit(flow, "moon", steps=10, progress=False)
    with pytest.raises(ValueError, match="data must have shape"):
        density.fit(flow, torch.zeros(10, 3), steps=10, progress=False)
    with pytest.raises(ValueError, match="unknown device"):
        density.resolve_device("tpu:7")
    assert density.resolve_device("auto").type == ("cpu" if NO_CUDA else "cuda")


@pytest.mark.skipif(not NO_CUDA, reason="checks the error raised when CUDA is absent")
def test_cuda_without_cuda_is_a_clear_error():
    with pytest.raises(ValueError, match="no CUDA device is available"):
        density.fit(Flow(2, layers=1), "banana", steps=10, device="cuda", progress=False)


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_fit_on_gpu(tmp_path):
    flow = Flow(2, layers=4, rank=2, seed=0)
    history = density.fit(flow, "banana", steps=100, batch_size=1024, device="cuda", progress=False)
    assert history.device.startswith("cuda") and flow.theta.device.type == "cuda"
    assert history.kl[-1] < 1.7
    density.save(flow, tmp_path / "gpu")
    loaded = density.load(tmp_path / "gpu", device="cuda")
    x = targets.banana.sample(1000, device="cuda")
    assert torch.allclose(loaded().log_prob(x), flow().log_prob(x))


def run_cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "flowpolicy.density", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env=env,
    )


@pytest.mark.parametrize("nonlinearity", ["prelu", "spline"])
def test_cli_end_to_end(tmp_path, nonlinearity):
    out = tmp_path / "banana"
    result = run_cli(
        "--nonlinearity",
        nonlinearity,
        "--target",
        "banana",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--steps",
        "50",
        "--layers",
        "4",
        "--batch-size",
        "256",
        "--eval-samples",
        "5000",
        "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    assert "KL(p||q)" in result.stdout and "entropy      4.2242" in result.stdout
    for name in (
        "config.json",
        "weights.pt",
        "metrics.json",
        "history.json",
        "density.png",
        "training.png",
        "deformation.png",
    ):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 50 and math.isfinite(metrics["kl"])
    if nonlinearity == "spline":  # init_splines_ starts near the banana
        assert metrics["kl"] < 0.01
    flow = density.load(out)
    scores = density.evaluate(flow, "banana", 5000, seed=metrics["args"]["seed"] + 777)
    assert scores["kl"] == pytest.approx(metrics["kl"], abs=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--target", "moon"], "unknown target 'moon'"),
        (["--steps", "0"], "--steps must be a positive int"),
        (["--steps", "-3"], "--steps must be a positive int"),
    ]
    + ([(["--device", "cuda"], "no CUDA device is available")] if NO_CUDA else []),
)
def test_cli_errors(tmp_path, capsys, args, message):
    # in-process: argparse's error path is the same as in a subprocess, without the start-up cost
    with pytest.raises(SystemExit) as exit_info:
        density.main(["--out", str(tmp_path / "x"), "--no-progress", *args])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_example_fit_banana_tiny(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "fit_banana.py"),
            "--out",
            str(tmp_path),
            "--tiny",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["kl"]) and summary["steps"] == 100
    assert (tmp_path / "deformation.png").is_file()
    assert density.load(tmp_path).config["layers"] == 4
