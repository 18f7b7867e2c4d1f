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
target's sampler. The seed article's experiment::

    flow = Flow(2, layers=24, rank=2, seed=0)
    init_layers_(flow, spread=0.5)          # PReLU kinks scattered through the bulk
    history = fit(flow, targets.banana, steps=12000, batch_size=2048, lr=2e-3)
    save(flow, "runs/banana"); flow = load("runs/banana")

Command line (trains at good defaults, prints the held-out NLL, the entropy and the KL with its
standard error, saves the flow and the figures)::

    python -m flowpolicy.density --target banana --device auto --out runs/banana
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from flowpolicy import targets as _targets
from flowpolicy.bijectors import call_and_ladj
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = [
    "History",
    "evaluate",
    "fit",
    "init_layers_",
    "load",
    "main",
    "resolve_device",
    "save",
    "save_figures",
    "standardize_",
]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "weights.pt"
_FORMAT = "flowpolicy.Flow"


# --------------------------------------------------------------------------------------------
# devices, initialization
# --------------------------------------------------------------------------------------------


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: CUDA when available, else CPU; anything else is checked to be usable.

    :raises ValueError: for a CUDA device when torch sees none, or an unknown device string.
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"unknown device {device!r}: use 'auto', 'cpu' or 'cuda[:i]'") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                "device 'cuda' was asked for, but no CUDA device is available "
                "(use --device auto or cpu)"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device} does not exist: {torch.cuda.device_count()} CUDA device(s)"
            )
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {device}: use 'auto', 'cpu' or 'cuda[:i]'")
    return device


def _affine_blocks(flow: Flow) -> list[tuple[int, torch.nn.Module]]:
    """(offset in ``theta``, parameter module) of every affine layer of the chain."""
    blocks, offset = [], 0
    for module, size in zip(flow.layout.chain, flow.layout.sizes):
        if hasattr(module, "diag_offset"):  # _AffineParams
            blocks.append((offset, module))
        offset += size
    return blocks


