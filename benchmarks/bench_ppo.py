"""PPO with FlowActorCriticPolicy (PReLU, spline) side by side with SB3's Gaussian MlpPolicy.

One torch thread, one process, identical settings and seeds:

1. time per PPO update (``--timing-only`` does this part alone): each model collects one
   rollout on Pendulum-v1 with rl-baselines3-zoo's PPO settings (4 envs x 1024 steps, batch 64,
   10 epochs), then ``model.train()`` (one update: 640 minibatches, each through the flow's
   inverse for the ratio) is timed for each model in turn, several rounds (thread CPU time,
   robust to other load); medians and the ratio flow / Gaussian. The rollout's time per
   environment step (sampling plus the log-prob of the stored action) is reported too;
2. Pendulum-v1 with zoo's PPO settings (1e5 steps; the zoo's Gaussian uses gSDE, which a flow
   has not: ``gaussian-sde`` is the zoo's, ``gaussian`` the same without gSDE), final
   deterministic return over 10 episodes, and the learning curve (mean return of the training
   episodes that ended in each rollout). The flows use FlowActorCriticPolicy's defaults
   (``head_gain=0.1``; with a plain head, ``head_gain=1``, the flow did not learn Pendulum at
   these settings: -1303 after 5e4 steps, 2 seeds);
3. LakeCrossing-v0 (no zoo entry: 4 envs x 256 steps, batch 64, 10 epochs, lr 3e-4): success,
   drowned and route split of sampled and of deterministic rollouts (envs/rollout.py), return.

Each finished run is appended to ``<out>/results.jsonl``; the tables go to BENCHMARKS.md and the
learning curves to ``docs/figures/ppo_curves.png``.

    python benchmarks/bench_ppo.py --timing-only
    python benchmarks/bench_ppo.py --envs Pendulum-v1 --policies gaussian-sde prelu
    python benchmarks/bench_ppo.py --seeds 0 --steps 8192      # a quick check
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
from stable_baselines3 import PPO
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.monitor import Monitor

import flowpolicy  # noqa: F401  (registers LakeCrossing-v0)
from flowpolicy.envs.rollout import rollout, route_stats
from flowpolicy.onpolicy import FlowActorCriticPolicy

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TIMING_TITLE = "PPO: time per update, flow vs Gaussian (bench_ppo.py --timing-only)"
RETURNS_TITLE = "PPO: Pendulum-v1 and LakeCrossing-v0, flow vs Gaussian (bench_ppo.py)"
TARGETS = {"prelu": "<= 1.5x", "spline": "<= 2x"}
POLICIES = ("gaussian-sde", "gaussian", "prelu", "spline")

# rl-baselines3-zoo hyperparams/ppo.yml (Pendulum-v1); LakeCrossing has no zoo entry
SETTINGS: dict[str, dict[str, Any]] = {
    "Pendulum-v1": dict(
        steps=100_000,
        n_envs=4,
        kwargs=dict(
            n_steps=1024,
            gae_lambda=0.95,
            gamma=0.9,
            n_epochs=10,
            ent_coef=0.0,
            learning_rate=1e-3,
            clip_range=0.2,
        ),
    ),
    "LakeCrossing-v0": dict(
        steps=20_000,
        n_envs=4,
        kwargs=dict(n_steps=256, batch_size=64, n_epochs=10, learning_rate=3e-4, gamma=0.99),
    ),
}


def make_model(policy: str, env_id: str, seed: int) -> PPO:
    """PPO with the env's settings; only the action distribution (and gSDE) differs."""
    settings = SETTINGS[env_id]
    env = make_vec_env(env_id, n_envs=settings["n_envs"], seed=seed)
    kwargs: dict[str, Any] = dict(settings["kwargs"])
    if policy.startswith("gaussian"):
        policy_class: Any = "MlpPolicy"
        if policy == "gaussian-sde":
            kwargs.update(use_sde=True, sde_sample_freq=4)
    else:
        policy_class = FlowActorCriticPolicy
        kwargs["policy_kwargs"] = dict(flow_kwargs=dict(nonlinearity=policy, layers=4, rank=1))
    return PPO(policy_class, env, seed=seed, verbose=0, **kwargs)


