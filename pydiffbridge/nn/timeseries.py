"""Irregularly sampled time series: data generation, a real data set, and batching.

Representation
--------------
A single series is a :class:`TimeSeries`: its own observation times ``t`` (1-D, strictly
increasing), values ``x`` ``[n, D]`` and an optional per-entry mask ``[n, D]`` (for series
where only some channels are seen at a time).

A batch of series with *different* observation times is an :class:`IrregularBatch` built by
:func:`collate`: the union of all times, sorted, ``times [N]``; values ``[B, N, D]``; and a mask
``[B, N, D]`` that is 1 exactly where sample ``b`` was observed at ``times[k]``.  Values at
masked-out entries are zero and must never influence a model (the models in
:mod:`pydiffbridge.nn.latent` only read them multiplied by the mask, and the likelihood sums
over masked-in entries only).  Nothing is padded along time, so no sample sees another's grid.

:func:`pack` turns the union grid back into per-sample index lists (``[B, L]`` with ``L`` the
largest number of points of one sample), which recurrent models iterate over.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pydiffbridge.errors import BackendUnavailableError, InputError

__all__ = [
    "TimeSeries",
    "IrregularBatch",
    "check_batch_shapes",
    "masked_values",
    "collate",
    "pack",
    "split_at",
    "random_split",
    "SpiralConfig",
    "spiral_points",
    "make_spirals",
    "load_real_series",
    "make_windows",
]


@dataclass
class TimeSeries:
    """One irregularly sampled series: times ``t [n]``, values ``x [n, D]``, optional mask."""

    t: Tensor
    x: Tensor
    mask: Tensor | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class IrregularBatch:
    """Union-of-times batch: ``times [N]`` increasing, ``values``/``mask`` ``[B, N, D]``."""

    times: Tensor
    values: Tensor
    mask: Tensor

    def __post_init__(self) -> None:
        check_batch_shapes(self, "IrregularBatch")

    @property
    def point_mask(self) -> Tensor:
        """``[B, N]`` bool: sample ``b`` has at least one observed channel at ``times[k]``."""
        return self.mask.sum(-1) > 0

    def with_mask(self, mask: Tensor) -> IrregularBatch:
        """Same grid, a new mask (``[B, N]`` or ``[B, N, D]``, combined with the old one);
        values outside it are zeroed."""
        B, N, D = self.values.shape
        if tuple(mask.shape) not in ((B, N), (B, N, D)):
            raise InputError(f"IrregularBatch.with_mask: mask must be [B, N] = {(B, N)} or "
                             f"[B, N, D] = {(B, N, D)}, got {tuple(mask.shape)}.")
        mask = mask.to(self.values.dtype)
        if mask.dim() == 2:
            mask = mask.unsqueeze(-1)
        mask = (mask * self.mask).expand_as(self.values)
        return IrregularBatch(self.times, masked_values(self.values, mask), mask)

    def select(self, index: int | slice | Tensor) -> IrregularBatch:
        """Sub-batch of samples, trimmed to the times that are still observed."""
        if isinstance(index, int):
            index = slice(index, index + 1)
        values, mask = self.values[index], self.mask[index]
        keep = mask.sum(dim=(0, 2)) > 0
        return IrregularBatch(self.times[keep], values[:, keep], mask[:, keep])

    def to(self, *args: Any, **kwargs: Any) -> IrregularBatch:
        """Move/cast all tensors (``torch.Tensor.to`` arguments)."""
        tensors = (self.times, self.values, self.mask)
        return IrregularBatch(*(v.to(*args, **kwargs) for v in tensors))


def masked_values(x: Tensor, mask: Tensor) -> Tensor:
    """``x * mask`` with exact zeros where ``mask == 0``, even where ``x`` is NaN or Inf (a
    plain product would give NaN there): masked-out values can never leak into a result."""
    return torch.where(mask != 0, x * mask, torch.zeros((), dtype=x.dtype, device=x.device))


def check_batch_shapes(batch: IrregularBatch, where: str) -> None:
    """Raise :class:`InputError` unless ``times [N]``, ``values [B, N, D]`` and ``mask`` of
    the same shape as ``values`` fit together (shapes only: no values are read)."""
    parts = (("times", batch.times), ("values", batch.values), ("mask", batch.mask))
    for name, v in parts:
        if not isinstance(v, Tensor):
            raise InputError(f"{where}: {name} must be a tensor, got {type(v).__name__}.")
    t, x, m = batch.times, batch.values, batch.mask
    if t.dim() != 1:
        raise InputError(f"{where}: times must be 1-D [N] (the union of observation times), "
                         f"got shape {tuple(t.shape)}.")
    if x.dim() != 3:
        raise InputError(f"{where}: values must be [B, N, D] (batch, times, channels), got "
                         f"shape {tuple(x.shape)}; build batches with collate(...).")
    if x.shape[1] != t.shape[0]:
        raise InputError(f"{where}: values have {x.shape[1]} time points (shape "
                         f"{tuple(x.shape)}) but times has length {t.shape[0]}; expected "
                         f"values [B, {t.shape[0]}, D].")
    if tuple(m.shape) != tuple(x.shape):
        raise InputError(f"{where}: mask must have the shape of values, expected "
                         f"{tuple(x.shape)}, got {tuple(m.shape)}.")


def _check_series(s: TimeSeries, i: int) -> None:
    if s.t.dim() != 1 or s.x.dim() != 2 or s.x.shape[0] != s.t.shape[0]:
        raise InputError(
            f"series {i}: expected t of shape [n] and x of shape [n, D], got t {tuple(s.t.shape)} "
            f"and x {tuple(s.x.shape)}; reshape a 1-channel series with x.unsqueeze(-1)."
        )
    if s.t.numel() > 1 and not bool((s.t[1:] > s.t[:-1]).all()):
        raise InputError(f"series {i}: observation times must be strictly increasing; sort them "
                         "and merge duplicates (average the values or use the mask).")


def collate(series: list[TimeSeries], dtype: torch.dtype | None = None) -> IrregularBatch:
    """Build the union-of-times batch of several series (see the module docstring)."""
    if len(series) == 0:
        raise InputError("collate: got an empty list of series; pass at least one TimeSeries.")
    dims = {s.x.shape[-1] for s in series}
    if len(dims) != 1:
        raise InputError(f"collate: all series need the same number of channels, got {dims}.")
    for i, s in enumerate(series):
        _check_series(s, i)
    dtype = dtype or series[0].x.dtype
    times = torch.unique(torch.cat([s.t.to(dtype) for s in series]))  # sorted
    B, N, D = len(series), times.numel(), dims.pop()
    values = torch.zeros(B, N, D, dtype=dtype)
    mask = torch.zeros(B, N, D, dtype=dtype)
    for b, s in enumerate(series):
        idx = torch.searchsorted(times, s.t.to(dtype))
        m = torch.ones_like(s.x, dtype=dtype) if s.mask is None else s.mask.to(dtype)
        values[b, idx] = masked_values(s.x.to(dtype), m)
        mask[b, idx] = m
    return IrregularBatch(times, values, mask)


def pack(point_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-sample lists of present points of a ``[B, N]`` mask.

    Returns ``idx [B, L]`` (indices into the union grid, increasing in time; padding entries
    are distinct indices of points the sample does not have) and ``valid [B, L]`` (False on
    padding), ``L = max_b count_b``.
    """
    B, N = point_mask.shape
    present = point_mask.bool()
    ar = torch.arange(N, device=point_mask.device).expand(B, N)
    order = torch.argsort(torch.where(present, ar, ar + N), dim=1)
    counts = present.sum(1)
    L = int(counts.max()) if B > 0 else 0
    idx = order[:, :L]
    valid = torch.arange(L, device=point_mask.device).expand(B, L) < counts[:, None]
    return idx, valid


