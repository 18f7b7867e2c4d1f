"""The examples run end to end on a tiny budget, as subprocesses (CleanRL-style), and write
their files: models that SAC.load reads, figures, and a summary with finite numbers. The
experiments (the studies behind the README's numbers) run in-process on a tiny budget too."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def run_example(name: str, out: Path, *extra: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
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


def check_soft_fit(summary: dict, gradients: tuple[str, ...]) -> None:
    actors = {(run["kind"], run["gradient"]) for run in summary["runs"]}
    assert actors == {(k, g) for k in ("flow", "gaussian") for g in gradients}
    for run in summary["runs"]:
        assert run["left"] + run["right"] == pytest.approx(1.0, abs=0.05)
        assert 0.0 <= run["minority"] <= 0.5 + 1e-6
    assert all_finite(summary)


def check_cloning(summary: dict) -> None:
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


def test_soft_policy_fit(tmp_path):
    summary = run_example("soft_policy_fit.py", tmp_path)
    assert (tmp_path / "soft_policy_fit.png").stat().st_size > 0
    check_soft_fit(summary, ("reparam", "score"))


def test_behaviour_cloning(tmp_path):
    summary = run_example("behaviour_cloning.py", tmp_path)
    assert (tmp_path / "behaviour_cloning.png").stat().st_size > 0
    check_cloning(summary)


def test_train_lake_saves_loadable_models(tmp_path):
    from stable_baselines3 import SAC

    import flowpolicy
    from flowpolicy.diagnostics import q_values
    from flowpolicy.symmetry import SymmetricCritic

    summary = run_example("train_lake.py", tmp_path)
    for name in ("rollouts.png", "learning_curves.png"):
        assert (tmp_path / name).stat().st_size > 0
    rng = np.random.default_rng(0)
    for kind in ("flow", "gaussian"):
        model = SAC.load(tmp_path / f"{kind}.zip", device="cpu")
        assert isinstance(model.policy, flowpolicy.FlowPolicy) == (kind == "flow")
        action, _ = model.predict(np.array([0.0, -1.25], dtype=np.float32), deterministic=True)
        assert action.shape == (2,) and abs(action).max() <= 1.0
        assert summary["curves"][kind], "the learning-curve callback recorded nothing"
        # the critic is symmetric by construction, also after loading: mirrored pairs agree
        assert isinstance(model.critic, SymmetricCritic)
        assert abs(summary[kind]["dq_over_alpha_start"]) < 1e-4
        mirror = model.policy.symmetry
        obs = rng.uniform(-2, 2, (16, 2)).astype(np.float32)
        act = rng.uniform(-1, 1, (16, 2)).astype(np.float32)
        q_mirror = q_values(model, mirror.obs(obs), mirror.action(act))
        np.testing.assert_allclose(q_values(model, obs, act), q_mirror, atol=1e-5)
    assert all_finite(summary)


def test_experiments_run_on_a_tiny_budget(tmp_path, monkeypatch, capsys):
    """bench_lake.py drives experiments/lake_bc.py and lake_sac.py; the soft fit runs alone."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import bench_lake

    from experiments import soft_policy_fit

    argv = ["--seeds", "0", "--out", str(tmp_path), "--no-record", "--bc-args=--tiny"]
    sac_args = "--sac-args=--tiny --policy flow --explore-episodes 2"
    monkeypatch.setattr(sys, "argv", ["bench_lake.py", *argv, sac_args])
    bench_lake.main()
    assert "| SAC | flow |" in capsys.readouterr().out
    sac = json.loads((tmp_path / "sac_seed0" / "summary.json").read_text())
    assert sac["flow"]["forced_episodes"] >= 1 and sac["flow"]["curve"] and all_finite(sac)
    check_cloning(json.loads((tmp_path / "bc_seed0" / "summary.json").read_text()))
    fit = soft_policy_fit.Args(out=str(tmp_path / "fit"), gradients=("score",), tiny=True)
    check_soft_fit(soft_policy_fit.run(fit), ("score",))
