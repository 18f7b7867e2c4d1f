"""Command line: ``python -m flowpolicy.sweep run ...`` and ``... report DIR``.

    python -m flowpolicy.sweep run --algo sac --env HalfCheetah-v5 Hopper-v5 \\
        --policies gaussian prelu spline --seeds 0 1 2 --steps 50000 --eval-every 5000 \\
        --out benchmarks/results/mujoco-sac
    python -m flowpolicy.sweep report benchmarks/results/mujoco-sac
"""

from __future__ import annotations

import argparse
import ast
import sys

from flowpolicy.sweep.algos import ALGOS, POLICIES


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(
            f"--set takes key=value (e.g. learning_starts=1000), not {text!r}"
        )
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value  # a plain string, e.g. ent_coef=auto_0.1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m flowpolicy.sweep", description=__doc__.split("\n")[0]
    )
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid of trials on Ray Tune")
    run.add_argument("--algo", nargs="+", default=["sac"], choices=sorted(ALGOS))
    run.add_argument("--env", nargs="+", required=True, help="Gymnasium ids")
    run.add_argument("--policies", nargs="+", default=list(POLICIES), choices=POLICIES)
    run.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    run.add_argument("--steps", type=int, required=True, help="environment steps per trial")
    run.add_argument("--eval-every", type=int, default=5000, help="steps between evaluations")
    run.add_argument("--eval-episodes", type=int, default=5)
    run.add_argument("--out", required=True, help="folder of results (<trial>.csv) and tune/")
    run.add_argument("--num-cpus", type=int, default=None, help="local Ray's CPUs (default: all)")
    run.add_argument("--address", default=None, help="join a running Ray cluster (e.g. auto)")
    storage_help = "Tune's checkpoints (default OUT/tune); on a cluster: a shared path or URI"
    run.add_argument("--storage", default=None, help=storage_help)
    run.add_argument("--resume", action="store_true", help="continue the sweep stored in --out")
    run.add_argument("--no-zoo", dest="zoo", action="store_false", help="SB3's defaults")
    run.add_argument("--set", dest="overrides", nargs="+", type=_override, default=[],
                     metavar="KEY=VALUE", help="hyperparameters over the zoo's")  # fmt: skip
    report = sub.add_parser("report", help="tables, curves and summary.json of a sweep's results")
    report.add_argument("dir", help="a sweep's --out folder (exported files and/or tune/)")
    report.add_argument("--out", default=None, help="where summary.json and curves.png go")
    report.add_argument("--reps", type=int, default=2000, help="bootstrap replications")
    report.add_argument(
        "--last", type=int, default=3, help="evaluations averaged per seed beside the final one"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "report":
        from flowpolicy.sweep.report import report

        print(report(args.dir, args.out, args.reps, args.last))
        return 0
    import torch

    from flowpolicy.sweep.run import grid, run_sweep

    torch.set_num_threads(1)
    specs = grid(
        args.algo, args.env, args.policies, args.seeds, args.steps, args.eval_every,
        args.eval_episodes, args.zoo, dict(args.overrides),
    )  # fmt: skip
    result = run_sweep(specs, args.out, args.num_cpus, args.address, args.resume, args.storage)
    print(
        f"{len(result.finished)} finished, {len(result.skipped)} already had results, "
        f"{len(result.failed)} failed, {len(result.interrupted)} interrupted"
    )
    for name, error in result.failed.items():
        print(f"FAILED {name}: {error.strip().splitlines()[-1]}")
    if result.not_in_resumed:
        print(
            f"{len(result.not_in_resumed)} trials were not part of the resumed sweep; once it is "
            f"done, delete {args.storage or args.out + '/tune'} and run without --resume"
        )
    if result.interrupted or result.failed:
        words = [w for w in (argv or sys.argv[1:]) if w != "--resume"]
        print(f"continue with: python -m flowpolicy.sweep {' '.join(words)} --resume")
    return 1 if result.failed or result.interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
