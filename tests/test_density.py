"""Density fitting: the training objective, initialization, fit, save/load, the command line."""

import json
import math
import os
import subprocess
import sys
import time
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
        (["--lr", "-1"], "--lr must be"),
        (["--lr", "inf"], "--lr must be"),
        (["--ema", "1.5"], "--ema must be"),
        (["--time-limit", "nan"], "--time-limit must be"),
        (["--kink-bandwidth", "-1"], "--kink-bandwidth must be"),
        (["--hinge-spread", "0"], "--hinge-spread must be"),
        (["--init-strength", "-1"], "--init-strength must be"),
        (["--rank", "3"], "--rank must be"),
        (["--bins", "1"], "--bins must be"),
        (["--layers", "-1"], "--layers must be"),
        (["--eval-samples", "0"], "--eval-samples must be"),
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


# --------------------------------------------------------------------------------------------
# reliability (issue 15): no silent NaN, no lost or mixed save
# --------------------------------------------------------------------------------------------


def gaussian_data(n, scale, seed=0):
    return scale * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed))


def test_fit_never_writes_nan_into_the_flow():
    """19 rows used to standardize on a one-row held-out set: the flow became NaN in place."""
    flow = Flow(2, layers=2, seed=0)
    before = flow.theta.detach().clone()
    with pytest.raises(ValueError, match="needs at least 20"):
        density.fit(flow, torch.randn(19, 2), steps=5, progress=False, device="cpu")
    with pytest.raises(ValueError, match="holdout must be in"):
        density.fit(flow, torch.randn(100, 2), steps=5, holdout=0, progress=False, device="cpu")
    with pytest.raises(ValueError, match="column 1 of the data is constant"):
        data = torch.cat([torch.randn(100, 1), torch.full((100, 1), 3.0)], 1)
        density.fit(flow, data, steps=5, progress=False, device="cpu")
    with pytest.raises(ValueError, match="NaN or inf in 1 of 100 rows"):
        data = torch.randn(100, 2)
        data[7, 1] = math.nan
        density.fit(flow, data, steps=5, progress=False, device="cpu")
    assert torch.equal(flow.theta, before)
    # 20 rows are enough (2 held out) and give a finite flow
    history = density.fit(flow, torch.randn(20, 2), steps=5, progress=False, device="cpu")
    assert torch.isfinite(flow.theta).all() and all(map(math.isfinite, history.nll))


def test_a_diverging_fit_leaves_the_flow_unchanged():
    flow = Flow(2, layers=2, seed=0)
    before = flow.theta.detach().clone()
    with pytest.raises(FloatingPointError, match="left unchanged"):
        density.fit(flow, gaussian_data(1000, 1.0), steps=50, lr=1e6, progress=False)
    assert torch.equal(flow.theta, before)


@pytest.mark.parametrize(
    "option,value",
    [
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -1.0),
        ("final_lr", -0.5),
        ("warmup", 1.5),
        ("holdout", 1.0),
        ("holdout", -0.1),
        ("ema", 1.0),
        ("time_limit", math.nan),
        ("kink_bandwidth", -1.0),
        ("eval_every", 0),
    ],
)
def test_fit_rejects_bad_options(option, value):
    flow = Flow(2, layers=1, seed=0)
    before = flow.theta.detach().clone()
    with pytest.raises(ValueError, match=option):
        density.fit(flow, gaussian_data(100, 1.0), steps=5, progress=False, **{option: value})
    assert torch.equal(flow.theta, before)


@pytest.mark.parametrize("scale", [1e-6, 3e-4, 1e5])
def test_fit_handles_any_units(scale):
    """fit trains in standardized units and folds the data's scale back without meeting the
    affine diagonal's floor (1e-4): the same fit, up to -d log(scale), at any scale (std 1e-5
    used to raise, 3e-4 to end tens of nats off)."""
    data = gaussian_data(4000, 1.0)
    nll = []
    for s in (1.0, scale):
        flow = Flow(2, layers=2, rank=1, seed=0)
        history = density.fit(flow, s * data, steps=60, batch_size=256, progress=False)
        with torch.no_grad():
            mine = -flow().log_prob(s * data).double().mean().item()
        assert mine == pytest.approx(history.nll[-1], abs=0.1)  # the flow is in data units
        nll.append(mine - 2 * math.log(s))
    assert nll[1] == pytest.approx(nll[0], abs=1e-3)


