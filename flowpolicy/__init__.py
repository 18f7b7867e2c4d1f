"""flowpolicy: normalizing-flow policies for Stable-Baselines3 SAC.

Importing the package registers the ``LakeCrossing-v0`` Gymnasium environment.
"""

from flowpolicy import bijectors, envs
from flowpolicy.flows import ConditionalFlow, Flow, FlowDistribution

__all__ = ["ConditionalFlow", "Flow", "FlowDistribution", "bijectors", "envs"]
__version__ = "0.1.0"
