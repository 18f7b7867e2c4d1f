"""Pretraining from demonstrations on LakeCrossing, flow vs Gaussian, then SAC fine-tuning.

Per seed, ``collect_demonstrations(200, seed)`` at its defaults (margin 0.01); SAC models with a
spline flow, a PReLU flow (the FlowPolicy default) and SB3's Gaussian actor are pretrained by
:func:`flowpolicy.pretrain` with its defaults only. Measured: success, drowning and the route
split (cw / ccw: share of all rollouts that reached home by that route) of sampled and of
deterministic actions; then ``model.learn`` fine-tunes each model (``train_lake.py``'s settings:
gamma 0.9, lr 1e-3, 500 warm-up steps) and the sampled-action rollouts are measured again every
``--eval-every`` steps.

    python benchmarks/bench_pretrain.py --seeds 0 1 2
    python benchmarks/bench_pretrain.py --seeds 0 --finetune-steps 0     # pretraining only
    # policies as separate processes side by side, then one table:
    python benchmarks/bench_pretrain.py --policies spline --out runs/pre_spline.jsonl --no-record &
    python benchmarks/bench_pretrain.py --policies gaussian --out runs/pre_gauss.jsonl --no-record
    python benchmarks/bench_pretrain.py --table-from runs/pre_spline.jsonl runs/pre_gauss.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC

import flowpolicy.envs as envs
from flowpolicy.pretraining import pretrain
from flowpolicy.sb3 import FlowPolicy

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

TITLE = "Pretraining on LakeCrossing from demonstrations, then SAC fine-tuning (bench_pretrain.py)"
POLICIES = ("spline", "prelu", "gaussian")


def make_model(policy: str, seed: int) -> SAC:
    env = gym.make("LakeCrossing-v0")
    settings = dict(learning_rate=1e-3, gamma=0.9, learning_starts=500, seed=seed)
    if policy == "gaussian":
        return SAC("MlpPolicy", env, **settings)
    flow_kwargs = dict(nonlinearity=policy)
    return SAC(FlowPolicy, env, policy_kwargs=dict(flow_kwargs=flow_kwargs), **settings)


def stats(model: SAC, n: int, seed: int, deterministic: bool) -> dict[str, float]:
    env = gym.make("LakeCrossing-v0")
    return envs.route_stats(envs.rollout(env, model, n, seed, deterministic=deterministic))


def run(policy: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    demos = envs.collect_demonstrations(200, seed=seed)
    model = make_model(policy, seed)
    start = time.perf_counter()
    losses = pretrain(model, demos.observations, demos.actions, seed=seed)
    result: dict[str, Any] = dict(policy=policy, seed=seed, nll=float(losses[-100:].mean()))
    result["minutes"] = (time.perf_counter() - start) / 60
    result["stochastic"] = stats(model, args.rollouts, 10_000 + seed, False)
    result["deterministic"] = stats(model, args.rollouts, 10_000 + seed, True)
    result["finetune"] = []
    for step in range(args.eval_every, args.finetune_steps + 1, args.eval_every):
        model.learn(args.eval_every, reset_num_timesteps=False)
        split = stats(model, args.finetune_rollouts, 20_000 + seed, False)
        result["finetune"].append(dict(step=step, **split))
    print(result, flush=True)
    return result


def fmt(s: dict[str, float]) -> str:
    return f"{s['success']:.1%} ({s['cw']:.1%} / {s['ccw']:.1%}), drowned {s['drowned']:.1%}"


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        f"collect_demonstrations(200, seed) at its defaults; pretrain() defaults (20000 cosine "
        f"Adam steps, batch 256, lr 1e-3, standardized inputs); SAC default networks "
        f"(256x256). {args.rollouts} rollouts per policy and mode; success (cw / ccw), "
        f"drowned. Fine-tuning: SAC gamma 0.9, lr 1e-3, 500 warm-up steps, "
        f"{args.finetune_rollouts} sampled rollouts per evaluation. The machine was shared with "
        f"other jobs (2 cores).",
        *(
            [f"Tabulated from {', '.join(args.table_from)}: one process per policy, side by side."]
            if args.table_from
            else []
        ),  # fmt: skip
        "",
        "| policy | seed | final NLL | sampled | deterministic | fine-tuning: sampled, by step |",
        "|---|---:|---:|---|---|---|",
    ]
    for r in results:
        tune = "; ".join(f"{f['step']}: {fmt(f)}" for f in r["finetune"]) or "-"
        lines.append(
            f"| {r['policy']} | {r['seed']} | {r['nll']:.2f} | {fmt(r['stochastic'])} | "
            f"{fmt(r['deterministic'])} | {tune} |"
        )
    for policy in POLICIES:
        rows = [r["stochastic"]["success"] for r in results if r["policy"] == policy]
        if len(rows) > 1:
            lines.append(
                f"\n{policy}: sampled success median {np.median(rows):.0%} "
                f"(min {min(rows):.0%}, max {max(rows):.0%}) over {len(rows)} seeds"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--rollouts", type=int, default=200)
    parser.add_argument("--finetune-steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=1000)
    parser.add_argument("--finetune-rollouts", type=int, default=100)
    parser.add_argument("--out", default="runs/bench_pretrain.jsonl", help="results, appended")
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument("--table-from", nargs="+", metavar="JSONL", help="train nothing: "
                        "tabulate (and record) the runs of these --out files")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.table_from:
        results = [json.loads(line) for path in args.table_from for line in open(path)]
    else:
        results = []
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        for seed in args.seeds:
            for policy in args.policies:
                results.append(run(policy, seed, args))
                with open(args.out, "a") as file:
                    file.write(json.dumps(results[-1]) + "\n")
    text = table(results, args)
    print(text)
    if not args.no_record:
        record(TITLE, text, threads=1)


if __name__ == "__main__":
    main()