def _rescale_affine_(
    flow: Flow, offset: int, module: torch.nn.Module, a: Tensor, c: Tensor
) -> None:
    r"""Compose the affine layer at ``offset`` with :math:`y \mapsto a \odot y + c` (in place).

    :math:`S x + b \to \mathrm{diag}(a) S x + a \odot b + c`, i.e. :math:`L \to \mathrm{diag}(a) L`
    (still lower-triangular with a positive diagonal, the low-rank part unchanged).
    """
    d, theta = module.dim, flow.theta
    with torch.no_grad():
        shift = theta[offset : offset + d]
        tril = theta[offset + d : offset + d + d * (d + 1) // 2]
        diag = F.softplus(tril[:d] + module.diag_offset) + module.eps
        # inverse of softplus(t + c0) + eps, for the new diagonal a * L_ii
        new_diag = (a * diag - module.eps).clamp_min(1e-6)
        tril[:d] = new_diag + torch.log(-torch.expm1(-new_diag)) - module.diag_offset
        rows, _ = torch.tril_indices(d, d, offset=-1)
        tril[d:] = tril[d:] * a[rows.to(theta.device)]
        shift.copy_(a * shift + c)


def init_layers_(
    flow: Flow, spread: float = 0.5, num_samples: int = 8192, seed: int | None = 0
) -> Flow:
    r"""Base-driven initialization of the inner affine layers (as ActNorm, Kingma & Dhariwal 2018).

    Pushing base samples through the chain, each inner affine layer :math:`k` is rescaled so
    that its outputs, the inputs of the next nonlinearity, have unit standard deviation and mean
    :math:`u_k \sim \mathcal{N}(0, \text{spread}^2)` per dimension.

    Why: with every shift at zero, each PReLU bends at the origin and the chain is positively
    homogeneous, :math:`f(cz) = c f(z)` for :math:`c > 0`, so it can only shape the density along
    rays; and random shears compound over many layers into values whose scale drifts by orders
    of magnitude. Unit-scale inputs with kinks scattered through their bulk give every PReLU
    something to bend. The last affine layer is left for :func:`standardize_`.
    """
    blocks = _affine_blocks(flow)
    theta = flow.theta
    generator = torch.Generator().manual_seed(0 if seed is None else seed)
    with torch.no_grad():
        z = torch.randn(num_samples, flow.layout.dim, generator=generator).to(theta)
        for (offset, module), layer in zip(blocks[:-1], list(flow.layout.chain)[1::2]):
            size = module.num_params
            pre, _ = call_and_ladj(module(theta[offset : offset + size]), z)
            u = spread * torch.randn(module.dim, generator=generator).to(theta)
            std = pre.std(0).clamp_min(1e-6)
            _rescale_affine_(flow, offset, module, 1 / std, u - pre.mean(0) / std)
            pre, _ = call_and_ladj(module(theta[offset : offset + size]), z)
            nonlinear_offset = offset + size
            z, _ = call_and_ladj(
                layer(theta[nonlinear_offset : nonlinear_offset + layer.num_params]), pre
            )
    return flow


def standardize_(flow: Flow, data: Tensor, num_samples: int = 16384, seed: int = 0) -> Flow:
    r"""Match the flow's output mean and standard deviation to the data's (data-dependent init).

    With :math:`\mu_q, \sigma_q` the moments of the flow's samples and :math:`\mu, \sigma` the
    data's, the last affine layer :math:`y = S x + b` becomes
    :math:`y = a \odot (S x + b - \mu_q) + \mu` with :math:`a = \sigma / \sigma_q`, i.e.
    :math:`L \to \mathrm{diag}(a) L` (still lower-triangular with a positive diagonal) and
    :math:`b \to a \odot (b - \mu_q) + \mu`. The chain then works on unit-scale values whatever
    the data's units, and a flow that already fits is left (nearly) unchanged.
    """
    if flow.config.get("squash"):
        raise ValueError("standardize_: a squashed flow's support is fixed to (-1, 1)^d")
    offset, module = _affine_blocks(flow)[-1]
    theta = flow.theta
    with torch.no_grad():
        generator = torch.Generator(theta.device).manual_seed(seed)
        z = torch.randn(
            num_samples, module.dim, generator=generator, device=theta.device, dtype=theta.dtype
        )
        x, _ = flow().push_forward(z)
        a = data.std(0).to(theta) / x.std(0)
        _rescale_affine_(flow, offset, module, a, data.mean(0).to(theta) - a * x.mean(0))
    return flow


# --------------------------------------------------------------------------------------------
# fast maximum-likelihood pass for affine + PReLU chains
# --------------------------------------------------------------------------------------------


class _PReLUChainLogProb:
    r"""``log q(x)`` of an affine + PReLU :class:`Flow` with all layers' parameters batched.

    The generic path builds one transform per layer and, for the inverse of each affine layer,
    runs batched triangular solves over the samples. In two dimensions that time is all
    per-operation overhead, so here every affine layer is built at once from the layout's own
    modules (same parametrization), each :math:`S_k^{-1}` is a dense :math:`d \times d`
    inverse, and a layer costs an ``addmm`` and a ``where``. Same value as
    ``flow().log_prob(x)`` (to float rounding), several times faster on CPU.
    """

    def __init__(self, flow: Flow) -> None:
        chain, sizes = list(flow.layout.chain), flow.layout.sizes
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        device = flow.theta.device

        def index(parity: int) -> Tensor:
            rows = [torch.arange(offsets[i], offsets[i + 1]) for i in range(parity, len(chain), 2)]
            return torch.stack(rows).to(device) if rows else torch.empty(0, dtype=torch.long)

        self.affine, self.prelu = chain[0], chain[1] if len(chain) > 1 else None
        self.affine_index, self.prelu_index = index(0), index(1)
        self.dim = flow.layout.dim
        self.basis = torch.eye(self.dim, device=device)[:, None, :]  # (d, 1, d)

    @staticmethod
    def supports(flow: Flow) -> bool:
        return flow.config.get("nonlinearity") == "prelu" and not flow.config.get("squash")

    def __call__(self, theta: Tensor, x: Tensor) -> Tensor:
        affine = self.affine(theta[self.affine_index])  # one Affine, batch of K + 1 layers
        basis = self.basis.to(theta.dtype)
        image, log_det = call_and_ladj(affine, basis.expand(-1, len(self.affine_index), -1))
        shift = affine(torch.zeros_like(basis[0]))  # (K + 1, d)
        matrix = (image - shift).transpose(0, 1)  # (K + 1, d, d): row i of layer k = S_k e_i
        inverse = torch.linalg.inv(matrix)  # x_prev = (y - b_k) @ inverse[k]
        offset = -(shift[:, None, :] @ inverse)[:, 0]
        ladj = log_det[0].sum()
        masks = []
        if self.prelu is not None:
            log_alpha = self.prelu(theta[self.prelu_index]).alpha.log()  # (K, d)
            inv_alpha = (-log_alpha).exp()
        for k in range(len(self.affine_index) - 1, -1, -1):
            x = torch.addmm(offset[k], x, inverse[k])
            if k > 0:
                negative = x < 0
                masks.append(negative)
                x = torch.where(negative, x * inv_alpha[k - 1], x)
        if masks:
            negative = torch.stack(masks[::-1], dim=-2).to(x.dtype)  # (N, K, d)
            ladj = ladj + (negative * log_alpha).sum((-2, -1))
        return -0.5 * x.square().sum(-1) - 0.5 * self.dim * math.log(2 * math.pi) - ladj


# --------------------------------------------------------------------------------------------
# fitting and evaluation
# --------------------------------------------------------------------------------------------


@dataclass
class History:
    """What :func:`fit` measured.

    :ivar loss: training NLL of each step's batch.
    :ivar lr: learning rate of each step.
    :ivar eval_step: steps at which the held-out set was scored (with the averaged weights).
    :ivar nll: held-out NLL at those steps; ``nll_stderr`` its standard error.
    :ivar kl: :math:`\\mathrm{KL}(p\\|q)` at those steps (analytic targets only, else empty);
        ``kl_stderr`` its standard error.
    :ivar entropy: the target's exact entropy (``None`` for data).
    :ivar train_seconds: wall time of the training steps (evaluations excluded).
    :ivar steps_per_second: training steps per second.
    :ivar device: where it ran.
    """

    loss: list[float] = field(default_factory=list)
    lr: list[float] = field(default_factory=list)
    eval_step: list[int] = field(default_factory=list)
    nll: list[float] = field(default_factory=list)
    nll_stderr: list[float] = field(default_factory=list)
    kl: list[float] = field(default_factory=list)
    kl_stderr: list[float] = field(default_factory=list)
    entropy: float | None = None
    train_seconds: float = 0.0
    steps_per_second: float = 0.0
    device: str = "cpu"

    @property
    def steps(self) -> int:
        return len(self.loss)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def _score(
    theta: Tensor, flow: Flow, x: Tensor, log_p: Tensor | None, chunk: int = 65536
) -> dict[str, float]:
    """Held-out NLL (and KL when ``log_p`` is given) of ``x`` under ``layout(theta)``."""
    dist = flow.layout(theta, False)
    log_q = torch.cat([dist.log_prob(part) for part in x.split(chunk)]).double()
    n = log_q.numel()
    out = {"nll": -log_q.mean().item(), "nll_stderr": log_q.std().item() / math.sqrt(n)}
    if log_p is not None:
        gap = log_p.double() - log_q
        out.update(kl=gap.mean().item(), kl_stderr=gap.std().item() / math.sqrt(n))
    return out


def evaluate(
    flow: Flow,
    target: Target | str,
    num_samples: int = 200_000,
    seed: int = 12345,
    device: str | torch.device | None = None,
) -> dict[str, float]:
    r"""Score a flow on ``num_samples`` fresh samples of an analytic target.

    Returns ``nll`` (:math:`-\frac1n\sum\log q(x_i)`), ``kl`` (:math:`\frac1n\sum[\log p(x_i)
    - \log q(x_i)]`), their standard errors ``nll_stderr`` and ``kl_stderr``
    (:math:`\hat\sigma/\sqrt n`) and the exact ``entropy``. Uses ``flow().log_prob`` (the
    library's inverse pass), never the training shortcut.
    """
    target = _targets.get(target) if isinstance(target, str) else target
    device = flow.theta.device if device is None else resolve_device(device)
    flow = flow.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x = target.sample(num_samples, generator=generator, device=device, dtype=flow.theta.dtype)
    out = _score(flow.theta.detach(), flow, x, target.log_prob(x))
    out["entropy"] = target.entropy()
    return out


def _check_positive(name: str, value, kind=int) -> None:
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        raise ValueError(f"{name} must be a positive {kind.__name__}, got {value!r}")


def fit(
    flow: Flow,
    target_or_data: Target | str | Tensor,
    steps: int = 8000,
    batch_size: int = 4096,
    lr: float = 3e-3,
    device: str | torch.device = "auto",
    seed: int | None = 0,
    progress: bool = True,
    *,
    time_limit: float | None = None,
    ema: float | None = 0.998,
    final_lr: float = 0.0,
    warmup: float = 0.0,
    standardize: bool = True,
    eval_every: int | None = None,
    eval_samples: int = 20_000,
    holdout: float = 0.1,
) -> History:
    r"""Fit ``flow`` by maximum likelihood: Adam on :math:`-\frac1B\sum_b \log q_\theta(x_b)`.

    Each step draws a fresh batch from the target on the device (or a random batch of the
    training rows of a data tensor). The learning rate follows a cosine from ``lr`` to
    ``final_lr * lr`` over the run's progress, :math:`\max(\text{step}/\text{steps},
    \text{elapsed}/\text{time\_limit})`, so a wall-clock budget anneals too. Held-out scores
    and the final weights use an exponential moving average of the parameters,
    :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` (Polyak averaging: it
    removes most of the SGD noise that would otherwise sit in the KL); the flow ends with
    :math:`\bar\theta`.

    :param flow: the flow to train (moved to ``device``, trained in place).
    :param target_or_data: a :class:`~flowpolicy.targets.Target`, a target's name, or a tensor
        of data of shape ``(n, d)`` (a fraction ``holdout`` of the rows is kept for scoring).
    :param steps: maximum number of Adam steps (positive).
    :param batch_size: samples per step.
    :param lr: peak learning rate.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    :param seed: seed of the batches and of the held-out set.
    :param progress: show a tqdm progress bar.
    :param time_limit: stop after this many seconds of training (the schedule follows it).
    :param ema: decay :math:`\beta` of the weight average (``None`` or 0: no averaging).
    :param final_lr: learning rate at the end, as a fraction of ``lr``.
    :param warmup: fraction of the run over which the learning rate ramps up linearly.
    :param standardize: first match the flow's output mean and std to the data's
        (:func:`standardize_`; skipped for squashed flows).
    :param eval_every: score the held-out set every this many steps (default: 10 times a run,
        spaced by the clock when ``time_limit`` is given).
    :param eval_samples: size of the held-out set of an analytic target.
    :param holdout: fraction of a data tensor's rows held out.
    :returns: a :class:`History`.
    :raises ValueError: for non-positive steps or batch size, an unknown target, a data tensor
        of the wrong shape, or an unusable device.
    """
    if not isinstance(flow, Flow):
        raise ValueError(f"fit: expected a flowpolicy.Flow, got {type(flow).__name__}")
    _check_positive("steps", steps)
    _check_positive("batch_size", batch_size)
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if time_limit is not None and not time_limit > 0:
        raise ValueError(f"time_limit must be positive, got {time_limit!r}")
    if ema is not None and not 0 <= ema < 1:
        raise ValueError(f"ema must be in [0, 1), got {ema!r}")
    device = resolve_device(device)
    flow = flow.to(device)
    dtype, dim = flow.theta.dtype, flow.config["dim"]
    seed = 0 if seed is None else seed
    generator = torch.Generator(device).manual_seed(seed)
    eval_generator = torch.Generator(device).manual_seed(seed + 1_000_003)

    target: Target | None = None
    if isinstance(target_or_data, Tensor):
        data = target_or_data.to(device=device, dtype=dtype)
        if data.dim() != 2 or data.shape[1] != dim or len(data) < 2:
            raise ValueError(f"data must have shape (n >= 2, {dim}), got {tuple(data.shape)}")
        if not torch.isfinite(data).all():
            raise ValueError("data contains NaN or inf")
        order = torch.randperm(len(data), generator=generator, device=device)
        n_held = min(max(1, int(holdout * len(data))), len(data) - 1)
        held, train = data[order[:n_held]], data[order[n_held:]]
        held_log_p = None

        def draw(n: int) -> Tensor:
            return train[torch.randint(len(train), (n,), generator=generator, device=device)]
    else:
        target = _targets.get(target_or_data) if isinstance(target_or_data, str) else target_or_data
        if not isinstance(target, Target) or target.dim != dim:
            raise ValueError(f"expected a {dim}-D Target, a target name or a data tensor")
        held = target.sample(eval_samples, generator=eval_generator, device=device, dtype=dtype)
        held_log_p = target.log_prob(held)

        def draw(n: int) -> Tensor:
            return target.sample(n, generator=generator, device=device, dtype=dtype)

    if standardize and not flow.config.get("squash"):
        standardize_(flow, held if target is None else draw(eval_samples), seed=seed)
    log_prob = (
        _PReLUChainLogProb(flow)
        if _PReLUChainLogProb.supports(flow)
        else lambda theta, x: flow.layout(theta, False).log_prob(x)
    )
    optimizer = torch.optim.Adam([flow.theta], lr=lr)
    average = flow.theta.detach().clone()
    # score 10 times a run: by steps, or by the clock when a time limit is what ends the run
    eval_by_time = eval_every is None and time_limit is not None
    eval_every = eval_every or max(1, steps // 10)
    next_eval = 0.1 * time_limit if eval_by_time else math.inf
    history = History(entropy=None if target is None else target.entropy(), device=str(device))

    def record(step: int) -> None:
        scores = _score(average if ema else flow.theta.detach(), flow, held, held_log_p)
        history.eval_step.append(step)
        history.nll.append(scores["nll"])
        history.nll_stderr.append(scores["nll_stderr"])
        if "kl" in scores:
            history.kl.append(scores["kl"])
            history.kl_stderr.append(scores["kl_stderr"])

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=steps, desc=f"fit on {device}", unit="step", dynamic_ncols=True, mininterval=1.0
        )
    train_seconds, step, losses = 0.0, 0, []
    start = time.perf_counter()
    while step < steps:
        elapsed = time.perf_counter() - start + train_seconds
        done = step / steps if time_limit is None else max(step / steps, elapsed / time_limit)
        if done >= 1:
            break
        rate = lr * (final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * done)))
        if done < warmup:  # linear warm-up: Adam's first steps are full-size whatever the gradient
            rate *= done / warmup
        for group in optimizer.param_groups:
            group["lr"] = rate
        loss = -log_prob(flow.theta, draw(batch_size)).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        with torch.no_grad():
            # early on the average forgets fast (warm-up of the decay, as in Polyak averaging)
            beta = min(ema or 0.0, (1 + step) / (10 + step))
            average.mul_(beta).add_(flow.theta.detach(), alpha=1 - beta)
        losses.append(loss.detach())  # no .item() per step: it would sync a GPU every step
        history.lr.append(rate)
        if bar is not None:
            bar.update()
        by_time = eval_by_time and time.perf_counter() - start + train_seconds >= next_eval
        if by_time or (not eval_by_time and step % eval_every == 0) or step == steps:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            train_seconds += time.perf_counter() - start
            next_eval = train_seconds + 0.1 * time_limit if eval_by_time else math.inf
            history.loss.extend(torch.stack(losses).tolist())
            losses.clear()
            record(step)
            if bar is not None:
                info = {"loss": f"{loss.item():.3f}", "nll": f"{history.nll[-1]:.3f}"}
                if history.kl:
                    info["kl"] = f"{history.kl[-1]:.4f}"
                bar.set_postfix(info)
            start = time.perf_counter()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if not history.eval_step or history.eval_step[-1] != step:
        train_seconds += time.perf_counter() - start
        if losses:
            history.loss.extend(torch.stack(losses).tolist())
        record(step)
    if bar is not None:
        bar.close()
    if ema:
        with torch.no_grad():
            flow.theta.copy_(average)
    history.train_seconds = train_seconds
    history.steps_per_second = step / max(train_seconds, 1e-9)
    return history


