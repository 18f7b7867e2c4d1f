"""Benchmark of the LakeCrossing environment: stepping cost, the expert, and SAC learnability.

Measures, single-threaded:

1. steps/s of the unwrapped environment and through ``gymnasium.make``'s wrappers (median of
   repeats, random actions, no rendering; target >= 50,000 unwrapped);
2. the scripted expert over 200 seeded episodes (target: 100% success, 50% +- 10% per side),
   and the policy that averages the expert's two sides (it should drown);
3. learnability: Stable-Baselines3 SAC with its default Gaussian ``MlpPolicy`` and default
   settings on ``LakeCrossing-v0`` for 15k steps, 3 seeds, evaluated deterministically
   (target: home in >= 95% of episodes), with the route split of training and evaluation.

Prints one Markdown table and records it, with the date, command and machine, in
``BENCHMARKS.md`` at the repository root (replacing the previous result).

Usage::

    python benchmarks/bench_lake_env.py                 # everything (about 10-15 min)
    python benchmarks/bench_lake_env.py --sac-seeds     # no SAC: about 20 s
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _record import record  # noqa: E402

from flowpolicy.envs import (  # noqa: E402
    LakeCrossingEnv,
    LakeExpert,
    collect_demonstrations,
    rollout,
)

TITLE = "LakeCrossing-v0 environment (bench_lake_env.py)"


def steps_per_second(env: gym.Env, n_steps: int, repeats: int, seed: int = 0) -> float:
    """Median over ``repeats`` of the rate of ``env.step`` with random actions, resets included."""
    rng = np.random.default_rng(seed)
    actions = list(rng.uniform(-1, 1, size=(n_steps, 2)).astype(np.float32))
    rates = []
    for _ in range(repeats):
        env.reset(seed=seed)
        start = time.perf_counter()
        for action in actions:
            _, _, terminated, truncated, _ = env.step(action)
            if terminated or truncated:
                env.reset()
        rates.append(n_steps / (time.perf_counter() - start))
    return statistics.median(rates)


def expert_stats(n_episodes: int, seed: int) -> dict[str, float]:
    demos = collect_demonstrations(n_episodes, seed=seed)
    env = gym.make("LakeCrossing-v0")
    cw, ccw = LakeExpert(env, "cw"), LakeExpert(env, "ccw")
    averaged = rollout(env, lambda obs: (cw(obs) + ccw(obs)) / 2, 50, seed=seed)
    return {
        "success": float(demos.episode_success.mean()),
        "ccw": float(np.mean(demos.episode_routes == "ccw")),
        "return": float(demos.episode_returns.mean()),
        "length": float(demos.episode_lengths.mean()),
        "avg_drowned": float(np.mean([r["drowned"] for r in averaged])),
        "avg_length": float(np.mean([r["length"] for r in averaged])),
    }


def sac_run(seed: int, total_steps: int, eval_episodes: int) -> dict[str, object]:
    """Train SB3's default SAC and evaluate it deterministically."""
    from stable_baselines3 import SAC
    from stable_baselines3.common.callbacks import BaseCallback

    class Episodes(BaseCallback):
        """Record each finished training episode's outcome and route."""

        def __init__(self) -> None:
            super().__init__()
            self.outcomes: list[tuple[int, bool, str | None]] = []

        def _on_step(self) -> bool:
            for done, info in zip(self.locals["dones"], self.locals["infos"], strict=True):
                if done:
                    self.outcomes.append((self.num_timesteps, info["success"], info["route"]))
            return True

    env = gym.make("LakeCrossing-v0")
    model = SAC("MlpPolicy", env, seed=seed, verbose=0)
    callback = Episodes()
    start = time.perf_counter()
    model.learn(total_steps, callback=callback)
    seconds = time.perf_counter() - start

    results = rollout(gym.make("LakeCrossing-v0"), model, eval_episodes, seed=10_000 + seed)
    successes = [t for t, ok, _ in callback.outcomes if ok]
    last = callback.outcomes[-100:]
    return {
        "seed": seed,
        "success": float(np.mean([r["success"] for r in results])),
        "drowned": float(np.mean([r["drowned"] for r in results])),
        "eval_ccw": sum(r["route"] == "ccw" for r in results),
        "eval_cw": sum(r["route"] == "cw" for r in results),
        "return": float(np.mean([r["return"] for r in results])),
        "length": float(np.mean([r["length"] for r in results])),
        "first_success": successes[0] if successes else None,
        "train_episodes": len(callback.outcomes),
        "train_ccw": sum(route == "ccw" for _, _, route in last),
        "train_cw": sum(route == "cw" for _, _, route in last),
        "train_last": len(last),
        "steps_per_s": total_steps / seconds,
    }


