r"""Behaviour cloning of a two-route expert on LakeCrossing: a flow policy against a Gaussian.

The expert goes around the lake on a side it picks 50/50 independently of the start, so its
actions given the state are bimodal: from the start, half head north-west and half north-east.
Two SAC models are pretrained on the demonstrations with :func:`flowpolicy.pretrain` (maximum
likelihood, the library's defaults): one with SB3's tanh-squashed diagonal Gaussian actor, one
with a spline :class:`flowpolicy.FlowPolicy`. The Gaussian covers both clusters with one bump:
its density fills the gap between them and its mean points straight into the lake. The flow
puts its mass on the two clusters. ``model.learn`` would then fine-tune either model.

Measured: the exact mass in the gap (actions heading at the lake centre) at the start, and
rollouts with sampled actions and with each policy's deterministic action (the Gaussian's mean,
as SB3 takes it; the flow's high-density action, never the image of the base mean, which lies in
the valley between the modes). ``experiments/lake_bc.py`` has the knobs and more measurements.

Run::

    python examples/behaviour_cloning.py --out runs/bc
    python examples/behaviour_cloning.py --out runs/bc_tiny --tiny
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import tyro
from matplotlib.figure import Figure
from stable_baselines3 import SAC

import flowpolicy.envs as envs  # registers LakeCrossing-v0
from flowpolicy.diagnostics import action_distribution, density_grid, side_mass
from flowpolicy.pretraining import pretrain
from flowpolicy.sb3 import FlowPolicy


@dataclass
class Args:
    """Behaviour cloning of a two-route expert on LakeCrossing, flow vs Gaussian."""

    out: str = "runs/behaviour_cloning"
    """output folder (summary.json, behaviour_cloning.png)"""
    seed: int = 0
    """seed of the demonstrations, the networks and the rollouts"""
    demos: int = 200
    """expert episodes (about 26 transitions each)"""
    margin: float = 0.01
    """the expert's distance from the shore (collect_demonstrations' default)"""
    rollouts: int = 200
    """episodes per policy and action mode"""
    tiny: bool = False
    """a tiny budget, for tests"""


def main() -> None:
    args = tyro.cli(Args)
    budget = dict(steps=20) if args.tiny else {}  # else pretrain's default
    if args.tiny:
        args.demos, args.rollouts = 10, 4
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    # ---- demonstrations: the expert's side is drawn independently of the start
    demos = envs.collect_demonstrations(args.demos, seed=args.seed, margin=args.margin)
    print(f"{len(demos)} transitions, expert routes cw {np.mean(demos.episode_routes == 'cw'):.2f}")

    # ---- two SAC models, pretrained by maximum likelihood on the demonstrations
    env = gym.make("LakeCrossing-v0")
    flow_kwargs = dict(nonlinearity="spline")  # a PReLU chain fills the gap like the Gaussian
    policies = {
        "flow": SAC(FlowPolicy, env, policy_kwargs=dict(flow_kwargs=flow_kwargs), seed=args.seed),
        "gaussian": SAC("MlpPolicy", env, seed=args.seed),
    }
    nll = {}
    for name, model in policies.items():
        losses = pretrain(model, demos.observations, demos.actions, seed=args.seed, **budget)
        nll[name] = float(np.mean(losses[-100:]))
        print(f"{name}: final negative log-likelihood {nll[name]:.3f}")

    # ---- the exact mass at the start, and rollouts with sampled and deterministic actions
    lake = env.unwrapped
    start = lake.start[None].astype(np.float32)
    masses, episodes = {}, {}
    for name, policy in policies.items():
        m = side_mass(policy, start, direction=lake.lake_center - start, gap=0.2, resolution=200)
        masses[name] = {"start": {key: float(value[0]) for key, value in m.items()}}
        for mode in ("stochastic", "deterministic"):
            det, n, seed = mode == "deterministic", args.rollouts, args.seed + 1
            episodes[f"{name}_{mode}"] = envs.rollout(env, policy, n, seed, deterministic=det)
    rollouts = {key: envs.route_stats(value) for key, value in episodes.items()}
    summary = {
        "args": asdict(args),
        "expert": {"success": float(demos.episode_success.mean())},
        "rollouts": rollouts,
        "masses": masses,
        "final_nll": nll,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps({"rollouts": rollouts, "masses": masses}, indent=1))

    # ---- one figure: demonstrations, both densities at the start, rollouts
    fig = Figure(figsize=(13, 8.5))
    axes = fig.subplots(2, 3)
    envs.draw_lake(axes[0, 0], lake)
    shown = range(min(args.demos, 60))
    paths = [demos.observations[demos.episode_index == e] for e in shown]
    envs.plot_trajectories(axes[0, 0], paths, list(demos.episode_routes[: len(paths)]), alpha=0.4)
    axes[0, 0].set_title("expert demonstrations (side 50/50, independent of the start)", fontsize=9)
    near = demos.actions[np.linalg.norm(demos.observations - start, axis=1) < 0.06]
    for ax, name in zip(axes[0, 1:], ("gaussian", "flow")):
        # a 12-nat window of the log-density, and samples: a clone can be narrower than a cell
        lp = density_grid(policies[name], start, 200)[0][0].numpy()
        ax.imshow(lp, origin="lower", extent=(-1, 1, -1, 1), cmap="magma", vmin=lp.max() - 12)
        with torch.no_grad():
            samples = action_distribution(policies[name], start).sample((300,))[:, 0].numpy()
        best = policies[name].predict(start[0], deterministic=True)[0]
        ax.scatter(*samples.T, s=3, c="white", alpha=0.6, label="samples")
        ax.scatter(*near.T, s=6, c="cyan", label="expert actions near the start")
        ax.plot(*best, marker="*", color="lime", markersize=14, label="deterministic action")
        ax.annotate("", xy=(0, 0.95), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="w"))
        gap = masses[name]["start"]["gap"]
        ax.set_title(f"{name}: log-density at the start, gap mass {gap:.1%}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    shown = ["gaussian_stochastic", "gaussian_deterministic", "flow_stochastic"]
    for ax, key in zip(axes[1], shown):
        envs.draw_lake(ax, lake)
        paths, labels = zip(*((e["positions"], e["label"]) for e in episodes[key][:100]))
        envs.plot_trajectories(ax, list(paths), list(labels), alpha=0.4)
        s = rollouts[key]
        title = f"{key.replace('_', ' ')}: success {s['success']:.0%}, drowned {s['drowned']:.0%}"
        ax.set_title(title, fontsize=9)
    fig.suptitle(
        "Behaviour cloning of a two-route expert: the Gaussian fills the gap and its mean walks "
        f"into the lake; the flow takes one route or the other (flow deterministic: success "
        f"{rollouts['flow_deterministic']['success']:.0%})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(out / "behaviour_cloning.png", dpi=110)
    print(f"wrote summary.json and behaviour_cloning.png to {out}")


if __name__ == "__main__":
    main()
