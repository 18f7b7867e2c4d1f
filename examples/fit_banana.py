r"""The experiment of Jang (2018): fit an affine + PReLU flow to the banana by maximum likelihood.

Target (Eric Jang, "Normalizing Flows Tutorial, Part 1", 2018):

.. math:: x_2 \sim \mathcal{N}(0, 4^2), \qquad x_1 \mid x_2 \sim \mathcal{N}(x_2^2 / 4, 1),

whose exact entropy is :math:`\log(2\pi e) + \log 4 = 4.2242` nats. A perfect model's held-out
negative log-likelihood equals it, and the gap is :math:`\mathrm{KL}(p\,\|\,q)`.

Run::

    python examples/fit_banana.py --out runs/fit_banana          # the command line's recipe
    python examples/fit_banana.py --out runs/fit_banana --tiny   # a few seconds, smoke test
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import tyro

import flowpolicy as fp
from flowpolicy.density import DEFAULTS


@dataclass
class Args:
    out: str = "runs/fit_banana"
    """where the flow, the figures and summary.json go"""
    layers: int = DEFAULTS["layers"]
    """(affine, PReLU) blocks; the chain ends on one more affine layer"""
    steps: int = DEFAULTS["steps"]
    """Adam steps at most"""
    time_limit: float = DEFAULTS["time_limit"]
    """seconds of training at most (the learning-rate schedule follows the clock)"""
    batch_size: int = DEFAULTS["batch_size"]
    """fresh target samples per step"""
    lr: float = DEFAULTS["lr"]
    """peak learning rate (cosine-decayed)"""
    device: str = "auto"
    """auto (CUDA when available), cpu or cuda"""
    seed: int = 0
    """seed of the flow, of the samples and of the batches"""
    tiny: bool = False
    """a tiny budget, for smoke tests"""


def main(args: Args) -> None:
    if args.tiny:
        args.layers, args.steps, args.batch_size, args.time_limit = 4, 100, 256, 20.0
    torch.set_num_threads(1)  # a 2-D flow is overhead-bound: more threads do not help
    torch.manual_seed(args.seed)
    target = fp.targets.banana

    # 1. The flow: affine layers (lower-triangular times a rank-2 update) between PReLUs.
    flow = fp.Flow(dim=2, layers=args.layers, rank=2, nonlinearity="prelu", seed=args.seed)

    # 2. Start the kinks where the data is: regress one coordinate of target samples on hinges
    #    relu(x_s - b_j) of the other, and build the chain as pairs of PReLU layers (slopes
    #    alpha, 1/alpha around a shear) that each add one hinge. Only samples are used.
    generator = torch.Generator().manual_seed(args.seed + 99)
    data = target.sample(DEFAULTS["init_samples"], generator=generator)
    fp.density.init_hinges_(flow, data, spread=DEFAULTS["hinge_spread"])

    # 3. Maximum likelihood on fresh target samples each step, with the weights averaged (EMA).
    #    A sample's log-det jumps by log(alpha) when it crosses a kink: kink_bandwidth adds that
    #    boundary term to the gradient, which backpropagation alone misses.
    history = fp.density.fit(
        flow,
        target,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=args.device,
        seed=args.seed,
        time_limit=args.time_limit,
        kink_bandwidth=DEFAULTS["kink_bandwidth"],
    )

    # 4. Score on fresh samples: held-out NLL vs the exact entropy, and KL(p||q).
    scores = fp.density.evaluate(flow, target, num_samples=20_000 if args.tiny else 200_000)
    print(
        f"held-out NLL {scores['nll']:.4f} ± {scores['nll_stderr']:.4f}, "
        f"entropy {scores['entropy']:.4f}, KL(p||q) {scores['kl']:.4f} ± {scores['kl_stderr']:.4f}"
    )

    # 5. Save the flow (fp.density.load(out) rebuilds it) and the tutorial's pictures.
    out = Path(args.out)
    fp.density.save(flow, out)
    figures = fp.density.save_figures(flow, target, history, out)
    summary = {
        **scores,
        "steps": history.steps,
        "train_seconds": history.train_seconds,
        "figures": [p.name for p in figures],
        "args": asdict(args),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"saved the flow, {', '.join(summary['figures'])} and summary.json to {out}")


if __name__ == "__main__":
    main(tyro.cli(Args))
