"""The examples run end to end on a tiny budget, as subprocesses (CleanRL-style), and write
their files: models that SAC.load reads, figures, and a summary with finite numbers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", MPLBACKEND="Agg")
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), "--out", str(out), "--tiny", *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "summary.json") as fh:
        return json.load(fh)


def all_finite(value) -> bool:
    if isinstance(value, dict):
        return all(all_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(all_finite(v) for v in value)
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def test_soft_policy_fit(tmp_path):
    summary = run_example("soft_policy_fit.py", tmp_path)
    assert (tmp_path / "soft_policy_fit.png").stat().st_size > 0
    actors = {(row["kind"], row["gradient"]) for row in summary["table"]}
    assert actors == {(k, g) for k in ("flow", "gaussian") for g in ("reparam", "score")}
    for run in summary["runs"]:
        assert run["left"] + run["right"] == pytest.approx(1.0, abs=0.05)
        assert 0.0 <= run["minority"] <= 0.5 + 1e-6
    assert all_finite(summary)


def test_behaviour_cloning(tmp_path):
    summary = run_example("behaviour_cloning.py", tmp_path)
    assert (tmp_path / "behaviour_cloning.png").stat().st_size > 0
    assert set(summary["rollouts"]) == {
        "flow_stochastic",
        "flow_deterministic",
        "gaussian_stochastic",
        "gaussian_deterministic",
    }
    for stats in summary["rollouts"].values():
        assert 0.0 <= stats["success"] + stats["drowned"] <= 1.0 + 1e-9
    for masses in summary["masses"].values():
        assert 0.0 <= masses["start"]["gap"] <= masses["start"]["total"] <= 1.02  # grid error
    assert all_finite(summary)


def test_train_lake_saves_loadable_models(tmp_path):
    from stable_baselines3 import SAC

    import flowpolicy

    summary = run_example("train_lake.py", tmp_path, "--mirror", "--symmetric-critic")
    for name in ("rollouts.png", "densities.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    for kind in ("flow", "gaussian"):
        assert kind in summary and summary[kind]["forced_episodes"] >= 1
        model = SAC.load(tmp_path / f"{kind}.zip", device="cpu")
        assert isinstance(model.policy, flowpolicy.FlowPolicy) == (kind == "flow")
        action, _ = model.predict([0.0, -1.25], deterministic=True)
        assert action.shape == (2,) and abs(action).max() <= 1.0
        assert summary["curves"][kind], "the learning-curve callback recorded nothing"
        # a mirror-symmetrized critic values mirrored actions at the start alike (up to the
        # rounding of matmuls over differently ordered batches)
        assert max(map(abs, summary[kind]["dq_over_alpha_start"])) < 1e-4
    assert all_finite(summary)
