r"""SAC on LakeCrossing, flow vs Gaussian, with every knob of the study behind the lake's results.

``examples/train_lake.py`` is the short version: at the defaults both train the same agents
(this one measures more along the way). This driver keeps what was tried on the way:

* ``--explore-episodes N``: route-balanced exploration. For the first ``N`` episodes each episode
  draws a side (cw or ccw, 50/50), and for its first ``--explore-steps`` steps the agent acts with
  its own policy's samples restricted to that side (rejection sampling of the lateral action's
  sign), so both routes enter the replay buffer. ``--explore-fraction p`` keeps doing so in a
  fraction ``p`` of the later episodes.
* ``--no-mirror`` / ``--no-symmetric-critic``: drop the mirrored transitions
  (:class:`flowpolicy.symmetry.MirrorReplayBuffer`) or the critic that is symmetric by
  construction (``policy_kwargs=dict(symmetry=...)``).
* the entropy coefficient (``--ent-coef``, ``--alpha-warmup``, ``--alpha-min``,
  ``--target-entropy``), the actor's learning-rate ratio, n-step returns, the flow's settings.
* ``--actor-gradient score`` or ``combined``: :class:`flowpolicy.flowsac.FlowSAC`'s
  score-function actor update, for all of the actor's objective or for the critic's term alone
  (``--score-samples`` actions per state), instead of SAC's reparameterized one.

Why plain SAC ends on one route: a soft actor that is optimal for its critic keeps a mass ratio
:math:`e^{-\Delta Q/\alpha}` between the routes, and the critic only knows the routes in its
replay buffer; once one route dominates the data, :math:`\Delta Q/\alpha` grows and even a
perfect multimodal actor becomes one-sided.

Outputs in ``--out``: ``flow.zip``, ``gaussian.zip``, ``summary.json`` (final rollouts, exact
masses at the start and along both routes, learning curves, :math:`\Delta Q/\alpha`) and
``densities.png``. ``benchmarks/bench_lake.py`` runs :func:`run` over seeds.

Run::

    python experiments/lake_sac.py --out runs/lake_sac --seed 1 --no-mirror
    python experiments/lake_sac.py --out runs/lake_sac_tiny --tiny
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

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
from flowpolicy.diagnostics import QGapCallback, density_grid, side_mass
from flowpolicy.flowsac import FlowSAC
from flowpolicy.symmetry import MirrorReplayBuffer, SymmetricSACPolicy

POLICIES = ("flow", "gaussian")


@dataclass
class Args:
    """SAC on LakeCrossing, flow vs Gaussian, with every knob of the study."""

    out: str = "runs/lake"
    """output folder (models, figures, summary.json)"""
    seed: int = 0
    """seed of the networks, the environment and the exploration"""
    steps: int = 8000
    """environment steps per policy"""
    policy: Literal["both", "flow", "gaussian"] = "both"
    """which agents to train"""
    # --- SAC settings that decide whether both routes survive
    ent_coef: str = "auto"
    """SAC entropy coefficient: 'auto', 'auto_0.5' (auto from 0.5) or a fixed number"""
    alpha_warmup: float = 0.0
    """if > 0 (and ent_coef is auto), hold alpha at this value for --alpha-warmup-steps"""
    alpha_warmup_steps: int = 0
    """steps of the fixed high alpha before automatic tuning takes over"""
    target_entropy: float = -2.0
    """target entropy of automatic alpha (SB3's 'auto' is -dim(A) = -2)"""
    alpha_min: float = 0.0
    """floor of the automatic entropy coefficient (0: none)"""
    explore_episodes: int = 0
    """route-balanced exploration: episodes with a per-episode side forced at the start (the
    earlier default was 40; with the symmetric critic it did not help on seed 0)"""
    explore_fraction: float = 0.0
    """fraction of the later episodes that also force a side"""
    explore_steps: int = 6
    """steps at the start of a forced episode whose lateral action is restricted to its side"""
    mirror: bool = True
    """store the mirror image of every transition too (uses the task's symmetry)"""
    symmetric_critic: bool = True
    """make every Q mirror-symmetric by construction: Q(s, a) = [Q(s, a) + Q(Ms, Ma)] / 2"""
    actor_gradient: Literal["reparam", "score", "combined"] = "reparam"
    """actor update (flowpolicy.flowsac.FlowSAC): reparam (SAC's), score (likelihood ratio) or
    combined (likelihood ratio for the critic's term, pathwise for the entropy's)"""
    score_samples: int = 4
    """actions per state of the score and combined updates"""
    learning_rate: float = 1e-3
    """Adam learning rate of actor, critics and alpha"""
    actor_lr_ratio: float = 1.0
    """the actor's learning rate is learning_rate times this (critics and alpha keep theirs)"""
    batch_size: int = 256
    """SAC minibatch"""
    gamma: float = 0.9
    """discount. At 0.99 hovering forever is worth -1.5/(1 - 0.99) = -150, far below drowning
    (-25): an agent that has not reached home yet learns to collect the shaping and then walk
    into the lake (flow and Gaussian alike, seed-dependent); at 0.9 hovering is worth -15, and
    the flow reached home on 3 of 3 seeds"""
    n_steps: int = 1
    """n-step returns for the critics (SB3's NStepReplayBuffer; not with --mirror)"""
    learning_starts: int = 500
    """uniform-random steps before learning"""
    n_critics: int = 2
    """critics (SAC's clipped double Q)"""
    net_arch: int = 256
    """width of the two hidden layers of actor and critics"""
    # --- flow actor
    nonlinearity: Literal["spline", "prelu"] = "spline"
    """flow nonlinearity: spline (separated modes) or prelu"""
    flow_layers: int = 4
    """(affine, nonlinearity) blocks of the flow"""
    init_strength: float = 0.0
    """spread of the flow's initialization (0: identity map, no initial side preference)"""
    head_scale: float = 0.01
    """scale of the flow head's initial weights (how state-dependent the initial policy is)"""
    flow_rank: int = 1
    """rank of the low-rank update of each affine layer of the flow"""
    # --- evaluation
    eval_every: int = 1000
    """steps between evaluations for the learning curves"""
    eval_episodes: int = 20
    """stochastic episodes per evaluation"""
    rollouts: int = 200
    """final stochastic rollouts per policy (the hero figure)"""
    det_rollouts: int = 50
    """final deterministic rollouts per policy"""
    resolution: int = 160
    """grid cells per side of the action square for exact masses and heatmaps"""
    tiny: bool = False
    """tiny budget for tests"""


class RouteExplorationSAC(FlowSAC):
    """SAC whose exploration can restrict the first steps of an episode to one side.

    In a forced episode (the first ``explore_episodes``, then a fraction ``explore_fraction``)
    a side ``s`` is drawn 50/50; for the first ``explore_steps`` steps the action is the first
    of 32 samples of the agent's own policy with ``sign(a_x) = s`` (in the warm-up, the uniform
    action with its lateral part on side ``s``); if no sample lies on that side, the lateral
    part of the first one is mirrored. Both routes thus enter the replay buffer. The saved
    model is a FlowSAC model (``FlowSAC.load`` reads it).
    """

    def setup_exploration(self, episodes: int, fraction: float, steps: int, seed: int) -> None:
        self.explore = dict(episodes=episodes, fraction=fraction, steps=steps)
        self.explore_rng = np.random.default_rng(seed)
        self.explore_episode, self.explore_t, self.explore_side = -1, 0, 0.0
        self.forced_episodes = 0

    actor_lr_ratio: float = 1.0
    alpha_min: float = 0.0

    def train(self, gradient_steps: int, batch_size: int = 64) -> None:
        super().train(gradient_steps, batch_size)
        if self.alpha_min > 0 and self.log_ent_coef is not None:
            with torch.no_grad():
                self.log_ent_coef.clamp_(min=float(np.log(self.alpha_min)))

    def _update_learning_rate(self, optimizers) -> None:  # type: ignore[override]
        """SB3 resets every learning rate from one schedule; keep the actor's ratio to it."""
        super()._update_learning_rate(optimizers)
        if self.actor_lr_ratio != 1.0:
            for group in self.actor.optimizer.param_groups:
                group["lr"] *= self.actor_lr_ratio

    def _sample_action(self, learning_starts, action_noise=None, n_envs=1):
        action, buffer_action = super()._sample_action(learning_starts, action_noise, n_envs)
        cfg = getattr(self, "explore", None)
        if cfg is None or n_envs != 1:
            return action, buffer_action
        if self._episode_num != self.explore_episode:  # a new episode began
            self.explore_episode, self.explore_t = self._episode_num, 0
            forced = self._episode_num < cfg["episodes"] or (
                self.explore_rng.random() < cfg["fraction"]
            )
            self.explore_side = float(self.explore_rng.choice([-1.0, 1.0])) if forced else 0.0
            self.forced_episodes += int(forced)
        self.explore_t += 1
        if self.explore_side == 0.0 or self.explore_t > cfg["steps"]:
            return action, buffer_action
        side = self.explore_side
        if self.num_timesteps < learning_starts:
            buffer_action = buffer_action.copy()
            buffer_action[:, 0] = side * np.abs(buffer_action[:, 0])
        else:
            obs = torch.as_tensor(self._last_obs, device=self.device).float().repeat(32, 1)
            with torch.no_grad():
                samples = self.policy.actor(obs, deterministic=False).cpu().numpy()
            ok = np.flatnonzero(np.sign(samples[:, 0]) == side)
            chosen = samples[ok[0]] if len(ok) else samples[0] * np.array([-1.0, 1.0])
            buffer_action = chosen[None].astype(np.float32)
        return self.policy.unscale_action(buffer_action), buffer_action


class AlphaWarmup(BaseCallback):
    """Holds SAC's automatic entropy coefficient at ``alpha`` for the first ``steps`` steps."""

    def __init__(self, alpha: float, steps: int) -> None:
        super().__init__()
        self.log_alpha, self.steps = float(np.log(alpha)), steps

    def _on_step(self) -> bool:
        if self.num_timesteps <= self.steps and self.model.log_ent_coef is not None:
            with torch.no_grad():
                self.model.log_ent_coef.fill_(self.log_alpha)
        return True


def lake_probe_states(env: gym.Env) -> dict[str, np.ndarray]:
    """The start, and states along the expert's cw and ccw paths (every 2nd of the first 10)."""
    lake = env.unwrapped
    states = {"start": lake.start[None].astype(np.float32)}
    for route in ("cw", "ccw"):
        expert = envs.LakeExpert(env, side=route)
        obs, _ = env.reset(options={"start": tuple(lake.start)})
        expert.reset()
        path = [obs]
        for _ in range(10):
            obs, *_ = env.step(expert(obs))
            path.append(obs)
        states[route] = np.asarray(path[2:11:2], dtype=np.float32)
    return states


def cw_mass(model: SAC, states: np.ndarray, center: np.ndarray, resolution: int) -> np.ndarray:
    """Mass heading clockwise (left of the direction to the lake centre) at each state."""
    masses = side_mass(model, states, direction=center - states, resolution=resolution)
    return masses["left"] / masses["total"]


class LakeEvalCallback(BaseCallback):
    """Every ``every`` steps: stochastic rollouts (return, success, route share) and the exact
    clockwise mass at the probe states; kept in :attr:`history` for the learning curves."""

    def __init__(self, args: Args, probes: dict[str, np.ndarray], center: np.ndarray) -> None:
        super().__init__()
        self.args, self.probes, self.center = args, probes, center
        self.env = gym.make("LakeCrossing-v0")
        self.history: list[dict[str, Any]] = []

    def evaluate(self) -> None:
        n, seed = self.args.eval_episodes, 10_000 + len(self.history)
        results = envs.rollout(self.env, self.model, n, seed, deterministic=False)
        entry = {"timesteps": int(self.num_timesteps), **envs.route_stats(results)}
        for name, states in self.probes.items():
            entry[f"cw_mass_{name}"] = cw_mass(self.model, states, self.center, 64).tolist()
        obs = torch.as_tensor(self.probes["start"], device=self.model.device).repeat(256, 1)
        with torch.no_grad():
            actions, log_prob = self.model.actor.action_log_prob(obs)
            q_start = torch.cat(self.model.critic(obs, actions), dim=1).min(1).values.mean()
        entry["entropy_start"] = float(-log_prob.mean())
        entry["q_start"] = float(q_start)
        log_alpha = self.model.log_ent_coef
        entry["alpha"] = float(log_alpha.detach().exp()) if log_alpha is not None else float("nan")
        for key in ("return", "success", "cw", "ccw"):
            self.logger.record(f"lake/{key}", entry[key])
        self.logger.record("lake/cw_mass_start", entry["cw_mass_start"][0])
        self.history.append(entry)
        print(
            f"  step {entry['timesteps']}: return {entry['return']:.1f}, success "
            f"{entry['success']:.2f}, drowned {entry['drowned']:.2f}, cw {entry['cw']:.2f}, ccw "
            f"{entry['ccw']:.2f}, cw mass at "
            f"start {entry['cw_mass_start'][0]:.3f}, along cw path "
            f"{np.mean(entry['cw_mass_cw']):.3f}, along ccw path "
            f"{np.mean(entry['cw_mass_ccw']):.3f}; alpha {entry['alpha']:.3f}, entropy at start "
            f"{entry['entropy_start']:.2f}, Q at start {entry['q_start']:.1f}",
            flush=True,
        )

    def _on_step(self) -> bool:
        if self.num_timesteps % self.args.eval_every == 0:
            # evaluation draws its own noise: training does not depend on --eval-every
            with torch.random.fork_rng():
                self.evaluate()
        return True


def make_model(kind: str, args: Args) -> RouteExplorationSAC:
    env = gym.make("LakeCrossing-v0")
    mirror = env.unwrapped.reflection()
    if args.mirror and args.n_steps > 1:
        raise ValueError("--n-steps > 1 and --mirror cannot be combined")
    policy_kwargs: dict[str, Any] = dict(
        net_arch=[args.net_arch, args.net_arch], n_critics=args.n_critics
    )
    if args.symmetric_critic:
        policy_kwargs["symmetry"] = mirror
    if kind == "flow":
        policy_kwargs["flow_kwargs"] = dict(
            layers=args.flow_layers,
            rank=args.flow_rank,
            nonlinearity=args.nonlinearity,
            init_strength=args.init_strength,
            head_scale=args.head_scale,
        )
    model = RouteExplorationSAC(
        FlowPolicy if kind == "flow" else SymmetricSACPolicy,
        env,
        learning_rate=args.learning_rate,
        batch_size=args.batch_size,
        gamma=args.gamma,
        n_steps=args.n_steps,
        learning_starts=args.learning_starts,
        ent_coef=args.ent_coef if args.ent_coef.startswith("auto") else float(args.ent_coef),
        target_entropy=args.target_entropy,
        replay_buffer_class=MirrorReplayBuffer if args.mirror else None,
        replay_buffer_kwargs=dict(symmetry=mirror) if args.mirror else None,
        policy_kwargs=policy_kwargs,
        actor_gradient=args.actor_gradient,
        score_samples=args.score_samples,
        seed=args.seed,
    )
    model.setup_exploration(
        args.explore_episodes, args.explore_fraction, args.explore_steps, args.seed + 7
    )
    model.actor_lr_ratio, model.alpha_min = args.actor_lr_ratio, args.alpha_min
    return model


def train(kind: str, args: Args, probes: dict[str, np.ndarray]) -> tuple[SAC, dict, list]:
    """Train one agent; return it, its summary entry and its final stochastic rollouts."""
    lake = gym.make("LakeCrossing-v0").unwrapped
    center, start = lake.lake_center.astype(np.float32), probes["start"]
    # mirrored action pairs (a, Ma) at the symmetric start: the expert's tangent heading, and
    # two headings at full lateral speed (where a trained squashed policy tends to sit)
    tangent = envs.LakeExpert(lake, side="cw")(start[0])
    left_actions = np.array([tangent, [-0.95, 0.95], [-0.95, 0.3]], dtype=np.float32)
    right_actions = lake.reflection().action(left_actions)
    model = make_model(kind, args)
    evaluator = LakeEvalCallback(args, probes, center)
    qgap = QGapCallback(
        np.repeat(start, 3, axis=0), left_actions, right_actions, every=args.eval_every
    )
    callbacks: list[BaseCallback] = [evaluator, qgap]
    if args.alpha_warmup > 0 and args.alpha_warmup_steps > 0:
        callbacks.append(AlphaWarmup(args.alpha_warmup, args.alpha_warmup_steps))
    print(f"training SAC with the {kind} policy for {args.steps} steps", flush=True)
    began = time.perf_counter()
    model.learn(args.steps, callback=callbacks)
    seconds = time.perf_counter() - began
    model.save(Path(args.out) / f"{kind}.zip")

    env = gym.make("LakeCrossing-v0")
    stochastic = envs.rollout(env, model, args.rollouts, args.seed + 100, deterministic=False)
    deterministic = envs.rollout(env, model, args.det_rollouts, args.seed + 200, deterministic=True)
    at_start = side_mass(model, start, direction=center - start, resolution=args.resolution)
    entry = {
        "stochastic": envs.route_stats(stochastic),
        "deterministic": envs.route_stats(deterministic),
        "start_mass": {k: float(v[0]) for k, v in at_start.items()},
        "cw_mass_along_path": {
            route: cw_mass(model, probes[route], center, args.resolution).tolist()
            for route in ("cw", "ccw")
        },
        # per mirrored pair: tangent, (0.95, 0.95), (0.95, 0.3)
        "dq_over_alpha_start": qgap.history[-1]["dq_over_alpha"],
        "alpha": qgap.history[-1]["alpha"],
        "train_seconds": seconds,
        "steps_per_second": args.steps / seconds,
        "forced_episodes": model.forced_episodes,
        "episodes": model._episode_num,
        "curve": evaluator.history,
        "qgap": qgap.history,
    }
    return model, entry, stochastic


def run(args: Args) -> dict[str, Any]:
    """Train the agents of ``args``, write models, ``summary.json`` and figures; return the
    summary."""
    if args.tiny:
        args.steps, args.learning_starts, args.eval_every, args.eval_episodes = 200, 100, 100, 2
        args.rollouts, args.det_rollouts, args.resolution, args.net_arch = 4, 2, 32, 32
        args.explore_episodes = min(args.explore_episodes, 2)
    torch.set_num_threads(1)
    set_random_seed(args.seed)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    kinds = POLICIES if args.policy == "both" else (args.policy,)
    probe_env = gym.make("LakeCrossing-v0")
    probes = lake_probe_states(probe_env)

    summary: dict[str, Any] = {"args": asdict(args)}
    models, rollouts = {}, {}
    for kind in kinds:
        models[kind], summary[kind], rollouts[kind] = train(kind, args, probes)
        s = summary[kind]
        print(
            f"{kind}: stochastic success {s['stochastic']['success']:.3f} (cw "
            f"{s['stochastic']['cw']:.3f}, ccw {s['stochastic']['ccw']:.3f}, drowned "
            f"{s['stochastic']['drowned']:.3f}), deterministic success "
            f"{s['deterministic']['success']:.3f}; start mass left {s['start_mass']['left']:.3f}"
            f" gap {s['start_mass']['gap']:.3f}; dQ/alpha {np.round(s['dq_over_alpha_start'], 2)} "
            f"(alpha {s['alpha']:.3f}); {s['steps_per_second']:.0f} steps/s",
            flush=True,
        )
    if len(kinds) == 2:
        summary["time_ratio_flow_over_gaussian"] = (
            summary["gaussian"]["steps_per_second"] / summary["flow"]["steps_per_second"]
        )
    with open(Path(args.out) / "summary.json", "w") as fh:
        json.dump(summary, fh, indent=2)
    plot_densities(models, probes, probe_env.unwrapped, args)
    return summary


def plot_densities(models: dict[str, SAC], probes: dict, lake, args: Args) -> None:
    """The exact action log-densities at the start and along each route (``densities.png``)."""
    center = lake.lake_center.astype(np.float32)
    columns = [("start", probes["start"][0])] + [
        (f"{route} step {2 * (i + 1)}", probes[route][i]) for route in ("cw", "ccw") for i in (0, 2)
    ]
    fig = Figure(figsize=(2.9 * len(columns), 3.0 * len(models)))
    axes = fig.subplots(len(models), len(columns), squeeze=False)
    for row, (kind, model) in zip(axes, models.items()):
        for ax, (name, state) in zip(row, columns):
            # log scale over a 12-nat window: both the modes and the (near-)empty gap show
            lp = density_grid(model, state, args.resolution)[0][0].numpy()
            ax.imshow(lp, origin="lower", extent=(-1, 1, -1, 1), cmap="magma", vmin=lp.max() - 12)
            to_lake = (center - state) / np.linalg.norm(center - state)
            arrow = dict(arrowstyle="->", color="cyan", lw=1.5)
            ax.annotate("", xy=tuple(0.95 * to_lake), xytext=(0, 0), arrowprops=arrow)
            cw = cw_mass(model, state[None], center, args.resolution)[0]
            ax.set_title(f"{kind}, {name}: cw mass {cw:.2f}", fontsize=8)
    fig.suptitle("exact action log-density, 12-nat colour range (cyan: into the lake)")
    fig.tight_layout()
    fig.savefig(Path(args.out) / "densities.png", dpi=110)


def main() -> None:
    run(tyro.cli(Args))


if __name__ == "__main__":
    main()
