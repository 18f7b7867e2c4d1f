"""Flow policies in SAC, TQC and CrossQ side by side with each algorithm's Gaussian policy.

Identical settings and seeds per algorithm, one torch thread, in one process:

1. time per gradient step (as ``bench_sac.py``): for each algorithm, a Gaussian, a PReLU-flow
   and a spline-flow model fill a replay buffer on Pendulum-v1 with rl-zoo3's settings, then
   ``model.train(steps, 256)`` is timed for each in turn, several interleaved rounds (thread CPU
   time, robust to other load); medians and the ratio flow / Gaussian of the same algorithm;
2. Pendulum-v1 with rl-zoo3's TQC and CrossQ settings (``hyperparams/tqc.yml``,
   ``crossq.yml``: 20k steps): the final deterministic return (10 episodes) per seed, flow
   (default settings: 4 PReLU layers, rank 1) and Gaussian, and whether the flow's mean lies
   within the Gaussian's seed range.

    python benchmarks/bench_contrib.py --timing-only
    python benchmarks/bench_contrib.py --skip-timing --seeds 0 1 2

Each finished return run is saved as ``--results/<algo>_<policy>_s<seed>.json`` (small files,
committed): a later run skips the runs whose file exists, and the table covers every file there,
so seeds can be added over several sittings or by processes side by side (``--algos TQC`` and
``--algos CrossQ``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from sb3_contrib import TQC, CrossQ
from stable_baselines3 import SAC
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor
from tqdm import tqdm

from flowpolicy.contrib import FlowCrossQPolicy, FlowTQCPolicy
from flowpolicy.sb3 import FlowPolicy

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

TIMING_TITLE = "SAC, TQC, CrossQ: time per gradient step (bench_contrib.py --timing-only)"
RETURNS_TITLE = "TQC and CrossQ: Pendulum-v1 returns, flow vs Gaussian (bench_contrib.py)"
RESULTS = Path(__file__).parent / "results" / "pendulum-contrib"
TARGETS = {"prelu": "<= 1.15x", "spline": "<= 1.5x"}

# algorithm -> (class, flow policy, rl-zoo3 Pendulum-v1 settings, steps)
ALGORITHMS: dict[str, tuple[Any, Any, dict[str, Any], int]] = {
    "SAC": (SAC, FlowPolicy, dict(learning_rate=1e-3), 20_000),
    "TQC": (TQC, FlowTQCPolicy, dict(learning_rate=1e-3), 20_000),
    "CrossQ": (
        CrossQ,
        FlowCrossQPolicy,
        dict(policy_delay=2, policy_kwargs=dict(net_arch=[256, 256])),
        20_000,
    ),
}


def make_model(algo: str, policy: str, seed: int, **overrides: Any) -> Any:
    """The algorithm with rl-zoo3's settings; only the actor's distribution differs."""
    cls, flow_policy, settings, _ = ALGORITHMS[algo]
    settings = {**settings, **overrides}
    policy_kwargs = dict(settings.pop("policy_kwargs", {}))
    if policy == "gaussian":
        policy_class: Any = "MlpPolicy"
    else:
        policy_class = flow_policy
        policy_kwargs["flow_kwargs"] = dict(nonlinearity=policy, layers=4, rank=1)
    return cls(policy_class, "Pendulum-v1", policy_kwargs=policy_kwargs, seed=seed, **settings)


def time_gradient_steps(algos: list[str], steps: int, rounds: int, fill: int) -> dict:
    """Median ms (thread CPU time) per gradient step, keyed by (algorithm, policy)."""
    models = {
        (algo, policy): make_model(algo, policy, 0, learning_starts=fill)
        for algo in algos
        for policy in ("gaussian", "prelu", "spline")
    }
    for model in models.values():
        model.learn(fill)
        model.train(gradient_steps=3, batch_size=256)  # warm-up
    times: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    for _ in tqdm(range(rounds), desc="timing rounds"):
        for key, model in models.items():
            start = time.thread_time()
            model.train(gradient_steps=steps, batch_size=256)
            times[key].append(1e3 * (time.thread_time() - start) / steps)
    return {key: statistics.median(values) for key, values in times.items()}


def timing_table(ms: dict, steps: int, rounds: int) -> str:
    lines = [
        f"Time per gradient step, Pendulum-v1 (batch 256, rl-zoo3 networks: SAC/TQC 256x256, "
        f"CrossQ 256x256 with batch renorm; 4 flow layers, rank 1), median of {rounds} "
        f"interleaved rounds of {steps} steps (thread CPU time). The machine was shared with "
        f"other jobs (2 cores, load > 2): absolute times are inflated, ratios less so.",
        "",
        "| algorithm | policy | ms per gradient step | ratio flow / Gaussian | target |",
        "|---|---|---:|---:|---|",
    ]
    for (algo, policy), value in ms.items():
        ratio = value / ms[(algo, "gaussian")]
        target = TARGETS.get(policy, "")
        lines.append(f"| {algo} | {policy} | {value:.2f} | {ratio:.2f}x | {target} |")
    return "\n".join(lines)


def run(algo: str, policy: str, seed: int, steps: int | None, episodes: int) -> dict[str, Any]:
    steps = steps or ALGORITHMS[algo][3]
    model = make_model(algo, policy, seed)
    start = time.perf_counter()
    model.learn(steps, progress_bar=True)
    minutes = (time.perf_counter() - start) / 60
    env = Monitor(gym.make("Pendulum-v1"))
    env.reset(seed=10_000 + seed)
    returns, _ = evaluate_policy(
        model, env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True
    )
    result = dict(algo=algo, policy=policy, seed=seed, steps=steps, minutes=minutes)
    result["mean_return"] = float(np.mean(returns))
    print(result, flush=True)
    return result


def returns_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "rl-zoo3 settings; deterministic return over 10 episodes per seed. The machine was "
        "shared with other jobs.",
        "",
        "| algorithm | steps | policy | seeds | mean return | per seed | flow within the "
        "Gaussian's seed range | minutes per run |",
        "|---|---:|---|---:|---:|---|---|---:|",
    ]
    for algo, steps in sorted({(r["algo"], r["steps"]) for r in results}):
        runs = {
            p: [r for r in results if (r["algo"], r["steps"], r["policy"]) == (algo, steps, p)]
            for p in ("gaussian", "prelu")
        }
        gauss = [r["mean_return"] for r in runs["gaussian"]]
        for policy, rows in runs.items():
            if not rows:
                continue
            values = [r["mean_return"] for r in rows]
            within = "-"
            if policy != "gaussian" and gauss:
                within = "yes" if min(gauss) <= np.mean(values) <= max(gauss) else "no"
                within = "yes (above)" if np.mean(values) > max(gauss) else within
            per_seed = ", ".join(f"{v:.1f}" for v in values)
            minutes = statistics.median(r["minutes"] for r in rows)
            lines.append(
                f"| {algo} | {steps} | {policy} | {len(rows)} | {np.mean(values):.1f} | "
                f"{per_seed} | {within} | {minutes:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--algos", nargs="+", default=list(ALGORITHMS), choices=list(ALGORITHMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="training steps (zoo: 20k)")
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--timing-rounds", type=int, default=9)
    parser.add_argument("--timing-fill", type=int, default=1000)
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--results", default=str(RESULTS), help="folder of finished return runs")
    args = parser.parse_args()
    torch.set_num_threads(1)

    if not args.skip_timing:
        ms = time_gradient_steps(
            args.algos, args.timing_steps, args.timing_rounds, args.timing_fill
        )
        table = timing_table(ms, args.timing_steps, args.timing_rounds)
        print(table)
        record(TIMING_TITLE, table, threads=1)
    if args.timing_only:
        return
    algos = [a for a in args.algos if a != "SAC"]  # SAC's returns: bench_sac.py
    folder = Path(args.results)
    folder.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        for algo in algos:
            for policy in ("gaussian", "prelu"):
                path = folder / f"{algo}_{policy}_s{seed}.json"
                if not path.exists():
                    result = run(algo, policy, seed, args.steps, args.episodes)
                    path.write_text(json.dumps(result) + "\n")
    results = [json.loads(path.read_text()) for path in sorted(folder.glob("*.json"))]
    table = returns_table(results)
    print(table)
    record(RETURNS_TITLE, table, threads=1)


if __name__ == "__main__":
    main()
