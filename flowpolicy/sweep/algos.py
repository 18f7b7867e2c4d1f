"""Which algorithm and policy a trial builds, and with which hyperparameters.

``ALGOS`` maps an algorithm's name to its class, its flow policy and its Gaussian policy, as
dotted paths imported when a trial starts (sb3-contrib's TQC or a PPO flow policy need not be
installed to sweep SAC). Hyperparameters come from rl-baselines3-zoo's file for the algorithm
(``hyperparams/<algo>.yml``), the entry for the environment; ``-v5`` MuJoCo tasks use the zoo's
``-v4`` entry, which is the newest it has. Everything a trial ran with is recorded with its
results (:func:`model_kwargs` returns it).
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
from pathlib import Path
from typing import Any, NamedTuple

POLICIES = ("gaussian", "prelu", "spline")


class Algo(NamedTuple):
    cls: str  # "module:Class"
    flow_policy: str  # "module:Class"
    gaussian_policy: str  # SB3's policy alias
    off_policy: bool
    zoo: str = ""  # the zoo's hyperparameter file, where not the algorithm's own name


ALGOS: dict[str, Algo] = {
    "sac": Algo("stable_baselines3:SAC", "flowpolicy.sb3:FlowPolicy", "MlpPolicy", True),
    "flowsac": Algo("flowpolicy.flowsac:FlowSAC", "flowpolicy.sb3:FlowPolicy", "MlpPolicy", True,
                    zoo="sac"),
    "tqc": Algo("sb3_contrib:TQC", "flowpolicy.contrib:FlowTQCPolicy", "MlpPolicy", True),
    "crossq": Algo("sb3_contrib:CrossQ", "flowpolicy.contrib:FlowCrossQPolicy", "MlpPolicy", True),
    "ppo": Algo("stable_baselines3:PPO", "flowpolicy.onpolicy:FlowActorCriticPolicy", "MlpPolicy",
                False),
    "a2c": Algo("stable_baselines3:A2C", "flowpolicy.onpolicy:FlowActorCriticPolicy", "MlpPolicy",
                False),
}  # fmt: skip

# zoo entries that change the environment or the training loop, which a trial does not do
_UNSUPPORTED_ZOO_KEYS = ("env_wrapper", "frame_stack", "callback", "vec_env_wrapper")
# the zoo's bookkeeping, recorded but not passed to the algorithm
_ZOO_META_KEYS = ("n_timesteps", "policy", "n_envs")
# Gaussian-only exploration (gSDE): dropped for every policy so that the protocol is the same
_GAUSSIAN_ONLY = ("use_sde", "sde_sample_freq", "use_sde_at_warmup")
_GAUSSIAN_ONLY_POLICY_KWARGS = ("log_std_init", "use_expln", "clip_mean")


def algo(name: str) -> Algo:
    if name not in ALGOS:
        raise ValueError(f"unknown algorithm {name!r}: use one of {sorted(ALGOS)}")
    return ALGOS[name]


def load(path: str) -> Any:
    """The object named ``"module:attr"``."""
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as error:
        raise ValueError(
            f"cannot import {path} ({error}); install the package that provides it "
            "(e.g. `pip install flowpolicy[contrib]` for TQC/CrossQ)"
        ) from error


def zoo_hyperparams(algo_name: str, env_id: str) -> tuple[str | None, dict[str, Any]]:
    """rl-baselines3-zoo's entry for ``env_id`` (or its ``-v4`` twin): (key, raw settings)."""
    spec = importlib.util.find_spec("rl_zoo3")
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(
            "zoo hyperparameters need rl_zoo3: `pip install rl_zoo3`, or pass --no-zoo"
        )
    import yaml

    path = Path(spec.submodule_search_locations[0]) / "hyperparams" / f"{algo_name}.yml"
    if not path.exists():
        return None, {}
    table = yaml.safe_load(path.read_text())
    for key in (env_id, env_id.replace("-v5", "-v4")):
        if key in table:
            return key, dict(table[key])
    return None, {}


def _zoo_value(key: str, value: Any) -> Any:
    """The zoo writes some settings as Python source ("dict(net_arch=[64, 64])")."""
    if key in ("policy_kwargs", "normalize") and isinstance(value, str):
        tree = ast.parse(value.strip(), mode="eval").body
        try:
            if isinstance(tree, ast.Call) and getattr(tree.func, "id", None) == "dict":
                return _literal(tree)
        except ValueError:
            pass
        raise ValueError(f"unsupported zoo {key} {value!r}: pass it with --set")
    if isinstance(value, str) and value.startswith("lin_"):
        return ("linear", float(value[4:]))
    return value


