"""CPU against CUDA on one machine: at what batch size the GPU pays for flowpolicy.

1. Density fitting (``fp.density.fit`` on the banana, 8 layers, rank 1): samples per second of
   training at several batch sizes, for the PReLU and the spline flow, on the CPU (one thread)
   and on CUDA.
2. SAC gradient steps on Pendulum-v1 (``bench_sac.py``'s models: default networks, 4 flow layers
   of rank 1): milliseconds per step at batch 256 and 4096 for the Gaussian and both flows, CPU
   (one thread) and CUDA.

Wall time with CUDA synchronized, after a warm-up; median of ``--rounds``, devices interleaved.
Needs a CUDA device (the table says where the CPU alone ran).

    python benchmarks/bench_device.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _record import record  # noqa: E402
from bench_sac import SETTINGS, make_model  # noqa: E402

import flowpolicy as fp  # noqa: E402

DENSITY_BATCHES = (1024, 16384, 262144)
SAC_BATCHES = (256, 4096)
POLICIES = ("gaussian", "prelu", "spline")


def timed(run, device: str, rounds: int) -> float:
    """Median wall seconds of ``run()`` over ``rounds`` (after one warm-up call)."""
    run()
    seconds = []
    for _ in range(rounds):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def density_rows(devices: list[str], steps: int, rounds: int) -> list[str]:
    rows = []
    for nonlinearity in ("prelu", "spline"):
        for batch in DENSITY_BATCHES:
            rates = {}
            for device in devices:
                flow = fp.Flow(2, layers=8, nonlinearity=nonlinearity)

                def run(flow=flow, device=device, batch=batch):
                    fp.density.fit(flow, "banana", steps, batch, device=device, progress=False)

                rates[device] = steps * batch / timed(run, device, rounds)
            rows.append(table_row(f"density fit, {nonlinearity}", batch, rates, "samples/s"))
            print(rows[-1], flush=True)
    return rows


def sac_rows(devices: list[str], steps: int, rounds: int) -> list[str]:
    settings = dict(SETTINGS["Pendulum-v1"])
    settings["kwargs"] = dict(settings["kwargs"], learning_starts=1000)
    rows = []
    for policy in POLICIES:
        models = {}
        for device in devices:
            settings["kwargs"]["device"] = device
            models[device] = make_model(policy, "Pendulum-v1", 0, settings)
            models[device].learn(1000)  # fills the buffer; no gradient step before learning_starts
        for batch in SAC_BATCHES:
            ms = {
                device: 1e3
                / steps
                * timed(lambda m=model, b=batch: m.train(steps, b), device, rounds)
                for device, model in models.items()
            }
            rows.append(table_row(f"SAC step, {policy}", batch, ms, "ms"))
            print(rows[-1], flush=True)
    return rows


def table_row(what: str, batch: int, values: dict[str, float], unit: str) -> str:
    cpu, cuda = values["cpu"], values.get("cuda")
    fmt = ",.0f" if unit == "samples/s" else ".1f"
    if cuda is None:
        return f"| {what} | {batch} | {cpu:{fmt}} {unit} | - | - |"
    gain = cuda / cpu if unit == "samples/s" else cpu / cuda  # > 1: CUDA is faster
    return f"| {what} | {batch} | {cpu:{fmt}} {unit} | {cuda:{fmt}} {unit} | {gain:.2f}x |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--density-steps", type=int, default=10)
    parser.add_argument("--sac-steps", type=int, default=20)
    parser.add_argument("--no-record", action="store_true", help="print only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = density_rows(devices, args.density_steps, args.rounds)
    rows += sac_rows(devices, args.sac_steps, args.rounds)
    table = "\n".join(
        [
            "| what | batch | CPU (1 thread) | CUDA | CUDA speed-up |",
            "|---|---|---|---|---|",
            *rows,
            "",
            f"Median wall time of {args.rounds} rounds after a warm-up, CUDA synchronized; "
            f"density: {args.density_steps} steps of `fp.density.fit` per round (8 layers, "
            f"rank 1, EMA weights); SAC: {args.sac_steps} gradient steps of `model.train` per "
            "round on a buffer of 1000 Pendulum-v1 transitions, zoo settings, 4 flow layers of "
            "rank 1.",
        ]
    )
    print(table)
    if not args.no_record:
        record("CPU and CUDA: where the GPU pays (bench_device.py)", table, threads=1)


if __name__ == "__main__":
    main()
