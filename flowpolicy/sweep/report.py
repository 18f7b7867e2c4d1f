r"""A sweep's results: per-environment tables, learning curves and a JSON summary.

The final return of a policy on a task aggregates its seeds' last deterministic evaluations by
the interquartile mean (rliable's ``aggregate_iqm``), the mean of the middle half,

.. math:: \mathrm{IQM}(x_{(1)} \le \dots \le x_{(n)})
          = \frac{1}{n - 2k} \sum_{i=k+1}^{n-k} x_{(i)}, \qquad k = \lfloor n/4 \rfloor,

with a 95% percentile interval from rliable's stratified bootstrap over seeds. A last evaluation
of a few episodes is noisy, so beside it each seed's mean over its last ``last`` evaluations is
aggregated the same way. Time per step is training seconds (evaluation and checkpoints excluded)
over steps trained, the median over seeds.

Trials are read from exported files (``<dir>/*.csv``) and from live Tune folders below ``dir``
(``result.json`` of trials still running or not yet exported); an exported file wins.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from flowpolicy.sweep.results import COLUMNS, read_result

BASELINE = "gaussian"


def load(directory: str | Path) -> dict[str, dict]:
    """Trial name -> ``{"spec", "rows", "complete", "source"}``, every trial below ``directory``."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"{directory} is not a folder: pass the sweep's --out folder")
    trials = {}
    for path in sorted(directory.glob("*.csv")):
        settings, rows = read_result(path)
        trials[path.stem] = dict(spec=settings["spec"], rows=rows, source=str(path))
    for path in sorted(directory.rglob("result.json")):
        lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        lines = [r for r in lines if "eval_return" in r]
        if not lines or "trial" not in lines[0].get("config", {}):
            continue
        spec = lines[0]["config"]["trial"]
        name = f"{spec['algo']}_{spec['policy']}_{spec['env']}_s{spec['seed']}"
        if name not in trials:  # a restored trial repeats steps: the latest report wins
            by_step = {int(r["step"]): r for r in lines}
            rows = [{k: float(by_step[s][k]) for k in COLUMNS} for s in sorted(by_step)]
            trials[name] = dict(spec=spec, rows=rows, source=str(path))
    for trial in trials.values():
        trial["complete"] = trial["rows"][-1]["step"] >= trial["spec"]["steps"]
    return trials


