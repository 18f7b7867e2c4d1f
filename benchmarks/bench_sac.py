"""SAC with FlowPolicy (PReLU and spline) side by side with SB3's Gaussian MlpPolicy.

Identical settings and seeds for the three policies, one torch thread, in one process:

1. time per gradient step: the models fill a replay buffer on Pendulum-v1 (zoo settings,
   default networks, 4 flow layers of rank 1), then ``model.train(gradient_steps, 256)`` is timed
   for each in turn, several rounds (thread CPU time, robust to other load on the machine);
   medians and the ratio flow / Gaussian. With ``--compile``, both flows run ``torch.compile``
   of the chain of bijectors instead (a measurement, never the library's default; a separate
   run, as compilation in the same process disturbed the other rows' timings);
2. Pendulum-v1 with rl-baselines3-zoo's SAC settings (lr 1e-3, 20k steps): the final
   deterministic return (10 evaluation episodes) per seed, its mean over seeds, and whether any
   logged loss or any parameter became NaN or infinite;
3. MountainCarContinuous-v0, where exploration matters: zoo's SAC settings without gSDE (a flow
   has no gSDE; the Gaussian runs without it too, so that the protocol is identical).

Runs are interleaved (seed by seed, policy by policy), and each finished run is printed and
appended to a JSON-lines file, so a long run can be read while it goes. The tables are printed
and appended to BENCHMARKS.md at the end.

    python benchmarks/bench_sac.py                      # the full protocol (hours on 2 cores)
    python benchmarks/bench_sac.py --seeds 0 --envs Pendulum-v1 --steps 5000   # a quick check
    python benchmarks/bench_sac.py --timing-only                  # the speed ratio alone
    python benchmarks/bench_sac.py --timing-only --compile        # ... with torch.compile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import SAC
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import KVWriter, Logger
from stable_baselines3.common.monitor import Monitor

import flowpolicy

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

POLICIES = ("gaussian", "prelu", "spline")
TIMING_TITLE = "SAC: time per gradient step (bench_sac.py --timing-only)"
RETURNS_TITLE = "SAC: returns, flow vs Gaussian (bench_sac.py)"

# timing rows: (policy, how its actor runs)
TIMED = [("gaussian", ""), ("prelu", ""), ("prelu", "output_bound=None"), ("spline", "")]
COMPILED = [("gaussian", ""), ("prelu", "torch.compile"), ("spline", "torch.compile")]
TARGETS = {"prelu": "<= 1.15x", "spline": "<= 1.5x"}

# rl-baselines3-zoo hyperparams/sac.yml; MountainCarContinuous without use_sde / log_std_init
SETTINGS: dict[str, dict[str, Any]] = {
    "Pendulum-v1": dict(steps=20_000, kwargs=dict(learning_rate=1e-3), net_arch=None),
    "MountainCarContinuous-v0": dict(
        steps=50_000,
        kwargs=dict(
            learning_rate=3e-4,
            buffer_size=50_000,
            batch_size=512,
            ent_coef=0.1,
            train_freq=32,
            gradient_steps=32,
            gamma=0.9999,
            tau=0.01,
            learning_starts=0,
        ),
        net_arch=[64, 64],
    ),
}


class FiniteCheck(KVWriter):
    """Logger output that remembers whether every logged ``train/`` value was finite."""

    def __init__(self) -> None:
        self.finite = True
        self.dumps = 0

    def write(self, key_values: dict, key_excluded: dict, step: int = 0) -> None:
        self.dumps += 1
        for key, value in key_values.items():
            if key.startswith("train/") and isinstance(value, (int, float)):
                self.finite &= math.isfinite(value)


def make_model(
    policy: str, env_id: str, seed: int, settings: dict[str, Any], **flow_kwargs: Any
) -> SAC:
    """SAC with identical settings for every policy; only the actor's distribution differs."""
    policy_kwargs: dict[str, Any] = {}
    if settings["net_arch"] is not None:
        policy_kwargs["net_arch"] = settings["net_arch"]
    if policy == "gaussian":
        policy_class: Any = "MlpPolicy"
    else:
        policy_class = flowpolicy.FlowPolicy
        policy_kwargs.update(flow_kwargs=dict(nonlinearity=policy, layers=4, rank=1, **flow_kwargs))
    return SAC(
        policy_class,
        env_id,
        policy_kwargs=policy_kwargs,
        seed=seed,
        verbose=0,
        **settings["kwargs"],
    )


