"""One trial: an SB3 training run reporting deterministic evaluation returns to Ray Tune.

A trial is a :class:`TrialSpec` (algorithm, policy, environment, seed, budget). Every
``eval_every`` steps (and before the first) it evaluates the deterministic policy on a separate
environment, saves a checkpoint (model and replay buffer) and reports to Tune; a restored trial
continues from its latest checkpoint. Its last report carries the whole record, which the sweep
exports as ``<results>/<trial>.csv`` (:func:`write_result`): one row per evaluation (step, mean
and standard deviation of the returns, wall and training seconds), after a ``# settings: {json}``
line recording everything it ran with. A trial whose file exists is not run again. Where the
zoo entry normalizes (``normalize: true``, as its MuJoCo PPO entries do), the trial trains in
``VecNormalize`` as the zoo does and evaluates the true returns with training's observation
statistics.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from ray import tune
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import sync_envs_normalization

from flowpolicy.sweep import algos
from flowpolicy.sweep.results import TrialSpec, read_result, result_path


def build(spec: TrialSpec) -> tuple[Any, Any, dict]:
    """(model, evaluation env, settings record) for a fresh run of ``spec``."""
    record = algos.settings(spec.algo, spec.env, spec.steps, spec.zoo, dict(spec.overrides))
    kwargs = algos.model_kwargs(record["kwargs"])
    policy, policy_kwargs = algos.policy(spec.algo, spec.policy, kwargs.pop("policy_kwargs", {}))
    cls = algos.load(algos.algo(spec.algo).cls)
    record = dict(record, spec=spec.to_dict(), policy_kwargs=policy_kwargs, torch=torch.__version__)
    model = cls(
        policy,
        _train_env(spec, record["normalize"]),
        policy_kwargs=algos.policy_kwargs_for_model(policy_kwargs),  # SB3 adds to this dict
        seed=spec.seed,
        **kwargs,
    )
    record["policy_class"] = policy if isinstance(policy, str) else policy.__qualname__
    return model, _eval_env(spec, record["normalize"]), record


def _train_env(spec: TrialSpec, normalize: dict | None, stats: Path | None = None):
    """The environment, wrapped in ``VecNormalize`` (fresh, or loaded from ``stats``) where the
    zoo entry normalizes, as rl-zoo3 trains."""
    import gymnasium as gym
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    if normalize is None:
        return gym.make(spec.env)
    venv = DummyVecEnv([lambda: gym.make(spec.env)])
    return VecNormalize.load(str(stats), venv) if stats else VecNormalize(venv, **normalize)


def _eval_env(spec: TrialSpec, normalize: dict | None):
    """A separate, seeded environment; with normalization, a frozen ``VecNormalize`` whose
    observation statistics are copied from training's before each evaluation, and whose
    Monitor reports the true (unnormalized) returns."""
    import gymnasium as gym
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    if normalize is None:
        env = Monitor(gym.make(spec.env))
        env.reset(seed=spec.seed + 10_000)  # its own stream, apart from training's
        return env
    venv = DummyVecEnv([lambda: Monitor(gym.make(spec.env))])
    venv.seed(spec.seed + 10_000)
    return VecNormalize(venv, training=False, norm_reward=False, **_obs_only(normalize))


def _obs_only(normalize: dict) -> dict:
    return {k: v for k, v in normalize.items() if k in ("norm_obs", "clip_obs", "epsilon")}


def _restore(spec: TrialSpec, directory: Path) -> tuple[Any, Any, dict, list[dict]]:
    state = json.loads((directory / "state.json").read_text())
    normalize = state["settings"].get("normalize")
    cls = algos.load(algos.algo(spec.algo).cls)
    env = _train_env(spec, normalize, directory / "vecnormalize.pkl" if normalize else None)
    model = cls.load(directory / "model.zip", env=env, device="cpu")
    if (directory / "buffer.pkl").exists():
        model.load_replay_buffer(directory / "buffer.pkl")
    state["settings"]["resumed_at"] = state["settings"].get("resumed_at", []) + [
        model.num_timesteps
    ]
    return model, _eval_env(spec, normalize), state["settings"], state["rows"]


def train(config: dict) -> None:
    """Tune's function trainable: ``config = {"trial": TrialSpec.to_dict(), "results": dir}``."""
    torch.set_num_threads(1)  # one core per trial: Tune runs one trial per CPU
    spec = TrialSpec.from_dict(config["trial"])
    path = result_path(config["results"], spec)
    if path.exists():  # exported by an earlier run: do not train again
        _, rows = read_result(path)
        tune.report({**rows[-1], "exported": True})
        return
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        model, eval_env, settings = build(spec)
        rows: list[dict] = []
    else:
        with checkpoint.as_directory() as directory:
            model, eval_env, settings, rows = _restore(spec, Path(directory))
    reporter = _Report(spec, eval_env, settings, rows)
    reporter.init_callback(model)
    if not rows:
        reporter.evaluate_and_report()  # the initial policy's return starts the curve
    remaining = spec.steps - model.num_timesteps
    if remaining > 0:
        model.learn(remaining, callback=reporter, reset_num_timesteps=False)
    if rows[-1]["step"] < model.num_timesteps:
        reporter.evaluate_and_report()
    # the whole record, for the driver to export (on a cluster, this machine's disk is not its)
    tune.report({**rows[-1], "rows": json.dumps(rows), "settings": json.dumps(settings)})


class _Report(BaseCallback):
    """Evaluates, checkpoints and reports to Tune every ``eval_every`` steps.

    Training seconds exclude evaluation and checkpointing, so that time per step compares the
    policies' training cost alone.
    """

    def __init__(self, spec: TrialSpec, eval_env, settings: dict, rows: list[dict]):
        super().__init__()
        self.spec, self.eval_env, self.settings, self.rows = spec, eval_env, settings, rows
        done = rows[-1] if rows else {"wall_seconds": 0.0, "train_seconds": 0.0}
        self.wall0 = time.perf_counter() - done["wall_seconds"]
        self.train_seconds = done["train_seconds"]
        self.resumed = time.perf_counter()

    def _on_step(self) -> bool:
        if self.num_timesteps % self.spec.eval_every == 0:
            self.evaluate_and_report()
        return True

    def evaluate_and_report(self) -> None:
        self.train_seconds += time.perf_counter() - self.resumed
        if self.model.get_vec_normalize_env() is not None:
            sync_envs_normalization(self.model.get_env(), self.eval_env)
        returns, _ = evaluate_policy(
            self.model, self.eval_env, self.spec.eval_episodes, deterministic=True,
            return_episode_rewards=True,
        )  # fmt: skip
        row = dict(
            step=self.model.num_timesteps,
            eval_return=float(sum(returns) / len(returns)),
            eval_return_std=float(torch.tensor(returns, dtype=torch.float64).std(correction=0)),
            wall_seconds=time.perf_counter() - self.wall0,
            train_seconds=self.train_seconds,
        )
        self.rows.append(row)
        with tempfile.TemporaryDirectory() as directory:
            self._save(Path(directory))
            tune.report(row, checkpoint=tune.Checkpoint.from_directory(directory))
        self.resumed = time.perf_counter()

    def _save(self, directory: Path) -> None:
        self.model.save(directory / "model.zip")
        if self.model.get_vec_normalize_env() is not None:
            self.model.get_vec_normalize_env().save(str(directory / "vecnormalize.pkl"))
        if hasattr(self.model, "save_replay_buffer"):
            self.model.save_replay_buffer(directory / "buffer.pkl")
        state = dict(rows=self.rows, settings=self.settings)
        (directory / "state.json").write_text(json.dumps(state))
