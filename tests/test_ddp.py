"""DistributedDataParallel with the adjoint: two gloo processes on localhost.

One DDP training step of a small neural ODE must leave the same parameters on both ranks and
equal the single-process step on the concatenated batch.  The adjoint's parameter gradients
are outputs of the bridge autograd.Function's backward, accumulated into ``.grad`` by
autograd, where DDP's hooks all-reduce them.

Tolerances: with a fixed-step method (rk4) every sample's trajectory and adjoint are
independent of the rest of the batch, and dL/dθ is a sum over samples, so the two-process
result differs from the one-process one only in the order of float64 summations (half-batch
sums, then DDP's average, vs one sum over the whole batch): a few ulps of the gradient, i.e. a
relative 1e-12 is ample (float64 eps 2.2e-16 times a few hundred operations).  With an adaptive
method (dopri5) the step sizes come from an error norm over the *whole* batch on each rank, so
half a batch takes other steps than the full one and the gradients agree only to the solver
tolerance; that case is checked at 100 times the solver's rtol.  (Measured: rk4 steps agree
to 4e-15 relative, dopri5 at rtol 1e-9 to 1.2e-11.)
"""

from __future__ import annotations

import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pydiffbridge import distributed as D
from pydiffbridge import odeint_adjoint
from pydiffbridge.fit import FitConfig, Observations, Trajectories, fit, make_observations
from pydiffbridge.nn import ODEBlock

WORLD = 2
BATCH = 8  # global batch; each rank gets BATCH // WORLD samples
LR = 0.1

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


class Func(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2))

    def forward(self, t, y):
        return self.net(y)


class AdjointModel(nn.Module):
    """The documented pattern: DDP wraps this model; the solver gets the inner ``func``."""

    def __init__(self, method: str, options: dict | None) -> None:
        super().__init__()
        self.func = Func()
        self.method, self.options = method, options

    def forward(self, x):
        t = torch.tensor([0.0, 0.5, 1.0], dtype=x.dtype)
        return odeint_adjoint(self.func, x, t, method=self.method, options=self.options,
                              rtol=1e-9, atol=1e-11)[1:]


class BlockModel(nn.Module):
    """An ODEBlock inside a network, the network wrapped in DDP."""

    def __init__(self, method: str, options: dict | None) -> None:
        super().__init__()
        self.block = ODEBlock(Func(), (0.0, 1.0), method=method, rtol=1e-9, atol=1e-11,
                              gradient="adjoint", options=options)
        self.head = nn.Linear(2, 3)

    def forward(self, x):
        return self.head(self.block(x))


CASES = {  # name: (model class, method, options, relative tolerance)
    "adjoint_rk4": (AdjointModel, "rk4", {"step_size": 0.05}, 1e-12),
    "odeblock_rk4": (BlockModel, "rk4", {"step_size": 0.05}, 1e-12),
    # rtol 1e-9: the half-batch solves take other steps, each accurate to ~1e-9 (seen: 1e-11)
    "odeblock_dopri5": (BlockModel, "dopri5", None, 1e-7),
}


def _data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(BATCH, 2, generator=g, dtype=torch.float64)


def _build(name: str) -> nn.Module:
    cls, method, options, _ = CASES[name]
    torch.manual_seed(7)
    return cls(method, options).double()


def _loss(out: torch.Tensor) -> torch.Tensor:
    return out.pow(2).mean()  # a mean over the (local) batch: DDP's average makes it global


