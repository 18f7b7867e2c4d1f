"""The recipes of the command line, shared by the example and the benchmarks: the settings that
fit the banana well, and the flow they start from."""

from __future__ import annotations

import torch

from flowpolicy.density.init import init_hinges_, init_layers_, init_splines_
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = ["DEFAULTS", "SPLINE_DEFAULTS", "initial_flow"]

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
