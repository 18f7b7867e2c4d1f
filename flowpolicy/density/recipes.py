"""The recipes of the command line, shared by the example and the benchmarks: the settings that
fit the banana well and the flow they start from, and the recipe for data (:func:`fit_data`)."""

from __future__ import annotations

import torch
from torch import Tensor

from flowpolicy.density.fit import History, fit
from flowpolicy.density.init import check_data, init_hinges_, init_layers_, init_splines_
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = ["DATA_DEFAULTS", "DEFAULTS", "SPLINE_DEFAULTS", "data_flow", "fit_data", "initial_flow"]

#: Defaults of the command line (affine + PReLU on the banana).
DEFAULTS = dict(
    steps=2000,
    time_limit=110.0,
    layers=24,
    rank=2,
    batch_size=2048,
    lr=1e-4,
    ema=0.998,
    init_strength=1.0,
    init="data",
    init_samples=2**18,
    init_spread=0.5,
    hinge_spread=2.0,
    kink_bandwidth=0.2,
)

#: The recipe for data (``--data``, :func:`fit_data`): affine layers between coupling splines
#: whose bins are an MLP of the other coordinates (measured in ``benchmarks/bench_density.py``).
DATA_DEFAULTS = dict(
    layers=5,
    bins=8,
    bound=4.0,
    coupling_hidden=(64, 64),
    batch_size=1024,
    lr=5e-3,
    ema=0.998,
    time_limit=60.0,
    holdout=0.1,
)

#: What changes for ``--nonlinearity spline`` (init_splines_ builds the shear from two pairs).
SPLINE_DEFAULTS = dict(layers=4, bins=16)


def initial_flow(
    target: Target,
    nonlinearity: str = "prelu",
    layers: int | None = None,
    rank: int = DEFAULTS["rank"],
    bins: int = SPLINE_DEFAULTS["bins"],
    init: str = DEFAULTS["init"],
    init_strength: float = DEFAULTS["init_strength"],
    init_spread: float = DEFAULTS["init_spread"],
    hinge_spread: float = DEFAULTS["hinge_spread"],
    seed: int = 0,
) -> Flow:
    """The command line's flow for ``target``, initialized before :func:`fit`.

    ``init="data"``: pairs of layers fitted to ``DEFAULTS["init_samples"]`` samples of the
    target (:func:`init_hinges_` for PReLU, :func:`init_splines_` for splines), when the flow
    has room for them (``layers >= 2``, ``rank >= 1``, ``dim >= 2``); otherwise kinks scattered
    through the bulk (:func:`init_layers_` with ``init_spread``; negative: skipped).
    ``layers=None``: 24 for PReLU, 4 for splines.
    """
    if layers is None:
        layers = SPLINE_DEFAULTS["layers"] if nonlinearity == "spline" else DEFAULTS["layers"]
    flow = Flow(
        target.dim,
        layers=layers,
        rank=rank,
        nonlinearity=nonlinearity,
        bins=bins,
        init_strength=init_strength,
        seed=seed,
    )
    if init == "data" and layers >= 2 and rank >= 1 and target.dim >= 2:
        generator = torch.Generator().manual_seed(seed + 99)
        samples = target.sample(DEFAULTS["init_samples"], generator=generator)
        if nonlinearity == "prelu":
            init_hinges_(flow, samples, spread=hinge_spread)
        else:
            init_splines_(flow, samples)
    elif init_spread >= 0:
        init_layers_(flow, init_spread, seed=seed)
    return flow


def data_flow(dim: int, seed: int = 0, **overrides) -> Flow:
    """The flow of the data recipe: ``DATA_DEFAULTS["layers"]`` coupling splines between affine
    layers of rank ``min(2, dim)``; ``overrides``: any :class:`Flow` argument."""
    config = dict(
        layers=DATA_DEFAULTS["layers"],
        rank=min(2, dim),
        nonlinearity="coupling",
        bins=DATA_DEFAULTS["bins"],
        bound=DATA_DEFAULTS["bound"],
        coupling_hidden=DATA_DEFAULTS["coupling_hidden"],
    )
    return Flow(dim, **{**config, **overrides}, seed=seed)


def fit_data(
    data: Tensor,
    time_limit: float | None = DATA_DEFAULTS["time_limit"],
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
    **fit_kwargs,
) -> tuple[Flow, History]:
    """Fit the data recipe's flow (:func:`data_flow`) to the rows of ``data`` ``(n, d)`` in
    ``time_limit`` seconds; a fraction ``DATA_DEFAULTS["holdout"]`` of the rows is held out,
    and ``history.nll[-1]`` is its NLL. ``fit_kwargs`` override the recipe's :func:`fit`
    settings (``batch_size``, ``lr``, ``ema``, ``holdout``, ``steps``...).

    Example:
        >>> flow, history = fit_data(torch.as_tensor(np.load("data.npy")), time_limit=60)
        >>> log_q = flow().log_prob(x)
    """
    data = torch.as_tensor(data)
    if data.dim() == 1:  # one variable
        data = data[:, None]
    if data.dim() != 2:
        raise ValueError(
            f"fit_data: data must be a 2-D array with one sample per row, got shape "
            f"{tuple(data.shape)}; reshape it to (n, d)"
        )
    check_data("fit_data", data, data.shape[1])
    flow = data_flow(data.shape[1], seed=seed)
    settings = {k: DATA_DEFAULTS[k] for k in ("batch_size", "lr", "ema", "holdout")}
    settings = {"steps": 10**9, **settings, **fit_kwargs}
    history = fit(
        flow, data, device=device, seed=seed, progress=progress, time_limit=time_limit, **settings
    )
    return flow, history
