r"""Behaviour cloning from two-route demonstrations on LakeCrossing: flow vs Gaussian policy.

The expert (:func:`flowpolicy.envs.expert.collect_demonstrations`) goes around the lake on a
side it picks 50/50 *independently of the start*, so its actions are genuinely bimodal given
the state: from the start, half go north-west and half north-east. Both policies are fitted
by maximum likelihood,

.. math:: \max_\theta \frac{1}{N}\sum_i \log \pi_\theta(a_i \mid s_i),

with a tanh-squashed diagonal Gaussian MLP (SB3's SAC actor) and a state-conditioned spline
:class:`~flowpolicy.ConditionalFlow` (``squash=True``). The Gaussian must cover both clusters
with one bump, so its density fills the gap between them and its mean points straight into
the lake; the flow puts its mass on the two clusters. Measured: the exact mass in the gap (the
strip of actions heading at the lake centre, by grid integration) at the start and along the
expert's paths; rollouts with sampled actions and with each policy's deterministic action
(Gaussian: its mean; flow: a high-density action, never the image of the base mean, which lies
in the valley between the modes).

Run::

    python examples/behaviour_cloning.py --out runs/bc --seed 0
    python examples/behaviour_cloning.py --out runs/bc_tiny --tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")
import gymnasium as gym  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.distributions import Independent, Normal  # noqa: E402
from tqdm import trange  # noqa: E402

import flowpolicy  # noqa: E402, F401  (registers LakeCrossing-v0)
from flowpolicy import (  # noqa: E402
    ConditionalFlow,
    FlowDistribution,
    envs,  # noqa: E402
)
from flowpolicy.bijectors import Tanh  # noqa: E402
from flowpolicy.diagnostics import density_grid, side_mass  # noqa: E402
from flowpolicy.sb3 import FlowActor  # noqa: E402


@dataclass
class Args:
    out: str = "runs/behaviour_cloning"
    """output folder (figures, summary.json)"""
    seed: int = 0
    """seed of the demonstrations, the networks and the rollouts"""
    demos: int = 200
    """expert episodes (each ~26 transitions, the side 50/50 independent of the start)"""
    margin: float = 0.05
    """the expert's distance from the shore (at 0.01 small cloning errors drown)"""
    steps: int = 6000
    """Adam steps of maximum likelihood per policy (cosine-decayed learning rate)"""
    normalize: bool = True
    """standardize observations with the demonstrations' mean and std"""
    batch_size: int = 256
    """transitions per step"""
    lr: float = 1e-3
    """Adam learning rate"""
    hidden: int = 256
    """width of both policies' two hidden layers"""
    flow_layers: int = 4
    """nonlinear layers of the flow"""
    nonlinearity: str = "spline"
    """flow nonlinearity: spline or prelu (prelu fills the gap like the Gaussian, DESIGN §3)"""
    init_strength: float = 0.0
    """spread of the flow's initialization (0 = identity map)"""
    rollouts: int = 200
    """episodes per policy and action mode"""
    mode_samples: int = 256
    """samples the flow's deterministic (high-density) action is chosen from"""
    gap: float = 0.2
    """half-width of the strip of actions heading at the lake centre, counted as gap mass"""
    resolution: int = 200
    """grid cells per side of the action square for exact masses"""
    tiny: bool = False
    """tiny budget for tests"""


