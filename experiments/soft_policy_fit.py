r"""SAC's actor objective against a fixed, exactly symmetric two-mode critic: flow vs Gaussian.

SAC's actor minimizes, at each state,

.. math:: J(\pi) = \mathbb{E}_{a \sim \pi}\big[\alpha \log \pi(a) - Q(a)\big]
          = \alpha\,\mathrm{KL}\big(\pi \,\|\, e^{Q/\alpha}/Z\big) - \alpha \log Z,

so the best actor *of any class* is the Boltzmann policy :math:`\pi^* \propto e^{Q/\alpha}`. Here
the critic is fixed and exactly mirror-symmetric, shaped like LakeCrossing's start state: high
for actions heading around the lake on either side, :math:`a \approx (\pm m_x, m_y)`, low
straight ahead into the water:

.. math:: Q(a) = -\kappa \min\big(\|a - (-m_x, m_y)\|^2,\ \|a - (m_x, m_y)\|^2\big)

SAC's automatic :math:`\alpha` starts at 1 and decreases while the actor trains; by default
:math:`\alpha` is annealed the same way, geometrically from ``--alpha-start`` (1) to its final
value over the first half of the fit (``--alpha-start 0`` keeps it constant: at small
:math:`\alpha` from the start, the mode-seeking reverse KL can push a flow that starts
unimodal onto one side before it splits).

This isolates the actor from the critic (in full SAC the critic is learned from the actor's own
data, so its errors and the actor's route feed each other): the flow actor keeps both modes, the
tanh-Gaussian actor takes one, or, at large :math:`\alpha`, straddles the gap.

Each actor is fitted with three unbiased gradients of the same objective (``--gradients``):

* ``reparam``, SAC's: :math:`\nabla_\theta \frac1n \sum_i \ell(a_i)` with
  :math:`a_i = f_\theta(z_i)` and :math:`\ell = \alpha \log\pi - Q`. Once the modes are apart,
  it sees their weights only through the few samples that the steep part of the map sends into
  the gap, and at small :math:`\alpha` the split between the modes drifts until one is empty;
* ``score``, the likelihood-ratio (REINFORCE) gradient with a leave-one-out baseline,
  :math:`\frac1n \sum_i (\ell(a_i) - \bar\ell_{-i}) \nabla_\theta \log\pi_\theta(a_i)` with
  the :math:`a_i` held fixed. A mode that holds too much mass has a higher :math:`\ell` there
  (by :math:`\alpha \log(2w)`), so every sample carries the weights' gradient;
* ``combined``: the likelihood ratio for :math:`-Q` alone and the pathwise gradient for
  :math:`\alpha \log \pi`: whether the reparameterized drift comes from :math:`\nabla_a Q`.

Both actors are state-conditioned networks, as in SAC, evaluated at one fixed state. Masses are
exact (grid integration of the density, :func:`flowpolicy.diagnostics.side_mass`), and the KL to
:math:`\pi^*` is computed with the exact :math:`\log Z` (grid integration of :math:`e^{Q/\alpha}`
over the action square).

Run::

    python experiments/soft_policy_fit.py --out runs/soft_fit    # 3 seeds x 3 alphas x 3 gradients
    python experiments/soft_policy_fit.py --out runs/soft_fit_tiny --tiny

``examples/soft_policy_fit.py`` is the short version (one seed, the defaults below).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import tyro
from matplotlib.figure import Figure
from tqdm import tqdm

from flowpolicy import ConditionalFlow
from flowpolicy.diagnostics import action_grid, density_grid, region_mass, side_mass
from flowpolicy.flows import squashed_gaussian
from flowpolicy.flowsac import soft_actor_loss


@dataclass
class Args:
    """SAC's actor objective against a fixed symmetric critic, over seeds and gradients."""

    out: str = "runs/soft_policy_fit"
    """output folder (figures, summary.json)"""
    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds of the actors' initialization and sampling"""
    alphas: tuple[float, ...] = (0.1, 0.3, 1.0)
    """entropy coefficients"""
    gradients: tuple[str, ...] = ("reparam", "score", "combined")
    """gradient estimators of the objective: reparam (SAC's), score (likelihood ratio) and
    combined (likelihood ratio for -Q, pathwise for alpha log pi)"""
    steps: int = 2000
    """Adam steps per fit"""
    alpha_start: float = 1.0
    """alpha is annealed geometrically from this value to the target alpha over the first half
    of the steps, as SAC's automatic alpha starts at 1 and decreases; 0 = constant alpha"""
    batch_size: int = 256
    """reparameterized action samples per step (SAC's batch)"""
    lr: float = 1e-3
    """Adam learning rate"""
    kappa: float = 10.0
    """depth of the critic's wells: Q(gap) - Q(mode) = -kappa m_x^2"""
    mode_x: float = 0.6
    """lateral action of the two modes (left and right of straight ahead)"""
    mode_y: float = 0.6
    """forward action of the two modes"""
    flow_layers: int = 4
    """nonlinear layers of the flow actor"""
    bins: int = 8
    """spline bins per layer"""
    nonlinearity: str = "spline"
    """flow nonlinearity: spline or prelu"""
    init_strength: float = 0.0
    """spread of the flow's initialization (0 = identity map: no initial bias to a side)"""
    hidden: int = 256
    """width of both actors' two hidden layers"""
    mode_radius: float = 0.3
    """radius of the disc around each mode counted as mass on that mode"""
    gap: float = 0.2
    """half-width of the 'straight ahead' strip counted as gap mass"""
    resolution: int = 200
    """grid cells per side for exact masses"""
    tiny: bool = False
    """tiny budget for tests (1 seed, 1 alpha, 30 steps)"""
    record: bool = False
    """write the table to BENCHMARKS.md (benchmarks/_record.py)"""