def timed_model(policy: str, variant: str, settings: dict[str, Any]) -> SAC:
    """A model whose actor runs as ``variant`` says: ``""`` (the default), ``"torch.compile"``
    (the chain of bijectors compiled, see :func:`compile_chain`) or ``"output_bound=None"``
    (without the default bound on what compounds over the layers: what that bound costs)."""
    extra = dict(output_bound=None) if variant == "output_bound=None" else {}
    model = make_model(policy, "Pendulum-v1", 0, settings, **extra)
    if variant == "torch.compile":
        compile_chain(model.actor.flow.layout)
    return model


def compile_chain(layout: Any) -> None:
    """Make the policy step of flows with this layout run ``torch.compile`` of the plain chain
    (raw parameters and noise to actions and log-densities). A measurement only: the library
    never compiles; this patches its distribution class for the layouts marked here."""
    distribution = flowpolicy.flows._LayeredFlowDistribution
    if not hasattr(distribution, "_eager_push_forward"):
        distribution._eager_push_forward = distribution.push_forward

        def push_forward(self, z):
            step = getattr(self.layout, "_compiled_step", None)
            if step is None or z.shape[:-1] != self.batch_shape:
                return self._eager_push_forward(z)
            return step(self.theta, z)

        distribution.push_forward = push_forward

    def step(theta, z):
        return distribution(layout, theta, False)._eager_push_forward(z)

    layout._compiled_step = torch.compile(step, dynamic=False)


def time_gradient_steps(
    steps: int, rounds: int, fill: int, rows: list[tuple[str, str]]
) -> dict[str, float]:
    """Median ms (thread CPU time) per gradient step on Pendulum (zoo settings), the models timed
    in turn; keyed by row name."""
    settings = dict(SETTINGS["Pendulum-v1"])
    settings["kwargs"] = dict(settings["kwargs"], learning_starts=fill)
    models = {
        f"{policy}, {variant}" if variant else policy: timed_model(policy, variant, settings)
        for policy, variant in rows
    }
    for model in models.values():
        model.learn(fill)  # fills the buffer; no gradient step before learning_starts
        model.train(gradient_steps=3, batch_size=256)  # warm-up (and compilation)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            start = time.thread_time()
            model.train(gradient_steps=steps, batch_size=256)
            times[name].append(1e3 * (time.thread_time() - start) / steps)
    return {name: statistics.median(values) for name, values in times.items()}


def run(policy: str, env_id: str, seed: int, steps: int, episodes: int) -> dict[str, Any]:
    settings = SETTINGS[env_id]
    model = make_model(policy, env_id, seed, settings)
    check = FiniteCheck()
    model.set_logger(Logger(folder=None, output_formats=[check]))
    start = time.perf_counter()
    model.learn(steps, log_interval=1)
    seconds = time.perf_counter() - start
    finite = check.finite and all(torch.isfinite(p).all() for p in model.policy.parameters())
    eval_env = Monitor(gym.make(env_id))
    eval_env.reset(seed=10_000 + seed)
    returns, _ = evaluate_policy(
        model, eval_env, n_eval_episodes=episodes, deterministic=True, return_episode_rewards=True
    )
    return dict(
        env=env_id,
        policy=policy,
        seed=seed,
        steps=steps,
        mean_return=float(np.mean(returns)),
        returns=[float(r) for r in returns],
        finite=bool(finite),
        steps_per_s=steps / seconds,
        minutes=seconds / 60,
    )


