"""Saving and loading a :class:`~flowpolicy.flows.Flow`: a directory with ``config.json`` (the
constructor arguments and the dtype) and ``weights.pt`` (the state dict).

A save is atomic: a reader sees the previous pair or the new one, never a mix, and an
interrupted save (Ctrl-C, a full disk, a crash) leaves the previous save loadable. Each file is
written beside its final name, flushed to disk, and renamed over it: first
``weights.<save_id>.pt``, then ``config.json`` (the commit point: it records the SHA-256 of its
weights and its ``save_id``), then the weights to ``weights.pt``. A loader that finds
``weights.pt`` not matching the config's hash reads ``weights.<save_id>.pt`` (a save between its
two renames), or retries a moment later (a concurrent save), or raises ``ValueError``. Saves to
one directory are serialized by a lock file where the platform has ``fcntl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import time
import uuid
from pathlib import Path

import torch

from flowpolicy.density.fit import resolve_device
from flowpolicy.flows import Flow

__all__ = ["check_writable", "load", "save"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
LOCK_FILE = ".save.lock"
_FORMAT = "flowpolicy.Flow"
_VERSION = 2
_DTYPES = ("float16", "bfloat16", "float32", "float64")
#: the files a save writes beside their final names (save ids are 32 hex digits)
_LEFTOVER = re.compile(r"weights\.[0-9a-f]{32}\.pt|\.config\.json\.[0-9a-f]{32}\.tmp")


def check_writable(path: str | Path) -> Path:
    """Check, without writing, that ``path`` is or can become a writable directory.

    :raises ValueError: if ``path`` (or a parent) is a file, or the directory (or the nearest
        existing parent) is not writable.
    """
    path = Path(path)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        what = "is" if existing == path else f"lies under {existing}, which is"
        raise ValueError(f"{path} {what} a file, not a directory: choose another output path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{existing} is not writable: choose another output path")
    return path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path / LOCK_FILE`` (no lock where fcntl is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: saves to one directory are not serialized
        yield
        return
    with open(path / LOCK_FILE, "a+b") as lock:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        except OSError:  # a file system without locks: saves are not serialized
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)


def _pending_weights(save_id: str) -> str:
    return f"weights.{save_id}.pt"


def _recover(path: Path) -> None:
    """Finish a save interrupted between its two renames, and remove leftovers of others
    (called under the lock)."""
    with contextlib.suppress(ValueError, OSError):
        meta = json.loads((path / CONFIG_FILE).read_text())
        pending = path / _pending_weights(str(meta["save_id"]))
        if pending.is_file():
            os.replace(pending, path / WEIGHTS_FILE)
    for stale in path.iterdir():
        if _LEFTOVER.fullmatch(stale.name):
            with contextlib.suppress(OSError):
                stale.unlink()


def save(flow: Flow, path: str | Path) -> Path:
    """Save ``flow`` to the directory ``path`` (created), atomically: ``config.json`` +
    ``weights.pt``; other files in the directory are left alone.

    ``config.json`` holds ``flow.config`` (the constructor arguments that fix the layout), the
    dtype, a ``save_id`` and the SHA-256 of ``weights.pt`` (the state dict). :func:`load`
    rebuilds the flow from them and refuses a pair from two different saves.

    :raises ValueError: if ``flow`` is not a Flow, or ``path`` is a file or not writable.
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"save: expected a flowpolicy.Flow, got {type(flow).__name__}")
    path = check_writable(path)
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # serialized before any file is touched
    weights = buffer.getvalue()
    save_id = uuid.uuid4().hex
    meta = {
        "format": _FORMAT,
        "format_version": _VERSION,
        "config": flow.config,
        "dtype": str(flow.theta.dtype).removeprefix("torch."),
        "save_id": save_id,
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        _recover(path)
        pending = path / _pending_weights(save_id)
        config_tmp = path / f".{CONFIG_FILE}.{save_id}.tmp"
        try:
            _write_durably(pending, weights)
            _write_durably(config_tmp, (json.dumps(meta, indent=2) + "\n").encode())
            os.replace(config_tmp, path / CONFIG_FILE)  # the commit point
        except BaseException:
            for leftover in (pending, config_tmp):
                with contextlib.suppress(OSError):
                    leftover.unlink()
            raise
        os.replace(pending, path / WEIGHTS_FILE)
        _fsync_dir(path)
    return path


def _not_saved(path: Path, missing: Path) -> ValueError:
    return ValueError(
        f"load: {path} is not a saved flow ({missing.name} is missing): expected a directory "
        f"with {CONFIG_FILE} and {WEIGHTS_FILE}, as written by flowpolicy.density.save"
    )


def _read_config(path: Path) -> dict:
    """The checked contents of ``config.json`` in the directory ``path``."""
    config_file = path / CONFIG_FILE
    if not path.is_dir() or not config_file.is_file():
        raise _not_saved(path, config_file)
    try:
        meta = json.loads(config_file.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"load: {config_file} is not valid JSON ({error})") from error
    if (
        not isinstance(meta, dict)
        or meta.get("format") != _FORMAT
        or not isinstance(meta.get("config"), dict)
    ):
        raise ValueError(
            f"load: {config_file} does not describe a {_FORMAT} (expected the keys 'format': "
            f"{_FORMAT!r} and 'config': {{...}}, as written by flowpolicy.density.save)"
        )
    if meta.get("dtype", "float32") not in _DTYPES:
        raise ValueError(f"load: {config_file} names an unknown dtype {meta.get('dtype')!r}")
    return meta


def _read_weights(path: Path, meta: dict) -> bytes | None:
    """The bytes of the weights that belong to ``meta``: ``weights.pt``, or the pending file of
    a save between its renames; ``None`` when neither matches (a concurrent save)."""
    expected = meta.get("weights_sha256")
    candidates = [path / WEIGHTS_FILE]
    if "save_id" in meta:
        candidates.append(path / _pending_weights(str(meta["save_id"])))
    for candidate in candidates:
        try:
            data = candidate.read_bytes()
        except FileNotFoundError:
            continue
        if expected is None or hashlib.sha256(data).hexdigest() == expected:
            return data
    return None


def _read_pair(path: Path, attempts: int = 20) -> tuple[dict, bytes]:
    """The config and the weights of one save (retrying, for up to ~0.2 s, while a concurrent
    save commits: its two renames are microseconds apart)."""
    for attempt in range(attempts):
        meta = _read_config(path)
        data = _read_weights(path, meta)
        if data is not None:
            return meta, data
        time.sleep(min(0.0005 * 2**attempt, 0.02))
    if not (path / WEIGHTS_FILE).is_file():
        raise _not_saved(path, path / WEIGHTS_FILE)
    raise ValueError(
        f"load: {path / WEIGHTS_FILE} does not belong to {path / CONFIG_FILE} (its SHA-256 "
        "differs from the one the config records): it is truncated or corrupted, or the pair "
        "comes from two different saves; save the flow again"
    )


def _state_dict(path: Path, data: bytes) -> dict:
    weights_file = path / WEIGHTS_FILE
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or foreign files raise many kinds of errors
        raise ValueError(
            f"load: {weights_file} is not a readable state dict (truncated or corrupted?): "
            f"{type(error).__name__}: {error}"
        ) from error
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"load: {weights_file} does not hold a state dict of tensors")
    if not all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()):
        raise ValueError(f"load: {weights_file} holds NaN or inf weights")
    return state


def load(path: str | Path, device: str | torch.device = "cpu") -> Flow:
    """Rebuild a flow saved by :func:`save` from the directory ``path``, on ``device``.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if ``path`` is not a directory written by :func:`save`: a missing,
        truncated or corrupted file, a config that does not describe a flow, weights that do
        not fit it, or a config and weights from two different saves (each message names the
        file).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist")
    meta, data = _read_pair(path)
    try:
        flow = Flow(**meta["config"], seed=0)
    except Exception as error:  # noqa: BLE001 (any value a corrupted file can hold)
        raise ValueError(
            f"load: the config in {path / CONFIG_FILE} does not fit Flow: {error}"
        ) from error
    flow = flow.to(getattr(torch, meta.get("dtype", "float32")))
    state = _state_dict(path, data)
    try:
        flow.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"load: {path / WEIGHTS_FILE} does not match its config: {error}"
        ) from error
    return flow.to(resolve_device(device))