def split_at(batch: IrregularBatch, t_split: float) -> tuple[IrregularBatch, IrregularBatch]:
    """``(points with t <= t_split, points with t > t_split)``, e.g. conditioning/extrapolation."""
    before = (batch.times <= t_split).to(batch.values.dtype)[None, :].expand(batch.mask.shape[:2])
    return batch.with_mask(before), batch.with_mask(1.0 - before)


def random_split(batch: IrregularBatch, keep: float,
                 generator: torch.Generator | None = None) -> tuple[IrregularBatch, IrregularBatch]:
    """Split each sample's points at random: ``(kept, held out)``; every sample keeps >= 1 point."""
    if not 0.0 < keep <= 1.0:
        raise InputError(f"random_split: keep={keep} must lie in (0, 1].")
    pm = batch.point_mask
    u = torch.rand(pm.shape, generator=generator, dtype=torch.float64)
    u = torch.where(pm, u, torch.full_like(u, 2.0))
    first = torch.argmin(u, dim=1)  # the sample's point with the smallest draw is always kept
    kept = (u < keep) & pm
    kept[torch.arange(pm.shape[0]), first] = True
    kept = kept.to(batch.values.dtype)
    return batch.with_mask(kept), batch.with_mask(pm.to(batch.values.dtype) - kept)


