"""flowpolicy: normalizing-flow policies for Stable-Baselines3 SAC.

Importing the package registers the ``LakeCrossing-v0`` Gymnasium environment.
"""

from flowpolicy import bijectors, diagnostics, envs, targets
from flowpolicy.flows import ConditionalFlow, Flow, FlowDistribution
from flowpolicy.sb3 import FlowActor, FlowPolicy

__all__ = [
    "ConditionalFlow",
    "Flow",
    "FlowActor",
    "FlowDistribution",
    "FlowPolicy",
    "bijectors",
    "density",
    "diagnostics",
    "envs",
    "targets",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    # density is imported on first use: imported here eagerly, `python -m flowpolicy.density`
    # would find it in sys.modules already and runpy would warn
    if name == "density":
        import importlib

        return importlib.import_module("flowpolicy.density")
    raise AttributeError(f"module 'flowpolicy' has no attribute {name!r}")