def time_updates(policies: list[str], rounds: int) -> dict[str, dict[str, float]]:
    """Median ms per PPO update and per environment step of the rollout, per policy."""
    models, collect = {}, {}
    for policy in policies:
        model = make_model(policy, "Pendulum-v1", 0)
        _, callback = model._setup_learn(10**6, None)
        start = time.thread_time()
        model.collect_rollouts(model.env, callback, model.rollout_buffer, model.n_steps)
        collect[policy] = 1e3 * (time.thread_time() - start) / model.rollout_buffer.buffer_size
        models[policy] = model
    times: dict[str, list[float]] = {policy: [] for policy in policies}
    for _ in range(rounds):
        for policy, model in models.items():
            start = time.thread_time()
            model.train()
            times[policy].append(1e3 * (time.thread_time() - start))
    return {
        p: dict(update=statistics.median(times[p]), step=collect[p] / models[p].n_envs)
        for p in policies
    }


def timing_table(times: dict[str, dict[str, float]], rounds: int) -> str:
    base = times.get("gaussian", next(iter(times.values())))
    lines = [
        "| policy | ms / PPO update | x Gaussian | target | ms / env step (rollout) | x Gaussian |",
        "|---|---|---|---|---|---|",
    ]
    for policy, t in times.items():
        lines.append(
            f"| {policy} | {t['update']:.0f} | {t['update'] / base['update']:.2f}x | "
            f"{TARGETS.get(policy, '')} | {t['step']:.3f} | {t['step'] / base['step']:.2f}x |"
        )
    note = (
        f"\nPendulum-v1, zoo settings (4 envs x 1024 steps, batch 64, 10 epochs: 640 "
        f"minibatches per update), flows of 4 layers, rank 1; median of {rounds} rounds, thread "
        f"CPU time. Machine shared with other jobs (2 cores, ~6 processes)."
    )
    return "\n".join(lines) + "\n" + note


class CurveCallback(BaseCallback):
    """Mean return of the training episodes that ended in each rollout: the learning curve."""

    def __init__(self) -> None:
        super().__init__()
        self.curve: list[tuple[int, float]] = []
        self._returns: list[float] = []

    def _on_step(self) -> bool:
        self._returns += [i["episode"]["r"] for i in self.locals["infos"] if "episode" in i]
        return True

    def _on_rollout_end(self) -> None:
        if self._returns:
            self.curve.append((self.num_timesteps, float(np.mean(self._returns))))
        self._returns = []


def run(policy: str, env_id: str, seed: int, steps: int, out: Path) -> dict[str, Any]:
    model = make_model(policy, env_id, seed)
    curve = CurveCallback()
    start = time.perf_counter()
    model.learn(steps, callback=curve)
    minutes = (time.perf_counter() - start) / 60
    model.save(out / f"{env_id}-{policy}-{seed}")  # to evaluate again without training
    result: dict[str, Any] = dict(
        env=env_id, policy=policy, seed=seed, steps=steps, minutes=minutes, curve=curve.curve
    )
    result["finite"] = bool(all(torch.isfinite(p).all() for p in model.policy.parameters()))
    eval_env = Monitor(gym.make(env_id))
    if env_id == "LakeCrossing-v0":
        for mode, deterministic in (("sampled", False), ("deterministic", True)):
            episodes = rollout(
                eval_env, model, 100, seed=10_000 + seed, deterministic=deterministic
            )
            result[mode] = route_stats(episodes)
        result["return"] = result["deterministic"]["return"]
    else:
        eval_env.reset(seed=10_000 + seed)
        returns, _ = evaluate_policy(model, eval_env, 10, deterministic=True)
        result["return"] = float(returns)
    return result


def median_range(values: list[float], fmt: str = "{:.0f}") -> str:
    return f"{fmt.format(np.median(values))} [{fmt.format(min(values))}, {fmt.format(max(values))}]"


