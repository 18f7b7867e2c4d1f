r"""Standalone density fitting: maximum likelihood of a :class:`~flowpolicy.flows.Flow`.

Fit a flow to an analytic target of :mod:`flowpolicy.targets` or to a tensor of data by
minimizing the negative log-likelihood :math:`-\frac{1}{B}\sum_b \log q_\theta(x_b)` with Adam.
For an analytic target a perfect model reaches a held-out NLL equal to the target's entropy,
and the gap is the exact divergence

.. math:: \mathrm{KL}(p\,\|\,q) = \mathbb{E}_p[\log p(x) - \log q(x)]
          = \mathrm{NLL}_{\text{held-out}} - H(p),

estimated on fresh samples with a standard error (it has far less noise than NLL minus entropy,
because :math:`\log p - \log q` varies much less than :math:`\log q`).

Everything runs on one device (``device="auto"`` takes CUDA when there is one), including the
target's sampler. The experiment of Jang (2018)::

    flow = Flow(2, layers=24, rank=2, seed=0)
    init_hinges_(flow, targets.banana.sample(65536))  # hinge pairs fitted to samples
    history = fit(flow, targets.banana, steps=2000, batch_size=2048, lr=1e-4)
    save(flow, "runs/banana"); flow = load("runs/banana")

A PReLU chain is piecewise linear, and two facts make it fit well: its kinks must start where
the data is (:func:`init_hinges_` regresses one coordinate on hinges of another and builds the
chain as pairs of PReLU layers that each add one hinge), and the gradient must include the
kinks' boundary term (``fit(kink_bandwidth=...)``), which backpropagation misses because each
sample's log-det is piecewise constant in the kinks' positions. A spline chain started by
:func:`init_splines_` (the same regression, with smooth hinges, built as pairs of spline layers
that each add one monotone function) begins within about 1e-4 nats of the banana::

    flow = Flow(2, layers=4, rank=2, nonlinearity="spline", bins=16)
    init_splines_(flow, targets.banana.sample(2**18))

From data (rows are samples): coupling splines, whose bins for one half of the coordinates are
an MLP of the other half, between affine layers (:func:`fit_data`, ``--data``)::

    flow, history = fit_data(data, time_limit=60)   # history.nll[-1]: held-out NLL
    python -m flowpolicy.density --data data.npy --out runs/data --time-limit 60

Command line (trains at good defaults, prints the held-out NLL, the entropy and the KL with its
standard error, saves the flow and the figures)::

    python -m flowpolicy.density --target banana --device auto --out runs/banana

The modules: :mod:`~flowpolicy.density.init` (initializers), :mod:`~flowpolicy.density.fit`
(fitting and scores), :mod:`~flowpolicy.density.source` (what fit trains on, in standardized
units, and the checks of its arguments), :mod:`~flowpolicy.density.io` (atomic save, checked
load),
:mod:`~flowpolicy.density.plots` (figures; matplotlib is imported when a figure is drawn),
:mod:`~flowpolicy.density.recipes` (the command line's settings) and ``__main__`` (the
command line, :func:`main`).
"""

from flowpolicy.density import datasets
from flowpolicy.density.fit import History, evaluate, fit, resolve_device
from flowpolicy.density.init import init_hinges_, init_layers_, init_splines_, standardize_
from flowpolicy.density.io import load, save
from flowpolicy.density.plots import save_figures
from flowpolicy.density.recipes import (
    DATA_DEFAULTS,
    DEFAULTS,
    SPLINE_DEFAULTS,
    data_flow,
    fit_data,
    initial_flow,
)

__all__ = [
    "DATA_DEFAULTS",
    "DEFAULTS",
    "SPLINE_DEFAULTS",
    "History",
    "data_flow",
    "datasets",
    "evaluate",
    "fit",
    "fit_data",
    "init_hinges_",
    "init_layers_",
    "init_splines_",
    "initial_flow",
    "load",
    "main",
    "resolve_device",
    "save",
    "save_figures",
    "standardize_",
]


def main(argv: list[str] | None = None) -> int:
    """The command line (``python -m flowpolicy.density``); see :mod:`flowpolicy.density`."""
    # imported here: imported with the package, runpy would find __main__ in sys.modules
    # already when the package is run, and warn
    from flowpolicy.density.__main__ import main as cli

    return cli(argv)
