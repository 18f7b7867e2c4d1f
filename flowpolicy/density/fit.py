r"""Maximum-likelihood fitting of a :class:`~flowpolicy.flows.Flow`, and its scores.

:func:`fit` minimizes :math:`-\frac{1}{B}\sum_b \log q_\theta(x_b)` with Adam on fresh batches of
a target (or of a data tensor's rows) and keeps an exponential moving average of the weights;
:func:`evaluate` scores a flow on fresh samples of an analytic target, with
:math:`\mathrm{KL}(p\,\|\,q) = \mathbb{E}_p[\log p(x) - \log q(x)]`.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor
from torch.optim.swa_utils import AveragedModel

from flowpolicy import targets as _targets
from flowpolicy.density.init import scale_output_, standardize_
from flowpolicy.density.source import Source, check_fit_args, check_positive, make_source
from flowpolicy.flows import Flow
from flowpolicy.targets import Target

__all__ = ["History", "evaluate", "fit", "resolve_device"]


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
    :ivar train_seconds: wall time of the setup and the training steps (evaluations excluded).
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

    def record(self, step: int, scores: dict[str, float]) -> None:
        """Append the held-out scores of ``step`` (as returned by :func:`_score`)."""
        self.eval_step.append(step)
        self.nll.append(scores["nll"])
        self.nll_stderr.append(scores["nll_stderr"])
        if "kl" in scores:
            self.kl.append(scores["kl"])
            self.kl_stderr.append(scores["kl_stderr"])


# --------------------------------------------------------------------------------------------
# scores
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def _score(
    flow: Flow,
    x: Tensor,
    log_p: Tensor | None,
    log_scale: float = 0.0,
    chunk: int = 65536,
) -> dict[str, float]:
    """Held-out NLL of ``x`` under ``flow`` (and the KL when ``log_p`` is given); ``x`` in
    working units, ``log_scale`` their log-Jacobian
    (:attr:`Source.log_scale <flowpolicy.density.source.Source.log_scale>`)."""
    dist = flow(False)
    log_q = torch.cat([dist.log_prob(part) for part in x.split(chunk)]).double() - log_scale
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
    (:math:`\hat\sigma/\sqrt n`) and the exact ``entropy``.
    """
    target = _targets.get(target) if isinstance(target, str) else target
    if not isinstance(target, Target):
        raise ValueError(f"evaluate: expected a Target or a target's name, got {target!r}")
    if not isinstance(flow, Flow) or flow.theta.dtype not in (torch.float32, torch.float64):
        kind = flow.theta.dtype if isinstance(flow, Flow) else type(flow).__name__
        raise TypeError(f"evaluate: expected a float32 or float64 flowpolicy.Flow, got {kind}")
    check_positive("num_samples", num_samples)
    device = flow.theta.device if device is None else resolve_device(device)
    flow = flow.to(device)
    generator = torch.Generator(device).manual_seed(seed)
    x = target.sample(num_samples, generator=generator, device=device, dtype=flow.theta.dtype)
    out = _score(flow, x, target.log_prob(x))
    out["entropy"] = target.entropy()
    return out


# --------------------------------------------------------------------------------------------
# the pieces of fit
# --------------------------------------------------------------------------------------------


def _train_step(
    flow: Flow, optimizer: torch.optim.Optimizer, batch: Tensor, rate: float, bandwidth: float
) -> Tensor:
    """One Adam step on the batch's NLL at learning rate ``rate``; returns the (detached) loss.
    ``bandwidth``: the PReLU kinks' boundary term (:meth:`Flow.forward`)."""
    for group in optimizer.param_groups:
        group["lr"] = rate
    loss = -flow(False, bandwidth).log_prob(batch).mean()
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


def _learning_rate(done: float, lr: float, final_lr: float, warmup: float) -> float:
    """Cosine from ``lr`` to ``final_lr * lr`` over the run's progress ``done`` in [0, 1], after
    a linear warm-up over its first ``warmup`` (Adam's first steps are full-size whatever the
    gradient)."""
    rate = lr * (final_lr + (1 - final_lr) * 0.5 * (1 + math.cos(math.pi * done)))
    return rate * done / warmup if done < warmup else rate


