"""A trial's identity (:class:`TrialSpec`) and its exported result file.

``<results>/<trial>.csv`` holds a ``# settings: {json}`` line recording everything the trial ran
with (the spec, the hyperparameters, the zoo entry they came from), then one row per evaluation:
``step, eval_return, eval_return_std, wall_seconds, train_seconds``.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path
from typing import Any

COLUMNS = ("step", "eval_return", "eval_return_std", "wall_seconds", "train_seconds")


@dataclasses.dataclass(frozen=True)
class TrialSpec:
    """One point of a sweep's grid; ``overrides`` replace the zoo's hyperparameters."""

    algo: str
    policy: str
    env: str
    seed: int
    steps: int
    eval_every: int
    eval_episodes: int = 5
    zoo: bool = True
    overrides: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        return f"{self.algo}_{self.policy}_{self.env}_s{self.seed}"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrialSpec:
        return cls(**dict(d, overrides=tuple(tuple(kv) for kv in d.get("overrides", ()))))


def result_path(results_dir: str | Path, spec: TrialSpec) -> Path:
    return Path(results_dir) / f"{spec.name}.csv"


def write_result(path: Path, settings: dict, rows: list[dict]) -> None:
    """The exported file, written whole then renamed (a killed run leaves no half file)."""
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        f.write(f"# settings: {json.dumps(settings, sort_keys=True)}\n")
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def read_result(path: str | Path) -> tuple[dict, list[dict]]:
    """(settings, rows) of an exported trial, rows with float values."""
    with open(path) as f:
        first = f.readline()
        if not first.startswith("# settings: "):
            raise ValueError(f"{path} is not a sweep result (no '# settings:' line)")
        rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]
    return json.loads(first[len("# settings: ") :]), rows