def returns_table(results: list[dict[str, Any]]) -> str:
    lines = [
        "| env | steps | policy | seeds | deterministic return, mean over seeds | per seed "
        "| minus Gaussian (relative) | all losses finite | env steps/s |",
        "|---|---:|---|---:|---:|---|---:|---|---:|",
    ]
    keys = sorted({(r["env"], r["steps"]) for r in results})
    for env_id, steps in keys:
        rows = {
            p: [r for r in results if (r["env"], r["steps"], r["policy"]) == (env_id, steps, p)]
            for p in POLICIES
        }
        base = np.mean([r["mean_return"] for r in rows["gaussian"]]) if rows["gaussian"] else None
        for policy in POLICIES:
            runs = rows[policy]
            if not runs:
                continue
            mean = float(np.mean([r["mean_return"] for r in runs]))
            std = float(np.std([r["mean_return"] for r in runs]))
            per_seed = ", ".join(f"{r['mean_return']:.1f}" for r in runs)
            # signed gap to the Gaussian, relative to |Gaussian| (returns are often negative)
            gap = "-" if base is None else f"{mean - base:+.1f}"
            if base is not None and abs(base) > 1:
                gap += f" ({100 * (mean - base) / abs(base):+.0f}%)"
            finite = "yes" if all(r["finite"] for r in runs) else "**NO**"
            speed = statistics.median(r["steps_per_s"] for r in runs)
            lines.append(
                f"| {env_id} | {steps} | {policy} | {len(runs)} | {mean:.1f} ± {std:.1f} | "
                f"{per_seed} | {gap} | {finite} | {speed:.0f} |"
            )
    return "\n".join(lines)


def timing_table(ms: dict[str, float], steps: int, rounds: int) -> str:
    lines = [
        f"Time per gradient step, Pendulum-v1 (batch 256, default networks, 4 flow layers, rank 1),"
        f" median of {rounds} interleaved rounds of {steps} steps (thread CPU time):",
        "",
        "| policy | ms per gradient step | ratio flow / Gaussian | target |",
        "|---|---:|---:|---|",
    ]
    for name, value in ms.items():
        target = TARGETS.get(name.split(",")[0], "")
        lines.append(f"| {name} | {value:.2f} | {value / ms['gaussian']:.2f}x | {target} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--envs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=None, help="Pendulum steps (default 20k)")
    parser.add_argument(
        "--mc-steps", type=int, default=None, help="MountainCarContinuous steps (default 50k)"
    )
    parser.add_argument("--episodes", type=int, default=10, help="evaluation episodes")
    parser.add_argument("--timing-steps", type=int, default=50)
    parser.add_argument("--timing-rounds", type=int, default=15)
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--timing-only", action="store_true", help="no training runs")
    parser.add_argument(
        "--compile", action="store_true", help="time the flows with torch.compile instead"
    )
    parser.add_argument("--jsonl", type=Path, default=Path("runs/bench_sac.jsonl"))
    parser.add_argument("--no-record", action="store_true", help="do not append to BENCHMARKS.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    steps_of = {
        "Pendulum-v1": args.steps or SETTINGS["Pendulum-v1"]["steps"],
        "MountainCarContinuous-v0": args.mc_steps or SETTINGS["MountainCarContinuous-v0"]["steps"],
    }
    args.jsonl.parent.mkdir(parents=True, exist_ok=True)

    sections, titles = [], []
    if not args.skip_timing:
        rows = COMPILED if args.compile else TIMED
        ms = time_gradient_steps(args.timing_steps, args.timing_rounds, 1000, rows)
        sections.append(timing_table(ms, args.timing_steps, args.timing_rounds))
        titles.append(TIMING_TITLE)
        print(sections[-1], flush=True)
        with args.jsonl.open("a") as f:
            f.write(json.dumps(dict(timing_ms=ms)) + "\n")

    results = []
    for env_id in [] if args.timing_only else args.envs:
        for seed in args.seeds:
            for policy in POLICIES:
                result = run(policy, env_id, seed, steps_of[env_id], args.episodes)
                results.append(result)
                print(json.dumps(result), flush=True)
                with args.jsonl.open("a") as f:
                    f.write(json.dumps(result) + "\n")
    if results:
        titles.append(RETURNS_TITLE)
        sections.append(
            f"Final deterministic return ({args.episodes} evaluation episodes per seed), "
            "identical SAC settings and seeds (zoo settings; MountainCarContinuous without gSDE):"
            "\n\n" + returns_table(results)
        )
        print(sections[-1])
    if args.no_record:
        return
    # one section per kind of result, so that a timing run leaves the returns in place
    for title, section in zip(titles, sections):
        record(title, section, 1)


if __name__ == "__main__":
    main()
