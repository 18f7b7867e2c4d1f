"""LakeCrossing, flow vs Gaussian policy, for SAC and behaviour cloning, over several seeds.

Runs ``examples/behaviour_cloning.py`` and ``examples/train_lake.py`` (at their defaults unless
told otherwise) once per seed, one process at a time with one torch thread, reads their
``summary.json`` and prints one table of medians over seeds (min-max in brackets): success with
sampled and with deterministic actions, drowned, share of each route among all rollouts, the
exact probability mass on each side (and in the gap straight ahead) at the start state, and the
wall time per step (BC: per gradient step; SAC: per environment step, training included), with
the flow/Gaussian ratio. The table is appended to ``BENCHMARKS.md``.

Run::

    python benchmarks/bench_lake.py                       # 3 seeds, the examples' defaults
    python benchmarks/bench_lake.py --seeds 0 --sac-args --steps 2000   # quick look
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run(script: str, out: Path, seed: int, extra: list[str], reuse: bool = False) -> dict:
    """Run one example as a subprocess (progress bars pass through) and read its summary.

    With ``reuse``, a ``summary.json`` already in ``out`` (from an earlier run of the same
    command) is read instead of training again."""
    if reuse and (out / "summary.json").exists():
        print(f"reusing {out / 'summary.json'}", flush=True)
        with open(out / "summary.json") as fh:
            return json.load(fh)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    cmd = [sys.executable, str(ROOT / "examples" / script), "--out", str(out), "--seed", str(seed)]
    print("$", " ".join(cmd + extra), flush=True)
    subprocess.run(cmd + extra, cwd=ROOT, env=env, check=True)
    with open(out / "summary.json") as fh:
        return json.load(fh)


def cell(values: list[float], percent: bool = True) -> str:
    """Median over seeds, with the range when there are several."""
    values = [100 * v for v in values] if percent else values
    fmt = "{:.1f}" if percent else "{:.2f}"
    med = fmt.format(float(np.median(values)))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/bench_lake")
    parser.add_argument("--skip-bc", action="store_true")
    parser.add_argument("--skip-sac", action="store_true")
    parser.add_argument(
        "--reuse", action="store_true", help="read summaries already in --out instead of rerunning"
    )
    parser.add_argument(
        "--bc-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra arguments for behaviour_cloning.py (must come last)",
    )
    parser.add_argument(
        "--sac-args",
        nargs=argparse.REMAINDER,
        default=[],
        help="extra arguments for train_lake.py (must come last)",
    )
    args = parser.parse_args()
    out = Path(args.out)

    bc, sac = [], []
    for seed in args.seeds:
        if not args.skip_bc:
            bc.append(
                run("behaviour_cloning.py", out / f"bc_seed{seed}", seed, args.bc_args, args.reuse)
            )
        if not args.skip_sac:
            sac.append(
                run("train_lake.py", out / f"sac_seed{seed}", seed, args.sac_args, args.reuse)
            )

    header = (
        "| method | policy | success (sampled) % | success (deterministic) % | drowned % | "
        "cw % | ccw % | start mass cw / ccw / gap % | time per step ms | flow/Gaussian |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = []
    for kind in ("flow", "gaussian"):
        if bc:
            st = [s["rollouts"][f"{kind}_stochastic"] for s in bc]
            det = [s["rollouts"][f"{kind}_deterministic"] for s in bc]
            mass = [s["masses"][kind]["start"] for s in bc]
            ms = [1000 * s["fit_seconds"][kind] / s["args"]["steps"] for s in bc]
            ratio = [s["time_ratio_flow_over_gaussian"] for s in bc]
            rows.append(
                (
                    "BC",
                    kind,
                    st,
                    det,
                    mass,
                    ms,
                    ratio,
                )
            )
        if sac:
            st = [s[kind]["stochastic"] for s in sac]
            det = [s[kind]["deterministic"] for s in sac]
            mass = [s[kind]["start_mass"] for s in sac]
            ms = [1000 / s[kind]["steps_per_second"] for s in sac]
            ratio = [s.get("time_ratio_flow_over_gaussian", float("nan")) for s in sac]
            rows.append(("SAC", kind, st, det, mass, ms, ratio))
    rows.sort(key=lambda r: (r[0], r[1] != "flow"))
    table = header
    for method, kind, st, det, mass, ms, ratio in rows:
        table += (
            f"| {method} | {kind} | {cell([s['success'] for s in st])} | "
            f"{cell([d['success'] for d in det])} | {cell([s['drowned'] for s in st])} | "
            f"{cell([s['cw'] for s in st])} | {cell([s['ccw'] for s in st])} | "
            f"{cell([m['left'] for m in mass])} / {cell([m['right'] for m in mass])} / "
            f"{cell([m['gap'] for m in mass])} | {cell(ms, percent=False)} | "
            f"{cell(ratio, percent=False) if kind == 'flow' else ''} |\n"
        )
    note = (
        f"\nMedian over seeds {args.seeds} (min–max). Rollouts: BC "
        f"{bc[0]['args']['rollouts'] if bc else '-'} per policy and mode; SAC "
        f"{sac[0]['args']['rollouts'] if sac else '-'} sampled and "
        f"{sac[0]['args']['det_rollouts'] if sac else '-'} deterministic. cw/ccw: share of "
        "all rollouts that reached home by that route. Start mass: exact (grid integration; Monte "
        "Carlo where the density is narrower than a grid cell) "
        "mass of actions heading left (cw) / right (ccw) of the lake centre, and in the strip "
        "|lateral| < 0.2 heading at it (gap). SAC steps: "
        f"{sac[0]['args']['steps'] if sac else '-'} per policy.\n"
    )
    print(table + note)
    record(
        "LakeCrossing: flow vs Gaussian, SAC and behaviour cloning (bench_lake.py)",
        table + note,
        threads=1,
    )


if __name__ == "__main__":
    main()
