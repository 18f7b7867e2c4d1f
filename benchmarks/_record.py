"""Record a benchmark table in BENCHMARKS.md with the date, the command and the machine.

Each benchmark has one section, named by its title: recording again replaces it, so the file
shows every benchmark's current result once (earlier runs are in its git history).
"""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
import re
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
    """Write ``table`` under ``## title`` with the UTC date, the command line and the machine,
    replacing the section of that title if there is one (else appending it)."""
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    command = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    section = (
        f"## {title}\n\n- date: {date}\n- command: `{command}`\n- machine: {machine(threads)}\n\n"
        f"{table.strip()}\n"
    )
    # benchmarks running side by side record one at a time (read, replace, write)
    with open(BENCHMARKS.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = BENCHMARKS.read_text() if BENCHMARKS.exists() else "# Benchmarks\n"
        # a section runs from its heading to the next "## " heading or the end of the file
        pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.M | re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _: section + "\n", text, count=1).rstrip() + "\n"
        else:
            text = text.rstrip() + "\n\n" + section
        BENCHMARKS.write_text(text)
    print(f"recorded in {BENCHMARKS} under '{title}'")