def _iqm_ci(scores: np.ndarray, reps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """rliable's IQM over runs (axis 0) of each column, and its 95% bootstrap interval (2, T)."""
    from rliable import library, metrics

    def func(x):
        return np.array([metrics.aggregate_iqm(x[..., t]) for t in range(x.shape[-1])])

    with warnings.catch_warnings():  # arch's notice that rliable's random_state is deprecated
        warnings.simplefilter("ignore", FutureWarning)
        point, interval = library.get_interval_estimates(
            {"x": scores[:, None, :]}, func, reps=reps, random_state=np.random.RandomState(seed)
        )
    return point["x"], interval["x"]


def summarize(trials: dict[str, dict], reps: int = 2000, seed: int = 0, last: int = 3) -> dict:
    """``{task: {policy: stats}}`` over complete trials, task = ``"<env> <algo>"``; ``recent``
    aggregates each seed's mean over its last ``last`` evaluations."""
    if isinstance(last, bool) or not isinstance(last, int) or last < 1:
        raise ValueError(f"last: the number of evaluations to average, at least 1, got {last!r}")
    groups: dict[tuple, dict[int, dict]] = {}
    for trial in trials.values():
        if trial["complete"]:
            s = trial["spec"]
            groups.setdefault((f"{s['env']} {s['algo']}", s["policy"]), {})[s["seed"]] = trial
    summary: dict[str, dict] = {}
    for (task, policy), by_seed in sorted(groups.items()):
        seeds = sorted(by_seed)
        steps = sorted(set.intersection(*({r["step"] for r in by_seed[s]["rows"]} for s in seeds)))
        curves = np.array(
            [[r["eval_return"] for r in by_seed[s]["rows"] if r["step"] in steps] for s in seeds]
        )
        iqm, ci = _iqm_ci(curves, reps, seed)
        recent = curves[:, -last:].mean(axis=1, keepdims=True)  # (seeds, 1)
        recent_iqm, recent_ci = _iqm_ci(recent, reps, seed)
        final_rows = [by_seed[s]["rows"][-1] for s in seeds]
        summary.setdefault(task, {})[policy] = dict(
            seeds=seeds,
            final=[r["eval_return"] for r in final_rows],
            iqm=float(iqm[-1]),
            ci=[float(ci[0, -1]), float(ci[1, -1])],
            recent=dict(
                evaluations=min(last, len(steps)),
                per_seed=recent[:, 0].tolist(),
                iqm=float(recent_iqm[0]),
                ci=[float(recent_ci[0, 0]), float(recent_ci[1, 0])],
            ),
            seconds_per_step=float(np.median([r["train_seconds"] / r["step"] for r in final_rows])),
            curve=dict(step=steps, iqm=iqm.tolist(), low=ci[0].tolist(), high=ci[1].tolist()),
        )
    return summary


def table(task: str, stats: dict[str, dict]) -> str:
    """One task's markdown table; time ratios against the Gaussian where it ran."""
    base = stats.get(BASELINE, {}).get("seconds_per_step")
    k = next(iter(stats.values()))["recent"]["evaluations"] if stats else 0
    lines = [
        f"**{task}**",
        "",
        f"| policy | seeds | final return IQM [95% CI] | per seed | mean of the last {k} "
        "evaluations: IQM [95% CI] | ms / step | time vs Gaussian |",
        "|---|---|---|---|---|---|---|",
    ]
    for policy, s in stats.items():
        ratio = f"{s['seconds_per_step'] / base:.2f}x" if base else "-"
        per_seed = ", ".join(f"{v:.1f}" for v in s["final"])
        r = s["recent"]
        lines.append(
            f"| {policy} | {len(s['seeds'])} | {s['iqm']:.1f} [{s['ci'][0]:.1f}, {s['ci'][1]:.1f}]"
            f" | {per_seed} | {r['iqm']:.1f} [{r['ci'][0]:.1f}, {r['ci'][1]:.1f}] | "
            f"{1e3 * s['seconds_per_step']:.2f} | {ratio} |"
        )
    return "\n".join(lines)


def figure(summary: dict, path: Path) -> None:
    """Learning curves: IQM over seeds with the 95% bootstrap band, one panel per task."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * max(1, len(summary)), 3.6), layout="constrained")
    axes = fig.subplots(1, max(1, len(summary)), squeeze=False)[0]
    for ax, (task, stats) in zip(axes, summary.items()):
        for policy, s in stats.items():
            c = s["curve"]
            ax.plot(c["step"], c["iqm"], label=f"{policy} ({len(s['seeds'])} seeds)")
            ax.fill_between(c["step"], c["low"], c["high"], alpha=0.2)
        ax.set(title=task, xlabel="environment steps", ylabel="return (IQM, 95% CI)")
        ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def report(
    directory: str | Path, out: str | Path | None = None, reps: int = 2000, last: int = 3
) -> str:
    """Reads the trials below ``directory``, writes ``summary.json`` and ``curves.png`` to
    ``out`` (default ``directory``) and returns the markdown tables (``last``: see
    :func:`summarize`)."""
    trials = load(directory)
    out = Path(out or directory)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarize(trials, reps, last=last)
    running = {n: t["rows"][-1]["step"] for n, t in trials.items() if not t["complete"]}
    (out / "summary.json").write_text(json.dumps(dict(tasks=summary, running=running), indent=1))
    if summary:
        figure(summary, out / "curves.png")
    parts = [table(task, stats) for task, stats in summary.items()]
    if running:
        parts.append(
            "Not finished (step reached): "
            + ", ".join(f"{n} ({s:.0f})" for n, s in running.items())
        )
    return "\n\n".join(parts) if parts else f"no trials found below {directory}"
