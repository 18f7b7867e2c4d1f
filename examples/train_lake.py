r"""SAC on LakeCrossing: a flow policy and SB3's Gaussian policy, side by side.

Both agents get the same seed and SAC settings; only the actor differs: a
:class:`flowpolicy.FlowPolicy` (a state-conditioned spline flow squashed by tanh) or SB3's
tanh-squashed diagonal Gaussian.
Going around the lake clockwise ("cw", west) or counter-clockwise ("ccw", east) is equally good;
straight ahead drowns. Two settings keep both routes alive:

* The task's mirror symmetry ``M = env.unwrapped.reflection()``, used twice: the replay buffer
  stores every transition with its mirror image, and the critic is symmetric by construction,
  :math:`Q(s, a) = \frac12[Q'(s, a) + Q'(Ms, Ma)]`. A soft actor optimal for its critic keeps a
  mass ratio :math:`e^{-\Delta Q/\alpha}` between the routes, and at the start (on the mirror
  axis) :math:`\Delta Q = 0` exactly. Without the symmetry, every seed ends on one route.
* :math:`\gamma = 0.9`, not SB3's 0.99: at 0.99, hovering until the time limit is worth about
  :math:`-1.5/(1-\gamma) = -150` to the critic, far below drowning (-25), so an agent that has
  not found home while the entropy coefficient decays learns to walk into the lake.

Writes ``flow.zip`` and ``gaussian.zip`` (``SAC.load`` reads them), ``summary.json``,
``rollouts.png`` and ``learning_curves.png`` to ``--out``. The research knobs and the
multi-seed runs are in ``experiments/lake_sac.py``.

Run::

    python examples/train_lake.py --out runs/demo
    python examples/train_lake.py --out runs/lake_tiny --tiny
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import gymnasium as gym
import numpy as np
import torch
import tyro
from matplotlib.figure import Figure
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import set_random_seed

import flowpolicy.envs as envs  # registers LakeCrossing-v0
from flowpolicy import FlowPolicy
from flowpolicy.diagnostics import QGapCallback, side_mass
from flowpolicy.symmetry import MirrorReplayBuffer, SymmetricSACPolicy


@dataclass
class Args:
    """SAC on LakeCrossing, a flow policy and SB3's Gaussian policy side by side."""

    out: str = "runs/lake"
    """output folder (models, summary.json, figures)"""
    seed: int = 0
    """seed of the networks, the environment and the rollouts"""
    policy: Literal["both", "flow", "gaussian"] = "both"
    """which agents to train"""
    steps: int = 8000
    """environment steps per agent"""
    gamma: float = 0.9
    """discount (see the module docstring)"""
    learning_starts: int = 500
    """uniform-random steps before learning"""
    hidden: int = 256
    """width of the two hidden layers of the actor and the critics"""
    eval_every: int = 1000
    """environment steps between evaluations (the learning curves)"""
    eval_episodes: int = 20
    """stochastic episodes per evaluation"""
    rollouts: int = 200
    """final stochastic rollouts per agent (and a quarter as many deterministic ones)"""
    tiny: bool = False
    """a tiny budget, for tests"""


# a spline flow that starts as the identity map: the initial policy prefers no side
FLOW_KWARGS = dict(layers=4, rank=1, nonlinearity="spline", init_strength=0.0, head_scale=0.01)


def start_mass(model: SAC, lake, resolution: int = 160) -> dict[str, float]:
    """The policy's exact action mass at the start: left of the lake centre (cw), right, gap."""
    start = lake.start[None].astype(np.float32)
    masses = side_mass(model, start, direction=lake.lake_center - start, resolution=resolution)
    return {key: float(value[0]) for key, value in masses.items()}


class LakeEval(BaseCallback):
    """Every ``every`` steps: stochastic rollouts (return, success, routes) and the start mass."""

    def __init__(self, every: int, episodes: int) -> None:
        super().__init__()
        self.every, self.episodes, self.history = every, episodes, []
        self.env = gym.make("LakeCrossing-v0")

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            with torch.random.fork_rng():  # evaluation draws no noise from training's stream
                n, seed = self.episodes, len(self.history)
                episodes = envs.rollout(self.env, self.model, n, seed, deterministic=False)
                mass = start_mass(self.model, self.env.unwrapped, resolution=64)
            entry = {"timesteps": self.num_timesteps, **envs.route_stats(episodes)}
            self.history.append({**entry, "cw_mass_start": mass["left"] / mass["total"]})
            print({k: round(v, 3) for k, v in self.history[-1].items()}, flush=True)
        return True


