"""The command line: ``python -m flowpolicy.density --target banana --out runs/banana``.

Trains a flow at the recipe's defaults (:mod:`flowpolicy.density.recipes`), prints the held-out
NLL, the entropy and the KL with its standard error, and saves the flow, its metrics, its
training history and the figures.

``python -m flowpolicy.density --data FILE.npy --out DIR [--time-limit S]`` fits the rows of a
NumPy array (one sample per row) with the data recipe (:func:`~flowpolicy.density.fit_data`),
prints the NLL of a held-out tenth of the rows, and saves the flow.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from flowpolicy import targets as _targets
from flowpolicy.density.fit import evaluate, fit, resolve_device
from flowpolicy.density.io import check_writable, save
from flowpolicy.density.recipes import (
    DATA_DEFAULTS,
    DEFAULTS,
    SPLINE_DEFAULTS,
    fit_data,
    initial_flow,
)
from flowpolicy.density.source import check_positive, check_range

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowpolicy.density",
        description="Fit an affine + PReLU (or spline) flow to a 2-D target by maximum likelihood; "
        "print the held-out NLL, the entropy and KL(p||q); save the flow and its figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="banana", help=f"one of {_targets.names()}")
    parser.add_argument(
        "--data",
        default=None,
        help="a .npy file of samples, one per row, to fit instead of a target (the data recipe: "
        f"{DATA_DEFAULTS['layers']} coupling splines, batch {DATA_DEFAULTS['batch_size']}, lr "
        f"{DATA_DEFAULTS['lr']}, default budget {DATA_DEFAULTS['time_limit']:g} s; a held-out "
        f"{DATA_DEFAULTS['holdout']:g} of the rows is scored; the flags of the flow and its "
        "init apply to --target only)",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--out", default=None, help="output directory (default runs/<target>)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="maximum steps")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=None,
        help=f"training budget in seconds (the lr schedule follows it); 0: none (default "
        f"{DEFAULTS['time_limit']:g}, {DATA_DEFAULTS['time_limit']:g} with --data)",
    )
    parser.add_argument("--nonlinearity", default="prelu", choices=("prelu", "spline"))
    parser.add_argument(
        "--layers",
        type=int,
        default=None,
        help=f"nonlinear layers (default {DEFAULTS['layers']} for PReLU, "
        f"{SPLINE_DEFAULTS['layers']} for spline)",
    )
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--bins", type=int, default=SPLINE_DEFAULTS["bins"], help="spline bins")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"default {DEFAULTS['batch_size']}, {DATA_DEFAULTS['batch_size']} with --data",
    )
    parser.add_argument(
        "--lr",
        type=float,
        default=None,
        help=f"default {DEFAULTS['lr']:g}, {DATA_DEFAULTS['lr']:g} with --data",
    )
    parser.add_argument("--ema", type=float, default=DEFAULTS["ema"], help="0: no averaging")
    parser.add_argument("--init-strength", type=float, default=DEFAULTS["init_strength"])
    parser.add_argument(
        "--init",
        default=DEFAULTS["init"],
        choices=("data", "layers"),
        help="data: pairs of layers fitted to 2^18 samples (init_hinges_ for PReLU, "
        "init_splines_ for spline); layers: kinks scattered through the bulk (init_layers_)",
    )
    parser.add_argument(
        "--init-spread",
        type=float,
        default=DEFAULTS["init_spread"],
        help="spread of the PReLU kinks at init (init_layers_); negative: skip",
    )
    parser.add_argument(
        "--hinge-spread",
        type=float,
        default=DEFAULTS["hinge_spread"],
        help="kinks of init_hinges_ at the quantiles of N(0, spread^2), in data stds",
    )
    parser.add_argument(
        "--kink-bandwidth",
        type=float,
        default=DEFAULTS["kink_bandwidth"],
        help="kernel width of the kinks' boundary gradient (fit); 0: plain backpropagation",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=200_000, help="final fresh samples")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the 2-D ops are overhead-bound, more threads do not help)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def _check_args(args: argparse.Namespace, target: _targets.Target) -> None:
    """Every flag, before anything is computed (a ValueError naming the flag)."""
    dim = target.dim
    for flag in ("steps", "batch_size", "eval_samples", "threads"):
        check_positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
    inf = math.inf
    check_range("--time-limit", args.time_limit, 0, inf, open_high=True)
    check_range("--lr", args.lr, 0, inf, open_low=True, open_high=True)
    check_range("--ema", args.ema, 0, 1, open_high=True)
    check_range("--init-strength", args.init_strength, 0, inf, open_high=True)
    check_range("--init-spread", args.init_spread, -inf, inf, open_low=True, open_high=True)
    check_range("--hinge-spread", args.hinge_spread, 0, inf, open_low=True, open_high=True)
    check_range("--kink-bandwidth", args.kink_bandwidth, 0, inf, open_high=True)
    if args.layers is not None and args.layers < 0:
        raise ValueError(f"--layers must be a non-negative int, got {args.layers}")
    if not 0 <= args.rank <= dim:
        raise ValueError(f"--rank must be in [0, {dim}] for a {dim}-D target, got {args.rank}")
    if args.bins < 2:
        raise ValueError(f"--bins must be at least 2, got {args.bins}")
    if args.seed < 0:
        raise ValueError(f"--seed must be a non-negative int, got {args.seed}")
    try:
        check_writable(args.out or f"runs/{target.name}")
    except ValueError as error:
        raise ValueError(f"--out: {error}") from None


def _write_run(out: Path, history, device, args, **fields) -> None:
    """Write ``metrics.json`` (``fields``, the run's speed, device and flags) and
    ``history.json`` to ``out``."""
    metrics = {
        **fields,
        "steps": history.steps,
        "train_seconds": history.train_seconds,
        "steps_per_second": history.steps_per_second,
        "device": str(device),
        "args": vars(args),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history.to_dict()) + "\n")


def _report(target, history, scores, device, args, out: Path) -> None:
    """Write ``metrics.json`` and ``history.json`` to ``out`` and print the scores."""
    _write_run(out, history, device, args, target=target.name, **scores)
    print(
        f"{target.name}: {history.steps} steps in {history.train_seconds:.1f} s "
        f"({history.steps_per_second:.0f} steps/s on {device})\n"
        f"  held-out NLL {scores['nll']:.4f} ± {scores['nll_stderr']:.4f} nats "
        f"({args.eval_samples} fresh samples)\n"
        f"  entropy      {scores['entropy']:.4f} nats (exact)\n"
        f"  KL(p||q)     {scores['kl']:.5f} ± {scores['kl_stderr']:.5f} nats\n"
        f"saved to {out} (load with flowpolicy.density.load({str(out)!r}))"
    )


def _resolve_defaults(args: argparse.Namespace) -> None:
    """The flags left unset take the target recipe's defaults, or the data recipe's."""
    recipe = DATA_DEFAULTS if args.data else DEFAULTS
    for flag in ("time_limit", "batch_size", "lr"):
        if getattr(args, flag) is None:
            setattr(args, flag, recipe[flag])


def _load_rows(path: str):
    """The array of ``path`` (.npy), as float64 rows ``(n, d)``."""
    import numpy as np

    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as error:
        raise ValueError(f"--data: cannot read {path} as a .npy array ({error})") from None
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or not np.issubdtype(array.dtype, np.number):
        raise ValueError(
            f"--data: {path} holds a {array.dtype} array of shape {array.shape}; expected "
            "numbers of shape (n, d), one sample per row"
        )
    return torch.from_numpy(array.astype(np.float64))


def _main_data(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    """``--data FILE``: the data recipe on the file's rows; prints the held-out NLL, saves."""
    try:
        data = _load_rows(args.data)
        device = resolve_device(args.device)
        for flag in ("steps", "batch_size", "threads"):
            check_positive(f"--{flag.replace('_', '-')}", getattr(args, flag))
        check_range("--time-limit", args.time_limit, 0, math.inf, open_high=True)
        check_range("--lr", args.lr, 0, math.inf, open_low=True, open_high=True)
        check_range("--ema", args.ema, 0, 1, open_high=True)
        out = Path(args.out or f"runs/{Path(args.data).stem}")
        check_writable(out)
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    try:
        flow, history = fit_data(
            data,
            time_limit=args.time_limit or None,
            device=device,
            seed=args.seed,
            progress=not args.no_progress,
            steps=args.steps if args.steps != DEFAULTS["steps"] else 10**9,
            batch_size=args.batch_size,
            lr=args.lr,
            ema=args.ema or None,
        )
    except (ValueError, TypeError) as error:
        parser.error(str(error))
    save(flow, out)
    _write_run(
        out,
        history,
        device,
        args,
        data=str(args.data),
        rows=len(data),
        dim=data.shape[1],
        nll=history.nll[-1],
        nll_stderr=history.nll_stderr[-1],
    )
    print(
        f"{args.data}: {len(data)} rows of dimension {data.shape[1]}; {history.steps} steps in "
        f"{history.train_seconds:.1f} s ({history.steps_per_second:.0f} steps/s on {device})\n"
        f"  held-out NLL {history.nll[-1]:.4f} ± {history.nll_stderr[-1]:.4f} nats "
        f"({DATA_DEFAULTS['holdout']:g} of the rows, in the data's units)\n"
        f"saved to {out} (load with flowpolicy.density.load({str(out)!r}))"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: parse ``argv``, fit, score, save; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    _resolve_defaults(args)
    if args.data:
        return _main_data(args, parser)
    try:
        target = _targets.get(args.target)
        device = resolve_device(args.device)
        _check_args(args, target)
        if args.layers is None:
            spline = args.nonlinearity == "spline"
            args.layers = SPLINE_DEFAULTS["layers"] if spline else DEFAULTS["layers"]
        torch.set_num_threads(args.threads)
        flow = initial_flow(
            target,
            args.nonlinearity,
            layers=args.layers,
            rank=args.rank,
            bins=args.bins,
            init=args.init,
            init_strength=args.init_strength,
            init_spread=args.init_spread,
            hinge_spread=args.hinge_spread,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    history = fit(
        flow,
        target,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        time_limit=args.time_limit or None,
        ema=args.ema or None,
        kink_bandwidth=args.kink_bandwidth,
    )
    scores = evaluate(flow, target, args.eval_samples, seed=args.seed + 777)
    out = Path(args.out or f"runs/{target.name}")
    save(flow, out)
    _report(target, history, scores, device, args, out)
    if not args.no_figures:
        from flowpolicy.density.plots import save_figures

        save_figures(flow, target, history, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