def returns_table(results: list[dict[str, Any]], figure: str) -> str:
    lines = [
        "| env | policy | seeds | final return (det.), median [min, max] | return sampled "
        "| success sampled / det. | cw / ccw / drowned (sampled) | minutes per run |",
        "|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["env"], r["policy"]) for r in results}, key=lambda k: (k[0], k[1]))
    for env_id, policy in keys:
        runs = [r for r in results if r["env"] == env_id and r["policy"] == policy]
        lake = "sampled" in runs[0]
        success = route = sampled = "-"
        if lake:
            success = (
                f"{median_range([r['sampled']['success'] for r in runs], '{:.2f}')} / "
                f"{median_range([r['deterministic']['success'] for r in runs], '{:.2f}')}"
            )
            sampled = median_range([r["sampled"]["return"] for r in runs], "{:.1f}")
            route = " / ".join(
                f"{np.median([r['sampled'][k] for r in runs]):.2f}"
                for k in ("cw", "ccw", "drowned")
            )
        lines.append(
            f"| {env_id} | {policy} | {len(runs)} | "
            f"{median_range([r['return'] for r in runs], '{:.1f}')} | {sampled} | {success} | "
            f"{route} | "
            f"{np.median([r['minutes'] for r in runs]):.1f} |"
        )
    steps = {r["env"]: r["steps"] for r in results}
    note = (
        f"\nSteps: {steps}. Pendulum-v1: zoo PPO settings; gaussian-sde is the zoo's (gSDE), "
        f"the others run without gSDE. Final return: 10 deterministic episodes (Pendulum), 100 "
        f"(lake, envs/rollout.py, medians over seeds of the route shares). Learning curves: "
        f"{figure}. Machine shared with other jobs (2 cores, ~6 processes)."
    )
    return "\n".join(lines) + "\n" + note


def plot_curves(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    envs = sorted({r["env"] for r in results})
    fig, axes = plt.subplots(1, len(envs), figsize=(5 * len(envs), 3.5), squeeze=False)
    for ax, env_id in zip(axes[0], envs):
        for policy in POLICIES:
            runs = [r for r in results if r["env"] == env_id and r["policy"] == policy]
            if not runs:
                continue
            length = min(len(r["curve"]) for r in runs)
            steps = np.array([s for s, _ in runs[0]["curve"][:length]])
            values = np.array([[v for _, v in r["curve"][:length]] for r in runs])
            color = f"C{POLICIES.index(policy)}"  # one color per policy in every panel
            label = f"{policy} ({len(runs)} seeds)"
            ax.plot(steps, np.median(values, 0), color=color, label=label)
            ax.fill_between(steps, values.min(0), values.max(0), color=color, alpha=0.2)
        ax.set(title=f"PPO, {env_id}", xlabel="environment steps", ylabel="training return")
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--timing-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--envs", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    parser.add_argument("--steps", type=int, default=None, help="override the env's budget")
    parser.add_argument("--out", default="runs/bench_ppo")
    parser.add_argument("--reuse", action="store_true", help="tabulate <out>/results.jsonl only")
    parser.add_argument("--tag", default="", help="appended to the recorded title (a budget)")
    parser.add_argument("--no-record", action="store_true", help="print, skip BENCHMARKS.md")
    parser.add_argument("--figure", default=str(ROOT / "docs/figures/ppo_curves.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.timing_only:
        policies = ["gaussian"] + [p for p in ("prelu", "spline") if p in args.policies]
        table = timing_table(time_updates(policies, args.rounds), args.rounds)
        print(table)
        if not args.no_record:
            record(TIMING_TITLE, table, threads=1)
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    if not args.reuse:
        for env_id in args.envs:
            for seed in args.seeds:
                for policy in args.policies:
                    steps = args.steps or SETTINGS[env_id]["steps"]
                    result = run(policy, env_id, seed, steps, out)
                    print(json.dumps({k: v for k, v in result.items() if k != "curve"}), flush=True)
                    with results_file.open("a") as f:
                        f.write(json.dumps(result) + "\n")
    results = [json.loads(line) for line in results_file.read_text().splitlines()]
    results = [r for r in results if r["env"] in args.envs and r["policy"] in args.policies]
    figure = Path(args.figure)
    table = returns_table(
        results, str(figure.relative_to(ROOT) if figure.is_relative_to(ROOT) else figure)
    )
    print(table)
    plot_curves(results, figure)
    if not args.no_record:
        title = f"{RETURNS_TITLE}, {args.tag}" if args.tag else RETURNS_TITLE
        record(title, table, threads=1)


if __name__ == "__main__":
    main()
