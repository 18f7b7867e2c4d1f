"""SAC + HER on LakeCrossingGoal-v0: a flow policy and SB3's Gaussian side by side.

Each seed trains SAC with ``HerReplayBuffer`` twice, with identical settings and seeds, once
with :class:`flowpolicy.MultiInputFlowPolicy` and once with SB3's ``MultiInputPolicy``; only the
actor differs. Every ``--eval-every`` steps both are evaluated on the same goals:

- random goals: ``--eval-episodes`` episodes with goals drawn from the environment's sector
  north of the lake (stochastic and deterministic actions): success, drowning, and the route
  of the successful episodes (``cw``: west of the lake, ``ccw``: east);
- the axis goal: the goal straight north of the start, ``(0, 1.7)``, where both routes are
  equally long: success and route split of stochastic rollouts.

Training adds Ornstein-Uhlenbeck action noise (``--ou-noise``, sigma 0.3; SB3's
``action_noise``, reset every episode) to both policies' actions: a drift that persists through
an episode carries the agent past the lake's equator, where SAC's own noise, uncorrelated from
step to step, left some seeds of both policies hovering beside the lake at 0% success
(``--ou-noise 0`` reproduces that). Evaluations use the policies alone, without the noise.

The table gives, per policy and seed, the first evaluation with stochastic success >= 90%,
and the final values. Finished runs are appended as JSON lines to ``--out``.

    python benchmarks/bench_her.py                    # 2 seeds x 20k steps
    python benchmarks/bench_her.py --shaping-weight 0  # the sparse reward (-1.5 per step)
    python benchmarks/bench_her.py --seeds 0 --steps 3000 --no-record   # a quick check
    # policies as separate processes side by side, then one table:
    python benchmarks/bench_her.py --policies flow --out runs/her_flow.jsonl --no-record &
    python benchmarks/bench_her.py --policies gaussian --out runs/her_gauss.jsonl --no-record
    python benchmarks/bench_her.py --table-from runs/her_flow.jsonl runs/her_gauss.jsonl
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
from stable_baselines3 import SAC, HerReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import OrnsteinUhlenbeckActionNoise

import flowpolicy.envs as envs  # registers LakeCrossingGoal-v0
from flowpolicy.sb3 import MultiInputFlowPolicy

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

TITLE = "SAC + HER on the goal-conditioned lake, flow vs Gaussian (bench_her.py)"
AXIS_GOAL = (0.0, 1.7)
ENV_KWARGS: dict[str, Any] = {}  # set from the command line (--shaping-weight, ...)
POLICIES = {"flow": MultiInputFlowPolicy, "gaussian": "MultiInputPolicy"}

# SAC + HER settings, as examples/zoo/sac.yml: rl-baselines3-zoo's FetchReach ones (lr 1e-3,
# batch 256, 'future' goals x4) with LakeCrossing-v0's gamma 0.9, 1000 random steps first, and
# copy_info_dict=True, since the environment's shaped reward reads the step's previous position
# from info when HER relabels goals
SETTINGS: dict[str, Any] = dict(
    learning_rate=1e-3,
    batch_size=256,
    gamma=0.9,
    learning_starts=1000,
    replay_buffer_class=HerReplayBuffer,
    replay_buffer_kwargs=dict(
        goal_selection_strategy="future", n_sampled_goal=4, copy_info_dict=True
    ),
)


def evaluate(
    model: SAC, n: int, seed: int, deterministic: bool, goal: tuple | None = None
) -> dict[str, float]:
    """Success, drowning and route shares over ``n`` episodes (``route_stats``)."""
    env = gym.make("LakeCrossingGoal-v0", **ENV_KWARGS)
    episodes = []
    options = None if goal is None else {"goal": goal}
    obs, info = env.reset(seed=seed, options=options)
    for _ in range(n):
        ret, done = 0.0, False
        while not done:
            action, _ = model.predict(obs, deterministic=deterministic)
            obs, reward, terminated, truncated, info = env.step(action)
            ret += float(reward)
            done = terminated or truncated
        episodes.append({**info, "return": ret})
        obs, info = env.reset(options=options)
    return envs.route_stats(episodes)


class Evaluation(BaseCallback):
    """Evaluate every ``every`` steps (random goals both ways, the axis goal stochastically)."""

    def __init__(self, every: int, episodes: int, seed: int) -> None:
        super().__init__()
        self.every, self.episodes, self.seed = every, episodes, seed
        self.history: list[dict[str, Any]] = []

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            n, seed = self.episodes, 10_000 + self.seed
            entry = {
                "timesteps": self.num_timesteps,
                "stochastic": evaluate(self.model, n, seed, deterministic=False),
                "deterministic": evaluate(self.model, n, seed, deterministic=True),
                "axis": evaluate(self.model, n, seed, deterministic=False, goal=AXIS_GOAL),
            }
            self.history.append(entry)
            s, d, a = entry["stochastic"], entry["deterministic"], entry["axis"]
            print(
                f"  {self.num_timesteps:>6} steps: success {s['success']:.2f} stochastic, "
                f"{d['success']:.2f} deterministic; axis goal {a['success']:.2f} "
                f"(cw {a['cw']:.2f} / ccw {a['ccw']:.2f})",
                flush=True,
            )
        return True


def _ou(result: dict[str, Any]) -> float:
    """The run's OU noise sigma (runs recorded before the option had none)."""
    return result.get("ou_noise", result.get("args", {}).get("ou_noise", 0.0))


