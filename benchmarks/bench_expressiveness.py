"""Two separated modes: affine + PReLU vs affine + spline flows on the ``two_clusters`` target.

The target is the shape of a policy at the lake's start state: modes at (+-0.5, 0.5) with std
0.05 and nothing in between (entropy -2.4604 nats). For each configuration and seed the flow is
fitted by maximum likelihood (:func:`flowpolicy.density.fit`, same steps, batch and schedule),
then scored on the same 200k fresh samples: KL(p||q) with its standard error, and the model's
mass in the empty gap |x1| < 0.2 (the target's is ~1e-9). Prints one table and records it in
BENCHMARKS.md.

Run::

    python benchmarks/bench_expressiveness.py                 # ~5 min on 2 CPU cores
    python benchmarks/bench_expressiveness.py --steps 300 --seeds 0 --no-record   # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

import flowpolicy as fp  # noqa: E402

CONFIGS = {
    # name: (Flow kwargs, init_layers_ spread or None, lr)
    "prelu, 16 layers": (dict(layers=16, rank=2, nonlinearity="prelu"), None, 3e-3),
    "prelu, 16 layers, kinks scattered": (dict(layers=16, rank=2, nonlinearity="prelu"), 0.5, 3e-3),
    "spline, 2 layers (8 bins)": (
        dict(layers=2, rank=2, nonlinearity="spline", bins=8),
        None,
        1e-2,
    ),
    "spline, 4 layers (8 bins)": (
        dict(layers=4, rank=2, nonlinearity="spline", bins=8),
        None,
        1e-2,
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--eval-samples", type=int, default=200_000)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    target = fp.targets.two_clusters
    x = target.sample(args.eval_samples, generator=torch.Generator().manual_seed(2024))
    log_p = target.log_prob(x)

    rows = []
    for name, (kwargs, spread, lr) in CONFIGS.items():
        kls, gaps, seconds = [], [], []
        for seed in args.seeds:
            flow = fp.Flow(2, seed=seed, **kwargs)
            if spread is not None:
                fp.density.init_layers_(flow, spread, seed=seed)
            start = time.perf_counter()
            fp.density.fit(
                flow,
                target,
                steps=args.steps,
                batch_size=args.batch_size,
                lr=lr,
                device="cpu",
                seed=seed,
                progress=False,
            )
            seconds.append(time.perf_counter() - start)
            with torch.no_grad():
                dist = flow()
                kl = (log_p - dist.log_prob(x)).mean().item()
                samples = dist.sample((args.eval_samples,))
            kls.append(kl)
            gaps.append((samples[:, 0].abs() < 0.2).float().mean().item())
            print(f"{name:36s} seed {seed}: KL {kl:.4f}, gap mass {gaps[-1]:.2%}", flush=True)
        rows.append(
            f"| {name} | {statistics.median(kls):.4f} | "
            + ", ".join(f"{k:.4f}" for k in kls)
            + f" | {statistics.median(gaps):.2%} | {statistics.median(seconds):.0f} |"
        )

    table = "\n".join(
        [
            f"two_clusters (entropy {target.entropy():.4f} nats), {args.steps} Adam steps, batch "
            f"{args.batch_size}, cosine lr, EMA weights; KL(p||q) on the same "
            f"{args.eval_samples} fresh samples (standard error ~0.001); seeds {args.seeds}.",
            "",
            "| flow | median KL (nats) | KL per seed | median gap mass (abs(x1) < 0.2) | s/fit |",
            "|---|---|---|---|---|",
            *rows,
        ]
    )
    print(table)
    if not args.no_record:
        record(
            "Expressiveness: two separated modes, PReLU vs spline (bench_expressiveness.py)",
            table,
            threads=1,
        )


if __name__ == "__main__":
    main()
