"""Fitting ODE models to observed trajectories: the loop that the scientific-ML examples share.

``examples/fit_parameters.py`` (known model, unknown parameters) and ``examples/ude.py`` (known
physics plus a neural network term) both

* observe a batch of trajectories at irregular times, each series at its own subset of the
  times (:class:`Observations`, :func:`make_observations`),
* compare a solve at the union of those times with the observations where they exist
  (:meth:`Observations.sse`),
* and minimise that loss with Adam, then optionally LBFGS, with early stopping, a progress bar,
  periodic checkpoints and resumption (:func:`fit`), also under DistributedDataParallel.

Nothing here knows about a particular model: ``fit`` takes a closure that returns the loss.
Under DDP each rank's closure evaluates its shard of the series with the loss scaled by
:func:`pydiffbridge.distributed.global_count` so that DDP's gradient average is the exact
gradient of the global loss, and ``fit`` logs the mean of the ranks' losses (the global loss),
which is also what LBFGS's line search and early stopping see, so every rank takes the same
steps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from . import distributed as D
from .nn.odeblock import ODEBlock

__all__ = ["Observations", "make_observations", "Trajectories", "FitConfig", "FitState", "fit"]


class Trajectories(nn.Module):
    """``forward(y0, t)``: the states at the times ``t`` of ``dz/dt = func(t, z)``,
    ``z(t[0]) = y0``, solved by an :class:`~pydiffbridge.nn.ODEBlock` with its settings
    (``gradient="adjoint"`` uses :func:`pydiffbridge.odeint_adjoint`).

    This is the module to wrap in DDP (:func:`pydiffbridge.distributed.wrap_ddp`): one DDP
    forward per loss evaluation, while the solver calls ``func`` itself.  Function evaluations
    are summed over all solves (:meth:`nfe`), also over the several evaluations of an LBFGS
    step.
    """

    def __init__(self, func: nn.Module, *, method: str = "dopri5", rtol: float = 1e-6,
                 atol: float = 1e-8, gradient: str = "adjoint", backend: str = "torch",
                 options: dict | None = None) -> None:
        super().__init__()
        self.block = ODEBlock(func, (0.0, 1.0), method=method, rtol=rtol, atol=atol,
                              gradient=gradient, backend=backend, options=options)
        self.nfe_forward_total = 0
        self.nfe_backward_total = 0

    @property
    def func(self) -> nn.Module:
        return self.block.func

    def _flush(self) -> None:
        c = self.block.counter
        self.nfe_forward_total += c.nfe_forward
        self.nfe_backward_total += c.nfe_backward
        c.reset()

    def nfe(self) -> tuple[int, int]:
        """``(forward, backward)`` evaluations of ``func`` over all solves so far."""
        self._flush()
        return self.nfe_forward_total, self.nfe_backward_total

    def forward(self, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self._flush()
        return self.block.trajectory(y0, t)


@dataclass
class Observations:
    """Series observed at their own irregular times, stored on the union of the times.

    Attributes:
        t: ``(m,)`` increasing times; ``t[0]`` is the initial time of every series.
        y: ``(m, B, d)`` observed values (0 where not observed).
        mask: ``(m, B)`` bool, True where series ``b`` was observed at ``t[i]``.
        y0: ``(B, d)`` initial states at ``t[0]`` (treated as known).
        clean: ``(m, B, d)`` noiseless values, for plots and errors (not used by the fit).
    """

    t: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    y0: torch.Tensor
    clean: torch.Tensor | None = None

    @property
    def n_series(self) -> int:
        return int(self.y0.shape[0])

    @property
    def n_obs(self) -> int:
        """Observed scalar values (points times state dimension)."""
        return int(self.mask.sum()) * int(self.y.shape[-1])

    def select(self, idx: Iterable[int]) -> Observations:
        """The series ``idx``, e.g. a rank's shard
        (:func:`pydiffbridge.distributed.shard_indices`)."""
        i = torch.as_tensor(list(idx), dtype=torch.long)
        return Observations(self.t, self.y[:, i], self.mask[:, i], self.y0[i],
                            None if self.clean is None else self.clean[:, i])

    def sse(self, pred: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        """Sum of squared errors of ``pred`` (``(m, B, d)``, a solve at :attr:`t`) over the
        observed points, each component's residual divided by ``scale`` (``(d,)``) if given."""
        w = self.mask.to(pred.dtype).unsqueeze(-1)
        r = pred - self.y
        if scale is not None:
            r = r / scale
        return (r ** 2 * w).sum()

    def until(self, t_max: float) -> Observations:
        """The observations at times ``<= t_max`` (the initial time always kept)."""
        k = max(2, int((self.t <= t_max).sum()))
        return Observations(self.t[:k], self.y[:k], self.mask[:k], self.y0,
                            None if self.clean is None else self.clean[:k])

    def with_noise(self, noise: float, generator: torch.Generator) -> Observations:
        """The same series, times and mask with a fresh noise draw on :attr:`clean`: Gaussian,
        standard deviation ``noise`` times each component's spread over the clean data."""
        if self.clean is None:
            raise ValueError("with_noise needs the noiseless values (clean)")
        d = self.clean.shape[-1]
        spread = self.clean.reshape(-1, d).std(0)
        y = self.clean + noise * spread * torch.randn(self.clean.shape, generator=generator,
                                                      dtype=self.clean.dtype)
        y = torch.where(self.mask.unsqueeze(-1), y, torch.zeros_like(y))
        return Observations(self.t, y, self.mask, self.y0, self.clean)

    def scale(self) -> torch.Tensor:
        """Per-component standard deviation of the observed values (``(d,)``): a natural
        ``scale`` for :meth:`sse` when the components have different magnitudes."""
        d = self.y.shape[-1]
        return self.y[self.mask].reshape(-1, d).std(0).clamp_min(1e-12)