def run(kind: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    policy_kwargs = dict(net_arch=[args.hidden, args.hidden])
    # temporally correlated exploration, reset every episode (as the zoo's noise_type)
    noise = OrnsteinUhlenbeckActionNoise(np.zeros(2), np.full(2, args.ou_noise))
    model = SAC(
        POLICIES[kind],
        gym.make("LakeCrossingGoal-v0", **ENV_KWARGS),
        policy_kwargs=policy_kwargs,
        seed=seed,
        action_noise=noise if args.ou_noise > 0 else None,
        **SETTINGS,
    )
    evaluation = Evaluation(args.eval_every, args.eval_episodes, seed)
    began = time.perf_counter()
    model.learn(args.steps, callback=evaluation, progress_bar=args.progress)
    seconds = time.perf_counter() - began
    reached = [h["timesteps"] for h in evaluation.history if h["stochastic"]["success"] >= 0.9]
    return {
        "policy": kind,
        "seed": seed,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "ou_noise": args.ou_noise,
        "seconds": seconds,
        "steps_to_90": reached[0] if reached else None,
        "history": evaluation.history,
    }


def table(results: list[dict[str, Any]], args: argparse.Namespace) -> str:
    lines = [
        "| policy | OU | seed | steps (evaluated every) | first eval with success >= 90% | "
        "success (stoch. / det.) | drowned (stoch.) | routes cw / ccw (stoch.) | "
        "axis goal: success, cw / ccw | minutes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        last = r["history"][-1]
        s, d, a = last["stochastic"], last["deterministic"], last["axis"]
        first = "not reached" if r["steps_to_90"] is None else f"{r['steps_to_90']} steps"
        every = r.get("eval_every") or r["args"]["eval_every"]
        lines.append(
            f"| {r['policy']} | {_ou(r)} | {r['seed']} | {r['steps']} ({every}) | {first} | "
            f"{s['success']:.2f} / "
            f"{d['success']:.2f} | {s['drowned']:.2f} | {s['cw']:.2f} / {s['ccw']:.2f} | "
            f"{a['success']:.2f}, {a['cw']:.2f} / {a['ccw']:.2f} | {r['seconds'] / 60:.1f} |"
        )
    for kind, ou in dict.fromkeys((r["policy"], _ou(r)) for r in results):
        runs = [r for r in results if (r["policy"], _ou(r)) == (kind, ou)]
        finals = [r["history"][-1]["stochastic"]["success"] for r in runs]
        reached = sum(r["steps_to_90"] is not None for r in runs)
        lines.append(
            f"| {kind}: median over seeds; seeds reaching 90% | {ou} | | | "
            f"{reached} of {len(runs)} | {statistics.median(finals):.2f} | | | | |"
        )
    note = (
        f"\nEvaluated on "
        f"{args.eval_episodes} episodes (random goals of the environment's sector, the same "
        f"goals for both policies; the axis goal {AXIS_GOAL}); LakeCrossingGoal-v0 with "
        f"{ENV_KWARGS or 'its default reward'}; SAC + HerReplayBuffer ('future', 4 goals, "
        f"copy_info_dict), lr 1e-3, batch 256, gamma 0.9, ent_coef {args.ent_coef}, "
        f"Ornstein-Uhlenbeck action noise of sigma 'OU' in training (SB3's, theta 0.15, dt 0.01, "
        f"reset every episode), "
        f"{args.hidden}x{args.hidden} "
        f"networks, 1000 random steps first. The flow is MultiInputFlowPolicy at its defaults "
        f"(4 PReLU layers, rank 1). One torch thread; the 2-core machine was shared with other "
        f"jobs, so the minutes are indicative only.\n"
    )
    return "\n".join(lines) + "\n" + note


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=20_000)
    parser.add_argument("--eval-every", type=int, default=2_000)
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--hidden", type=int, default=64, help="as examples/zoo/sac.yml")
    parser.add_argument("--policies", nargs="+", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--out", default="runs/bench_her.jsonl")
    parser.add_argument("--progress", action="store_true", help="SB3's progress bar")
    parser.add_argument("--no-record", action="store_true", help="do not write BENCHMARKS.md")
    parser.add_argument(
        "--table-from",
        nargs="+",
        metavar="JSONL",
        help="train nothing: tabulate (and record) runs from these --out files, e.g. of the "
        "policies run as separate processes side by side",
    )
    for name in ("shaping_weight", "step_cost", "home_bonus", "lake_penalty"):
        parser.add_argument(
            f"--{name.replace('_', '-')}", type=float, help=f"the env's {name} (its default)"
        )
    parser.add_argument("--ent-coef", default="auto", help="SAC's ent_coef, e.g. auto_0.1")
    parser.add_argument(
        "--ou-noise",
        type=float,
        default=0.3,
        help="sigma of Ornstein-Uhlenbeck action noise added in training (0: none)",
    )
    args = parser.parse_args()
    for name in ("shaping_weight", "step_cost", "home_bonus", "lake_penalty"):
        if getattr(args, name) is not None:
            ENV_KWARGS[name] = getattr(args, name)
    SETTINGS["ent_coef"] = args.ent_coef
    torch.set_num_threads(1)

    if args.table_from:
        results = [json.loads(line) for path in args.table_from for line in open(path)]
        finish(results, args)
        return
    results = []
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # interleaved, so that a stopped run still compares both
        for kind in args.policies:
            print(f"{kind}, seed {seed}: {args.steps} steps", flush=True)
            result = run(kind, seed, args)
            results.append(result)
            with open(args.out, "a") as f:
                f.write(json.dumps({**result, "args": vars(args)}, default=float) + "\n")
    finish(results, args)


def finish(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    text = table(results, args)
    print(text)
    if not args.no_record:
        record(TITLE, text)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
