"""flowpolicy: normalizing-flow policies for Stable-Baselines3 SAC."""

from flowpolicy import bijectors
from flowpolicy.flows import ConditionalFlow, Flow, FlowDistribution

__all__ = ["ConditionalFlow", "Flow", "FlowDistribution", "bijectors"]
__version__ = "0.1.0"
