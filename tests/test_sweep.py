"""flowpolicy.sweep: a local Ray Tune sweep end to end, interrupted and resumed, with a failing
trial, then its report checked against the per-trial files in the output folder.

One sweep (2 policies x 2 seeds on Pendulum-v1 at a tiny budget, plus a trial on an unknown
environment) is shared by the tests: Ray starts once for the module.
"""

import json
import os
import signal
import threading
import time

import numpy as np
import pytest
import ray
import scipy.stats

from flowpolicy.sweep import algos
from flowpolicy.sweep.__main__ import parser
from flowpolicy.sweep.report import load, report
from flowpolicy.sweep.results import TrialSpec, read_result, result_path
from flowpolicy.sweep.run import grid, run_sweep

BAD = TrialSpec("sac", "gaussian", "NoSuchEnv-v0", 0, steps=200, eval_every=100)


def _interrupt(out, stop: threading.Event) -> None:
    """Stops the sweep once a trial is exported and another has a checkpoint, by SIGUSR1, on
    which Tune stops the run as on Ctrl-C and saves its state."""
    while not stop.is_set():
        exported = {p.stem for p in out.glob("*.csv")}
        running = {p.parent.name for p in out.glob("tune/sweep/*/checkpoint_*")} - exported
        if exported and running:
            os.kill(os.getpid(), signal.SIGUSR1)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    specs = grid(
        ["sac"], ["Pendulum-v1"], ["gaussian", "prelu"], [0, 1], steps=200, eval_every=100,
        eval_episodes=1, overrides=dict(learning_starts=100),
    )  # fmt: skip
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        stop = threading.Event()
        watcher = threading.Thread(target=_interrupt, args=(out, stop))
        watcher.start()
        first = run_sweep([*specs, BAD], out)
        stop.set()
        watcher.join()
        exported = {p.name: p.stat().st_mtime_ns for p in out.glob("*.csv")}
        second = run_sweep([*specs, BAD], out, resume=True)
    finally:
        ray.shutdown()
    return dict(out=out, specs=specs, first=first, exported=exported, second=second)


def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep):
    out, first, second = sweep["out"], sweep["first"], sweep["second"]
    assert first.interrupted, "the first run was stopped before every trial finished"
    assert 1 <= len(sweep["exported"]) < len(sweep["specs"])
    # every trial has its results now; those exported before the interruption were not redone
    for spec in sweep["specs"]:
        assert result_path(out, spec).exists()
    for name, mtime in sweep["exported"].items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert set(first.finished) | set(second.finished) == {s.name for s in sweep["specs"]}
    assert not set(first.finished) & set(second.finished)
    # a trial that was running continued from its checkpoint: one curve, steps in order
    resumed = []
    for spec in sweep["specs"]:
        settings, rows = read_result(result_path(out, spec))
        assert [r["step"] for r in rows] == [0, 100, 200]
        resumed += settings.get("resumed_at", [])
    assert resumed and all(0 <= s < 200 for s in resumed)


def test_failing_trial_is_reported_and_others_finish(sweep):
    second = sweep["second"]
    assert list(second.failed) == [BAD.name] and "NoSuchEnv" in second.failed[BAD.name]
    assert not second.interrupted and not second.not_in_resumed
    assert BAD.name not in sweep["first"].finished
    assert not result_path(sweep["out"], BAD).exists()


def test_report_matches_per_trial_results(sweep):
    out = sweep["out"]
    text = report(out, reps=500)
    summary = json.loads((out / "summary.json").read_text())["tasks"]["Pendulum-v1 sac"]
    assert (out / "curves.png").stat().st_size > 0
    assert set(summary) == {"gaussian", "prelu"}
    for policy, stats in summary.items():
        per_seed_rows = [
            read_result(result_path(out, TrialSpec("sac", policy, "Pendulum-v1", s, 200, 100)))[1]
            for s in (0, 1)
        ]
        finals = [rows[-1]["eval_return"] for rows in per_seed_rows]
        assert stats["seeds"] == [0, 1]
        assert stats["final"] == pytest.approx(finals)
        assert stats["iqm"] == pytest.approx(scipy.stats.trim_mean(finals, 0.25))
        assert stats["ci"][0] <= stats["iqm"] <= stats["ci"][1]
        assert min(finals) <= stats["ci"][0] and stats["ci"][1] <= max(finals)
        # beside it, each seed's mean over its last evaluations (all 3 here: 0, 100, 200 steps)
        means = [np.mean([r["eval_return"] for r in rows]) for rows in per_seed_rows]
        assert stats["recent"]["evaluations"] == 3
        assert stats["recent"]["per_seed"] == pytest.approx(means)
        assert stats["recent"]["iqm"] == pytest.approx(scipy.stats.trim_mean(means, 0.25))
        assert stats["seconds_per_step"] > 0
        assert f"{stats['iqm']:.1f} [{stats['ci'][0]:.1f}, {stats['ci'][1]:.1f}]" in text
        for value in finals:
            assert f"{value:.1f}" in text


def test_report_rejects_a_bad_number_of_last_evaluations(sweep):
    with pytest.raises(ValueError, match="at least 1"):
        report(sweep["out"], reps=10, last=0)


