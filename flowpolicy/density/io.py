"""Saving and loading a :class:`~flowpolicy.flows.Flow`: a directory with ``config.json`` (the
constructor arguments and the dtype) and ``weights.pt`` (the state dict)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from flowpolicy.density.fit import resolve_device
from flowpolicy.flows import Flow

__all__ = ["load", "save"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
_FORMAT = "flowpolicy.Flow"


def save(flow: Flow, path: str | Path) -> Path:
    """Save ``flow`` to the directory ``path`` (created): ``config.json`` + ``weights.pt``.

    ``config.json`` holds ``flow.config`` (the constructor arguments that fix the layout) and the
    dtype; ``weights.pt`` the state dict. :func:`load` rebuilds the flow from them.
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"save: expected a flowpolicy.Flow, got {type(flow).__name__}")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": _FORMAT,
        "format_version": 1,
        "config": flow.config,
        "dtype": str(flow.theta.dtype).removeprefix("torch."),
    }
    (path / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    state = {k: v.detach().cpu() for k, v in flow.state_dict().items()}
    torch.save(state, path / WEIGHTS_FILE)
    return path


def _read_config(path: Path) -> dict:
    """The checked contents of ``config.json`` in the directory ``path``."""
    config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not path.is_dir() or not config_file.is_file() or not weights_file.is_file():
        raise ValueError(
            f"load: {path} is not a saved flow: expected a directory with {CONFIG_FILE} and "
            f"{WEIGHTS_FILE}, as written by flowpolicy.density.save"
        )
    try:
        meta = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"load: {config_file} is not valid JSON ({error})") from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT or "config" not in meta:
        raise ValueError(f"load: {config_file} does not describe a {_FORMAT}")
    return meta


def load(path: str | Path, device: str | torch.device = "cpu") -> Flow:
    """Rebuild a flow saved by :func:`save` from the directory ``path``, on ``device``.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if ``path`` is not a directory written by :func:`save`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist")
    meta = _read_config(path)
    try:
        flow = Flow(**meta["config"], seed=0)
    except TypeError as error:
        raise ValueError(
            f"load: the config in {path / CONFIG_FILE} does not fit Flow: {error}"
        ) from error
    flow = flow.to(getattr(torch, meta.get("dtype", "float32")))
    state = torch.load(path / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    try:
        flow.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(
            f"load: {path / WEIGHTS_FILE} does not match its config: {error}"
        ) from error
    return flow.to(resolve_device(device))
