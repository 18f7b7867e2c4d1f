"""rl-baselines3-zoo with flow policies: ``-optimize`` that samples the flow's settings too.

rl-zoo3 trains a flow policy from a hyperparameter yaml as it is (``policy:
'flowpolicy.FlowPolicy'``, see ``examples/zoo/``). Its hyperparameter search, though, picks one
sampler per algorithm from its registry ``rl_zoo3.hyperparams_opt.HYPERPARAMS_SAMPLER``, and
SAC's and TQC's replace ``policy_kwargs`` by a sampled ``net_arch``: the flow would be searched
at its defaults only. ``python -m flowpolicy.zoo`` is ``python -m rl_zoo3.train`` (same
arguments) with samplers for ``sac`` and ``tqc`` that add the flow's settings
(:func:`sample_flow_kwargs`) to the zoo's own, registered the way the zoo's README registers
other algorithms (its registries are plain dicts)::

    python -m flowpolicy.zoo --algo sac --env Pendulum-v1 -conf examples/zoo/sac.yml \\
        -optimize --n-trials 20 --n-timesteps 20000

It also registers :class:`~flowpolicy.flowsac.FlowSAC` as the algorithm ``flowsac`` (SAC's
hyperparameter entries apply; its ``actor_gradient`` is one more of them), and
``python -m flowpolicy.zoo enjoy`` is ``python -m rl_zoo3.enjoy`` with it registered::

    python -m flowpolicy.zoo --algo flowsac --env Pendulum-v1 -conf examples/zoo/sac.yml \\
        -params actor_gradient:"'score'"
    python -m flowpolicy.zoo enjoy --algo flowsac --env Pendulum-v1 -f logs/

The samplers are for flow policies (the yaml's ``policy``): SB3's Gaussian policies take no
``flow_kwargs``; search those with ``python -m rl_zoo3.train``. Needs ``pip install
flowpolicy[zoo]``.
"""

from __future__ import annotations

import sys
from typing import Any

try:
    import optuna
    from rl_zoo3 import hyperparams_opt
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "flowpolicy.zoo needs rl-baselines3-zoo: pip install flowpolicy[zoo]"
    ) from error

__all__ = [
    "convert_flow_params",
    "register",
    "sample_flow_kwargs",
    "sample_sac_flow_params",
    "sample_tqc_flow_params",
]

# trial parameter names of the flow settings: "flow_" + a ConditionalFlow argument
_PREFIX = "flow_"


def sample_flow_kwargs(trial: optuna.Trial) -> dict[str, Any]:
    """The flow's settings for one trial, as ``policy_kwargs["flow_kwargs"]``.

    ``layers`` in {2, 4, 6}, ``nonlinearity`` in {"prelu", "spline"} and ``init_strength``
    log-uniform in [0.1, 1] (the spread of the flow at initialization); the other settings
    stay at :data:`flowpolicy.sb3.DEFAULT_FLOW_KWARGS`.
    """
    return {
        "layers": trial.suggest_categorical(_PREFIX + "layers", [2, 4, 6]),
        "nonlinearity": trial.suggest_categorical(_PREFIX + "nonlinearity", ["prelu", "spline"]),
        "init_strength": trial.suggest_float(_PREFIX + "init_strength", 0.1, 1.0, log=True),
    }


def sample_sac_flow_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict
) -> dict[str, Any]:
    """The zoo's SAC sampler (learning rate, gamma, batch size, ``net_arch``, ...) plus the
    flow's settings (:func:`sample_flow_kwargs`) in ``policy_kwargs["flow_kwargs"]``."""
    hyperparams = hyperparams_opt.sample_sac_params(trial, n_actions, n_envs, additional_args)
    hyperparams["policy_kwargs"]["flow_kwargs"] = sample_flow_kwargs(trial)
    return hyperparams


def sample_tqc_flow_params(
    trial: optuna.Trial, n_actions: int, n_envs: int, additional_args: dict
) -> dict[str, Any]:
    """The zoo's TQC sampler (SAC's and the quantiles) plus the flow's settings."""
    hyperparams = hyperparams_opt.sample_tqc_params(trial, n_actions, n_envs, additional_args)
    hyperparams["policy_kwargs"]["flow_kwargs"] = sample_flow_kwargs(trial)
    return hyperparams


def convert_flow_params(params: dict[str, Any]) -> dict[str, Any]:
    """A finished trial's parameters as hyperparameters (``--trial-id``, ``--study-name``):
    the zoo's off-policy conversion, with the ``flow_*`` parameters in
    ``policy_kwargs["flow_kwargs"]``."""
    rest = {key: value for key, value in params.items() if not key.startswith(_PREFIX)}
    flow = {key[len(_PREFIX) :]: v for key, v in params.items() if key.startswith(_PREFIX)}
    hyperparams = hyperparams_opt.convert_offpolicy_params(rest)
    hyperparams["policy_kwargs"]["flow_kwargs"] = flow
    return hyperparams


def register() -> None:
    """Register :class:`~flowpolicy.flowsac.FlowSAC` as the zoo's algorithm ``flowsac``, and make
    the ``sac``, ``flowsac`` and ``tqc`` searches use the flow samplers above (and their
    conversion of stored trials). Called by ``python -m flowpolicy.zoo``; affects this process
    only."""
    from rl_zoo3.utils import ALGOS

    from flowpolicy.flowsac import FlowSAC

    ALGOS["flowsac"] = FlowSAC
    samplers = dict(sac=sample_sac_flow_params, flowsac=sample_sac_flow_params)
    hyperparams_opt.HYPERPARAMS_SAMPLER.update(samplers, tqc=sample_tqc_flow_params)
    converters = dict.fromkeys(("sac", "flowsac", "tqc"), convert_flow_params)
    hyperparams_opt.HYPERPARAMS_CONVERTER.update(converters)


def main() -> None:
    """``python -m rl_zoo3.train`` (or, first argument ``enjoy``, ``python -m rl_zoo3.enjoy``)
    with the flow samplers and ``flowsac`` registered."""
    register()
    if sys.argv[1:2] == ["enjoy"]:
        from rl_zoo3.enjoy import enjoy

        del sys.argv[1]
        enjoy()
    else:
        from rl_zoo3.train import train

        train()


if __name__ == "__main__":
    main()
