"""The studies behind the README's LakeCrossing results, with every knob that was tried.

Each module is a script (``python experiments/lake_sac.py --help``) with an ``Args`` dataclass
and a ``run(args) -> dict`` that writes its outputs and returns its summary;
``benchmarks/bench_lake.py`` runs them over seeds. The examples in ``examples/`` are their short,
readable versions.
"""