def test_fit_refuses_a_scale_a_spline_flow_cannot_represent_before_training():
    flow = Flow(2, layers=2, rank=1, nonlinearity="spline", seed=0)
    before = flow.theta.detach().clone()
    with pytest.raises(ValueError, match="floored at 0.0001"):
        density.fit(flow, gaussian_data(1000, 1e-7), steps=10**6, time_limit=5.0, progress=False)
    assert torch.equal(flow.theta, before)


def test_initializers_reject_bad_data_and_handle_tiny_scales():
    one_row, nan_row = torch.randn(1, 2), torch.randn(50, 2)
    nan_row[3, 0] = math.nan
    constant = torch.cat([torch.randn(50, 1), torch.ones(50, 1)], 1)
    cases = [(one_row, "at least 2 rows"), (nan_row, "NaN or inf"), (constant, "constant")]
    for init, nonlinearity in [
        (density.init_hinges_, "prelu"),
        (density.init_splines_, "spline"),
        (density.standardize_, "prelu"),
    ]:
        flow = Flow(2, layers=4, rank=1, nonlinearity=nonlinearity, seed=0)
        before = flow.theta.detach().clone()
        for data, message in cases:
            with pytest.raises(ValueError, match=message):
                init(flow, data)
        assert torch.equal(flow.theta, before)
    # data of std 1e-6: the same map, scaled (the last layer alone would fall below the floor)
    data = targets.banana.sample(20_000, generator=torch.Generator().manual_seed(1))
    unit = density.init_hinges_(Flow(2, layers=6, rank=2, seed=0), data)
    tiny = density.init_hinges_(Flow(2, layers=6, rank=2, seed=0), 1e-6 * data)
    with torch.no_grad():
        log_q = unit().log_prob(data[:1000]).double()
        log_q_tiny = tiny().log_prob(1e-6 * data[:1000]).double() + 2 * math.log(1e-6)
    assert torch.allclose(log_q_tiny, log_q, atol=2e-3)
    assert torch.isfinite(density.init_hinges_(Flow(2, layers=4, rank=1), data[:2]).theta).all()


def test_half_precision_is_a_clear_error():
    with pytest.raises(TypeError, match="float16.*flow.float"):
        density.fit(Flow(2, layers=1).half(), gaussian_data(100, 1.0), steps=5, progress=False)
    with pytest.raises(TypeError, match="float32 or float64"):
        density.evaluate(Flow(2, layers=1).half(), "banana", 100)
    # data of another dtype than the flow is converted
    flow = Flow(2, layers=1, seed=0)
    density.fit(flow, gaussian_data(100, 1.0).double(), steps=5, progress=False)
    assert flow.theta.dtype == torch.float32 and torch.isfinite(flow.theta).all()


def saved_pair(tmp_path):
    """Two flows of one layout with different weights, and a directory holding the first."""
    a, b = Flow(2, layers=2, rank=1, seed=0), Flow(2, layers=2, rank=1, seed=1)
    return a, b, density.save(a, tmp_path / "flow")


