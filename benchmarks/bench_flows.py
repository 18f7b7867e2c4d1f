"""Speed of the flow core, side by side in one run (medians of interleaved repeats).

1. ``rsample_and_log_prob`` for a batch of 256 contexts: our ``ConditionalFlow`` (dim 6, 4 layers,
   rank 2, context 17, hidden 256x256, PReLU and spline) against SB3's
   ``SquashedDiagGaussianDistribution`` fed by the same MLP, against zuko's MAF of similar size,
   and against the flows' hypernetwork alone (the MLP whose head gives every flow parameter: the
   floor of a flow's cost). Forward alone and forward + backward, under two cache conditions:
   interleaved (each call follows the other candidates' calls, which evict its weights from
   cache, as the critic's updates do between an actor's steps in SAC) and consecutive (blocks of
   calls of one model, warm caches, as in a loop that times one model).
2. ``log|det S|`` of the affine layer by the determinant lemma against ``torch.linalg.slogdet`` of
   the dense matrix, for d = 2 ... 64.

Usage: ``python benchmarks/bench_flows.py [--repeats 200] [--threads 1]``; appends to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn as nn
from stable_baselines3.common.distributions import SquashedDiagGaussianDistribution

from flowpolicy import ConditionalFlow
from flowpolicy.bijectors import Affine

sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
from _record import record  # noqa: E402

DIM, CONTEXT, BATCH, LAYERS, RANK, HIDDEN = 6, 17, 256, 4, 2, (256, 256)


def mlp(out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(CONTEXT, HIDDEN[0]),
        nn.ReLU(),
        nn.Linear(HIDDEN[0], HIDDEN[1]),
        nn.ReLU(),
        nn.Linear(HIDDEN[1], out),
    )


def candidates() -> dict[str, Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
    """Each maps a context batch to (sample, log_prob) with gradients to its parameters."""
    gaussian_net, gaussian = mlp(2 * DIM), SquashedDiagGaussianDistribution(DIM)

    def sb3_gaussian(c):
        mean, log_std = gaussian_net(c).chunk(2, -1)
        return gaussian.log_prob_from_params(mean, log_std.clamp(-20, 2))

    prelu = ConditionalFlow(DIM, CONTEXT, LAYERS, RANK, HIDDEN, squash=True, seed=0)
    spline = ConditionalFlow(
        DIM, CONTEXT, LAYERS, RANK, HIDDEN, nonlinearity="spline", squash=True, seed=0
    )

    def hypernetwork(c):  # the flow's floor: its MLP, whose head gives all 219 parameters
        theta = prelu.hyper(c)
        return theta[..., :DIM], theta.sum(-1)

    runs = {
        "SB3 SquashedDiagGaussian": sb3_gaussian,
        "ConditionalFlow prelu": lambda c: prelu(c, validate_args=False).rsample_and_log_prob(),
        "ConditionalFlow spline": lambda c: spline(c, validate_args=False).rsample_and_log_prob(),
        "its hypernetwork alone (no flow)": hypernetwork,
    }
    try:
        import zuko

        maf = zuko.flows.MAF(DIM, CONTEXT, transforms=LAYERS, hidden_features=HIDDEN)
        runs["zuko MAF (4 transforms, 256x256)"] = lambda c: maf(c).rsample_and_log_prob()
    except ImportError:
        print("zuko not installed (pip install -e '.[bench]'): skipping the MAF row")
    return runs


def time_interleaved(
    fns: dict[str, Callable[[], object]], repeats: int, block: int = 1
) -> dict[str, float]:
    """Median seconds per call; candidates take turns so that load changes hit them all.

    With ``block > 1`` each turn is one untimed call and ``block`` timed calls in a row (warm
    caches); with ``block == 1``, one timed call right after the other candidates' calls.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        for _ in range(5):
            fn()
    for _ in range(max(repeats // block, 1)):
        for name, fn in fns.items():
            if block > 1:
                fn()
            for _ in range(block):
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def bench_sampling(repeats: int) -> str:
    context = torch.randn(BATCH, CONTEXT)
    runs = candidates()

    def forward(fn):
        def call():
            with torch.no_grad():
                fn(context)

        return call

    def forward_backward(fn):
        def call():
            sample, log_prob = fn(context)
            (log_prob.mean() + sample.pow(2).mean()).backward()

        return call

    lines = [
        f"rsample_and_log_prob, batch {BATCH}, dim {DIM}, context {CONTEXT}, hidden 256x256, "
        f"{LAYERS} layers, rank {RANK}; median of {repeats} calls per model; ratios to the "
        "Gaussian",
        "",
        "| model | calls | forward (ms) | ratio | forward + backward (ms) | ratio |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for calls, block in (("interleaved", 1), ("consecutive", 10)):
        fwd = time_interleaved({k: forward(f) for k, f in runs.items()}, repeats, block)
        bwd = time_interleaved({k: forward_backward(f) for k, f in runs.items()}, repeats, block)
        ref_f, ref_b = fwd["SB3 SquashedDiagGaussian"], bwd["SB3 SquashedDiagGaussian"]
        for name in runs:
            lines.append(
                f"| {name} | {calls} | {1e3 * fwd[name]:.3f} | {fwd[name] / ref_f:.2f}x "
                f"| {1e3 * bwd[name]:.3f} | {bwd[name] / ref_b:.2f}x |"
            )
    return "\n".join(lines)


def bench_log_det(repeats: int) -> str:
    lines = [
        "log|det S| of S = L (I + V D V^T), rank 2, 256 parameter sets; median of "
        f"{repeats} repeats; |difference| in float64",
        "",
        "| d | determinant lemma (ms) | slogdet of dense S (ms) | speed-up | max abs difference |",
        "|---:|---:|---:|---:|---:|",
    ]
    g = torch.Generator().manual_seed(0)
    for d in (2, 4, 8, 16, 32, 64):
        L = torch.randn(BATCH, d, d, generator=g, dtype=torch.float64).tril(-1) / d
        L = L + torch.diag_embed(torch.rand(BATCH, d, generator=g, dtype=torch.float64) + 0.5)
        V = torch.randn(BATCH, d, 2, generator=g, dtype=torch.float64)
        D = torch.rand(BATCH, 2, generator=g, dtype=torch.float64)
        shift = torch.zeros(BATCH, d, dtype=torch.float64)
        eye = torch.eye(d, dtype=torch.float64)
        dense = L @ (eye + V @ torch.diag_embed(D) @ V.mT)

        def lemma(shift=shift, L=L, V=V, D=D):
            return Affine(shift, L, V, D, validate=False).log_det()

        def slogdet(L=L, V=V, D=D, eye=eye):
            return torch.linalg.slogdet(L @ (eye + V @ torch.diag_embed(D) @ V.mT))[1]

        t = time_interleaved({"lemma": lemma, "slogdet": slogdet}, repeats)
        error = float((lemma() - torch.linalg.slogdet(dense)[1]).abs().max())
        lines.append(
            f"| {d} | {1e3 * t['lemma']:.3f} | {1e3 * t['slogdet']:.3f} "
            f"| {t['slogdet'] / t['lemma']:.2f}x | {error:.1e} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    table = bench_sampling(args.repeats) + "\n\n" + bench_log_det(max(args.repeats // 4, 10))
    print(table)
    record("Flow core speed (bench_flows.py)", table, threads=args.threads)


if __name__ == "__main__":
    main()