def make_observations(simulate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                      y0: torch.Tensor, t_end: float, n_times: int, keep: float, noise: float,
                      generator: torch.Generator, t0: float = 0.0,
                      min_per_series: int = 3) -> Observations:
    """Noisy observations of ``simulate(y0, t) -> (m, B, d)`` at irregular times.

    ``n_times`` times are drawn uniformly in ``(t0, t_end]`` and sorted; series ``b`` is
    observed at each of them with probability ``keep`` (at least ``min_per_series`` times).
    Noise is Gaussian with standard deviation ``noise`` times each state component's standard
    deviation over the clean data (so ``noise=0.05`` is 5 % of the signal's spread).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep={keep} must be in (0, 1]")
    dtype = y0.dtype
    ts = torch.sort(torch.rand(n_times, generator=generator, dtype=torch.float64))[0]
    ts = t0 + (t_end - t0) * (1.0 - ts.flip(0)).flip(0)  # in (t0, t_end]
    ts = torch.unique(ts)  # strictly increasing
    t = torch.cat([torch.tensor([t0], dtype=torch.float64), ts]).to(dtype)
    with torch.no_grad():
        clean = simulate(y0, t)
    B = y0.shape[0]
    mask = torch.rand(len(t), B, generator=generator) < keep
    mask[0] = False  # the initial state is given, not observed
    for b in range(B):  # every series gets at least min_per_series observations
        have = int(mask[1:, b].sum())
        if have < min_per_series:
            free = torch.nonzero(~mask[1:, b]).flatten() + 1
            pick = free[torch.randperm(len(free), generator=generator)[: min_per_series - have]]
            mask[pick, b] = True
    return Observations(t, torch.zeros_like(clean), mask, y0, clean).with_noise(noise, generator)


@dataclass
class FitConfig:
    """Settings of :func:`fit`.

    Attributes:
        adam_iters: Adam iterations (at most; early stopping may end the phase sooner).
        lr: Adam learning rate.
        lbfgs_iters: LBFGS steps after Adam (0: none); each step evaluates the loss up to
            ``lbfgs_max_iter * 1.25`` times (strong-Wolfe line search).
        lbfgs_max_iter: inner iterations per LBFGS step.
        patience: stop Adam after this many iterations without a relative improvement of the
            best loss by ``min_rel_improvement`` (0: never stop early).
        min_rel_improvement: see ``patience``.
        lbfgs_tol: stop LBFGS when a step changes the loss by less than this, relatively.
        grad_clip: clip the gradient norm (Adam phase) to this value (None: no clipping).
        ckpt_every: call ``save`` every this many iterations (both phases counted).
    """

    adam_iters: int = 300
    lr: float = 0.05
    lbfgs_iters: int = 0
    lbfgs_max_iter: int = 20
    patience: int = 50
    min_rel_improvement: float = 1e-4
    lbfgs_tol: float = 1e-10
    grad_clip: float | None = None
    ckpt_every: int = 50


@dataclass
class FitState:
    """Progress of :func:`fit`, resumable (see :meth:`to_dict`)."""

    phase: str = "adam"  # "adam", "lbfgs" or "done"
    iter: int = 0  # iterations done in the current phase
    losses: list[float] = field(default_factory=list)  # global loss after every iteration
    lbfgs_start: int | None = None  # index in losses where LBFGS began
    evals: int = 0  # loss evaluations (forward + backward passes)
    train_time: float = 0.0
    best: float = float("inf")
    since_best: int = 0
    stop_reason: str = ""
    opt: dict | None = None  # the current optimizer's state_dict

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> FitState:
        return cls(**d) if d else cls()


def _bar(total: int, desc: str, show: bool, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, initial=initial, leave=False,
                disable=not (show and D.is_main_process()))


def fit(loss_fn: Callable[[], torch.Tensor], params: Iterable[torch.Tensor], cfg: FitConfig,
        *, state: dict | FitState | None = None, save: Callable[[FitState], None] | None = None,
        on_iter: Callable[[FitState], None] | None = None, desc: str = "fit",
        progress: bool = True) -> FitState:
    """Minimise ``loss_fn()`` over ``params``: Adam, then optionally LBFGS.

    Args:
        loss_fn: evaluates the loss (a scalar tensor with a graph to ``params``).  It is called
            once per Adam iteration and several times per LBFGS step; ``fit`` calls
            ``backward`` on it.  Under DDP it should return this rank's share of the global
            loss scaled as described in the module docstring.
        params: the tensors to optimise (for DDP, the wrapped model's parameters).
        cfg: the settings.
        state: a :class:`FitState` (or its ``to_dict()``) to resume from; its optimizer state is
            loaded, so ``params`` must already hold the values saved with it.
        save: called with the state every ``cfg.ckpt_every`` iterations and at the end (on
            every rank: write files on rank 0 only).
        on_iter: called after every iteration (e.g. to collect NFE counts).
        desc: progress-bar label; ``progress=False`` hides the bar.

    Returns:
        The final :class:`FitState` (``losses``: the global loss after each iteration).
    """
    params = list(params)
    st = state if isinstance(state, FitState) else FitState.from_dict(state)
    total = cfg.adam_iters + cfg.lbfgs_iters
    done_before = {"adam": st.iter, "lbfgs": cfg.adam_iters + st.iter}.get(st.phase, total)
    bar = _bar(total, desc, progress, min(done_before, total))

    def checkpoint(opt: torch.optim.Optimizer | None, force: bool = False) -> None:
        st.opt = opt.state_dict() if opt is not None else None
        n = len(st.losses)
        if save is not None and (force or (cfg.ckpt_every > 0 and n % cfg.ckpt_every == 0)):
            save(st)

    try:
        if st.phase == "adam":
            opt = torch.optim.Adam(params, lr=cfg.lr)
            if st.opt:
                opt.load_state_dict(st.opt)
            while st.iter < cfg.adam_iters:
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                if cfg.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                opt.step()
                st.train_time += time.perf_counter() - t0
                st.evals += 1
                st.iter += 1
                value = D.mean_across_ranks(loss)
                st.losses.append(value)
                if value < st.best * (1.0 - cfg.min_rel_improvement):
                    st.best, st.since_best = value, 0
                else:
                    st.best = min(st.best, value)
                    st.since_best += 1
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3e}")
                if on_iter is not None:
                    on_iter(st)
                if cfg.patience and st.since_best >= cfg.patience:
                    st.stop_reason = f"adam: no improvement for {cfg.patience} iterations"
                    bar.update(max(0, cfg.adam_iters - st.iter))
                    break
                if not math.isfinite(value):
                    st.stop_reason = "adam: non-finite loss"
                    break
                checkpoint(opt)
            st.phase, st.iter, st.opt = "lbfgs", 0, None
            st.lbfgs_start = len(st.losses)
            if not st.stop_reason:
                st.stop_reason = f"adam: {cfg.adam_iters} iterations"
        if st.phase == "lbfgs" and st.iter < cfg.lbfgs_iters and st.losses and \
                math.isfinite(st.losses[-1]):
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=cfg.lbfgs_max_iter,
                                    history_size=20, line_search_fn="strong_wolfe",
                                    tolerance_grad=1e-12, tolerance_change=1e-14)
            if st.opt:
                opt.load_state_dict(st.opt)

            def closure() -> torch.Tensor:
                opt.zero_grad(set_to_none=True)
                loss = loss_fn()
                loss.backward()
                st.evals += 1
                # the line search compares loss values: give every rank the global one
                return torch.tensor(D.mean_across_ranks(loss), dtype=loss.dtype)

            while st.iter < cfg.lbfgs_iters:
                t0 = time.perf_counter()
                prev = st.losses[-1]
                opt.step(closure)
                with torch.no_grad():
                    value = D.mean_across_ranks(loss_fn())
                st.evals += 1
                st.train_time += time.perf_counter() - t0
                st.iter += 1
                st.losses.append(value)
                st.best = min(st.best, value)
                bar.update(1)
                bar.set_postfix(loss=f"{value:.3e}")
                if on_iter is not None:
                    on_iter(st)
                checkpoint(opt)
                if not math.isfinite(value):
                    st.stop_reason += "; lbfgs: non-finite loss"
                    break
                if abs(prev - value) <= cfg.lbfgs_tol * max(abs(value), 1e-300):
                    st.stop_reason += f"; lbfgs: converged after {st.iter} steps"
                    break
            else:
                st.stop_reason += f"; lbfgs: {cfg.lbfgs_iters} steps"
        st.phase = "done"
        checkpoint(None, force=True)
    finally:
        bar.close()
    return st
