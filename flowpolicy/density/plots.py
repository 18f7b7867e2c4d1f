"""Figures of a fitted flow (matplotlib, imported on use, Agg backend): the density next to the
target's or the data's, the training curves, and the base samples deformed layer by layer."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from flowpolicy import targets as _targets
from flowpolicy.bijectors import call_and_ladj
from flowpolicy.density.fit import History
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = ["save_figures"]


def _grid(box, n: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    (x_lo, x_hi), (y_lo, y_hi) = box
    xs, ys = torch.linspace(x_lo, x_hi, n), torch.linspace(y_lo, y_hi, n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, torch.stack([gx, gy], -1).reshape(-1, 2)


def _box_of(points: Tensor, margin: float = 0.1) -> tuple[tuple[float, float], ...]:
    lo, hi = points.quantile(0.005, dim=0), points.quantile(0.995, dim=0)
    pad = margin * (hi - lo)
    return tuple((float(a), float(b)) for a, b in zip(lo - pad, hi + pad))


@torch.no_grad()
def _plot_density(flow: Flow, target: Target | None, data: Tensor | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    dist = flow()
    samples = dist.sample((4000,)).cpu()
    box = target.view if target is not None else _box_of(data.cpu())
    gx, gy, points = _grid(box)
    extent = (*box[0], *box[1])
    model = dist.log_prob(points.to(flow.theta)).cpu().exp().reshape(gx.shape).double().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    if target is not None:
        truth = target.log_prob(points).exp().reshape(gx.shape).double().numpy()
        axes[0].imshow(truth, origin="lower", extent=extent, aspect="auto", cmap="magma")
        axes[0].set_title(f"target p ({target.name})")
        reference = truth
    else:
        d = data.detach().cpu().double().numpy()
        axes[0].hist2d(d[:, 0], d[:, 1], bins=120, range=box, cmap="magma")
        axes[0].set_title("data")
        reference = model
    axes[1].imshow(model, origin="lower", extent=extent, aspect="auto", cmap="magma")
    axes[1].set_title("model q")
    axes[2].contour(gx.numpy(), gy.numpy(), reference, levels=8, cmap="viridis", linewidths=1)
    axes[2].scatter(*samples.T.numpy(), s=2, alpha=0.3, color="tab:red")
    axes[2].set_xlim(box[0])
    axes[2].set_ylim(box[1])
    axes[2].set_title("model samples on the target's contours")
    for ax in axes:
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(history: History, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    loss = torch.tensor(history.loss)
    axes[0].plot(loss.numpy(), lw=0.5, alpha=0.35, color="tab:blue", label="batch NLL")
    width = max(1, len(loss) // 100)
    if len(loss) > width:
        smooth = loss.unfold(0, width, 1).mean(-1)
        steps = (torch.arange(len(smooth)) + width - 1).numpy()
        axes[0].plot(steps, smooth.numpy(), color="tab:blue", label="mean")
    axes[0].errorbar(
        history.eval_step,
        history.nll,
        history.nll_stderr,
        fmt="o-",
        ms=3,
        color="tab:orange",
        label="held-out NLL",
    )
    if history.entropy is not None:
        axes[0].axhline(history.entropy, ls="--", color="k", label=f"entropy {history.entropy:.4f}")
    # the first steps' losses can be huge: frame the held-out curve and the entropy instead
    floor = [history.entropy] if history.entropy is not None else []
    low = min(history.nll + floor + [float(loss.quantile(0.01))])
    high = max(history.nll + [float(loss.quantile(0.5))])
    axes[0].set_ylim(low - 0.1, high + 0.4)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats")
    axes[0].legend()
    axes[0].set_title("negative log-likelihood")
    if history.kl:
        kl = torch.tensor(history.kl).clamp_min(1e-4)
        axes[1].errorbar(history.eval_step, kl.numpy(), history.kl_stderr, fmt="o-", ms=3)
        axes[1].set_yscale("log")
        axes[1].set_title(f"KL(p||q), final {history.kl[-1]:.4f} nats")
        axes[1].set_ylabel("nats")
    else:
        axes[1].plot(history.lr)
        axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _plot_deformation(flow: Flow, path: Path, panels: int = 10, seed: int = 0) -> None:
    """The picture of Jang (2018): base samples coloured by starting quadrant, layer by layer."""
    import matplotlib.pyplot as plt

    dist = flow()
    generator = torch.Generator(flow.theta.device).manual_seed(seed)
    z = torch.randn(3000, 2, generator=generator, device=flow.theta.device, dtype=flow.theta.dtype)
    quadrant = ((z[:, 0] < 0).long() + 2 * (z[:, 1] < 0).long()).cpu()
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    stages, x = [("base z", z.cpu())], z
    for i, transform in enumerate(dist.transforms, start=1):
        x, _ = call_and_ladj(transform, x)
        stages.append((f"after {i} / {len(dist.transforms)}: {type(transform).__name__}", x.cpu()))
    if len(stages) > panels:  # a readable subset, evenly spaced, first and last kept
        keep = torch.linspace(0, len(stages) - 1, panels).round().long().unique().tolist()
        stages = [stages[i] for i in keep]
    cols = min(5, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, points) in zip(axes.flat, stages):
        for q in range(4):
            ax.scatter(*points[quadrant == q].T.numpy(), s=1.5, alpha=0.5, color=colors[q])
        lo, hi = _box_of(points, 0.05)
        ax.set_xlim(lo)
        ax.set_ylim(hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.suptitle("base samples coloured by starting quadrant, deformed by the flow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_figures(
    flow: Flow,
    target_or_data: Target | str | Tensor,
    history: History | None,
    out: str | Path,
) -> list[Path]:
    """Write ``density.png``, ``training.png`` (with a history) and ``deformation.png`` to ``out``.

    Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, data = None, None
    if isinstance(target_or_data, Tensor):
        data = target_or_data
    else:
        target = _targets.get(target_or_data) if isinstance(target_or_data, str) else target_or_data
    written = [out / "density.png"]
    _plot_density(flow, target, data, written[0])
    if history is not None and history.loss:
        written.append(out / "training.png")
        _plot_history(history, written[-1])
    if flow.config["dim"] == 2:
        written.append(out / "deformation.png")
        _plot_deformation(flow, written[-1])
    return written