def test_live_tune_folder_reads_as_the_exported_files(sweep):
    live = load(sweep["out"] / "tune")  # result.json files only, as while a sweep runs
    for spec in sweep["specs"]:
        _, rows = read_result(result_path(sweep["out"], spec))
        assert live[spec.name]["complete"]
        assert len(live[spec.name]["rows"]) == len(rows)
        for live_row, row in zip(live[spec.name]["rows"], rows):
            assert live_row == pytest.approx(row)


def test_exported_trials_are_skipped(sweep):
    # everything is exported: a new run starts no trial (and no Ray)
    result = run_sweep(sweep["specs"], sweep["out"])
    assert result.skipped == [s.name for s in sweep["specs"]] and not result.finished


def test_zoo_hyperparameters_are_recorded():
    record = algos.settings("sac", "HalfCheetah-v5", 50_000, zoo=True, overrides={})
    assert record["zoo_key"] == "HalfCheetah-v4" and record["zoo_budget"] == 1e6
    assert record["kwargs"] == dict(learning_starts=10_000, buffer_size=50_000)
    record = algos.settings("sac", "Pendulum-v1", 100, zoo=True, overrides=dict(gamma=0.9))
    assert record["kwargs"] == dict(learning_rate=1e-3, buffer_size=100, gamma=0.9)
    # gSDE is the Gaussian's alone: dropped for every policy, and said so
    record = algos.settings("sac", "MountainCarContinuous-v0", 1000, zoo=True, overrides={})
    assert record["dropped"]["use_sde"] is True and "use_sde" not in record["kwargs"]
    assert "log_std_init" not in record["kwargs"]["policy_kwargs"]


def test_flowsac_sweeps_with_sacs_zoo_settings_and_its_actor_gradient():
    from flowpolicy.flowsac import FlowSAC
    from flowpolicy.sweep.trial import build

    sac = algos.settings("sac", "HalfCheetah-v5", 50_000, zoo=True, overrides={})
    flowsac = algos.settings("flowsac", "HalfCheetah-v5", 50_000, zoo=True, overrides={})
    assert flowsac == sac
    overrides = (("actor_gradient", "score"), ("learning_starts", 50), ("batch_size", 32))
    spec = TrialSpec("flowsac", "spline", "Pendulum-v1", 0, 60, 30, 1, overrides=overrides)
    model, _, record = build(spec)
    assert isinstance(model, FlowSAC) and model.actor_gradient == "score"
    assert record["kwargs"]["learning_rate"] == 1e-3  # the zoo's SAC entry for Pendulum
    model.learn(60)
    assert model._n_updates == 10


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="use one of"):
        algos.policy("sac", "gauss", {})
    with pytest.raises(ValueError, match="must be positive"):
        grid(["sac"], ["Pendulum-v1"], ["gaussian"], [0], steps=0, eval_every=10)
    args = parser().parse_args(
        ["run", "--env", "Pendulum-v1", "--steps", "10", "--out", "x", "--set", "gamma=0.9"]
    )
    assert args.overrides == [("gamma", 0.9)] and args.policies == list(algos.POLICIES)
    with pytest.raises(SystemExit):
        parser().parse_args(["run", "--env", "E", "--steps", "1", "--out", "x", "--set", "gamma"])


def test_zoo_normalization_trains_and_evaluates_as_the_zoo(tmp_path):
    """A zoo entry with ``normalize`` (all of its MuJoCo PPO ones) trains in ``VecNormalize``;
    evaluation returns are the true ones, of the policy fed training's observation statistics;
    a checkpoint restores the statistics with the model."""
    import gymnasium as gym
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.vec_env import sync_envs_normalization

    from flowpolicy.sweep.trial import _Report, _restore, build

    record = algos.settings("ppo", "HalfCheetah-v5", 10_000, zoo=True, overrides={})
    assert record["normalize"] == {"gamma": 0.98} and "normalize" not in record["kwargs"]
    assert record["kwargs"]["policy_kwargs"]["activation_fn"] == "nn.ReLU"
    json.dumps(record)  # the record stays JSON-able

    overrides = (("normalize", True), ("n_steps", 128), ("batch_size", 64), ("n_epochs", 1))
    spec = TrialSpec("ppo", "prelu", "Pendulum-v1", 0, 256, 128, 1, zoo=False, overrides=overrides)
    model, eval_env, settings = build(spec)
    model.learn(256)
    stats = model.get_vec_normalize_env()
    assert stats is not None and stats.obs_rms.count > 256

    sync_envs_normalization(model.get_env(), eval_env)
    (episode_return,), _ = evaluate_policy(model, eval_env, 1, return_episode_rewards=True)
    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=spec.seed + 10_000)
    total, done = 0.0, False
    while not done:
        action, _ = model.predict(stats.normalize_obs(obs), deterministic=True)
        obs, reward, terminated, truncated, _ = env.step(action)
        total, done = total + reward, terminated or truncated
    assert episode_return == pytest.approx(total, rel=1e-5)

    reporter = _Report(spec, eval_env, settings, [])
    reporter.init_callback(model)
    reporter._save(tmp_path)
    restored, _, _, _ = _restore(spec, tmp_path)
    restored_stats = restored.get_vec_normalize_env()
    np.testing.assert_array_equal(restored_stats.obs_rms.mean, stats.obs_rms.mean)
    np.testing.assert_array_equal(restored_stats.ret_rms.var, stats.ret_rms.var)
