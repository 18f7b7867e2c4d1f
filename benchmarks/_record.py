"""Append a benchmark table to BENCHMARKS.md with the date, the command and the machine."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import sys
from pathlib import Path

import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"


def machine(threads: int | None = None) -> str:
    """One line naming the machine: CPU, cores, torch build, threads, and the GPU if any."""
    cpu = platform.processor() or platform.machine()
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    threads = torch.get_num_threads() if threads is None else threads
    return (
        f"{platform.system()} {cpu}, {os.cpu_count()} cores{gpu}, Python "
        f"{platform.python_version()}, torch {torch.__version__}, {threads} torch thread(s)"
    )


def record(title: str, table: str, threads: int | None = None) -> None:
    """Append ``table`` under a heading with the UTC date, the command line and the machine."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    header = "# Benchmarks\n\nTables appended by the scripts in `benchmarks/`, newest last.\n"
    text = BENCHMARKS.read_text() if BENCHMARKS.exists() else header
    text += (
        f"\n## {title}\n\n- date: {date}\n- command: `{command}`\n- machine: {machine(threads)}\n\n"
        f"{table}\n"
    )
    BENCHMARKS.write_text(text)
    print(f"appended to {BENCHMARKS}")
