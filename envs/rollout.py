"""Run a policy in an environment for a number of episodes and record each one."""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TypedDict

import gymnasium as gym
import numpy as np

__all__ = ["Episode", "rollout", "route_label", "route_stats"]


class _Predictor(Protocol):
    """What :func:`rollout` needs of a Stable-Baselines3 model: ``predict``."""

    def predict(self, observation: np.ndarray, deterministic: bool = ...) -> tuple[Any, Any]: ...


#: One episode recorded by :func:`rollout` (T steps), a dict with the keys:
#: ``observations`` (T+1, obs_dim) float32, the first observation included; ``positions``
#: (T+1, 2) float64, the first two entries of each observation; ``actions`` (T, 2) float32, as
#: passed to ``env.step``; ``rewards`` (T,) float64 and their sum ``return``; ``length`` T;
#: ``success`` and ``drowned`` (``info`` at the end); ``terminated`` (home or lake) and
#: ``truncated`` (time limit or ``max_steps``); ``route`` (``info["route"]`` at the end:
#: ``"cw"``, ``"ccw"`` or ``None``) and ``label`` (:func:`route_label`).
Episode = TypedDict(
    "Episode",
    {
        "observations": np.ndarray,
        "positions": np.ndarray,
        "actions": np.ndarray,
        "rewards": np.ndarray,
        "return": float,
        "length": int,
        "success": bool,
        "drowned": bool,
        "terminated": bool,
        "truncated": bool,
        "route": str | None,
        "label": str,
    },
)


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """``value`` as an int if it is an integer (not a bool) ``>= minimum``, else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def route_label(result: Mapping[str, Any]) -> str:
    """``"drowned"`` if the episode drowned, else its route ``"cw"``/``"ccw"``, else ``"none"``."""
    if result.get("drowned"):
        return "drowned"
    return result.get("route") or "none"


def route_stats(episodes: list[Episode]) -> dict[str, float]:
    """The share of ``episodes`` that succeeded, drowned, and reached home clockwise (``cw``) or
    counter-clockwise (``ccw``), and their mean ``return``."""
    if not episodes:
        raise ValueError("route_stats: no episodes")
    n = len(episodes)
    return {
        "success": sum(e["success"] for e in episodes) / n,
        "drowned": sum(e["drowned"] for e in episodes) / n,
        "cw": sum(e["success"] and e["route"] == "cw" for e in episodes) / n,
        "ccw": sum(e["success"] and e["route"] == "ccw" for e in episodes) / n,
        "return": float(np.mean([e["return"] for e in episodes])),
    }


def rollout(
    env: gym.Env,
    policy: Callable[[np.ndarray], np.ndarray] | _Predictor,
    n_episodes: int,
    seed: int | None = None,
    *,
    deterministic: bool = True,
    max_steps: int | None = None,
    reset_options: dict[str, Any] | None = None,
) -> list[Episode]:
    """Run ``policy`` for ``n_episodes`` episodes and record each one.

    The environment is reset with ``seed`` for the first episode only; later episodes continue
    its random stream. Episodes end on termination, truncation, or after ``max_steps`` steps
    (default: the registered ``max_episode_steps``, else 1000), so an unwrapped environment
    is safe too.

    :param env: a Gymnasium environment (LakeCrossing's ``info`` keys ``success``, ``drowned``
        and ``route`` are read if present).
    :param policy: a callable observation -> action (e.g. :class:`~flowpolicy.envs.LakeExpert`),
        or a Stable-Baselines3 model (anything with ``predict``), called as
        ``policy.predict(obs, deterministic=deterministic)``. A callable with a ``reset()``
        method (such as the expert, which draws its side there) is reset before each episode.
    :param n_episodes: number of episodes, an integer >= 0 (``ValueError`` otherwise).
    :param seed: seed of the first ``env.reset``.
    :param deterministic: passed to ``predict`` (SB3 models only).
    :param max_steps: step limit per episode, an integer >= 1.
    :param reset_options: ``options`` of every ``env.reset`` (e.g. ``{"start": (x, y)}``).
    :return: one :class:`Episode` dict per episode.
    """
    n_episodes = check_count("n_episodes", n_episodes)
    if max_steps is None:
        spec = getattr(env, "spec", None)
        max_steps = spec.max_episode_steps if spec and spec.max_episode_steps else 1000
    max_steps = check_count("max_steps", max_steps, minimum=1)
    if hasattr(policy, "predict"):
        model = policy

        def act(obs: np.ndarray) -> np.ndarray:
            return model.predict(obs, deterministic=deterministic)[0]

        reset = None
    else:
        act, reset = policy, getattr(policy, "reset", None)
    results = []
    for episode in range(n_episodes):
        if callable(reset):
            reset()
        obs, info = env.reset(seed=seed if episode == 0 else None, options=reset_options)
        observations, actions, rewards = [obs], [], []
        terminated = truncated = False
        for _ in range(max_steps):
            action = np.asarray(act(obs), dtype=np.float32)
            obs, reward, terminated, truncated, info = env.step(action)
            observations.append(obs)
            actions.append(action)
            rewards.append(float(reward))
            if terminated or truncated:
                break
        results.append(_episode(observations, actions, rewards, terminated, truncated, info))
    return results


def _episode(
    observations: list, actions: list, rewards: list, terminated: bool, truncated: bool, info: dict
) -> Episode:
    obs = np.stack([np.asarray(o) for o in observations])
    result = {
        "observations": obs,
        "positions": np.asarray(obs[:, :2], dtype=np.float64),
        "actions": np.asarray(actions, dtype=np.float32).reshape(-1, 2),
        "rewards": np.asarray(rewards, dtype=np.float64),
        "return": float(np.sum(rewards)),
        "length": len(rewards),
        "success": bool(info.get("success", False)),
        "drowned": bool(info.get("drowned", False)),
        "terminated": bool(terminated),
        "truncated": bool(truncated or not terminated),
        "route": info.get("route"),
    }
    result["label"] = route_label(result)
    return result  # type: ignore[return-value]