def critic(actions: torch.Tensor, args: Args) -> torch.Tensor:
    """The fixed symmetric two-well Q of the module docstring."""
    left = torch.tensor([-args.mode_x, args.mode_y], dtype=actions.dtype)
    right = torch.tensor([args.mode_x, args.mode_y], dtype=actions.dtype)
    d_left = ((actions - left) ** 2).sum(-1)
    d_right = ((actions - right) ** 2).sum(-1)
    return -args.kappa * torch.minimum(d_left, d_right)


class GaussianActor(nn.Module):
    """SB3's SAC actor: MLP -> (mean, log_std clamped to [-20, 2]) -> tanh-squashed Gaussian."""

    def __init__(self, obs_dim: int, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Linear(obs_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU()
        )
        self.mu = nn.Linear(hidden, 2)
        self.log_std = nn.Linear(hidden, 2)

    def forward(self, obs: torch.Tensor):
        h = self.body(obs)
        return squashed_gaussian(self.mu(h), self.log_std(h).clamp(-20, 2).exp())


def make_actor(kind: str, obs_dim: int, args: Args, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    if kind == "gaussian":
        return GaussianActor(obs_dim, args.hidden)
    return ConditionalFlow(
        dim=2,
        context_dim=obs_dim,
        layers=args.flow_layers,
        rank=1,
        hidden=(args.hidden, args.hidden),
        nonlinearity=args.nonlinearity,
        bins=args.bins,
        squash=True,
        init_strength=args.init_strength,
        seed=seed,
    )


def log_partition(alpha: float, args: Args, resolution: int = 1000) -> float:
    r""":math:`\log Z = \log \int_{[-1,1]^2} e^{Q(a)/\alpha} da` by grid integration."""
    points, area = action_grid(resolution)
    q = critic(points, args) / alpha
    return float(torch.logsumexp(q.flatten(), 0) + math.log(area))


def actor_loss(
    actor: nn.Module, obs: torch.Tensor, alpha: float, gradient: str, args: Args
) -> tuple[torch.Tensor, float]:
    r"""FlowSAC's actor loss (:func:`flowpolicy.flowsac.soft_actor_loss`, the library's code)
    against the fixed critic, and the Monte-Carlo estimate of
    :math:`J = \mathbb{E}_\pi[\alpha \log \pi - Q]`. ``reparam``: one action at each of
    ``batch_size`` copies of the state (SAC's batch); ``score``: ``batch_size`` actions at the
    state, with the leave-one-out baseline over them."""

    def fixed_critic(states: torch.Tensor, actions: torch.Tensor) -> tuple[torch.Tensor]:
        return (critic(actions, args)[:, None],)  # SB3's form: one (n, 1) tensor per critic

    states = obs.expand(args.batch_size, -1) if gradient == "reparam" else obs
    loss, _ = soft_actor_loss(actor, fixed_critic, states, alpha, gradient, args.batch_size)
    if gradient == "reparam":  # the loss is the estimate of J
        return loss, loss.item()
    with torch.no_grad():  # the score update's surrogate is not: J from fresh actions
        actions, log_prob = actor(obs).rsample_and_log_prob((args.batch_size,))
        return loss, (alpha * log_prob - critic(actions, args)).mean().item()


def fit(kind: str, gradient: str, alpha: float, seed: int, obs: torch.Tensor, args: Args) -> dict:
    actor = make_actor(kind, obs.shape[-1], args, seed)
    optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr)
    torch.manual_seed(seed + 1000)
    start = time.perf_counter()
    losses = []
    for step in range(args.steps):
        # alpha_t: geometric from alpha_start to alpha over the first half, then alpha
        frac = min(1.0, 2 * step / max(args.steps, 1))
        alpha_t = alpha if args.alpha_start <= 0 else args.alpha_start ** (1 - frac) * alpha**frac
        loss, objective = actor_loss(actor, obs, alpha_t, gradient, args)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"{kind} ({gradient}) alpha={alpha} seed={seed}: non-finite loss {loss}"
            )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(objective)
    seconds = time.perf_counter() - start
    masses = side_mass(actor, obs, direction=(0.0, 1.0), gap=args.gap, resolution=args.resolution)
    # mass *on* each mode (a disc around it), which a broad Gaussian straddling the gap lacks
    near = {
        side: region_mass(actor, obs, _disc(sign, args), args.resolution)[0]
        for side, sign in (("left", -1.0), ("right", 1.0))
    }
    with torch.no_grad():
        actions, log_prob = actor(obs).rsample_and_log_prob((8192,))
        # KL(pi || pi*) = E_pi[log pi - Q/alpha] + log Z  (exact log Z, Monte-Carlo expectation)
        kl = (log_prob - critic(actions, args) / alpha).mean().item() + log_partition(alpha, args)
    return {
        "kind": kind,
        "gradient": gradient,
        "alpha": alpha,
        "seed": seed,
        "left": float(masses["left"][0]),
        "right": float(masses["right"][0]),
        "gap": float(masses["gap"][0]),
        "minority": float(min(masses["left"][0], masses["right"][0])),
        "mode_left": float(near["left"]),
        "mode_right": float(near["right"]),
        "kl_to_boltzmann": kl,
        "final_loss": float(np.mean(losses[-50:])),
        "seconds_per_step": seconds / max(args.steps, 1),
        "actor": actor,
    }


