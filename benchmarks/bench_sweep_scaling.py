"""How a local sweep scales: the same 4 trials on 1 CPU (one after another) and on 2 CPUs.

Both runs go through :func:`flowpolicy.sweep.run.run_sweep` (Ray Tune schedules the trials; the
engine, not a loop, does the parallel work), each into a fresh folder, alternating
1-2-2-1 CPUs over ``--rounds`` pairs so that drifting load hits both alike. The wall time
includes Ray's start and shutdown, as a user's sweep does. Target: 2 CPUs take no more than
~0.6x the time of 1 CPU. Needs a machine with 2 idle cores.

    python benchmarks/bench_sweep_scaling.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from flowpolicy.sweep.run import grid, run_sweep

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402

TITLE = "Sweeps: 4 trials on 1 and 2 local CPUs (bench_sweep_scaling.py)"


def timed_sweep(num_cpus: int, steps: int) -> float:
    specs = grid(["sac"], ["Pendulum-v1"], ["gaussian", "prelu"], [0, 1], steps, steps // 2, 2)
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        result = run_sweep(specs, out, num_cpus=num_cpus)
        wall = time.perf_counter() - start
    if len(result.finished) != len(specs):
        raise RuntimeError(f"sweep on {num_cpus} CPU(s) did not finish every trial: {result}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000, help="SAC steps per trial")
    parser.add_argument("--rounds", type=int, default=1, help="pairs of 1-2-2-1 CPU sweeps")
    args = parser.parse_args()
    walls: dict[int, list[float]] = {1: [], 2: []}
    for _ in range(args.rounds):
        for cpus in (1, 2, 2, 1):
            walls[cpus].append(timed_sweep(cpus, args.steps))
            print(f"{cpus} CPU(s): {walls[cpus][-1]:.1f} s", flush=True)
    one, two = statistics.median(walls[1]), statistics.median(walls[2])
    table = "\n".join(
        [
            f"SAC on Pendulum-v1 (zoo settings), Gaussian and PReLU flow x seeds 0, 1: 4 trials "
            f"of {args.steps} steps, evaluated twice (2 episodes). Wall time of the whole sweep "
            f"(Ray start to shutdown), median of {len(walls[1])} runs each, alternating.",
            "",
            "| CPUs | wall s (runs) | × 1 CPU |",
            "|---:|---|---:|",
            f"| 1 | {one:.1f} ({', '.join(f'{w:.1f}' for w in walls[1])}) | 1.00 |",
            f"| 2 | {two:.1f} ({', '.join(f'{w:.1f}' for w in walls[2])}) | {two / one:.2f} |",
        ]
    )
    print(table)
    record(TITLE, table, threads=1)


if __name__ == "__main__":
    main()
