"""Environments for flowpolicy, installed as the subpackage ``flowpolicy.envs``.

Importing this module registers ``LakeCrossing-v0`` and ``LakeCrossingGoal-v0`` (a goal drawn
north of the lake each episode, Dict observations for HER) with Gymnasium (Gymnasium 1.x has no
plugin loading, so registration happens on import). In a process that has not imported
flowpolicy, such as a ``SubprocVecEnv`` worker, the id ``"flowpolicy:LakeCrossing-v0"`` makes
``gymnasium.make`` import it first. This module imports neither matplotlib (the plotting
helpers import it when they draw) nor Stable-Baselines3.
"""

from gymnasium.envs.registration import register, registry

from .expert import Demonstrations, LakeExpert, collect_demonstrations
from .geometry import LakeGeometry, geodesic_distance
from .goal import LakeCrossingGoalEnv
from .lake import LakeCrossingEnv
from .plotting import draw_lake, plot_trajectories
from .rollout import Episode, rollout, route_stats

__all__ = [
    "Demonstrations",
    "Episode",
    "LakeCrossingEnv",
    "LakeCrossingGoalEnv",
    "LakeExpert",
    "LakeGeometry",
    "collect_demonstrations",
    "draw_lake",
    "geodesic_distance",
    "plot_trajectories",
    "rollout",
    "route_stats",
]

# Guarded: re-importing (e.g. importlib.reload) must not trigger Gymnasium's
# "Overriding environment" warning.
if "LakeCrossing-v0" not in registry:
    register(
        id="LakeCrossing-v0",
        entry_point="flowpolicy.envs.lake:LakeCrossingEnv",
        # The geodesic at full speed takes 23 steps from the default start; 60 leaves room for
        # detours while keeping episodes short, which speeds up learning.
        max_episode_steps=60,
    )

if "LakeCrossingGoal-v0" not in registry:
    register(
        id="LakeCrossingGoal-v0",
        entry_point="flowpolicy.envs.goal:LakeCrossingGoalEnv",
        # as LakeCrossing-v0: the farthest default goal is 26 steps away at full speed
        max_episode_steps=60,
    )
