"""Banana density: our affine + PReLU flow vs zuko's MAF at equal wall-clock budgets.

Both models train by maximum likelihood on fresh banana samples drawn each step, with the same
batch size, Adam, and a cosine learning rate that follows the clock (it reaches zero when the
budget is spent). Both see standardized data: ours through :func:`flowpolicy.density.fit`
(the last affine layer is matched to the data's mean and std), zuko's MAF through a fixed
standardization whose log-determinant is added back. Each trained model is scored on the same
fresh samples: KL(p||q) = E_p[log p - log q] (exact log p). Medians over seeds. Also reports
training steps/s on CPU (1 thread), and on CUDA when there is a device.

Run::

    python benchmarks/bench_density.py                        # budgets 10, 30, 60 s, 3 seeds
    python benchmarks/bench_density.py --budgets 2 --seeds 0 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

import flowpolicy as fp  # noqa: E402

DEFAULTS, SPLINE = fp.density.DEFAULTS, fp.density.SPLINE_DEFAULTS


def fit_ours(
    budget: float, batch_size: int, seed: int, device: str, nonlinearity: str = "prelu"
) -> tuple[object, int, float]:
    """The CLI's recipe: data-driven init from samples (inside the budget), then ``fit`` at the
    CLI's defaults; the PReLU recipe stops at its step count when that comes before the budget,
    the spline one trains for the whole budget, as zuko's MAF does."""
    start = time.perf_counter()
    flow = fp.density.initial_flow(fp.targets.banana, nonlinearity, seed=seed)
    steps = DEFAULTS["steps"] if nonlinearity == "prelu" else 10**9
    init_seconds = time.perf_counter() - start
    history = fp.density.fit(
        flow,
        fp.targets.banana,
        steps=steps,
        batch_size=batch_size,
        lr=DEFAULTS["lr"],
        device=device,
        seed=seed,
        progress=False,
        time_limit=max(budget - init_seconds, 1e-3),
        ema=DEFAULTS["ema"],
        kink_bandwidth=DEFAULTS["kink_bandwidth"],
        eval_every=10**9,
    )
    return (lambda x: flow().log_prob(x)), history.steps, init_seconds + history.train_seconds


def fit_ours_spline(budget: float, batch_size: int, seed: int, device: str):
    return fit_ours(budget, batch_size, seed, device, nonlinearity="spline")


def fit_zuko(budget: float, batch_size: int, seed: int, device: str, lr: float = 1e-3):
    import zuko

    torch.manual_seed(seed)
    target = fp.targets.banana
    generator = torch.Generator(device).manual_seed(seed)
    stats = target.sample(100_000, generator=generator, device=device)
    mean, std = stats.mean(0), stats.std(0)
    flow = zuko.flows.MAF(2, transforms=3, hidden_features=(64, 64)).to(device)
    optimizer = torch.optim.Adam(flow.parameters(), lr=lr)
    steps, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget:
        for group in optimizer.param_groups:  # cosine over the budget, as fit(time_limit=...)
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * elapsed / budget))
        x = (target.sample(batch_size, generator=generator, device=device) - mean) / std
        loss = -flow().log_prob(x).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        steps += 1
    log_std = std.log().sum()

    def log_prob(x):
        return flow().log_prob((x - mean) / std) - log_std

    return log_prob, steps, time.perf_counter() - start


def kl_on(log_prob, x: torch.Tensor, log_p: torch.Tensor, device: str = "cpu") -> float:
    with torch.no_grad():
        log_q = torch.cat([log_prob(part.to(device)).cpu() for part in x.split(50_000)])
    return (log_p - log_q).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[10.0, 30.0, 60.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--eval-samples", type=int, default=200_000)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    x = fp.targets.banana.sample(args.eval_samples, generator=torch.Generator().manual_seed(7))
    log_p = fp.targets.banana.log_prob(x)
    models = {
        "flowpolicy affine+PReLU": fit_ours,
        "flowpolicy affine+spline": fit_ours_spline,
        "zuko MAF (3 x 64x64)": fit_zuko,
    }

    rows, speed = [], {}
    for budget in args.budgets:
        results = {}
        for name, fit in models.items():
            kls, rates, used = [], [], []
            for seed in args.seeds:
                log_prob, steps, seconds = fit(budget, args.batch_size, seed, "cpu")
                kls.append(kl_on(log_prob, x, log_p))
                rates.append(steps / seconds)
                used.append(seconds)
                print(
                    f"{budget:4.0f} s {name:26s} seed {seed}: KL {kls[-1]:.5f}, {steps} steps "
                    f"in {seconds:.1f} s",
                    flush=True,
                )
            results[name] = statistics.median(kls)
            speed.setdefault(name, []).extend(rates)
            rows.append(
                f"| {budget:.0f} | {name} | {results[name]:.5f} | "
                + ", ".join(f"{k:.5f}" for k in kls)
                + f" | {statistics.median(used):.1f} | {statistics.median(rates):.0f} |"
            )
        prelu, spline, theirs = results.values()
        rows.append(
            f"| {budget:.0f} | ratio ours / zuko | PReLU {prelu / theirs:.2f}, "
            f"spline {spline / theirs:.3f} | | | |"
        )

    speed_rows = []
    for name, fit in models.items():
        cells = [f"{statistics.median(speed[name]):.0f}"]
        if "cuda" in devices:
            _, steps, seconds = fit(10.0, args.batch_size, 0, "cuda")
            cells.append(f"{steps / seconds:.0f}")
        else:
            cells.append("pending (no CUDA device on this machine)")
        speed_rows.append(f"| {name} | " + " | ".join(cells) + " |")

    table = "\n".join(
        [
            f"Banana (entropy 4.2242 nats), batch {args.batch_size}, equal wall-clock budgets, "
            f"KL(p||q) on the same {args.eval_samples} fresh samples, seeds {args.seeds}. "
            f"Ours: the CLI's recipes, rank {DEFAULTS['rank']}, lr {DEFAULTS['lr']}, EMA weights, "
            f"init from {DEFAULTS['init_samples']} samples inside the budget: "
            f"{DEFAULTS['layers']} affine+PReLU "
            f"blocks, init_hinges_, at most {DEFAULTS['steps']} steps (it stops before the "
            f"budget when they are done); {SPLINE['layers']} affine+spline blocks "
            f"({SPLINE['bins']} bins), init_splines_, the whole budget. zuko: MAF(2, "
            "transforms=3, hidden_features=(64, 64)), lr 1e-3, cosine over the budget. "
            "Training time plus our init from samples (periodic evaluation excluded).",
            "",
            "| budget (s) | model | median KL (nats) | KL per seed | seconds used | steps/s |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
            "| model | steps/s CPU (1 thread) | steps/s CUDA (10 s) |",
            "|---|---|---|",
            *speed_rows,
        ]
    )
    print(table)
    if not args.no_record:
        record(
            "Density: banana, flowpolicy vs zuko MAF at equal wall-clock (bench_density.py)",
            table,
            threads=1,
        )


if __name__ == "__main__":
    main()