def parse_args() -> Args:
    """argparse generated from the dataclass fields (their types and defaults)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            parser.add_argument(flag, type=type(f.default), default=f.default)
    return Args(**vars(parser.parse_args()))


class Standardize(nn.Module):
    """``(obs - mean) / std`` with the demonstrations' statistics (identity when not given).

    Positions differ by ~0.1 between the two routes' first steps; standardized inputs let the
    network resolve that difference sooner."""

    def __init__(self, obs_dim: int, mean=None, std=None) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(obs_dim) if mean is None else mean.clone())
        self.register_buffer("std", torch.ones(obs_dim) if std is None else std.clone())

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return (obs - self.mean) / self.std


class GaussianPolicy(nn.Module):
    """SB3's SAC actor: MLP -> (mean, log_std clamped to [-20, 2]) -> tanh-squashed Gaussian."""

    def __init__(self, obs_dim: int, hidden: int, obs_mean=None, obs_std=None) -> None:
        super().__init__()
        self.normalize = Standardize(obs_dim, obs_mean, obs_std)
        self.body = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mu = nn.Linear(hidden, 2)
        self.log_std = nn.Linear(hidden, 2)

    def forward(self, obs: torch.Tensor) -> FlowDistribution:
        h = self.body(self.normalize(obs))
        std = self.log_std(h).clamp(-20, 2).exp()
        return FlowDistribution(Independent(Normal(self.mu(h), std), 1), [Tanh()])

    @torch.no_grad()
    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """SB3's deterministic action: tanh of the mean."""
        return torch.tanh(self.mu(self.body(self.normalize(obs))))


class FlowPolicy(nn.Module):
    """A state-conditioned flow over squashed actions, with a high-density deterministic action."""

    def __init__(self, obs_dim: int, args: Args, obs_mean=None, obs_std=None) -> None:
        super().__init__()
        self.normalize = Standardize(obs_dim, obs_mean, obs_std)
        self.flow = ConditionalFlow(
            dim=2,
            context_dim=obs_dim,
            layers=args.flow_layers,
            rank=1,
            hidden=(args.hidden, args.hidden),
            nonlinearity=args.nonlinearity,
            squash=True,
            init_strength=args.init_strength,
            seed=args.seed,
        )
        # the deterministic action of FlowPolicy's actor (mode = FlowActor.mode below) reads these
        self.mode_samples, self.mode_bandwidth = args.mode_samples, 1.0
        generator = torch.Generator().manual_seed(12345)
        self.register_buffer("mode_noise", torch.randn(args.mode_samples, 2, generator=generator))

    # The SAC flow actor's high-density action: the densest of K fixed-noise samples among those
    # that carry the most mass (a kernel estimate), never the image of the base mean.
    mode = FlowActor.mode

    def forward(self, obs: torch.Tensor) -> FlowDistribution:
        return self.flow(self.normalize(obs))

    @torch.no_grad()
    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """A high-density action per state (see :meth:`FlowActor.mode`)."""
        return self.mode(self(obs))


def fit(policy: nn.Module, obs: torch.Tensor, actions: torch.Tensor, args: Args, name: str):
    """Maximum likelihood: minimize -log pi(a | s) over minibatches. Returns (losses, seconds)."""
    optimizer = torch.optim.Adam(policy.parameters(), lr=args.lr)
    # cosine decay: the last steps sharpen the state-dependence of the fit
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(args.steps, 1))
    generator = torch.Generator().manual_seed(args.seed)
    losses = []
    start = time.perf_counter()
    bar = trange(args.steps, desc=f"fit {name}")
    for step in bar:
        idx = torch.randint(len(obs), (args.batch_size,), generator=generator)
        loss = -policy(obs[idx]).log_prob(actions[idx]).mean()
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{name}: non-finite loss at step {step}")
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 100 == 0:
            bar.set_postfix(nll=f"{np.mean(losses[-100:]):.3f}")
    return losses, time.perf_counter() - start


def run_policy(env: gym.Env, policy: nn.Module, deterministic: bool, args: Args) -> list[dict]:
    def act(obs: np.ndarray) -> np.ndarray:
        obs_t = torch.as_tensor(obs, dtype=torch.float32).unsqueeze(0)
        if deterministic:
            return policy.deterministic(obs_t)[0].numpy()
        with torch.no_grad():
            return policy(obs_t).sample()[0].numpy()

    return envs.rollout(env, act, args.rollouts, seed=args.seed + 1)


def rollout_stats(results: list[dict]) -> dict:
    n = len(results)
    return {
        "success": sum(r["success"] for r in results) / n,
        "drowned": sum(r["drowned"] for r in results) / n,
        "cw": sum(r["route"] == "cw" and r["success"] for r in results) / n,
        "ccw": sum(r["route"] == "ccw" and r["success"] for r in results) / n,
        "mean_return": float(np.mean([r["return"] for r in results])),
    }


