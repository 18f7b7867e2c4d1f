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

This is the study behind ``examples/behaviour_cloning.py`` (which draws the figure): the same
fits with their knobs (observation standardization, the flow's nonlinearity, layers and
initialization, the samples searched for the deterministic action, the expert's margin) and the
gap mass along the expert's paths too. ``benchmarks/bench_lake.py`` runs :func:`run` over seeds.

Run::

    python experiments/lake_bc.py --out runs/lake_bc --seed 0 --nonlinearity prelu
    python experiments/lake_bc.py --out runs/lake_bc_tiny --tiny
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch
import torch.nn as nn
import tyro
from tqdm import trange

import flowpolicy.envs as envs  # registers LakeCrossing-v0
from flowpolicy import ConditionalFlow, FlowDistribution
from flowpolicy.diagnostics import side_mass
from flowpolicy.flows import squashed_gaussian


@dataclass
class Args:
    """Behaviour cloning on LakeCrossing, flow vs Gaussian, with the study's knobs."""

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
    """flow nonlinearity: spline or prelu (a PReLU chain fills the gap like the Gaussian)"""
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
        return squashed_gaussian(self.mu(h), self.log_std(h).clamp(-20, 2).exp())

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
        # the deterministic action searches these base samples (FlowPolicy's actor uses 64)
        self.mode_bandwidth = 1.0
        generator = torch.Generator().manual_seed(12345)
        self.register_buffer("mode_noise", torch.randn(args.mode_samples, 2, generator=generator))

    def forward(self, obs: torch.Tensor) -> FlowDistribution:
        return self.flow(self.normalize(obs))

    @torch.no_grad()
    def deterministic(self, obs: torch.Tensor) -> torch.Tensor:
        """A high-density action per state: the densest of the fixed base samples among those
        that carry the most mass, never the image of the base mean (between the modes)."""
        return self(obs).high_density_sample(self.mode_noise, self.mode_bandwidth)


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


def measure_masses(policies: dict, demos, lake, args: Args) -> dict:
    """Exact gap mass at the start, and along one expert path per side."""
    center = np.asarray(lake.lake_center, dtype=np.float32)
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
    return masses


def report(summary: dict) -> None:
    """Print the rollout table, the masses and the fit times."""
    stats, masses = summary["rollouts"], summary["masses"]
    flow_time, gauss_time = summary["fit_seconds"]["flow"], summary["fit_seconds"]["gaussian"]
    print(f"\n{'policy':24s} {'success':>8s} {'drowned':>8s} {'cw':>6s} {'ccw':>6s} {'return':>8s}")
    for key, s in stats.items():
        print(
            f"{key:24s} {s['success']:8.3f} {s['drowned']:8.3f} {s['cw']:6.3f} {s['ccw']:6.3f} "
            f"{s['return']:8.1f}"
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


def run(args: Args) -> dict:
    """Fit both policies, measure them, write ``summary.json``; return the summary."""
    if args.tiny:
        args.demos, args.steps, args.rollouts, args.resolution = 10, 20, 4, 48
        args.hidden, args.mode_samples = 32, 32
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    env = gym.make("LakeCrossing-v0")
    lake = env.unwrapped

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

    masses = measure_masses(policies, demos, lake, args)

    # ---- rollouts: sampled actions and each policy's deterministic action
    results, stats = {}, {}
    for name, policy in policies.items():
        for mode in ("stochastic", "deterministic"):
            key = f"{name}_{mode}"
            results[key] = run_policy(env, policy, mode == "deterministic", args)
            stats[key] = envs.route_stats(results[key])

    flow_time, gauss_time = train["flow"][1], train["gaussian"][1]
    summary = {
        "args": asdict(args),
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
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))

    report(summary)
    return summary


def main() -> None:
    run(tyro.cli(Args))


if __name__ == "__main__":
    main()
