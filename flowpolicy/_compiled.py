"""The fused affine/PReLU policy step compiled for the CPU (``csrc/prelu_flow.cpp``).

On the CPU a small flow's step in eager PyTorch is ~60 tiny kernels, each costing 3-10 µs
whatever its size; the compiled loop takes each sample through the whole chain at once. It is
built with torch's C++ extension tools on first use (about 10 s, once per machine) and cached in
torch's folder of extensions (``$TORCH_EXTENSIONS_DIR``, or ``~/.cache/torch_extensions``) under a
hash of its source, torch's version and the flags. Without a C++ compiler, or with
``FLOWPOLICY_CPU_KERNEL=0``, :func:`cpu_kernel` returns ``None`` and flows take the PyTorch
implementation: the same maths, slower on the CPU.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sysconfig
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "prelu_flow.cpp"
FLAGS = ["-O3"]
_BUILD_LOCK = threading.Lock()


@functools.cache
def cpu_kernel() -> object | None:
    """``torch.ops.flowpolicy`` with the compiled ``prelu_flow_forward`` and
    ``prelu_flow_backward``, or ``None`` (disabled, or the build failed: warned once)."""
    if os.environ.get("FLOWPOLICY_CPU_KERNEL", "1") == "0":
        return None
    try:
        with _BUILD_LOCK:  # threads of one process: one build (a second one finds it cached)
            _load()
    except Exception as error:  # no compiler, no ninja, a read-only cache: all mean "fall back"
        lines = str(error).splitlines() or [type(error).__name__]
        reason = next((line for line in lines if "error:" in line), lines[0])  # the compiler's
        warnings.warn(
            f"flowpolicy: could not build the CPU flow kernel ({reason.strip()[:300]}); flows "
            "use the PyTorch implementation, the same maths, slower on the CPU. Set "
            "FLOWPOLICY_CPU_KERNEL=0 to skip the attempt.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return torch.ops.flowpolicy


def _load() -> None:
    if hasattr(torch.ops.flowpolicy, "prelu_flow_forward"):
        return  # loaded already: a second copy of the library would register its ops again
    from torch.utils import cpp_extension

    key = hashlib.sha256(
        SOURCE.read_bytes() + torch.__version__.encode() + " ".join(FLAGS).encode()
    ).hexdigest()[:16]
    name = f"flowpolicy_prelu_flow_{key}"
    cache = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    library = Path(cache) / f"{name}.so"
    if library.exists():
        torch.ops.load_library(str(library))
        return
    # Build in a private folder and move the result into the cache in one step: an interrupted
    # build leaves nothing behind (torch's shared build folder would keep a lock file that makes
    # every later build wait forever), and concurrent builds do not collide. ninja from pip lies
    # beside this Python, which is not on PATH when a virtual environment is used unactivated.
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
    try:
        with tempfile.TemporaryDirectory() as build:
            built = cpp_extension.load(
                name,
                [str(SOURCE)],
                extra_cflags=FLAGS,
                build_directory=build,
                is_python_module=False,
            )  # also loads the library into this process
            library.parent.mkdir(parents=True, exist_ok=True)
            partial = library.with_suffix(f".{os.getpid()}.tmp")
            shutil.copy(built, partial)
            os.replace(partial, library)
    finally:
        os.environ["PATH"] = path