def _literal(node: ast.expr) -> Any:
    """A literal, or ``"nn.ReLU"`` for the zoo's ``activation_fn=nn.ReLU`` (JSON-able; the
    class is looked up when the model is built, :func:`policy_kwargs_for_model`)."""
    if isinstance(node, ast.Attribute) and getattr(node.value, "id", None) == "nn":
        return f"nn.{node.attr}"
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "dict":
        return {kw.arg: _literal(kw.value) for kw in node.keywords}  # net_arch=dict(pi=...)
    return ast.literal_eval(node)


def settings(algo_name: str, env_id: str, steps: int, zoo: bool, overrides: dict) -> dict:
    """What a trial runs with: the zoo entry's keyword arguments, then ``overrides``.

    Returns a JSON-able record: ``zoo_key`` (the entry used), ``zoo_budget`` (its n_timesteps),
    ``zoo_meta`` (its policy, n_envs: a trial steps one environment), ``dropped`` (gSDE
    settings, which a flow has no use for), ``normalize`` (``VecNormalize``'s keyword arguments
    where the entry normalizes observations and rewards, as the zoo does, else ``None``) and
    ``kwargs`` for the algorithm.
    """
    key, raw = zoo_hyperparams(algo(algo_name).zoo or algo_name, env_id) if zoo else (None, {})
    bad = [k for k in _UNSUPPORTED_ZOO_KEYS if k in raw]
    if bad:
        raise ValueError(f"zoo entry {key} uses {bad}, which sweeps do not support: use --no-zoo")
    kwargs = {k: _zoo_value(k, v) for k, v in raw.items() if k not in _ZOO_META_KEYS}
    overrides = dict(overrides)
    normalize = _normalize_kwargs(overrides.pop("normalize", kwargs.pop("normalize", False)))
    dropped = {k: kwargs.pop(k) for k in _GAUSSIAN_ONLY if k in kwargs}
    policy_kwargs = kwargs.get("policy_kwargs", {})
    dropped.update(
        {k: policy_kwargs.pop(k) for k in _GAUSSIAN_ONLY_POLICY_KWARGS if k in policy_kwargs}
    )
    kwargs.update(overrides)
    if algo(algo_name).off_policy and "buffer_size" not in overrides:
        # a buffer that never fills is the same buffer; the smaller one keeps checkpoints small
        kwargs["buffer_size"] = min(int(kwargs.get("buffer_size", 1_000_000)), steps)
    zoo_meta = {k: raw[k] for k in _ZOO_META_KEYS if k in raw}  # n_envs: a trial steps one env
    if normalize is not None:  # the zoo discounts the normalized reward with the agent's gamma
        normalize.setdefault("gamma", kwargs.get("gamma", 0.99))
    return dict(zoo_key=key, zoo_budget=raw.get("n_timesteps"), zoo_meta=zoo_meta, dropped=dropped,
                normalize=normalize, kwargs=kwargs)  # fmt: skip


def _normalize_kwargs(value: Any) -> dict | None:
    """The zoo's ``normalize``: ``true``, ``false`` or ``"dict(norm_obs=True, ...)"``."""
    if isinstance(value, str):
        return _zoo_value("normalize", value)
    return {} if value else None


def model_kwargs(kwargs: dict) -> dict:
    """The record's kwargs as the algorithm takes them (schedules become callables)."""
    out = dict(kwargs)
    for key, value in kwargs.items():
        if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == "linear":
            out[key] = _Linear(float(value[1]))
    return out


def policy_kwargs_for_model(policy_kwargs: dict) -> dict:
    """The recorded policy kwargs as the policy takes them (``"nn.ReLU"`` becomes the class)."""
    out = dict(policy_kwargs)
    name = out.get("activation_fn")
    if isinstance(name, str) and name.startswith("nn."):
        import torch.nn

        out["activation_fn"] = getattr(torch.nn, name[3:])
    return out


class _Linear:
    """SB3 schedule: ``progress_remaining`` (1 -> 0) times the initial value (zoo's ``lin_``)."""

    def __init__(self, initial: float):
        self.initial = initial

    def __call__(self, progress_remaining: float) -> float:
        return progress_remaining * self.initial


def policy(algo_name: str, policy_name: str, policy_kwargs: dict) -> tuple[Any, dict]:
    """The policy class (or alias) and its kwargs for ``gaussian``, ``prelu`` or ``spline``."""
    if policy_name not in POLICIES:
        raise ValueError(f"unknown policy {policy_name!r}: use one of {list(POLICIES)}")
    spec = algo(algo_name)
    if policy_name == "gaussian":
        return spec.gaussian_policy, dict(policy_kwargs)
    flow_kwargs = dict(policy_kwargs.get("flow_kwargs", {}), nonlinearity=policy_name)
    return load(spec.flow_policy), dict(policy_kwargs, flow_kwargs=flow_kwargs)