def defaults() -> str:
    """The environment's default settings, in one line."""
    e = LakeCrossingEnv()
    return (
        f"lake r={e.lake_radius} at {e.lake_center.tolist()}, start {e.start.tolist()} "
        f"± {e.start_noise} along the axis, home {e.home.tolist()} r={e.home_radius}, "
        f"max_speed {e.max_speed}, arena ±{e.arena_half_size}, "
        f"max_episode_steps {gym.spec('LakeCrossing-v0').max_episode_steps}; rewards: "
        f"step -{e.step_cost}, shaping {e.shaping_weight}·Δgeodesic, home +{e.home_bonus}, "
        f"lake -{e.lake_penalty}; gymnasium {gym.__version__}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50_000, help="steps per timing repeat")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--expert-episodes", type=int, default=200)
    parser.add_argument("--sac-steps", type=int, default=15_000)
    parser.add_argument("--sac-seeds", type=int, nargs="*", default=[0, 1, 2])
    parser.add_argument("--eval-episodes", type=int, default=50)
    parser.add_argument("--no-record", action="store_true", help="only print the table")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the machines are shared; compare single-threaded figures

    raw = steps_per_second(LakeCrossingEnv(), args.steps, args.repeats)
    made = steps_per_second(gym.make("LakeCrossing-v0"), args.steps, args.repeats)
    expert = expert_stats(args.expert_episodes, seed=0)
    rows = [
        ("steps/s, unwrapped (median)", f"{raw:,.0f}", ">= 50,000"),
        ("steps/s, `gym.make` wrappers (median)", f"{made:,.0f}", "report"),
        (
            f"expert success, {args.expert_episodes} seeded episodes",
            f"{expert['success']:.1%}",
            "100%",
        ),
        (
            "expert side split ccw / cw",
            f"{expert['ccw']:.1%} / {1 - expert['ccw']:.1%}",
            "50% ± 10%",
        ),
        (
            "expert mean return / length",
            f"{expert['return']:.1f} / {expert['length']:.1f}",
            "report",
        ),
        (
            "averaged expert (mean of both sides' actions), 50 episodes",
            f"drowned {expert['avg_drowned']:.0%}, mean length {expert['avg_length']:.1f}",
            "drowns",
        ),
    ]
    sac = []
    for seed in args.sac_seeds:
        print(f"SAC seed {seed}: training {args.sac_steps} steps...", file=sys.stderr, flush=True)
        run = sac_run(seed, args.sac_steps, args.eval_episodes)
        print(run, file=sys.stderr, flush=True)
        sac.append(run)
        rows.append(
            (
                f"SAC `MlpPolicy` seed {seed}, {args.sac_steps:,} steps: deterministic success"
                f" ({args.eval_episodes} eps)",
                f"{run['success']:.0%} (drowned {run['drowned']:.0%}, return {run['return']:.1f},"
                f" length {run['length']:.1f}); routes ccw/cw {run['eval_ccw']}/{run['eval_cw']};"
                f" last {run['train_last']} training eps ccw/cw {run['train_ccw']}/"
                f"{run['train_cw']}; first success at step {run['first_success']};"
                f" {run['steps_per_s']:.0f} steps/s",
                ">= 95%",
            )
        )
    if sac:
        mean = float(np.mean([r["success"] for r in sac]))
        worst = min(r["success"] for r in sac)
        rows.append(("SAC success, mean / worst seed", f"{mean:.1%} / {worst:.0%}", ">= 95%"))

    lines = [
        f"Environment defaults: {defaults()}",
        "",
        "| measure | value | target |",
        "|---|---|---|",
        *[f"| {name} | {value} | {target} |" for name, value, target in rows],
    ]
    table = "\n".join(lines)
    print(table)
    if not args.no_record:
        record(TITLE, table, threads=1)


if __name__ == "__main__":
    main()
