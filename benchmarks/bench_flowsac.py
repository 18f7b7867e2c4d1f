"""FlowSAC's actor updates side by side: the score-function and combined updates vs SAC's.

Three parts (``--parts``), each printed as a markdown table and recorded in BENCHMARKS.md:

1. ``lake``: SAC on LakeCrossing-v0 (``experiments/lake_sac.py``, its defaults: 8k steps, the
   spline flow, the symmetry tools) for the flow with the score update, the combined update
   and SAC's update, and the Gaussian with SAC's update, same seeds. Per run: the route split of 200
   stochastic rollouts (both routes kept = each >= 30%), success, and beside it the critic's
   :math:`\\Delta Q/\\alpha` at the start between the two mirrored tangent headings (an actor
   optimal for its critic keeps a mass ratio :math:`e^{-|\\Delta Q|/\\alpha}` between them; with
   the symmetric critic it is 0 by construction, so the split is the actor's alone).
   ``--no-symmetry`` runs without the mirrored buffer and the symmetric critic instead, and the
   figure shows :math:`\\Delta Q/\\alpha` and the clockwise mass at the start over training.
   Runs go to ``--out``, each in its own process (``--jobs`` at a time); a finished run
   (``summary.json``) is read again, not re-run.
2. ``timing``: milliseconds (thread CPU time) per gradient step on Pendulum-v1 (zoo settings,
   batch 256) of each update, for the Gaussian and the flow: what the score updates cost.
3. ``returns``: Pendulum-v1 (zoo settings) final deterministic return of each update, per seed.

Run::

    python benchmarks/bench_flowsac.py --parts lake --seeds 0 1 2 3 4 --jobs 2
    python benchmarks/bench_flowsac.py --parts lake --no-symmetry --seeds 0 1 2 3 4
    python benchmarks/bench_flowsac.py --parts timing
    python benchmarks/bench_flowsac.py --parts returns --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

# (policy, actor gradient): the rows compared on the lake
LAKE_VARIANTS = [
    ("flow", "score"),
    ("flow", "combined"),
    ("flow", "reparam"),
    ("gaussian", "reparam"),
]
MIN_ROUTE_SHARE = 0.3
NOTE_LOAD = (
    "The machine was shared with other jobs (2 cores, several processes): wall times are not "
    "comparable across rows; thread CPU times are."
)


def lake_run(out: Path, seed: int, policy: str, gradient: str, args) -> dict | None:
    """One experiments/lake_sac.py run in its own process (or its saved summary; with
    ``--finished-only``, ``None`` where there is none)."""
    folder = out / f"seed{seed}" / f"{policy}-{gradient}"
    summary, failed = folder / "summary.json", folder / "failed.txt"
    if failed.exists():  # a run that raised is reported, not run again
        return dict(failed=failed.read_text().strip())
    if not summary.exists() and args.finished_only:
        return None
    if not summary.exists():
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, str(ROOT / "experiments" / "lake_sac.py"), "--out", str(folder)]
        command += ["--seed", str(seed), "--policy", policy, "--actor-gradient", gradient]
        command += ["--steps", str(args.steps), "--score-samples", str(args.score_samples)]
        command += ["--rollouts", str(args.rollouts)]
        if args.no_symmetry:
            command += ["--no-mirror", "--no-symmetric-critic"]
        if args.tiny:
            command += ["--tiny"]
        with open(folder / "log.txt", "w") as log:
            code = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT).returncode
        if code != 0:
            error = (folder / "log.txt").read_text().strip().splitlines()[-1]
            failed.write_text(error)
            return dict(failed=error)
    data = json.loads(summary.read_text())
    return dict(data[policy], steps=data["args"]["steps"], samples=data["args"]["score_samples"])


def lake(args) -> None:
    out = Path(args.out) / ("nosym" if args.no_symmetry else "sym")
    jobs = [(s, p, g) for s in args.seeds for p, g in LAKE_VARIANTS]
    with ThreadPoolExecutor(args.jobs) as pool, tqdm(total=len(jobs), desc="lake runs") as bar:
        futures = {job: pool.submit(lake_run, out, *job, args) for job in jobs}
        results = {}
        for job, future in futures.items():
            if (result := future.result()) is not None:
                results[job] = result
            bar.update()
    lines = [
        "| actor | update (K) | seed | steps | cw / ccw % (sampled) | both ≥ 30% | success % | "
        "ΔQ/α at start (α) | start mass cw / ccw / gap % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    failures = {job: r["failed"] for job, r in results.items() if "failed" in r}
    results = {job: r for job, r in results.items() if "failed" not in r}
    for (seed, policy, gradient), error in failures.items():
        lines.append(f"| {policy} | {gradient} | {seed} | - | raised: {error} | no | - | - | - |")
    for (seed, policy, gradient), r in results.items():
        s, m = r["stochastic"], r["start_mass"]
        both = min(s["cw"], s["ccw"]) >= MIN_ROUTE_SHARE
        update = gradient if gradient == "reparam" else f"{gradient} ({r['samples']})"
        lines.append(
            f"| {policy} | {update} | "
            f"{seed} | {r['steps']} | {100 * s['cw']:.0f} / {100 * s['ccw']:.0f} | "
            f"{'yes' if both else 'no'} | {100 * s['success']:.0f} | "
            f"{r['dq_over_alpha_start'][0]:+.2f} ({r['alpha']:.3f}) | "
            f"{100 * m['left']:.0f} / {100 * m['right']:.0f} / {100 * m['gap']:.1f} |"
        )
    summary = []
    for policy, gradient in LAKE_VARIANTS:
        runs = [r for (_, p, g), r in results.items() if (p, g) == (policy, gradient)]
        raised = sum((p, g) == (policy, gradient) for _, p, g in failures)
        if not runs:
            summary.append(f"{policy} {gradient}: no finished run ({raised} raised)")
            continue
        kept = sum(
            min(r["stochastic"]["cw"], r["stochastic"]["ccw"]) >= MIN_ROUTE_SHARE for r in runs
        )
        success = statistics.median(r["stochastic"]["success"] for r in runs)
        summary.append(
            f"{policy} {gradient}: both routes on {kept}/{len(runs) + raised} seeds, median "
            f"success {100 * success:.0f}% of the finished runs ({raised} raised)"
        )
    mode = "without" if args.no_symmetry else "with"
    note = (
        f"\n\nLakeCrossing-v0, seeds {list(args.seeds)}, {mode} the symmetry tools (mirrored "
        f"replay buffer and symmetric critic); K: actions per state of the score and combined "
        f"updates; {args.rollouts} sampled rollouts per run. ΔQ/α: min-critic value of the cw "
        f"minus the ccw tangent heading at the start, over the final α. {'; '.join(summary)}. "
        f"{NOTE_LOAD}\n"
    )
    table = "\n".join(lines) + note
    print(table)
    if results:
        name = f"flowsac_lake_{'nosym' if args.no_symmetry else 'sym'}.png"
        plot_lake(results, Path(args.figures) / name, args)
    if args.record:
        record(f"FlowSAC on LakeCrossing, {mode} the symmetry tools (bench_flowsac.py)", table)


def plot_lake(results: dict, path: Path, args) -> None:
    """Route split per run (bars, ΔQ/α above), and ΔQ/α and the cw mass at the start over
    training."""
    fig = Figure(figsize=(14, 4.2))
    bars, dq, mass = fig.subplots(1, 3)
    colors = dict(zip(LAKE_VARIANTS, ("C0", "C3", "C1", "C2")))
    labelled: set[tuple[str, str]] = set()  # one legend entry per variant
    for i, ((_, policy, gradient), r) in enumerate(results.items()):
        s = r["stochastic"]
        bars.bar(i, s["cw"], color="C4")
        bars.bar(i, s["ccw"], bottom=s["cw"], color="C9")
        bars.text(i, 1.02, f"{r['dq_over_alpha_start'][0]:+.1f}", ha="center", fontsize=6)
        label = f"{policy} {gradient}" if (policy, gradient) not in labelled else None
        labelled.add((policy, gradient))
        steps = [q["timesteps"] for q in r["qgap"]]
        c = colors[(policy, gradient)]
        dq.plot(steps, [q["dq_over_alpha"][0] for q in r["qgap"]], color=c, label=label)
        curve = r["curve"]
        mass.plot([e["timesteps"] for e in curve], [e["cw_mass_start"][0] for e in curve], color=c)
    names = [f"{p[0]}{g[0].upper()}{s}" for s, p, g in results]  # e.g. fS0: flow, score, seed 0
    bars.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
    bars.axhline(MIN_ROUTE_SHARE, color="k", lw=0.5)
    bars.set_title("cw (purple) / ccw (cyan) share of 200 sampled rollouts; ΔQ/α above", fontsize=8)
    bars.set_ylim(0, 1.1)
    dq.set_title("ΔQ/α at the start (cw − ccw tangent) over training", fontsize=8)
    dq.legend(fontsize=7)
    mass.set_title("exact cw mass at the start over training", fontsize=8)
    mass.set_ylim(0, 1)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def pendulum_model(policy: str, gradient: str, seed: int, samples: int, **kwargs):
    from flowpolicy import FlowPolicy
    from flowpolicy.flowsac import FlowSAC

    return FlowSAC(
        FlowPolicy if policy == "flow" else "MlpPolicy",
        "Pendulum-v1",
        learning_rate=1e-3,  # rl-baselines3-zoo's SAC settings for Pendulum-v1
        actor_gradient=gradient,
        score_samples=samples,
        seed=seed,
        **kwargs,
    )


def timing(args) -> None:
    rows = [("gaussian", "reparam", 0), ("gaussian", "score", args.score_samples)]
    rows += [("flow", "reparam", 0)] + [("flow", "score", k) for k in args.timing_samples]
    rows += [("flow", "combined", args.score_samples)]
    models = {
        row: pendulum_model(*row[:2], 0, max(row[2], 2), learning_starts=1000) for row in rows
    }
    for model in models.values():
        model.learn(1000)  # fills the buffer
        model.train(gradient_steps=3, batch_size=256)  # warm-up
    times: dict[tuple, list[float]] = {row: [] for row in rows}
    for _ in tqdm(range(args.rounds), desc="timing rounds"):
        for row, model in models.items():
            start = time.thread_time()
            model.train(gradient_steps=args.timing_steps, batch_size=256)
            times[row].append(1e3 * (time.thread_time() - start) / args.timing_steps)
    lines = [
        "| actor | update | actions per state | ms per gradient step (median) | × reparam |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        ms = statistics.median(times[row])
        base = statistics.median(times[(row[0], "reparam", 0)])
        lines.append(f"| {row[0]} | {row[1]} | {row[2] or 1} | {ms:.1f} | {ms / base:.2f} |")
    note = (
        f"\n\nPendulum-v1, batch 256, default networks (flow: FlowPolicy's defaults, 4 PReLU "
        f"layers), {args.rounds} rounds of {args.timing_steps} steps per model, interleaved; "
        f"thread CPU time. {NOTE_LOAD}\n"
    )
    table = "\n".join(lines) + note
    print(table)
    if args.record:
        record("FlowSAC: time per gradient step of each actor update (bench_flowsac.py)", table)


def pendulum_run(policy: str, gradient: str, seed: int, args) -> float:
    """One Pendulum-v1 run's final deterministic return (or its saved result in ``--out``)."""
    from stable_baselines3.common.evaluation import evaluate_policy

    path = Path(args.out) / "returns" / f"{policy}-{gradient}-s{seed}.json"
    if path.exists():
        return json.loads(path.read_text())["return"]
    torch.set_num_threads(1)  # in a worker process
    model = pendulum_model(policy, gradient, seed, args.score_samples)
    model.learn(args.pendulum_steps)
    mean, _ = evaluate_policy(model, model.get_env(), 10, deterministic=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"return": float(mean), "steps": args.pendulum_steps}))
    return float(mean)