def fit_limits(ax, trajectories: list[np.ndarray], pad: float = 0.1) -> None:
    """Widen the axes (set by draw_lake around the lake) so that every trajectory shows."""
    points = np.concatenate(trajectories)
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    ax.set_xlim(min(x0, points[:, 0].min() - pad), max(x1, points[:, 0].max() + pad))
    ax.set_ylim(min(y0, points[:, 1].min() - pad), max(y1, points[:, 1].max() + pad))


def main() -> None:
    args = parse_args()
    if args.tiny:
        args.demos, args.steps, args.rollouts, args.resolution = 10, 20, 4, 48
        args.hidden, args.mode_samples = 32, 32
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)
    env = gym.make("LakeCrossing-v0")
    lake = env.unwrapped
    center = np.asarray(lake.lake_center, dtype=np.float32)

    # ---- demonstrations: the expert's side is independent of the start
    demos = envs.collect_demonstrations(args.demos, seed=args.seed, margin=args.margin)
    obs = torch.as_tensor(demos.observations)
    actions = torch.as_tensor(demos.actions)
    print(
        f"{args.demos} demonstrations, {len(demos)} transitions, "
        f"routes cw {np.mean(demos.episode_routes == 'cw'):.2f} / "
        f"ccw {np.mean(demos.episode_routes == 'ccw'):.2f}, "
        f"expert success {demos.episode_success.mean():.2f}"
    )

    # ---- fit both policies by maximum likelihood
    torch.manual_seed(args.seed)
    stats = (obs.mean(0), obs.std(0).clamp_min(1e-3)) if args.normalize else (None, None)
    gaussian = GaussianPolicy(obs.shape[1], args.hidden, *stats)
    flow = FlowPolicy(obs.shape[1], args, *stats)
    policies = {"flow": flow, "gaussian": gaussian}
    train = {name: fit(p, obs, actions, args, name) for name, p in policies.items()}

    # ---- exact gap mass: at the start, and along one expert path per side
    start = lake.start.astype(np.float32)
    path_states = {}
    for route in ("cw", "ccw"):
        episode = np.flatnonzero(demos.episode_routes == route)
        if len(episode):
            states = demos.observations[demos.episode_index == episode[0]][:12:2]
            path_states[route] = states
    masses = {}
    for name, policy in policies.items():
        at_start = side_mass(
            policy, start, direction=center - start, gap=args.gap, resolution=args.resolution
        )
        masses[name] = {
            "start": {k: float(v[0]) for k, v in at_start.items()},
            "path_gap": {
                route: side_mass(
                    policy, s, direction=center - s, gap=args.gap, resolution=args.resolution
                )["gap"].tolist()
                for route, s in path_states.items()
            },
        }

    # ---- rollouts: sampled actions and each policy's deterministic action
    results, stats = {}, {}
    for name, policy in policies.items():
        for mode in ("stochastic", "deterministic"):
            key = f"{name}_{mode}"
            results[key] = run_policy(env, policy, mode == "deterministic", args)
            stats[key] = rollout_stats(results[key])

    flow_time, gauss_time = train["flow"][1], train["gaussian"][1]
    summary = {
        "args": dataclasses.asdict(args),
        "expert": {
            "success": float(demos.episode_success.mean()),
            "cw": float(np.mean(demos.episode_routes == "cw")),
        },
        "rollouts": stats,
        "masses": masses,
        "final_nll": {name: float(np.mean(t[0][-100:])) for name, t in train.items()},
        "fit_seconds": {name: t[1] for name, t in train.items()},
        "time_ratio_flow_over_gaussian": flow_time / gauss_time,
    }
    with open(os.path.join(args.out, "summary.json"), "w") as fh:
        json.dump(summary, fh, indent=2)

    print(f"\n{'policy':24s} {'success':>8s} {'drowned':>8s} {'cw':>6s} {'ccw':>6s} {'return':>8s}")
    for key, s in stats.items():
        print(
            f"{key:24s} {s['success']:8.3f} {s['drowned']:8.3f} {s['cw']:6.3f} {s['ccw']:6.3f} "
            f"{s['mean_return']:8.1f}"
        )
    for name, m in masses.items():
        path = ", ".join(
            f"{route}: " + " ".join(f"{g:.3f}" for g in gaps)
            for route, gaps in m["path_gap"].items()
        )
        print(
            f"{name:9s} start: gap {m['start']['gap']:.3f}  left {m['start']['left']:.3f}  "
            f"right {m['start']['right']:.3f} | gap along the path ({path})"
        )
    print(
        f"fit time flow/gaussian: {flow_time / gauss_time:.2f} ({flow_time:.0f} s / "
        f"{gauss_time:.0f} s)"
    )

    # ---- the seed's story in one figure
    fig, axes = plt.subplots(2, 3, figsize=(13, 8.5))
    ax = axes[0, 0]
    envs.draw_lake(ax, lake)
    n_show = min(args.demos, 60)
    trajs = [demos.observations[demos.episode_index == e] for e in range(n_show)]
    envs.plot_trajectories(ax, trajs, list(demos.episode_routes[:n_show]), alpha=0.4)
    ax.set_title("expert demonstrations (side 50/50, independent of the start)", fontsize=9)
    start_t = torch.as_tensor(start).unsqueeze(0)
    for ax, name in zip(axes[0, 1:], ("gaussian", "flow")):
        log_prob, _, _ = density_grid(policies[name], start, args.resolution)
        # log scale over a 12-nat window, and samples: a clone of a deterministic expert is
        # narrower than a grid cell
        lp = log_prob[0].numpy()
        ax.imshow(
            lp,
            origin="lower",
            extent=(-1, 1, -1, 1),
            cmap="magma",
            vmin=lp.max() - 12,
            vmax=lp.max(),
        )
        with torch.no_grad():
            samples = policies[name](start_t).sample((300,))[:, 0].numpy()
        ax.scatter(samples[:, 0], samples[:, 1], s=3, c="white", alpha=0.6, label="samples")
        near = demos.actions[np.linalg.norm(demos.observations - start, axis=1) < 0.06]
        ax.scatter(near[:, 0], near[:, 1], s=6, c="cyan", label="expert actions near start")
        det = policies[name].deterministic(start_t)[0].numpy()
        ax.plot(*det, marker="*", color="lime", markersize=14, label="deterministic action")
        ax.annotate(
            "", xy=(0, 0.95), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="white", lw=1.5)
        )
        ax.text(0.03, 0.5, "into the lake", color="white", fontsize=8)
        m = masses[name]["start"]
        ax.set_title(f"{name}: log-density at the start, gap mass {m['gap']:.1%}", fontsize=9)
        ax.legend(fontsize=7, loc="lower left")
    panels = [
        ("gaussian_stochastic", axes[1, 0]),
        ("gaussian_deterministic", axes[1, 1]),
        ("flow_stochastic", axes[1, 2]),
    ]
    for key, ax in panels:
        envs.draw_lake(ax, lake)
        res = results[key][:100]
        envs.plot_trajectories(
            ax, [r["positions"] for r in res], [r["label"] for r in res], alpha=0.4
        )
        fit_limits(ax, [r["positions"] for r in res])
        s = stats[key]
        ax.set_title(
            f"{key.replace('_', ' ')}: success {s['success']:.0%}, drowned {s['drowned']:.0%}",
            fontsize=9,
        )
    fd = stats["flow_deterministic"]
    fig.suptitle(
        "Behaviour cloning of a two-route expert: the Gaussian fills the gap and its mean walks "
        f"into the lake; the flow takes one route or the other (flow deterministic: success "
        f"{fd['success']:.0%})",
        fontsize=10,
    )
    fig.tight_layout()
    path = os.path.join(args.out, "behaviour_cloning.png")
    fig.savefig(path, dpi=110)
    print(f"wrote {path} and {os.path.join(args.out, 'summary.json')}")


if __name__ == "__main__":
    main()