@dataclass
class SpiralConfig:
    """Archimedean spirals ``r = a + b*theta`` traversed at angular speed ``omega``.

    Each series starts at a random angle in ``[theta_min, theta_max]`` and turns clockwise or
    counter-clockwise (mirror image); coordinates are divided by the largest radius reached, so
    values lie in [-1, 1].  Observations are at ``n_obs`` random times in ``[0, t_obs]`` (the
    conditioning window); ``n_extrap`` further random times in ``(t_obs, t_total]`` are the
    extrapolation targets.
    """

    a: float = 0.5
    b: float = 0.3
    omega: float = math.pi
    theta_min: float = math.pi
    theta_max: float = 3.0 * math.pi
    t_obs: float = 1.0
    t_total: float = 2.0
    n_obs: tuple[int, int] = (15, 30)
    n_extrap: tuple[int, int] = (15, 30)
    noise_std: float = 0.0

    @property
    def scale(self) -> float:
        return self.a + self.b * (self.theta_max + self.omega * self.t_total)


def spiral_points(theta0: float, direction: int, t: Tensor, cfg: SpiralConfig) -> Tensor:
    """Noise-free spiral coordinates ``[len(t), 2]`` (used for data and for plotting truth)."""
    theta = theta0 + cfg.omega * t
    r = (cfg.a + cfg.b * theta) / cfg.scale
    return torch.stack([r * torch.cos(theta), direction * r * torch.sin(theta)], dim=-1)