def _polyak(decay: float):
    r"""The ``multi_avg_fn`` of an exponential moving average with a warm-up of the decay,
    :math:`\beta_n = \min(\text{decay}, (1 + n) / (10 + n))` after ``n`` updates: early on the
    average forgets fast (as in Polyak averaging). One fused update for all the parameters
    (a coupling flow has dozens), with ``n`` counted here: no sync with a GPU."""
    updates = 0

    def average(means: list[Tensor], values: list[Tensor], count: Tensor) -> None:
        nonlocal updates
        updates += 1
        beta = min(decay, (1 + updates) / (10 + updates))
        torch._foreach_lerp_(means, values, 1 - beta)

    return average


def _polyak_average(flow: Flow, decay: float | None) -> AveragedModel | None:
    """``torch.optim.swa_utils.AveragedModel`` of the flow's parameters (its raw vector, and
    the conditioners of coupling layers) with :func:`_polyak`'s decay, started at their current
    values (``None`` for no average); ``average.module`` is the averaged flow."""
    if not decay:
        return None
    average = AveragedModel(flow, multi_avg_fn=_polyak(decay))
    average.update_parameters(flow)
    return average


class _Clock:
    """Training time (evaluations excluded), the run's progress and when to evaluate: every
    ``eval_every`` steps, or every tenth of ``time_limit`` when the clock is what ends the run."""

    def __init__(self, steps, time_limit, eval_every, device, setup: float = 0.0) -> None:
        self.steps, self.time_limit, self.device = steps, time_limit, device
        self.by_time = eval_every is None and time_limit is not None
        self.eval_every = eval_every or max(1, steps // 10)
        self.step, self.seconds = 0, setup  # the setup's seconds count against the budget
        self.next_eval = 0.1 * time_limit if self.by_time else math.inf
        self.start = time.perf_counter()

    def elapsed(self) -> float:
        return self.seconds + time.perf_counter() - self.start

    def progress(self) -> float:
        """``max(step / steps, elapsed / time_limit)``: whichever budget ends first."""
        done = self.step / self.steps
        return done if self.time_limit is None else max(done, self.elapsed() / self.time_limit)

    def eval_due(self) -> bool:
        if self.step == self.steps:
            return True
        if self.by_time:
            return self.elapsed() >= self.next_eval
        return self.step % self.eval_every == 0

    def pause(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self.start
        if self.by_time:
            self.next_eval = self.seconds + 0.1 * self.time_limit

    def resume(self) -> None:
        self.start = time.perf_counter()


def _progress_bar(progress: bool, clock: _Clock):
    """Steps done out of ``steps``; or, when there is a ``time_limit``, the run's progress in
    seconds of it (the step budget may end it first, which fills the bar too)."""
    if not progress:
        return None
    from tqdm.auto import tqdm

    desc = f"fit on {clock.device}"
    if clock.time_limit is None:
        return tqdm(total=clock.steps, desc=desc, unit="step", dynamic_ncols=True, mininterval=1)
    form = "{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]"
    return tqdm(total=clock.time_limit, desc=desc, bar_format=form, dynamic_ncols=True)


def _advance(bar, clock: _Clock) -> None:
    if bar is not None:
        if clock.time_limit is None:
            bar.update(clock.step - bar.n)
        else:
            bar.update(min(clock.progress(), 1.0) * clock.time_limit - bar.n)


def _show(bar, loss: Tensor, history: History) -> None:
    if bar is not None:
        info = {"loss": f"{loss.item():.3f}", "nll": f"{history.nll[-1]:.3f}"}
        if history.kl:
            info["kl"] = f"{history.kl[-1]:.4f}"
        bar.set_postfix(info)


# --------------------------------------------------------------------------------------------
# fit
# --------------------------------------------------------------------------------------------


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
    kink_bandwidth: float = 0.2,
) -> History:
    r"""Fit ``flow`` by maximum likelihood: Adam on :math:`-\frac1B\sum_b \log q_\theta(x_b)`.

    Each step draws a fresh batch from the target on the device (or a random batch of the
    training rows of a data tensor). The learning rate follows a cosine from ``lr`` to
    ``final_lr * lr`` over the run's progress, :math:`\max(\text{step}/\text{steps},
    \text{elapsed}/\text{time\_limit})`, so a wall-clock budget anneals too. Held-out scores
    and the final weights use an exponential moving average of the parameters,
    :math:`\bar\theta \leftarrow \beta\bar\theta + (1-\beta)\theta` (Polyak averaging, with
    ``torch.optim.swa_utils.AveragedModel``: it removes most of the SGD noise that would
    otherwise sit in the KL); the flow ends with :math:`\bar\theta`.

    :param flow: the flow to train (moved to ``device``, trained in place).
    :param target_or_data: a :class:`~flowpolicy.targets.Target`, a target's name, or a tensor
        of data of shape ``(n, d)`` (a fraction ``holdout`` of the rows is kept for scoring).
    :param steps: maximum number of Adam steps (positive).
    :param batch_size: samples per step.
    :param lr: peak learning rate.
    :param device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"``...
    :param seed: seed of the batches and of the held-out set.
    :param progress: show a tqdm progress bar.
    :param time_limit: stop after this many seconds (the schedule follows it): training, and
        the setup before it (the copy, the split of the data, the standardization), so that a
        budget is the wall-clock time of the call; evaluations are excluded.
    :param ema: decay :math:`\beta` of the weight average (``None`` or 0: no averaging).
    :param final_lr: learning rate at the end, as a fraction of ``lr``.
    :param warmup: fraction of the run over which the learning rate ramps up linearly.
    :param standardize: train in standardized units, :math:`u = (x - \mu)/\sigma` per column
        (the training rows' moments, in float64): the flow's output moments are first matched
        to them (:func:`~flowpolicy.density.standardize_`), and at the end the data's scale is
        folded back into the flow exactly, spread over the affine layers of a PReLU chain where
        the last one alone would meet the floor of its diagonal (1e-4), so any units fit alike.
        A scale the flow cannot represent (a spline chain on data of std below ~1e-3) raises
        before training. ``False`` (and squashed flows): train in the data's own units.
    :param eval_every: score the held-out set every this many steps (default: 10 times a run,
        spaced by the clock when ``time_limit`` is given).
    :param eval_samples: size of the held-out set of an analytic target.
    :param holdout: fraction of a data tensor's rows held out.
    :param kink_bandwidth: affine + PReLU flows only: a sample whose PReLU input crosses 0 changes
        its log-det by :math:`\log\alpha`, a term of the gradient of the expected NLL with
        respect to the kinks' positions that backpropagation misses (the per-sample log-det is
        piecewise constant); it is estimated with a Gaussian kernel of this width, in units of
        the inputs' std (``flow(kink_bandwidth=...)``; 0: plain backpropagation). Without it
        the kinks drift out of the data.
    :returns: a :class:`History` (NLLs in the data's units).
    :raises ValueError: before anything is changed, for any option out of its range (naming
        it), an unknown target, an unusable device, or data that cannot be fitted: the wrong
        shape, NaN or inf, a constant column, or fewer rows than ``holdout`` needs (2 held out
        and 2 to train on: 20 rows at ``holdout=0.1``).
    :raises TypeError: for a flow in half precision (call ``flow.float()``) or complex data.
    :raises FloatingPointError: if training diverges (NaN or singular layers: lower ``lr``).

    ``flow`` is trained on a copy and changes only when the fit succeeds: an error, a
    divergence or a ``KeyboardInterrupt`` leaves it as it was (moved to ``device``).
    """
    called = time.perf_counter()
    check_fit_args(
        flow,
        steps,
        batch_size,
        lr,
        time_limit,
        ema,
        final_lr=final_lr,
        warmup=warmup,
        holdout=holdout,
        kink_bandwidth=kink_bandwidth,
        eval_every=eval_every,
        eval_samples=eval_samples,
        seed=seed,
    )
    device = resolve_device(device)
    flow = flow.to(device)
    seed = 0 if seed is None else seed
    scaled = bool(standardize) and not flow.config["squash"]
    work = copy.deepcopy(flow)  # trained; the user's flow changes only when fit succeeds
    source = make_source(target_or_data, work, seed, eval_samples, holdout, scaled)
    if scaled:
        _to_working_units_(work, source, seed)
    optimizer = torch.optim.Adam(work.parameters(), lr=lr, foreach=True)
    average = _polyak_average(work, ema)
    averaged = work if average is None else average.module
    history = History(entropy=source.entropy, device=str(device))
    setup = time.perf_counter() - called
    clock, losses = _Clock(steps, time_limit, eval_every, device, setup), []
    bar = _progress_bar(progress, clock)

    def checkpoint() -> None:  # the losses so far, and the held-out scores
        clock.pause()
        _check_finite(work, averaged, clock.step, lr)
        history.loss.extend((torch.stack(losses) + source.log_scale).tolist() if losses else [])
        losses.clear()
        scores = _score(averaged, source.held, source.held_log_p, source.log_scale)
        history.record(clock.step, scores)
        clock.resume()

    try:
        while (done := clock.progress()) < 1:
            history.lr.append(_learning_rate(done, lr, final_lr, warmup))
            batch = source.draw(batch_size)
            loss = _train_step(work, optimizer, batch, history.lr[-1], kink_bandwidth)
            if average is not None:
                average.update_parameters(work)
            losses.append(loss)  # no .item() per step: it would sync a GPU every step
            clock.step += 1
            _advance(bar, clock)
            if clock.eval_due():
                checkpoint()
                _show(bar, loss + source.log_scale, history)
        if not history.eval_step or history.eval_step[-1] != clock.step:  # the clock ended it
            checkpoint()
        _advance(bar, clock)  # the setup alone may have spent a time limit
    except (RuntimeError, ValueError) as error:  # a diverged chain fails to build or invert
        if _finite(work) and not isinstance(error, torch.linalg.LinAlgError):
            raise
        raise FloatingPointError(
            f"fit diverged at step {clock.step} (lr={lr:g}): the flow's layers became singular or "
            "non-finite; the flow was left unchanged. Lower lr"
        ) from error
    finally:
        if bar is not None:
            bar.close()
    _finish_(flow, work, averaged, source)
    history.train_seconds = clock.seconds
    history.steps_per_second = clock.step / max(clock.seconds, 1e-9)
    return history


def _to_working_units_(work: Flow, source: Source, seed: int) -> None:
    """Match the flow's output moments to the standardized data, and check before any training
    that the data's scale can be folded back into it (:func:`scale_output_`)."""
    standardize_(work, source.moments, seed=seed)
    try:
        scale_output_(copy.deepcopy(work), source.std, source.mean)
    except ValueError as error:
        raise ValueError(f"fit: {error}") from None


def _finite(flow: Flow) -> bool:
    """Whether every parameter of ``flow`` is finite (one sync)."""
    return bool(torch.stack([torch.isfinite(p).all() for p in flow.parameters()]).all())


def _check_finite(work: Flow, averaged: Flow, step: int, lr: float) -> None:
    """Raise if training diverged (the user's flow is still untouched then)."""
    if not (_finite(work) and (averaged is work or _finite(averaged))):
        raise FloatingPointError(
            f"fit diverged: the parameters became NaN or inf by step {step} (lr={lr:g}); the "
            "flow was left unchanged. Lower lr, or check the data's scale"
        )


@torch.no_grad()
def _finish_(flow: Flow, work: Flow, averaged: Flow, source: Source) -> None:
    """Write the trained (averaged) parameters, back in the data's units, into ``flow``."""
    for mine, mean in zip(work.parameters(), averaged.parameters()):
        mine.copy_(mean)
    if source.std is not None:
        try:
            scale_output_(work, source.std, source.mean)
        except ValueError as error:
            raise ValueError(f"fit: the flow was left unchanged: {error}") from None
    if not _finite(work):
        raise FloatingPointError("fit diverged: the flow was left unchanged; lower lr")
    for theirs, mine in zip(flow.parameters(), work.parameters()):
        theirs.copy_(mine)
