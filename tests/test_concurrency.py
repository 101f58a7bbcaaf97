"""Solves in parallel threads give the results they give alone; Ctrl-C interrupts a long solve
promptly (as a plain KeyboardInterrupt, never wrapped in a library error); the same solve
repeated is bit-identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch

import pydiffbridge as pdb

D = torch.float64
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class VdP(torch.nn.Module):
    def __init__(self, mu: float):
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=D))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def _problem(i: int):
    y0 = torch.tensor([[1.0 + 0.1 * i, 0.0], [2.0, 0.5 * i]], dtype=D)
    return VdP(1.0 + i), y0, torch.linspace(0.0, 4.0, 9, dtype=D)


def _run(kind: str, i: int):
    f, y0, t = _problem(i)
    if kind == "torch":
        sol = pdb.solve(f, y0, t, rtol=1e-8, atol=1e-10)
    elif kind == "fixed":
        sol = pdb.solve(f, y0, t, method="rk4", options={"step_size": 0.01})
    elif kind == "batched":
        sol = pdb.solve(f, y0, t, rtol=1e-8, atol=1e-10, batch_dims=1)
    elif kind == "scipy":
        sol = pdb.solve(f, y0, t, rtol=1e-8, atol=1e-10, backend="scipy", method="DOP853",
                        gradient="auto")
    elif kind == "adjoint":
        y0 = y0.clone().requires_grad_(True)
        ys = pdb.odeint_adjoint(f, y0, t, rtol=1e-8, atol=1e-10)
        gy, gmu = torch.autograd.grad(ys[-1].square().sum(), (y0, f.mu))
        return ys.detach(), torch.cat([gy.reshape(-1), gmu.reshape(-1)])
    else:
        raise AssertionError(kind)
    return sol.ys, torch.as_tensor(sol.stats.nfe)


KINDS = ["torch", "fixed", "batched", "scipy", "adjoint"]


def _need(kind):
    if kind == "scipy":
        pytest.importorskip("scipy")


@pytest.mark.parametrize("kind", KINDS)
def test_repeated_solves_are_bit_identical(kind):
    _need(kind)
    first = _run(kind, 1)
    for _ in range(3):
        again = _run(kind, 1)
        assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


@pytest.mark.parametrize("kind", KINDS)
def test_two_threads_give_the_results_of_solves_alone(kind):
    _need(kind)
    alone = [_run(kind, i) for i in range(2)]
    results: dict[tuple[int, int], tuple] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def work(i):
        try:
            start.wait(timeout=30)
            for rep in range(3):
                results[(i, rep)] = _run(kind, i)
        except BaseException as exc:  # noqa: B036 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not any(th.is_alive() for th in threads), "a solve thread hung"
    assert not errors, errors
    for (i, _rep), got in results.items():
        assert all(torch.equal(a, b) for a, b in zip(alone[i], got, strict=True)), (i, kind)
    assert len(results) == 6


def test_threads_mixing_backends_and_shapes():
    pytest.importorskip("scipy")
    alone = {k: _run(k, 0) for k in KINDS}
    out: dict[str, tuple] = {}
    errors: list[BaseException] = []

    def work(k):
        try:
            out[k] = _run(k, 0)
        except BaseException as exc:  # noqa: B036
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(k,)) for k in KINDS]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=120)
    assert not errors, errors
    for k in KINDS:
        assert all(torch.equal(a, b) for a, b in zip(alone[k], out[k], strict=True)), k


CHILD = textwrap.dedent("""
    import faulthandler, signal, sys, torch
    import pydiffbridge as pdb

    # Python's own SIGINT handler even if the parent's disposition was inherited as ignored;
    # SIGUSR1 dumps every thread's stack (the parent asks for it if the child does not stop)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    faulthandler.register(signal.SIGUSR1)

    backend, method = sys.argv[1], sys.argv[2]
    mu = 1.0 if method == "rk4" else 1000.0  # stiff for the adaptive methods: tiny steps
    said = []

    def f(t, y):  # 100000 Van der Pol oscillators on a long span: minutes of work
        if not said:
            said.append(1)
            print("started", flush=True)
        x, v = y[0], y[1]
        return torch.stack([v, mu * (1 - x * x) * v - x])

    y0 = torch.stack([torch.linspace(1.0, 2.0, 100000, dtype=torch.float64),
                      torch.zeros(100000, dtype=torch.float64)])
    t = torch.tensor([0.0, 1e4], dtype=torch.float64)
    # (a fixed grid of 1e5 steps: its grid is built in moments, before the first step)
    opts = {"step_size": 0.1} if method == "rk4" else {"max_num_steps": 10**9}
    try:
        pdb.solve(f, y0, t, rtol=1e-10, atol=1e-12, method=method, backend=backend,
                  options=opts)
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        sys.exit(3)
    print("finished", flush=True)
""")


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
@pytest.mark.parametrize("backend,method", [("torch", "dopri5"), ("torch", "rk4"),
                                            ("scipy", "RK45")])
def test_sigint_interrupts_a_long_solve_promptly(backend, method):
    if backend == "scipy":
        pytest.importorskip("scipy")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    proc = subprocess.Popen([sys.executable, "-c", CHILD, backend, method], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # the solve is running
        assert line.strip() == "started", (line, proc.stderr.read() if proc.poll() else "")
        proc.send_signal(signal.SIGINT)
        # a hang detector, not a timing: an interrupted solve returns within moments (the
        # limit is generous for a loaded machine); on a hang, report where the child is
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            out, err = proc.communicate()
            raise AssertionError(f"the solve did not stop within 60 s of SIGINT; child stacks:"
                                 f"\n{err[-4000:]}") from None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3 and "interrupted" in out, (proc.returncode, out, err[-2000:])
