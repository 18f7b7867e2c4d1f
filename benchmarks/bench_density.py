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

DEFAULTS = fp.density.DEFAULTS


def fit_ours(budget: float, batch_size: int, seed: int, device: str) -> tuple[object, int, float]:
    """The CLI's recipe: hinge init from samples, then ``fit`` at the CLI's defaults (it stops at
    its step count when that comes before the budget)."""
    flow = fp.Flow(2, layers=DEFAULTS["layers"], rank=DEFAULTS["rank"], seed=seed)
    data = fp.targets.banana.sample(65536, generator=torch.Generator().manual_seed(seed + 99))
    fp.density.init_hinges_(flow, data, spread=DEFAULTS["hinge_spread"])
    history = fp.density.fit(
        flow,
        fp.targets.banana,
        steps=DEFAULTS["steps"],
        batch_size=batch_size,
        lr=DEFAULTS["lr"],
        device=device,
        seed=seed,
        progress=False,
        time_limit=budget,
        ema=DEFAULTS["ema"],
        kink_bandwidth=DEFAULTS["kink_bandwidth"],
        eval_every=10**9,
    )
    return (lambda x: flow().log_prob(x)), history.steps, history.train_seconds


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
    models = {"flowpolicy affine+PReLU": fit_ours, "zuko MAF (3 x 64x64)": fit_zuko}

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
                    f"{budget:4.0f} s {name:26s} seed {seed}: KL {kls[-1]:.4f}, {steps} steps "
                    f"in {seconds:.1f} s",
                    flush=True,
                )
            results[name] = statistics.median(kls)
            speed.setdefault(name, []).extend(rates)
            rows.append(
                f"| {budget:.0f} | {name} | {results[name]:.4f} | "
                + ", ".join(f"{k:.4f}" for k in kls)
                + f" | {statistics.median(used):.1f} | {statistics.median(rates):.0f} |"
            )
        ours, theirs = results.values()
        rows.append(f"| {budget:.0f} | ratio ours / zuko | {ours / theirs:.2f} | | | |")

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
            f"Ours: the CLI's recipe, {DEFAULTS['layers']} affine+PReLU blocks, rank "
            f"{DEFAULTS['rank']}, hinge init from 65536 samples, lr {DEFAULTS['lr']}, at most "
            f"{DEFAULTS['steps']} steps (it stops before the budget when they are done), EMA "
            "weights; zuko: MAF(2, transforms=3, hidden_features=(64, 64)), lr 1e-3, cosine "
            "over the budget. Training time only (periodic evaluation excluded).",
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
        record("Density: banana, flowpolicy vs zuko MAF at equal wall-clock", table, threads=1)


if __name__ == "__main__":
    main()