def make_spirals(n: int, cfg: SpiralConfig | None = None, seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> list[TimeSeries]:
    """``n`` spirals, half clockwise, with per-series random observation times.

    ``info`` of each series holds ``theta0``, ``direction`` (+1 counter-clockwise, -1 clockwise)
    and ``t_obs`` (the end of the conditioning window).
    """
    cfg = cfg or SpiralConfig()
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        u = float(torch.rand((), generator=g))
        theta0 = cfg.theta_min + (cfg.theta_max - cfg.theta_min) * u
        direction = 1 if i % 2 == 0 else -1
        n1 = int(torch.randint(cfg.n_obs[0], cfg.n_obs[1] + 1, (), generator=g))
        n2 = int(torch.randint(cfg.n_extrap[0], cfg.n_extrap[1] + 1, (), generator=g))
        t1 = torch.rand(n1, generator=g, dtype=torch.float64) * cfg.t_obs
        t2 = torch.rand(n2, generator=g, dtype=torch.float64) * (cfg.t_total - cfg.t_obs)
        t2 = t2 + cfg.t_obs
        t = torch.unique(torch.cat([t1, t2]))
        x = spiral_points(theta0, direction, t, cfg)
        x = x + cfg.noise_std * torch.randn(x.shape, generator=g, dtype=x.dtype)
        out.append(TimeSeries(t.to(dtype), x.to(dtype),
                              info={"theta0": theta0, "direction": direction, "t_obs": cfg.t_obs}))
    return out


_REAL = {"sunspots": "yearly sunspot numbers 1700-2008 (sqrt-transformed), time unit 10 years",
         "elnino": "monthly Pacific sea surface temperature 1950-2010, time unit 1 year",
         "co2": "weekly Mauna Loa CO2 1958-2001 (linear trend removed, NaNs = missing), "
                "time unit 1 year"}


def load_real_series(name: str = "sunspots") -> tuple[np.ndarray, np.ndarray]:
    """A real univariate series shipped with ``statsmodels``: ``(t, y)`` numpy arrays.

    ``name``: ``"sunspots"``, ``"elnino"`` or ``"co2"`` (see ``_REAL`` for units).  NaNs in
    ``y`` are genuinely missing observations.  Needs ``pip install statsmodels``; the data
    files are inside the package, no network access is needed.
    """
    if name not in _REAL:
        raise InputError(f"load_real_series: unknown name {name!r}; choose one of {list(_REAL)}.")
    try:
        from statsmodels import datasets
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise BackendUnavailableError(
            "load_real_series needs statsmodels (it ships the data); install it with "
            "`pip install statsmodels` or `pip install pydiffbridge[examples]`."
        ) from exc
    if name == "sunspots":
        df = datasets.sunspots.load_pandas().data
        t = (df["YEAR"].to_numpy(float) - 1700.0) / 10.0
        y = np.sqrt(df["SUNACTIVITY"].to_numpy(float))
    elif name == "elnino":
        df = datasets.elnino.load_pandas().data
        y = df.drop(columns="YEAR").to_numpy(float).reshape(-1)
        t = np.arange(y.size) / 12.0
    else:
        df = datasets.co2.load_pandas().data
        y = df["co2"].to_numpy(float)
        t = np.arange(y.size) * 7.0 / 365.25
        ok = np.isfinite(y)
        coef = np.polyfit(t[ok], y[ok], 1)
        y = y - np.polyval(coef, t)
    return t, y


def make_windows(t: np.ndarray, y: np.ndarray, window: float, stride: float, keep: float,
                 t_start: float, t_stop: float, seed: int = 0, mean: float | None = None,
                 std: float | None = None,
                 dtype: torch.dtype = torch.float32) -> tuple[list[TimeSeries], float, float]:
    """Cut ``[t_start, t_stop]`` into windows of length ``window`` every ``stride``, keep a random
    fraction ``keep`` of each window's (finite) points, shift each window to start at 0 and
    standardise with ``mean``/``std`` (computed on this span if not given; pass the training
    values for test windows).  Returns ``(series, mean, std)``.
    """
    if not 0.0 < keep <= 1.0 or window <= 0 or stride <= 0:
        raise InputError(f"make_windows: need 0 < keep <= 1, window > 0, stride > 0; got "
                         f"keep={keep}, window={window}, stride={stride}.")
    span = (t >= t_start) & (t <= t_stop) & np.isfinite(y)
    mean = float(np.mean(y[span])) if mean is None else mean
    std = float(np.std(y[span])) if std is None else std
    rng = np.random.default_rng(seed)
    out = []
    s = t_start
    while s + window <= t_stop + 1e-9:
        sel = np.flatnonzero((t >= s) & (t <= s + window) & np.isfinite(y))
        sel = sel[rng.random(sel.size) < keep]
        if sel.size >= 2:
            tt = torch.as_tensor(t[sel] - s, dtype=dtype)
            yy = torch.as_tensor((y[sel] - mean) / std, dtype=dtype).unsqueeze(-1)
            out.append(TimeSeries(tt, yy, info={"start": s}))
        s += stride
    if not out:
        raise InputError(f"make_windows: no window of length {window} fits in "
                         f"[{t_start}, {t_stop}]; shorten the window or widen the span.")
    return out, mean, std