def tabulate(runs: list[dict], actors: list[tuple[str, str]], args: Args) -> tuple[list, dict]:
    """Medians over seeds per alpha, actor and gradient; the median time per step per actor."""

    def runs_of(kind: str, gradient: str, alpha: float | None = None) -> list[dict]:
        """The runs of one actor and gradient (at one alpha, or at all)."""
        return [
            r
            for r in runs
            if (r["kind"], r["gradient"]) == (kind, gradient) and alpha in (None, r["alpha"])
        ]

    # ---- summary: median over seeds of the mass per mode, per alpha, actor and gradient
    table = []
    for alpha in args.alphas:
        for kind, gradient in actors:
            rows = runs_of(kind, gradient, alpha)
            table.append(
                {
                    "kind": kind,
                    "gradient": gradient,
                    "alpha": alpha,
                    "median_minority_mass": float(np.median([r["minority"] for r in rows])),
                    "min_minority_mass": float(np.min([r["minority"] for r in rows])),
                    "median_gap_mass": float(np.median([r["gap"] for r in rows])),
                    "median_kl": float(np.median([r["kl_to_boltzmann"] for r in rows])),
                    "left_per_seed": [r["left"] for r in rows],
                    "median_mode_mass": [
                        float(np.median([r["mode_left"] for r in rows])),
                        float(np.median([r["mode_right"] for r in rows])),
                    ],
                    "min_mode_mass_per_seed": [min(r["mode_left"], r["mode_right"]) for r in rows],
                }
            )
    step_time = {
        f"{kind} {gradient}": float(
            np.median([r["seconds_per_step"] for r in runs_of(kind, gradient)])
        )
        for kind, gradient in actors
    }
    return table, step_time