def test_interrupted_save_keeps_the_previous_save(tmp_path, monkeypatch):
    a, b, path = saved_pair(tmp_path)

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a file")
        raise OSError("No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(torch, "save", broken_save)
        with pytest.raises(OSError, match="No space"):
            density.save(b, path)
    assert torch.equal(density.load(path).theta, a.theta)
    # interrupted at the commit (config.json's rename): the previous save
    real_replace, calls = os.replace, []

    def replace_then_stop(src, dst):
        calls.append(dst)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", replace_then_stop)
        with pytest.raises(KeyboardInterrupt):
            density.save(b, path)
    assert torch.equal(density.load(path).theta, a.theta)
    # interrupted between the commit and the weights' rename: the new save, whole
    calls.clear()

    def stop_after_commit(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_replace(src, dst)

    with monkeypatch.context() as patch:
        patch.setattr(os, "replace", stop_after_commit)
        with pytest.raises(KeyboardInterrupt):
            density.save(b, path)
    assert torch.equal(density.load(path).theta, b.theta)
    density.save(a, path)  # finishes the interrupted one, removes the leftovers
    assert torch.equal(density.load(path).theta, a.theta)
    assert sorted(p.name for p in path.iterdir()) == [".save.lock", "config.json", "weights.pt"]


def test_load_refuses_a_mixed_pair(tmp_path):
    a, b, path = saved_pair(tmp_path)
    other = density.save(b, tmp_path / "other")
    (path / "weights.pt").write_bytes((other / "weights.pt").read_bytes())
    with pytest.raises(ValueError, match="two different saves"):
        density.load(path)
    # a save of the first format (no save id, no hash) still loads
    legacy = density.save(a, tmp_path / "legacy")
    meta = json.loads((legacy / "config.json").read_text())
    meta = {k: v for k, v in meta.items() if k not in ("save_id", "weights_sha256")}
    (legacy / "config.json").write_text(json.dumps({**meta, "format_version": 1}))
    assert torch.equal(density.load(legacy).theta, a.theta)


def test_concurrent_saves_and_loads_never_mix(tmp_path):
    """A writer alternates two saves of different dtypes while a reader loads: every load is
    one whole save (the dtype of config.json and the values of weights.pt agree)."""
    import threading

    a, b = Flow(2, layers=2, rank=1, seed=0), Flow(2, layers=2, rank=1, seed=1).double()
    path = density.save(a, tmp_path / "flow")
    stop, errors, loads = threading.Event(), [], [0]

    def write():  # a few hundred saves, or 2 seconds (each save fsyncs)
        start = time.perf_counter()
        for i in range(300):
            if time.perf_counter() - start > 2:
                break
            density.save(b if i % 2 else a, path)

    def read():
        while not stop.is_set():
            try:
                flow = density.load(path)
            except Exception as error:  # noqa: BLE001
                errors.append(error)
                continue
            expected = a if flow.theta.dtype == torch.float32 else b
            if not torch.equal(flow.theta, expected.theta):
                errors.append("mixed pair")
            loads[0] += 1

    writer, reader = threading.Thread(target=write), threading.Thread(target=read)
    reader.start()
    writer.start()
    writer.join(timeout=20)
    stop.set()
    reader.join(timeout=20)
    assert errors == [] and loads[0] >= 20


def test_load_corrupted_files_raise_value_errors(tmp_path):
    flow = Flow(2, layers=2, rank=1, seed=0)

    def fresh(name):
        return density.save(flow, tmp_path / name)

    path = fresh("truncated")
    weights = (path / "weights.pt").read_bytes()
    (path / "weights.pt").write_bytes(weights[: len(weights) // 2])
    with pytest.raises(ValueError, match="weights.pt"):
        density.load(path)
    meta = json.loads((fresh("x") / "config.json").read_text())
    cases = {
        "binary": b"\xff\xfe\x00garbage",
        "garbage": b"{not json",
        "list": b"[1, 2]",
        "no_config": json.dumps({"format": "flowpolicy.Flow"}).encode(),
        "bad_key": json.dumps({**meta, "config": {**meta["config"], "depth": 3}}).encode(),
        "bad_dtype": json.dumps({**meta, "dtype": "float17"}).encode(),
        "bad_value": json.dumps({**meta, "config": {**meta["config"], "dim": "two"}}).encode(),
    }
    for name, content in cases.items():
        path = fresh(name)
        (path / "config.json").write_bytes(content)
        with pytest.raises(ValueError, match="config.json"):
            density.load(path)
    path = fresh("not_a_state_dict")
    torch.save([1, 2, 3], path / "weights.pt")
    meta = json.loads((path / "config.json").read_text())
    meta.pop("weights_sha256")  # a save of the first format (no hash)
    (path / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="weights.pt"):
        density.load(path)
    path = fresh("no_weights")
    (path / "weights.pt").unlink()
    with pytest.raises(ValueError, match="weights.pt is missing"):
        density.load(path)


def test_cli_checks_out_before_training(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a directory")
    for out in (a_file, a_file / "below"):
        with pytest.raises(SystemExit) as exit_info:
            density.main(["--out", str(out), "--no-progress", "--device", "cpu"])
        assert exit_info.value.code == 2
        assert "--out" in capsys.readouterr().err


# --- issue 19: density from data --------------------------------------------------------------


def _eight_gaussians(n: int, seed: int) -> torch.Tensor:
    return density.datasets.eight_gaussians(n, torch.Generator().manual_seed(seed))


def test_fit_data_learns_a_multimodal_density():
    """The data recipe separates the eight modes in a few hundred steps: far below the best
    Gaussian's NLL (log(2 pi e) + log det cov / 2 = 4.25 nats; the entropy is 2.84)."""
    data = _eight_gaussians(20_000, 0)
    flow, history = density.fit_data(
        data, time_limit=None, progress=False, steps=150, batch_size=256
    )
    assert flow.config["nonlinearity"] == "coupling" and history.steps == 150
    gaussian = math.log(2 * math.pi * math.e) + 0.5 * torch.logdet(data.T.cov()).item()
    fresh = _eight_gaussians(20_000, 1)
    with torch.no_grad():
        nll = -flow().log_prob(fresh.float()).double().mean().item()
    assert nll < gaussian - 0.8, (nll, gaussian)
    assert abs(nll - history.nll[-1]) < 0.1  # the held-out split scores the same flow


def test_progress_bar_of_a_timed_fit_counts_seconds(capsys):
    """With a time limit (and no step budget) the bar runs over the limit's seconds, to 100%."""
    data = _eight_gaussians(2000, 0)
    density.fit_data(data, time_limit=2.0, progress=True, batch_size=64)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert "100%" in bar and "/2 s" in bar and "step" not in bar, bar


def test_coupling_flow_save_load_round_trip(tmp_path):
    flow = Flow(3, layers=2, rank=1, nonlinearity="coupling", coupling_hidden=(8,), seed=0)
    with torch.no_grad():
        for p in flow.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    loaded = density.load(density.save(flow, tmp_path / "coupling"))
    assert loaded.config == flow.config and loaded.config["coupling_hidden"] == [8]
    x = torch.randn(100, 3)
    assert torch.equal(loaded().log_prob(x), flow().log_prob(x))


def test_cli_data_end_to_end(tmp_path):
    import numpy as np

    file = tmp_path / "rows.npy"
    np.save(file, density.datasets.two_moons(2000, torch.Generator().manual_seed(0)).numpy())
    out = tmp_path / "fit"
    result = run_cli("--data", str(file), "--out", str(out), "--time-limit", "1", "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "held-out NLL" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["rows"] == 2000 and metrics["dim"] == 2 and math.isfinite(metrics["nll"])
    flow = density.load(out)
    data = torch.from_numpy(np.load(file)).float()
    with torch.no_grad():
        nll = -flow().log_prob(data).mean().item()
    assert abs(nll - metrics["nll"]) < 0.3  # the saved flow is the scored one, in data units


@pytest.mark.parametrize(
    ("content", "message"),
    [(None, "cannot read"), (torch.zeros(3, 2, 2), "expected numbers of shape")],
)
def test_cli_data_errors(tmp_path, capsys, content, message):
    import numpy as np

    file = tmp_path / "rows.npy"
    if content is not None:
        np.save(file, content.numpy())
    with pytest.raises(SystemExit) as exit_info:
        density.main(["--data", str(file), "--out", str(tmp_path / "x"), "--no-progress"])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.skipif(NO_CUDA, reason="needs a CUDA device")
def test_fit_data_on_gpu():
    """device="auto" keeps the coupling flow, its conditioners and the data on the device."""
    flow, history = density.fit_data(_eight_gaussians(5000, 0), progress=False, steps=50)
    assert history.device.startswith("cuda")
    assert all(p.device.type == "cuda" for p in flow.parameters())
    x = _eight_gaussians(100, 1).float().cuda()
    assert torch.isfinite(flow().log_prob(x)).all()
