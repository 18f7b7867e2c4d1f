"""A sweep: the grid of trials, run by Ray Tune on local cores or on a cluster.

The grid is ordered environment, seed, algorithm, policy, so that complete sets of policies for
one seed finish together, and one environment's seeds before the next environment's. Trials whose
results file exists in the output folder are left out; the rest run as one Tune experiment stored
in ``<out>/tune/sweep`` (or ``<storage>/sweep``). ``resume=True`` restores that experiment:
finished trials are not run again, interrupted ones continue from their latest checkpoint, failed
ones retry from theirs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

from ray import tune
from ray.tune.logger import JsonLoggerCallback

from flowpolicy.sweep.results import TrialSpec, result_path, write_result
from flowpolicy.sweep.trial import train

EXPERIMENT = "sweep"
_QUIET = {
    "RAY_AIR_NEW_OUTPUT": "0",  # with verbose=0: no status tables, only Progress's lines
    # a snapshot per checkpoint is what lets a resumed trial find its latest one; do not warn
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
    # no TensorBoard/CSV files per trial: Progress exports, JsonLoggerCallback feeds `report`
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
}


def grid(
    algos: list[str],
    envs: list[str],
    policies: list[str],
    seeds: list[int],
    steps: int,
    eval_every: int,
    eval_episodes: int = 5,
    zoo: bool = True,
    overrides: dict | None = None,
) -> list[TrialSpec]:
    """Every combination, environment-major then seed, algorithm and policy."""
    if steps <= 0 or eval_every <= 0:
        raise ValueError(f"steps ({steps}) and eval_every ({eval_every}) must be positive")
    items = tuple(sorted((overrides or {}).items()))
    return [
        TrialSpec(a, p, e, s, steps, eval_every, eval_episodes, zoo, items)
        for e, s, a, p in product(envs, seeds, algos, policies)
    ]


@dataclass
class SweepResult:
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # results already in the output folder
    failed: dict[str, str] = field(default_factory=dict)  # trial -> error
    interrupted: list[str] = field(default_factory=list)  # stopped (Ctrl-C): --resume continues
    # asked for, but not in the resumed experiment's grid: a new sweep (without --resume) runs them
    not_in_resumed: list[str] = field(default_factory=list)


def trial_name(trial) -> str:
    """Tune's name and folder for a trial: the grid point's name."""
    return TrialSpec.from_dict(trial.config["trial"]).name


class Progress(tune.Callback):
    """One line per evaluation; exports a finished trial's record to the output folder."""

    def __init__(self, out: Path):
        self.out = out

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "rows" not in result and "exported" not in result:
            print(
                f"{trial_name(trial)}: step {result['step']:.0f} return "
                f"{result['eval_return']:.1f} ({result['wall_seconds']:.0f} s)",
                flush=True,
            )

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result
        path = result_path(self.out, TrialSpec.from_dict(trial.config["trial"]))
        if "rows" in result and not path.exists():
            write_result(path, json.loads(result["settings"]), json.loads(result["rows"]))
            print(f"{trial_name(trial)}: finished -> {path}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"{trial_name(trial)}: FAILED (see {trial.path}/error.txt)", flush=True)


def _init_ray(num_cpus: int | None, address: str | None) -> bool:
    """Starts local Ray (or joins ``address``); True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    quiet = dict(include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(address="local", num_cpus=num_cpus or os.cpu_count(), **quiet)
    return True


def run_sweep(
    specs: list[TrialSpec],
    out: str | Path,
    num_cpus: int | None = None,
    address: str | None = None,
    resume: bool = False,
    storage: str | None = None,
) -> SweepResult:
    """Runs the trials of ``specs`` without results in ``out``; exports each as it finishes.

    ``storage`` holds Tune's experiment (checkpoints), ``<out>/tune`` by default; on a cluster of
    several machines, a folder all of them share or a cloud URI (``s3://...``), one per sweep.
    """
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    storage = storage or str(out / "tune")
    experiment = f"{storage.rstrip('/')}/{EXPERIMENT}"
    result = SweepResult(skipped=[s.name for s in specs if result_path(out, s).exists()])
    todo = [s for s in specs if not result_path(out, s).exists()]
    restorable = tune.Tuner.can_restore(experiment)
    if not todo and not (resume and restorable):
        return result
    if restorable and not resume:
        raise ValueError(
            f"{experiment} holds an earlier sweep: pass --resume to continue it, or delete "
            f"that folder to start a new one (exported results in {out} are kept either way)"
        )
    os.environ.update(_QUIET)
    started = _init_ray(num_cpus, address)
    trainable = tune.with_resources(train, {"cpu": 1})
    try:
        if resume and restorable:
            tuner = tune.Tuner.restore(
                experiment, trainable, resume_unfinished=True, resume_errored=True
            )
        else:
            tuner = tune.Tuner(
                trainable,
                param_space={
                    "trial": tune.grid_search([s.to_dict() for s in todo]),
                    "results": str(out),
                },
                tune_config=tune.TuneConfig(
                    trial_name_creator=trial_name,
                    trial_dirname_creator=trial_name,
                    reuse_actors=True,  # a process imports torch and SB3 once, not per trial
                ),
                run_config=tune.RunConfig(
                    name=EXPERIMENT,
                    storage_path=storage,
                    verbose=0,
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
                    callbacks=[Progress(out), JsonLoggerCallback()],
                ),
            )
        grid_results = tuner.fit()
    finally:
        if started:
            import ray

            ray.shutdown()
    errors = {}  # trial folder (= trial name) -> error; trials never started have no config
    names = {Path(trial.path).name for trial in grid_results}
    for trial in grid_results:
        if trial.error is not None:
            error = getattr(trial.error, "cause", None) or trial.error  # unwrap Ray's wrapper
            errors[Path(trial.path).name] = f"{type(error).__name__}: {error}"
    for spec in todo:
        if spec.name in errors:
            result.failed[spec.name] = errors[spec.name]
        elif result_path(out, spec).exists():
            result.finished.append(spec.name)
        elif spec.name not in names:
            result.not_in_resumed.append(spec.name)
        else:
            result.interrupted.append(spec.name)
    return result
