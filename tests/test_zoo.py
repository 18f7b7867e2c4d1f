"""rl-baselines3-zoo with the shipped hyperparameter files (examples/zoo) and flowpolicy.zoo."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import optuna
import yaml
from stable_baselines3 import SAC

import flowpolicy.envs  # noqa: F401  (registers the environments)
from flowpolicy.flowsac import FlowSAC
from flowpolicy.sb3 import FlowPolicy
from flowpolicy.zoo import convert_flow_params, sample_sac_flow_params, sample_tqc_flow_params

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "examples" / "zoo"


def _zoo(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", module, *args, "--num-threads", "1"]
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_every_shipped_entry_names_an_importable_flow_policy_and_a_registered_env():
    # imported here: importing rl_zoo3 patches gymnasium's TimeLimit for the whole process
    from rl_zoo3.utils import get_class_by_name

    files = sorted(ZOO.glob("*.yml"))
    assert {f.stem for f in files} >= {"sac", "tqc"}
    for path in files:
        entries = yaml.safe_load(path.read_text())
        assert {"LakeCrossing-v0", "LakeCrossingGoal-v0", "Pendulum-v1"} <= set(entries)
        for env_id, hyperparams in entries.items():
            gym.spec(env_id)  # registered once flowpolicy.envs is imported (--gym-packages)
            policy = get_class_by_name(hyperparams["policy"])
            assert hasattr(policy, "make_actor") and "Flow" in policy.__name__, (path, env_id)


def test_zoo_trains_a_flow_policy_from_the_yaml_and_enjoy_replays_it(tmp_path):
    config = str(ZOO / "sac.yml")
    common = ["--algo", "sac", "--env", "LakeCrossing-v0", "--gym-packages", "flowpolicy.envs"]
    _zoo(
        "rl_zoo3.train",
        *common,
        *["-conf", config, "-n", "200", "-params", "learning_starts:100", "--seed", "0"],
        *["-f", str(tmp_path), "--eval-freq", "-1"],
        cwd=tmp_path,
    )
    saved = tmp_path / "sac" / "LakeCrossing-v0_1" / "LakeCrossing-v0.zip"
    model = SAC.load(saved)
    assert isinstance(model.policy, FlowPolicy)
    # the yaml's flow settings were applied, and training ran (100 gradient steps)
    assert model.policy.actor.flow_kwargs["nonlinearity"] == "spline"
    assert model.policy.net_arch == [256, 256] and model._n_updates == 100
    obs, _ = gym.make("LakeCrossing-v0").reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (2,) and np.all(np.isfinite(action))
    result = _zoo(
        "rl_zoo3.enjoy",
        *common,
        *["-f", str(tmp_path), "--no-render", "-n", "70"],
        cwd=tmp_path,
    )
    assert "Episode Reward" in result.stdout


def _trial(seed: int) -> optuna.Trial:
    return optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()


def test_the_flow_samplers_add_the_flow_settings_and_convert_back():
    args = {"using_her_replay_buffer": False, "her_kwargs": {}}
    for seed in range(4):
        trial = _trial(seed)
        sampled = sample_sac_flow_params(trial, 1, 1, dict(args))
        flow = sampled["policy_kwargs"]["flow_kwargs"]
        assert flow["layers"] in (2, 4, 6) and flow["nonlinearity"] in ("prelu", "spline")
        assert 0.1 <= flow["init_strength"] <= 1.0
        # a stored trial converts to the same hyperparameters (zoo's --trial-id)
        assert convert_flow_params(trial.params) == sampled
    tqc = sample_tqc_flow_params(_trial(0), 1, 1, dict(args))
    assert "n_quantiles" in tqc["policy_kwargs"] and "flow_kwargs" in tqc["policy_kwargs"]
    # the sampled settings build a flow SAC
    sampled["buffer_size"] = 1000
    model = SAC(FlowPolicy, "Pendulum-v1", **sampled)
    assert model.policy.actor.flow_kwargs["layers"] == flow["layers"]


def test_zoo_optimize_samples_the_flow_settings(tmp_path):
    _zoo(
        "flowpolicy.zoo",
        *["--algo", "sac", "--env", "Pendulum-v1", "-conf", str(ZOO / "sac.yml")],
        *["-optimize", "--n-trials", "2", "-n", "120", "--sampler", "random"],
        *["--pruner", "none", "--n-evaluations", "1", "--eval-episodes", "1", "--seed", "0"],
        *["-f", str(tmp_path), "--no-optim-plots"],
        cwd=tmp_path,
    )
    (report,) = (tmp_path / "sac").glob("report_Pendulum-v1_2-trials-*.csv")
    header = report.read_text().splitlines()[0]
    assert "params_flow_layers" in header and "params_flow_nonlinearity" in header
    assert len(report.read_text().splitlines()) == 3  # both trials ran


def test_flowsac_trains_from_the_sac_yaml_with_its_actor_gradient_and_enjoy_replays_it(tmp_path):
    common = ["--algo", "flowsac", "--env", "Pendulum-v1", "-f", str(tmp_path)]
    _zoo(
        "flowpolicy.zoo",
        *common,
        *["-conf", str(ZOO / "sac.yml"), "-n", "150", "--seed", "0", "--eval-freq", "-1"],
        *["-params", "learning_starts:100", "actor_gradient:'score'", "score_samples:3"],
        cwd=tmp_path,
    )
    model = FlowSAC.load(tmp_path / "flowsac" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    assert isinstance(model.policy, FlowPolicy)
    assert (model.actor_gradient, model.score_samples, model._n_updates) == ("score", 3, 50)
    result = _zoo("flowpolicy.zoo", "enjoy", *common, "--no-render", "-n", "210", cwd=tmp_path)
    assert "Episode Reward" in result.stdout