def main() -> None:
    args = tyro.cli(Args)
    if args.tiny:
        args.steps, args.learning_starts, args.eval_every = 150, 100, 50
        args.eval_episodes, args.rollouts, args.hidden = 1, 4, 32
    torch.set_num_threads(1)
    set_random_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    kinds = ("flow", "gaussian") if args.policy == "both" else (args.policy,)

    lake = gym.make("LakeCrossing-v0").unwrapped
    mirror = lake.reflection()  # x -> 2 * axis - x, lateral action -> -lateral action
    # a mirrored pair of actions at the start, the expert's first cw step and its image: the
    # critic's dQ/alpha between them (0 for a symmetric critic) sets the actor's route odds
    start = lake.start[None].astype(np.float32)
    cw_step = envs.LakeExpert(lake, side="cw")(start[0])[None]

    summary, episodes, histories = {"args": asdict(args)}, {}, {}
    for kind in kinds:
        # symmetry: a critic symmetric by construction, Q(s, a) = [Q'(s, a) + Q'(Ms, Ma)] / 2
        policy_kwargs = dict(net_arch=[args.hidden, args.hidden], symmetry=mirror)
        if kind == "flow":
            policy_kwargs["flow_kwargs"] = FLOW_KWARGS
        model = SAC(
            FlowPolicy if kind == "flow" else SymmetricSACPolicy,
            gym.make("LakeCrossing-v0"),
            learning_rate=1e-3,
            gamma=args.gamma,
            learning_starts=args.learning_starts,
            replay_buffer_class=MirrorReplayBuffer,
            replay_buffer_kwargs=dict(symmetry=mirror),
            policy_kwargs=policy_kwargs,
            seed=args.seed,
        )
        evaluation = LakeEval(args.eval_every, args.eval_episodes)
        qgap = QGapCallback(start, cw_step, mirror.action(cw_step), every=args.eval_every)
        print(f"training SAC with the {kind} policy for {args.steps} steps")
        began = time.perf_counter()
        model.learn(args.steps, callback=[evaluation, qgap])
        seconds = time.perf_counter() - began
        model.save(out / f"{kind}.zip")
        env = gym.make("LakeCrossing-v0")
        n, seed = args.rollouts, args.seed + 100
        episodes[kind] = envs.rollout(env, model, n, seed, deterministic=False)
        det = envs.rollout(env, model, n // 4, seed + 100, deterministic=True)
        summary[kind] = s = {
            "stochastic": envs.route_stats(episodes[kind]),
            "deterministic": envs.route_stats(det),
            "start_mass": start_mass(model, lake),
            "dq_over_alpha_start": qgap.history[-1]["dq_over_alpha"][0],
            "alpha": qgap.history[-1]["alpha"],
            "train_seconds": seconds,
            "steps_per_second": args.steps / seconds,
        }
        histories[kind] = [e | q for e, q in zip(evaluation.history, qgap.history)]
        print(f"{kind}: {json.dumps(s)}", flush=True)
    summary["curves"] = histories
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # ---- figure 1: the final stochastic rollouts of each agent, coloured by route
    fig = Figure(figsize=(5.2 * len(kinds), 5.6))
    for ax, kind in zip(fig.subplots(1, len(kinds), squeeze=False)[0], kinds):
        envs.draw_lake(ax, lake)
        paths = [e["positions"] for e in episodes[kind]]
        envs.plot_trajectories(ax, paths, [e["label"] for e in episodes[kind]], alpha=0.35)
        st = summary[kind]["stochastic"]
        ax.set_title(
            f"SAC + {kind} policy: {len(paths)} stochastic rollouts\nsuccess {st['success']:.0%}"
            f" (cw {st['cw']:.0%}, ccw {st['ccw']:.0%}), drowned {st['drowned']:.0%}",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(out / "rollouts.png", dpi=120)

    # ---- figure 2: learning curves
    panels = {
        "stochastic return": ["return"],
        "success and cw share (stochastic)": ["success", "cw"],
        "exact cw mass at the start": ["cw_mass_start"],
        "ΔQ/α at the start, cw step vs its mirror image": ["dq_over_alpha"],
    }
    fig = Figure(figsize=(17, 3.8))
    for ax, (title, keys) in zip(fig.subplots(1, len(panels)), panels.items()):
        for color, kind in zip(("C0", "C1"), kinds):
            steps = [h["timesteps"] for h in histories[kind]]
            for key in keys:
                values = [np.ravel(h[key])[0] for h in histories[kind]]
                style = "--" if key == "cw" else "-"
                ax.plot(steps, values, style, color=color, label=f"{kind} {key}")
        if keys == ["dq_over_alpha"]:  # on the scale of a route's odds: 0 by construction
            ax.set_ylim(-1, 1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("environment steps")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "learning_curves.png", dpi=110)
    print(f"wrote models, summary.json, rollouts.png and learning_curves.png to {out}")


if __name__ == "__main__":
    main()
