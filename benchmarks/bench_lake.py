"""LakeCrossing, flow vs Gaussian policy, for SAC and behaviour cloning, over several seeds.

Runs the studies of ``experiments/lake_bc.py`` and ``experiments/lake_sac.py`` (their
:func:`run`, at their defaults unless told otherwise) once per seed, one after the other with one
torch thread, and prints one table of medians over seeds (min-max in brackets): success with
sampled and with deterministic actions, drowned, share of each route among all rollouts, the
exact probability mass on each side (and in the gap straight ahead) at the start state, and the
wall time per step (BC: per gradient step; SAC: per environment step, training included), with
the flow/Gaussian ratio. The table is recorded in ``BENCHMARKS.md``.

Run::

    python benchmarks/bench_lake.py                              # 3 seeds, the defaults
    python benchmarks/bench_lake.py --seeds 0 --skip-bc --sac-args="--steps 2000 --no-mirror"
"""

from __future__ import annotations

import json
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tyro

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

from experiments import lake_bc, lake_sac  # noqa: E402


@dataclass
class Args:
    """LakeCrossing, flow vs Gaussian, SAC and behaviour cloning, over seeds."""

    seeds: tuple[int, ...] = (0, 1, 2)
    """seeds, one run of each study per seed"""
    out: str = "runs/bench_lake"
    """output folder (one subfolder per study and seed)"""
    skip_bc: bool = False
    """skip behaviour cloning"""
    skip_sac: bool = False
    """skip SAC"""
    reuse: bool = False
    """read summaries already in --out instead of running again"""
    bc_args: str = ""
    """options for experiments/lake_bc.py, as one string: --bc-args="--steps 2000" """
    sac_args: str = ""
    """options for experiments/lake_sac.py, as one string: --sac-args="--no-mirror" """
    record: bool = True
    """record the table in BENCHMARKS.md"""


def run(study, out: Path, seed: int, options: str, reuse: bool) -> dict:
    """One run of ``study`` (a module with ``Args`` and ``run``), or its saved summary."""
    if reuse and (out / "summary.json").exists():
        print(f"reusing {out / 'summary.json'}", flush=True)
        return json.loads((out / "summary.json").read_text())
    default = study.Args(out=str(out), seed=seed)
    args = tyro.cli(study.Args, args=shlex.split(options), default=default)
    print(f"$ python experiments/{study.__name__.split('.')[-1]}.py {args}", flush=True)
    return study.run(args)


def cell(values: list[float], percent: bool = True) -> str:
    """Median over seeds, with the range when there are several."""
    values = [100 * v for v in values] if percent else values
    fmt = "{:.1f}" if percent else "{:.2f}"
    med = fmt.format(float(np.median(values)))
    if len(values) == 1:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def rows_of(bc: list[dict], sac: list[dict]) -> list[tuple]:
    """(method, policy, sampled, deterministic, start masses, ms per step, time ratio) rows."""
    rows = []
    for kind in ("flow", "gaussian"):
        if bc:
            st = [s["rollouts"][f"{kind}_stochastic"] for s in bc]
            det = [s["rollouts"][f"{kind}_deterministic"] for s in bc]
            mass = [s["masses"][kind]["start"] for s in bc]
            ms = [1000 * s["fit_seconds"][kind] / s["args"]["steps"] for s in bc]
            ratio = [s["time_ratio_flow_over_gaussian"] for s in bc]
            rows.append(("BC", kind, st, det, mass, ms, ratio))
        if sac and kind in sac[0]:
            st = [s[kind]["stochastic"] for s in sac]
            det = [s[kind]["deterministic"] for s in sac]
            mass = [s[kind]["start_mass"] for s in sac]
            ms = [1000 / s[kind]["steps_per_second"] for s in sac]
            ratio = [s.get("time_ratio_flow_over_gaussian", float("nan")) for s in sac]
            rows.append(("SAC", kind, st, det, mass, ms, ratio))
    return sorted(rows, key=lambda r: (r[0], r[1] != "flow"))


def main() -> None:
    args = tyro.cli(Args)
    out = Path(args.out)
    bc, sac = [], []
    for seed in args.seeds:
        if not args.skip_bc:
            bc.append(run(lake_bc, out / f"bc_seed{seed}", seed, args.bc_args, args.reuse))
        if not args.skip_sac:
            sac.append(run(lake_sac, out / f"sac_seed{seed}", seed, args.sac_args, args.reuse))

    table = (
        "| method | policy | success (sampled) % | success (deterministic) % | drowned % | "
        "cw % | ccw % | start mass cw / ccw / gap % | time per step ms | flow/Gaussian |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    for method, kind, st, det, mass, ms, ratio in rows_of(bc, sac):
        table += (
            f"| {method} | {kind} | {cell([s['success'] for s in st])} | "
            f"{cell([d['success'] for d in det])} | {cell([s['drowned'] for s in st])} | "
            f"{cell([s['cw'] for s in st])} | {cell([s['ccw'] for s in st])} | "
            f"{cell([m['left'] for m in mass])} / {cell([m['right'] for m in mass])} / "
            f"{cell([m['gap'] for m in mass])} | {cell(ms, percent=False)} | "
            f"{cell(ratio, percent=False) if kind == 'flow' else ''} |\n"
        )
    note = (
        f"\nMedian over seeds {list(args.seeds)} (min–max). Rollouts: BC "
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
    if args.record:
        record(
            "LakeCrossing: SAC and behaviour cloning, flow vs Gaussian (bench_lake.py)",
            table + note,
            threads=1,
        )


if __name__ == "__main__":
    main()