def returns(args) -> None:
    rows = [(p, g) for p in ("gaussian", "flow") for g in ("reparam", "score", "combined")]
    jobs = [(p, g, s) for s in args.seeds for p, g in rows]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.jobs, mp_context=spawn) as pool:
        futures = {job: pool.submit(pendulum_run, *job, args) for job in jobs}
        results = {job: future.result() for job, future in tqdm(futures.items(), "Pendulum")}
    lines = ["| actor | update | return per seed | mean |", "|---|---|---|---|"]
    for policy, gradient in rows:
        values = [results[(policy, gradient, s)] for s in args.seeds]
        cells = ", ".join(f"{v:.0f}" for v in values)
        lines.append(f"| {policy} | {gradient} | {cells} | {np.mean(values):.0f} |")
    note = (
        f"\n\nPendulum-v1, zoo settings (lr 1e-3), {args.pendulum_steps} steps, 10 deterministic "
        f"evaluation episodes; score and combined updates: {args.score_samples} actions per state. "
        f"{NOTE_LOAD}\n"
    )
    table = "\n".join(lines) + note
    print(table)
    if args.record:
        record("FlowSAC: Pendulum-v1 return of each actor update (bench_flowsac.py)", table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--parts", nargs="+", default=["lake", "timing"],
                        choices=["lake", "timing", "returns"])  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=int, default=8000, help="lake: steps per run")
    parser.add_argument("--no-symmetry", action="store_true", help="lake: without the tools")
    parser.add_argument("--score-samples", type=int, default=4, help="actions per state")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (lake, returns)")
    parser.add_argument("--out", default="runs/bench_flowsac")
    parser.add_argument("--figures", default=str(ROOT / "docs" / "figures"))
    parser.add_argument("--timing-samples", type=int, nargs="+", default=[4, 16, 64])
    parser.add_argument("--timing-steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pendulum-steps", type=int, default=20_000)
    parser.add_argument("--tiny", action="store_true", help="tiny lake runs (a smoke test)")
    parser.add_argument("--finished-only", action="store_true",
                        help="lake: tabulate the finished runs in --out, start none")  # fmt: skip
    parser.add_argument("--rollouts", type=int, default=200, help="lake: sampled rollouts")
    parser.add_argument("--no-record", dest="record", action="store_false")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for part in args.parts:
        dict(lake=lake, timing=timing, returns=returns)[part](args)


if __name__ == "__main__":
    main()