def _step(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    opt.zero_grad()
    _loss(model(x)).backward()
    opt.step()
    return {k: v.detach().clone() for k, v in D.unwrap(model).state_dict().items()}


def _lv_obs() -> Observations:
    from pydiffbridge import odeint

    class LV(nn.Module):
        def forward(self, t, u):
            x, y = u[..., 0], u[..., 1]
            return torch.stack([1.5 * x - x * y, x * y - 3.0 * y], -1)

    y0 = torch.tensor([[1.0, 1.0], [1.5, 0.7], [0.8, 1.3]], dtype=torch.float64)
    return make_observations(lambda a, t: odeint(LV(), a, t, method="dopri8", rtol=1e-10,
                                                 atol=1e-12),
                             y0, 1.5, 10, 0.7, 0.02, torch.Generator().manual_seed(3))


class LVParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_theta = nn.Parameter(torch.log(torch.tensor([1.2, 0.8, 1.2, 2.5],
                                                             dtype=torch.float64)))

    def forward(self, t, u):
        a, b, d, g = torch.exp(self.log_theta)
        x, y = u[..., 0], u[..., 1]
        return torch.stack([a * x - b * x * y, d * x * y - g * y], -1)


def _fit_lv(rank: int, world: int) -> torch.Tensor:
    """A few Adam iterations and one LBFGS step on rank-sharded (3 series: unequal shards)
    Lotka-Volterra data, with the global-count loss scaling of pydiffbridge.fit."""
    obs = _lv_obs()
    local = obs.select(D.shard_indices(obs.n_series, rank, world))
    n_global = D.global_count(local.n_obs)
    scale = obs.scale()
    rhs = LVParams()
    sim = Trajectories(rhs, method="rk4", options={"step_size": 0.02})
    model = D.wrap_ddp(sim)
    fit(lambda: local.sse(model(local.y0, local.t), scale) * (world / n_global),
        model.parameters(), FitConfig(adam_iters=3, lr=0.05, lbfgs_iters=1, lbfgs_max_iter=4,
                                      patience=0), progress=False)
    return rhs.log_theta.detach().clone()


def _worker(rank: int, port: int, outdir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    info = D.init_from_env(device="cpu", timeout_s=120)
    try:
        assert info.backend == "gloo" and info.world_size == WORLD and info.rank == rank
        x = _data()[D.shard_indices(BATCH, rank, WORLD)]  # rank-strided shard
        res: dict = {"params": {}, "nfe": {}}
        for name in CASES:
            model = D.wrap_ddp(_build(name))
            res["params"][name] = _step(model, x)
            if name.startswith("odeblock"):
                res["nfe"][name] = D.aggregate_nfe(model)  # this rank's counts, aggregated
                res.setdefault("local_nfe", {})[name] = D.nfe_of(model)
        # aggregation with known per-rank numbers
        res["agg"] = D.aggregate_nfe(10 + rank, [1, 2] if rank == 0 else [3, 4, 5])
        res["count"] = D.global_count(rank + 1)
        res["mean"] = D.mean_across_ranks(torch.tensor(float(rank)))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            ddp = D.wrap_ddp(Func().double())
            res["check_func_unwraps"] = D.check_func(ddp) is ddp.module
            res["check_func_warned"] = any("DistributedDataParallel" in str(m.message)
                                           for m in w)
        res["fit_lv"] = _fit_lv(rank, WORLD)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        D.cleanup(info)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):  # the parent stays a single process
        assert key not in os.environ or os.environ[key] in ("0", "1")
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_ddp_step_equals_single_process_step(ranks, name):
    rtol = CASES[name][3]
    p0, p1 = ranks[0]["params"][name], ranks[1]["params"][name]
    for k in p0:  # the ranks agree bit for bit: DDP gives both the same averaged gradient
        assert torch.equal(p0[k], p1[k]), k
    ref = _step(_build(name), _data())  # one process, the whole batch
    init = _build(name).state_dict()
    for k in ref:
        step_ref = ref[k] - init[k]
        step_ddp = p0[k] - init[k]
        assert step_ref.abs().max() > 0, k  # the step did something
        scale = float(step_ref.abs().max())
        err = float((step_ddp - step_ref).abs().max())
        assert err <= rtol * scale, (k, err, scale)


@pytest.mark.slow
def test_nfe_aggregation(ranks):
    for r in ranks:  # every rank gets the same statistics
        a = r["agg"]
        assert a["world_size"] == 2
        assert a["forward"] == {"sum": 21.0, "mean": 10.5, "max": 11.0, "min": 10.0}
        assert a["backward"] == {"sum": 15.0, "mean": 7.5, "max": 12.0, "min": 3.0}
        assert a["total"] == {"sum": 36.0, "mean": 18.0, "max": 23.0, "min": 13.0}
        assert r["count"] == 3.0 and r["mean"] == 0.5
    for name in ("odeblock_rk4", "odeblock_dopri5"):
        local = [r["local_nfe"][name] for r in ranks]
        agg = ranks[0]["nfe"][name]
        assert agg == ranks[1]["nfe"][name]
        assert agg["forward"]["sum"] == sum(f for f, _ in local) > 0
        assert agg["backward"]["sum"] == sum(b for _, b in local) > 0
        assert agg["forward"]["max"] == max(f for f, _ in local)


@pytest.mark.slow
def test_check_func_and_sharded_fit(ranks):
    assert ranks[0]["check_func_unwraps"] and ranks[0]["check_func_warned"]
    # Adam + LBFGS on unequal shards (2 + 1 series): same parameters on both ranks, equal to
    # the single-process fit on all series (rk4: summation order only; the LBFGS line
    # search branches on loss values, which agree to ~1e-15)
    a, b = ranks[0]["fit_lv"], ranks[1]["fit_lv"]
    assert torch.equal(a, b)
    ref = _fit_lv(0, 1)
    assert torch.allclose(a, ref, rtol=1e-11, atol=1e-13), (a, ref)  # seen: 6e-16


def test_single_process_helpers():
    assert not D.is_distributed() and D.get_world_size() == 1 and D.is_main_process()
    info = D.init_from_env(device="cpu")
    assert info.world_size == 1 and info.backend is None and not info.initialized_here
    D.cleanup(info)
    assert D.shard_indices(5, 0, 2) == [0, 2, 4] and D.shard_indices(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError):
        D.shard_indices(5, 2, 2)
    m = Func()
    assert D.wrap_ddp(m) is m and D.unwrap(m) is m and D.check_func(m) is m
    assert D.global_count(7) == 7.0 and D.mean_across_ranks(torch.tensor(2.5)) == 2.5
    blk = ODEBlock(Func().double(), method="rk4", options={"step_size": 0.25})
    x = torch.randn(3, 2, dtype=torch.float64)
    blk(x).sum().backward()
    agg = D.aggregate_nfe(blk)
    assert agg["world_size"] == 1
    assert agg["forward"]["sum"] == agg["forward"]["max"] == blk.nfe_forward == 16
    assert agg["backward"]["sum"] == blk.nfe_backward > 0
