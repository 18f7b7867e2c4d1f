r"""SAC's actor objective against a fixed, exactly symmetric two-mode critic: flow vs Gaussian.

SAC's actor minimizes, at each state,

.. math:: J(\pi) = \mathbb{E}_{a \sim \pi}[\alpha \log \pi(a) - Q(a)]
          = \alpha\,\mathrm{KL}(\pi \,\|\, e^{Q/\alpha}/Z) - \alpha \log Z,

so the best actor of any class is the Boltzmann policy :math:`\pi^* \propto e^{Q/\alpha}`. Here
the critic is fixed and mirror-symmetric, shaped like LakeCrossing's start: high for actions
heading around the lake on either side, :math:`a \approx (\pm 0.6, 0.6)`, low straight ahead,
:math:`Q(a) = -10 \min(\|a - (-0.6, 0.6)\|^2, \|a - (0.6, 0.6)\|^2)`. This isolates the actor from
the critic: in full SAC the critic is learned from the actor's own data.

Each actor (a state-conditioned network evaluated at one state, as in SAC) is fitted with the two
actor updates of ``FlowSAC(actor_gradient=...)``, whose code this example calls
(:func:`flowpolicy.flowsac.soft_actor_loss`): two unbiased gradients of the same objective,
:math:`\ell(a) = \alpha \log\pi(a) - Q(a)`:

* ``reparam``, SAC's: the gradient of :math:`\frac1n \sum_i \ell(f_\theta(z_i))`. Once the modes
  are apart it sees their weights only through the few samples that the map sends into the gap;
* ``score``, the likelihood-ratio gradient with a leave-one-out baseline,
  :math:`\frac1n \sum_i (\ell(a_i) - \bar\ell_{-i}) \nabla_\theta \log\pi_\theta(a_i)`.

As SAC's automatic :math:`\alpha` starts at 1 and decreases, :math:`\alpha` is annealed
geometrically from 1 to its final value over the first half of each fit. Masses are exact (grid
integration), and so is :math:`\log Z` in the KL to :math:`\pi^*`. The study over seeds and
settings is ``experiments/soft_policy_fit.py``.

Run::

    python examples/soft_policy_fit.py --out runs/soft_fit
    python examples/soft_policy_fit.py --out runs/soft_fit_tiny --tiny
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro
from matplotlib.figure import Figure
from torch import nn

from flowpolicy import ConditionalFlow
from flowpolicy.diagnostics import action_grid, density_grid, side_mass
from flowpolicy.flows import squashed_gaussian
from flowpolicy.flowsac import soft_actor_loss


@dataclass
class Args:
    """SAC's actor objective against a fixed symmetric two-mode critic, flow vs Gaussian."""

    out: str = "runs/soft_policy_fit"
    """output folder (summary.json, soft_policy_fit.png)"""
    seed: int = 0
    """seed of the actors' initialization and sampling"""
    alphas: tuple[float, ...] = (0.1, 0.3, 1.0)
    """final entropy coefficients"""
    steps: int = 2000
    """Adam steps per fit"""
    batch_size: int = 256
    """action samples per step (SAC's batch)"""
    lr: float = 1e-3
    """Adam learning rate"""
    tiny: bool = False
    """a tiny budget, for tests"""


MODES = torch.tensor([[-0.6, 0.6], [0.6, 0.6]])  # the critic's two best actions
OBS = torch.tensor([[0.0, -1.25]])  # one fixed state, the lake's start


def critic(actions: torch.Tensor) -> torch.Tensor:
    """The fixed symmetric two-well Q of the module docstring."""
    return -10.0 * ((actions[..., None, :] - MODES.to(actions)) ** 2).sum(-1).min(-1).values