def run(args: Args) -> dict:
    """Every fit of ``args``; writes ``summary.json`` and ``soft_policy_fit.png``, returns the
    summary (a table of medians over seeds, and every run)."""
    if args.tiny:
        args.seeds, args.alphas, args.steps, args.resolution = args.seeds[:1], (0.3,), 30, 64
    torch.set_num_threads(1)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # one fixed state, as LakeCrossing's start observation would be to a SAC actor
    obs = torch.tensor([[0.0, -1.0, 0.0, 1.0]])

    runs = []
    actors = [(k, g) for k in ("flow", "gaussian") for g in args.gradients]
    jobs = [(k, g, a, s) for a in args.alphas for s in args.seeds for k, g in actors]
    for kind, gradient, alpha, seed in tqdm(jobs, desc="soft policy fits"):
        runs.append(fit(kind, gradient, alpha, seed, obs, args))

    table, step_time = tabulate(runs, actors, args)
    summary = {
        "args": asdict(args),
        "table": table,
        "runs": [{k: v for k, v in r.items() if k != "actor"} for r in runs],
        "seconds_per_step": step_time,
        "boltzmann_mode_mass": {
            str(alpha): _boltzmann_mode_mass(alpha, args) for alpha in args.alphas
        },
        "boltzmann_gap_mass": {
            str(alpha): float(_boltzmann_gap_mass(alpha, args)) for alpha in args.alphas
        },
    }
    (Path(args.out) / "summary.json").write_text(json.dumps(summary, indent=2))

    print(
        f"\n{'actor':9s} {'gradient':8s} {'alpha':>6s} {'minority (median)':>18s} {'min':>6s} "
        f"{'gap':>6s} {'KL':>6s}  left mass per seed | mass on the less-held mode"
    )
    for row in table:
        print(
            f"{row['kind']:9s} {row['gradient']:8s} {row['alpha']:6.2f} "
            f"{row['median_minority_mass']:18.3f} {row['min_minority_mass']:6.3f} "
            f"{row['median_gap_mass']:6.3f} {row['median_kl']:6.3f}"
            f"  {', '.join(f'{x:.3f}' for x in row['left_per_seed'])} | "
            f"{', '.join(f'{x:.3f}' for x in row['min_mode_mass_per_seed'])} "
            f"(pi*: {summary['boltzmann_mode_mass'][str(row['alpha'])]:.3f})"
        )
    print("ms per step: " + ", ".join(f"{k} {1e3 * v:.1f}" for k, v in step_time.items()))
    plot(runs, actors, obs, args)
    if args.record:
        record_table(summary, args)
    return summary


