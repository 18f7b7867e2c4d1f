"""Multi-seed sweeps on Ray Tune: algorithm x policy x environment x seed, and their statistics.

``python -m flowpolicy.sweep run`` trains every grid point as one Tune trial (one CPU and one
torch thread each) on the local cores, or on a cluster with ``--address``; each finished trial is
exported to ``<out>/<trial>.csv``, and trials with a file there are not run again.
``python -m flowpolicy.sweep report DIR`` aggregates them (rliable's IQM with stratified
bootstrap intervals over seeds). Importing this package loads neither Ray nor SB3.
"""

from flowpolicy.sweep.algos import ALGOS, POLICIES
from flowpolicy.sweep.results import TrialSpec, read_result

__all__ = ["ALGOS", "POLICIES", "TrialSpec", "read_result"]