class GaussianActor(nn.Module):
    """SB3's SAC actor: an MLP gives the mean and log-std of a tanh-squashed Gaussian."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU())
        self.net.append(nn.Linear(256, 4))

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.net(obs).chunk(2, -1)
        return squashed_gaussian(mean, log_std.clamp(-20, 2).exp())


def log_partition(alpha: float) -> float:
    r""":math:`\log Z = \log \int e^{Q(a)/\alpha} da` over the action square, on a fine grid."""
    points, area = action_grid(1000)
    return float(torch.logsumexp((critic(points) / alpha).flatten(), 0) + math.log(area))


def actor_loss(actor: nn.Module, alpha: float, gradient: str, batch: int) -> torch.Tensor:
    """FlowSAC's actor loss (the library's code) against the fixed critic, ``batch`` actions:
    reparam, one action at each of ``batch`` copies of the state (SAC's batch); score, ``batch``
    actions at the state, with the leave-one-out baseline over them."""
    fixed_critic = lambda obs, actions: (critic(actions)[:, None],)  # noqa: E731 (SB3's form)
    obs = OBS.expand(batch, -1) if gradient == "reparam" else OBS
    return soft_actor_loss(actor, fixed_critic, obs, alpha, gradient, samples=batch)[0]


def fit(kind: str, gradient: str, alpha: float, args: Args) -> dict:
    """Fit one actor with one gradient; its exact masses and its KL to the Boltzmann policy."""
    torch.manual_seed(args.seed)  # every fit starts from the same stream
    if kind == "gaussian":
        actor = GaussianActor()
    else:  # 4 (affine, spline) layers, starting as the identity map
        flow_kwargs = dict(layers=4, nonlinearity="spline", squash=True, init_strength=0.0)
        actor = ConditionalFlow(dim=2, context_dim=2, **flow_kwargs)
    optimizer = torch.optim.Adam(actor.parameters(), lr=args.lr)
    for step in range(args.steps):
        frac = min(1.0, 2 * step / args.steps)  # alpha: from 1 to alpha over half the fit
        loss = actor_loss(actor, alpha**frac, gradient, args.batch_size)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mass = side_mass(actor, OBS, direction=(0.0, 1.0), gap=0.2, resolution=200)
    left, right, gap = (float(mass[key][0]) for key in ("left", "right", "gap"))
    with torch.no_grad():  # KL(pi || pi*) = E_pi[log pi - Q / alpha] + log Z
        actions, log_prob = actor(OBS).rsample_and_log_prob((8192,))
        kl = (log_prob - critic(actions) / alpha).mean().item() + log_partition(alpha)
    run = dict(kind=kind, gradient=gradient, alpha=alpha, left=left, right=right, gap=gap)
    return run | dict(minority=min(left, right), kl_to_boltzmann=kl, actor=actor)


def main() -> None:
    args = tyro.cli(Args)
    if args.tiny:
        args.alphas, args.steps = (0.3,), 30
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    runs = []
    for alpha in args.alphas:
        for kind in ("flow", "gaussian"):
            for gradient in ("reparam", "score"):
                runs.append(fit(kind, gradient, alpha, args))
                r = runs[-1]
                print(
                    f"alpha {alpha:4.2f} {kind:8s} {gradient:7s}: left {r['left']:.3f} right "
                    f"{r['right']:.3f} gap {r['gap']:.3f} KL {r['kl_to_boltzmann']:.3f}",
                    flush=True,
                )
    table = [{k: v for k, v in r.items() if k != "actor"} for r in runs]
    summary = {"args": asdict(args), "runs": table}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))

    # ---- figure: the Boltzmann target and each actor's density, one row per alpha
    fig = Figure(figsize=(3.2 * 5, 3.1 * len(args.alphas)))
    axes = fig.subplots(len(args.alphas), 5, squeeze=False)
    points, _ = action_grid(200)
    for row, alpha in zip(axes, args.alphas):
        target = critic(points) / alpha - log_partition(alpha)
        panels = [("Boltzmann target exp(Q/α)/Z", target)]
        for r in (r for r in runs if r["alpha"] == alpha):
            masses = f"left {r['left']:.2f} / right {r['right']:.2f}, gap {r['gap']:.2f}"
            title = f"{r['kind']}, {r['gradient']} gradient:\n{masses}"
            panels.append((title, density_grid(r["actor"], OBS, 200)[0][0]))
        for ax, (title, log_prob) in zip(row, panels):
            image = log_prob.exp().numpy()
            vmax = float(target.exp().max())  # the target's colour scale for every panel
            ax.imshow(image, origin="lower", extent=(-1, 1, -1, 1), cmap="magma", vmax=vmax)
            ax.annotate("", xy=(0, 0.9), xytext=(0, 0), arrowprops=dict(arrowstyle="->", color="c"))
            ax.set_title(f"α={alpha}: {title}", fontsize=8)
    fig.suptitle("SAC actor objective vs a fixed symmetric Q (cyan: straight ahead, the gap)")
    fig.tight_layout()
    fig.savefig(out / "soft_policy_fit.png", dpi=110)
    print(f"wrote summary.json and soft_policy_fit.png to {out}")


if __name__ == "__main__":
    main()