def record_table(summary: dict, args: Args) -> None:
    """The table of medians over seeds, as markdown, in BENCHMARKS.md."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from _record import record

    lines = [
        "| actor | gradient | α | minority-side mass: median (min) % | gap mass % | "
        "KL to exp(Q/α)/Z | left mass per seed % |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in summary["table"]:
        seeds = ", ".join(f"{100 * x:.1f}" for x in row["left_per_seed"])
        lines.append(
            f"| {row['kind']} | {row['gradient']} | {row['alpha']} | "
            f"{100 * row['median_minority_mass']:.1f} ({100 * row['min_minority_mass']:.1f}) | "
            f"{100 * row['median_gap_mass']:.1f} | {row['median_kl']:.3f} | {seeds} |"
        )
    note = (
        f"\n\nSeeds {list(args.seeds)}, {args.steps} Adam steps per fit, batch {args.batch_size}, "
        f"alpha annealed from {args.alpha_start} over the first half. Masses exact (grid "
        f"integration at {args.resolution}x{args.resolution}), KL with the exact log Z.\n"
    )
    record("Soft policy fit: reparameterized vs score-function gradient", "\n".join(lines) + note)


def plot(runs: list[dict], actors: list[tuple[str, str]], obs: torch.Tensor, args: Args) -> None:
    """The target and each actor's density, first seed, one row per alpha."""
    columns = 1 + len(actors)
    fig = Figure(figsize=(3.2 * columns, 3.1 * len(args.alphas)))
    axes = fig.subplots(len(args.alphas), columns, squeeze=False)
    points, area = action_grid(args.resolution)
    for i, alpha in enumerate(args.alphas):
        target = critic(points, args) / alpha - log_partition(alpha, args)
        panels = [("Boltzmann target exp(Q/α)/Z", target)]
        for kind, gradient in actors:
            r = next(
                r for r in runs if (r["kind"], r["gradient"], r["alpha"]) == (kind, gradient, alpha)
            )
            log_prob = density_grid(r["actor"], obs, args.resolution)[0][0]
            panels.append(
                (
                    f"{kind}, {gradient} gradient:\nleft {r['left']:.2f} / right {r['right']:.2f}, "
                    f"gap {r['gap']:.2f}",
                    log_prob,
                )
            )
        for ax, (title, log_prob) in zip(axes[i], panels):
            ax.imshow(
                log_prob.exp().numpy(),
                origin="lower",
                extent=(-1, 1, -1, 1),
                cmap="magma",
                vmax=float(target.exp().max()),
            )
            ax.annotate(
                "",
                xy=(0, 0.9),
                xytext=(0, 0),
                arrowprops=dict(arrowstyle="->", color="cyan", lw=1.5),
            )
            ax.set_title(f"α={alpha}: {title}", fontsize=8)
            ax.set_xticks([-1, 0, 1])
            ax.set_yticks([-1, 0, 1])
    fig.suptitle(
        "SAC actor objective vs a fixed symmetric Q (cyan: straight ahead, the gap)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(Path(args.out) / "soft_policy_fit.png", dpi=110)
    print(f"wrote summary.json and soft_policy_fit.png to {args.out}")


def main() -> None:
    run(tyro.cli(Args))


def _disc(sign: float, args: Args):
    """The disc of radius ``mode_radius`` around the mode on side ``sign`` (-1 left, +1 right)."""
    center = torch.tensor([sign * args.mode_x, args.mode_y], dtype=torch.float64)
    return lambda points: ((points - center) ** 2).sum(-1) < args.mode_radius**2


def _boltzmann_mode_mass(alpha: float, args: Args) -> float:
    """Mass of the optimal actor pi* in the disc around one mode."""
    points, area = action_grid(400)
    log_p = critic(points, args) / alpha - log_partition(alpha, args)
    return float((log_p.exp() * _disc(1.0, args)(points)).sum() * area)


def _boltzmann_gap_mass(alpha: float, args: Args) -> float:
    """Gap mass of the optimal actor pi* (what a perfect fit would put straight ahead)."""
    points, area = action_grid(400)
    log_p = critic(points, args) / alpha - log_partition(alpha, args)
    inside = (points[..., 0].abs() < args.gap) & (points[..., 1] > 0)
    return float((log_p.exp() * inside).sum() * area)


if __name__ == "__main__":
    main()