# --------------------------------------------------------------------------------------------
# saving and loading
# --------------------------------------------------------------------------------------------


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


def load(path: str | Path, device: str | torch.device = "cpu") -> Flow:
    """Rebuild a flow saved by :func:`save` from the directory ``path``, on ``device``.

    :raises FileNotFoundError: if ``path`` does not exist.
    :raises ValueError: if ``path`` is not a directory written by :func:`save`.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"load: {path} does not exist")
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
    try:
        flow = Flow(**meta["config"], seed=0)
    except TypeError as error:
        raise ValueError(f"load: the config in {config_file} does not fit Flow: {error}") from error
    dtype = getattr(torch, meta.get("dtype", "float32"))
    state = torch.load(weights_file, map_location="cpu", weights_only=True)
    flow = flow.to(dtype)
    try:
        flow.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"load: {weights_file} does not match its config: {error}") from error
    return flow.to(resolve_device(device))


# --------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------


def _grid(box, n: int = 200) -> tuple[Tensor, Tensor, Tensor]:
    (x_lo, x_hi), (y_lo, y_hi) = box
    xs, ys = torch.linspace(x_lo, x_hi, n), torch.linspace(y_lo, y_hi, n)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    return gx, gy, torch.stack([gx, gy], -1).reshape(-1, 2)


def _box_of(points: Tensor, margin: float = 0.1) -> tuple[tuple[float, float], ...]:
    lo, hi = points.quantile(0.005, dim=0), points.quantile(0.995, dim=0)
    pad = margin * (hi - lo)
    return tuple((float(a), float(b)) for a, b in zip(lo - pad, hi + pad))


@torch.no_grad()
def _plot_density(flow: Flow, target: Target | None, data: Tensor | None, path: Path) -> None:
    import matplotlib.pyplot as plt

    dist = flow()
    samples = dist.sample((4000,)).cpu()
    box = target.view if target is not None else _box_of(data.cpu())
    gx, gy, points = _grid(box)
    extent = (*box[0], *box[1])
    model = dist.log_prob(points.to(flow.theta)).cpu().exp().reshape(gx.shape).double().numpy()
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6), constrained_layout=True)
    if target is not None:
        truth = target.log_prob(points).exp().reshape(gx.shape).double().numpy()
        axes[0].imshow(truth, origin="lower", extent=extent, aspect="auto", cmap="magma")
        axes[0].set_title(f"target p ({target.name})")
        reference = truth
    else:
        d = data.detach().cpu().double().numpy()
        axes[0].hist2d(d[:, 0], d[:, 1], bins=120, range=box, cmap="magma")
        axes[0].set_title("data")
        reference = model
    axes[1].imshow(model, origin="lower", extent=extent, aspect="auto", cmap="magma")
    axes[1].set_title("model q")
    axes[2].contour(gx.numpy(), gy.numpy(), reference, levels=8, cmap="viridis", linewidths=1)
    axes[2].scatter(*samples.T.numpy(), s=2, alpha=0.3, color="tab:red")
    axes[2].set_xlim(box[0])
    axes[2].set_ylim(box[1])
    axes[2].set_title("model samples on the target's contours")
    for ax in axes:
        ax.set_xlabel("$x_1$")
        ax.set_ylabel("$x_2$")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_history(history: History, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), constrained_layout=True)
    loss = torch.tensor(history.loss)
    axes[0].plot(loss.numpy(), lw=0.5, alpha=0.35, color="tab:blue", label="batch NLL")
    width = max(1, len(loss) // 100)
    if len(loss) > width:
        smooth = loss.unfold(0, width, 1).mean(-1)
        steps = (torch.arange(len(smooth)) + width - 1).numpy()
        axes[0].plot(steps, smooth.numpy(), color="tab:blue", label="mean")
    axes[0].errorbar(
        history.eval_step,
        history.nll,
        history.nll_stderr,
        fmt="o-",
        ms=3,
        color="tab:orange",
        label="held-out NLL",
    )
    if history.entropy is not None:
        axes[0].axhline(history.entropy, ls="--", color="k", label=f"entropy {history.entropy:.4f}")
    # the first steps' losses can be huge: frame the held-out curve and the entropy instead
    floor = [history.entropy] if history.entropy is not None else []
    low = min(history.nll + floor + [float(loss.quantile(0.01))])
    high = max(history.nll + [float(loss.quantile(0.5))])
    axes[0].set_ylim(low - 0.1, high + 0.4)
    axes[0].set_xlabel("step")
    axes[0].set_ylabel("nats")
    axes[0].legend()
    axes[0].set_title("negative log-likelihood")
    if history.kl:
        kl = torch.tensor(history.kl).clamp_min(1e-4)
        axes[1].errorbar(history.eval_step, kl.numpy(), history.kl_stderr, fmt="o-", ms=3)
        axes[1].set_yscale("log")
        axes[1].set_title(f"KL(p||q), final {history.kl[-1]:.4f} nats")
        axes[1].set_ylabel("nats")
    else:
        axes[1].plot(history.lr)
        axes[1].set_title("learning rate")
    axes[1].set_xlabel("step")
    fig.savefig(path, dpi=110)
    plt.close(fig)


@torch.no_grad()
def _plot_deformation(flow: Flow, path: Path, panels: int = 10, seed: int = 0) -> None:
    """The seed's picture: base samples coloured by their starting quadrant, layer after layer."""
    import matplotlib.pyplot as plt

    dist = flow()
    generator = torch.Generator(flow.theta.device).manual_seed(seed)
    z = torch.randn(3000, 2, generator=generator, device=flow.theta.device, dtype=flow.theta.dtype)
    quadrant = ((z[:, 0] < 0).long() + 2 * (z[:, 1] < 0).long()).cpu()
    colors = ["tab:red", "tab:blue", "tab:green", "tab:orange"]
    stages, x = [("base z", z.cpu())], z
    for i, transform in enumerate(dist.transforms, start=1):
        x, _ = call_and_ladj(transform, x)
        stages.append((f"after {i} / {len(dist.transforms)}: {type(transform).__name__}", x.cpu()))
    if len(stages) > panels:  # a readable subset, evenly spaced, first and last kept
        keep = torch.linspace(0, len(stages) - 1, panels).round().long().unique().tolist()
        stages = [stages[i] for i in keep]
    cols = min(5, len(stages))
    rows = math.ceil(len(stages) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (title, points) in zip(axes.flat, stages):
        for q in range(4):
            ax.scatter(*points[quadrant == q].T.numpy(), s=1.5, alpha=0.5, color=colors[q])
        lo, hi = _box_of(points, 0.05)
        ax.set_xlim(lo)
        ax.set_ylim(hi)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in list(axes.flat)[len(stages) :]:
        ax.axis("off")
    fig.suptitle("base samples coloured by starting quadrant, deformed by the flow")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_figures(
    flow: Flow,
    target_or_data: Target | str | Tensor,
    history: History | None,
    out: str | Path,
) -> list[Path]:
    """Write ``density.png``, ``training.png`` (with a history) and ``deformation.png`` to ``out``.

    Uses matplotlib's Agg backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target, data = None, None
    if isinstance(target_or_data, Tensor):
        data = target_or_data
    else:
        target = _targets.get(target_or_data) if isinstance(target_or_data, str) else target_or_data
    written = [out / "density.png"]
    _plot_density(flow, target, data, written[0])
    if history is not None and history.loss:
        written.append(out / "training.png")
        _plot_history(history, written[-1])
    if flow.config["dim"] == 2:
        written.append(out / "deformation.png")
        _plot_deformation(flow, written[-1])
    return written


# --------------------------------------------------------------------------------------------
# command line
# --------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flowpolicy.density",
        description="Fit an affine + PReLU (or spline) flow to a 2-D target by maximum likelihood; "
        "print the held-out NLL, the entropy and KL(p||q); save the flow and its figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--target", default="banana", help=f"one of {_targets.names()}")
    parser.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda")
    parser.add_argument("--out", default=None, help="output directory (default runs/<target>)")
    parser.add_argument("--steps", type=int, default=DEFAULTS["steps"], help="maximum steps")
    parser.add_argument(
        "--time-limit",
        type=float,
        default=DEFAULTS["time_limit"],
        help="training budget in seconds (the lr schedule follows it); 0: none",
    )
    parser.add_argument("--layers", type=int, default=DEFAULTS["layers"])
    parser.add_argument("--rank", type=int, default=DEFAULTS["rank"])
    parser.add_argument("--nonlinearity", default="prelu", choices=("prelu", "spline"))
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--lr", type=float, default=DEFAULTS["lr"])
    parser.add_argument("--ema", type=float, default=DEFAULTS["ema"], help="0: no averaging")
    parser.add_argument("--init-strength", type=float, default=DEFAULTS["init_strength"])
    parser.add_argument(
        "--init-spread",
        type=float,
        default=DEFAULTS["init_spread"],
        help="spread of the PReLU kinks at init (init_layers_); negative: skip",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, default=200_000, help="final fresh samples")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (1: the 2-D ops are overhead-bound, more threads do not help)",
    )
    parser.add_argument("--no-figures", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    return parser


#: Defaults of the command line (affine + PReLU on the banana).
DEFAULTS = dict(
    steps=12000,
    time_limit=100.0,
    layers=24,
    rank=2,
    batch_size=2048,
    lr=2e-3,
    ema=0.998,
    init_strength=1.0,
    init_spread=0.5,
)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (see the module docstring)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        target = _targets.get(args.target)
        device = resolve_device(args.device)
        _check_positive("--steps", args.steps)
        _check_positive("--batch-size", args.batch_size)
        _check_positive("--eval-samples", args.eval_samples)
        _check_positive("--threads", args.threads)
        if args.time_limit < 0:
            raise ValueError(f"--time-limit must be >= 0, got {args.time_limit}")
        flow = Flow(
            target.dim,
            layers=args.layers,
            rank=args.rank,
            nonlinearity=args.nonlinearity,
            init_strength=args.init_strength,
            seed=args.seed,
        )
    except ValueError as error:
        parser.error(str(error))
    torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{target.name}")
    if args.init_spread >= 0:
        init_layers_(flow, args.init_spread, seed=args.seed)
    history = fit(
        flow,
        target,
        steps=args.steps,
        batch_size=args.batch_size,
        lr=args.lr,
        device=device,
        seed=args.seed,
        progress=not args.no_progress,
        time_limit=args.time_limit or None,
        ema=args.ema or None,
    )
    scores = evaluate(flow, target, args.eval_samples, seed=args.seed + 777)
    save(flow, out)
    metrics = {
        "target": target.name,
        **scores,
        "steps": history.steps,
        "train_seconds": history.train_seconds,
        "steps_per_second": history.steps_per_second,
        "device": str(device),
        "args": vars(args),
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "history.json").write_text(json.dumps(history.to_dict()) + "\n")
    if not args.no_figures:
        save_figures(flow, target, history, out)
    print(
        f"{target.name}: {history.steps} steps in {history.train_seconds:.1f} s "
        f"({history.steps_per_second:.0f} steps/s on {device})\n"
        f"  held-out NLL {scores['nll']:.4f} ± {scores['nll_stderr']:.4f} nats "
        f"({args.eval_samples} fresh samples)\n"
        f"  entropy      {scores['entropy']:.4f} nats (exact)\n"
        f"  KL(p||q)     {scores['kl']:.4f} ± {scores['kl_stderr']:.4f} nats\n"
        f"saved to {out} (load with flowpolicy.density.load({str(out)!r}))"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
