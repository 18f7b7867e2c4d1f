"""flowpolicy: normalizing-flow policies for Stable-Baselines3.

Importing the package registers the ``LakeCrossing-v0`` and ``LakeCrossingGoal-v0`` Gymnasium
environments. It loads torch and Gymnasium only: the Stable-Baselines3 parts (``FlowPolicy``,
``FlowSAC``, the TQC/CrossQ and PPO/A2C policies, ``pretrain``, ``symmetry``, ``diagnostics``), the
density tools and the sweep tool are imported when first used.
"""

import importlib

from flowpolicy import bijectors, envs, targets
from flowpolicy.flows import ConditionalFlow, Flow, FlowDistribution, squashed_gaussian

__all__ = [
    "ConditionalFlow",
    "EntropyCallback",
    "Flow",
    "FlowActor",
    "FlowActorCriticPolicy",
    "FlowCrossQPolicy",
    "FlowDistribution",
    "FlowPolicy",
    "FlowSAC",
    "FlowTQCPolicy",
    "MultiInputFlowActorCriticPolicy",
    "MultiInputFlowPolicy",
    "MultiInputFlowTQCPolicy",
    "bijectors",
    "density",
    "diagnostics",
    "envs",
    "pretrain",
    "squashed_gaussian",
    "sweep",
    "symmetry",
    "targets",
]
__version__ = "0.2.0"

# name -> module that defines it, imported on first access (PEP 562)
_LAZY = {
    "EntropyCallback": "flowpolicy.sb3",
    "FlowActor": "flowpolicy.sb3",
    "FlowPolicy": "flowpolicy.sb3",
    "MultiInputFlowPolicy": "flowpolicy.sb3",
    "FlowSAC": "flowpolicy.flowsac",
    "pretrain": "flowpolicy.pretraining",
    # sb3-contrib's algorithms (the contrib extra)
    "FlowTQCPolicy": "flowpolicy.contrib",
    "FlowCrossQPolicy": "flowpolicy.contrib",
    "MultiInputFlowTQCPolicy": "flowpolicy.contrib",
    # on-policy: PPO and A2C
    "FlowActorCriticPolicy": "flowpolicy.onpolicy",
    "MultiInputFlowActorCriticPolicy": "flowpolicy.onpolicy",
    "sweep": "flowpolicy.sweep",
    "density": "flowpolicy.density",
    "diagnostics": "flowpolicy.diagnostics",
    "symmetry": "flowpolicy.symmetry",
}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'flowpolicy' has no attribute {name!r}")
    module = importlib.import_module(_LAZY[name])
    value = module if module.__name__.endswith(name) else getattr(module, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
