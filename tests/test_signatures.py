"""Right-hand sides and event functions that cannot be called as ``f(t, y)`` are reported up
front with an RHSError that shows the expected signature (instead of a raw TypeError from
deep inside a solver); everything that *can* be called so (``*args``, ``**kwargs``,
``functools.partial``, callable objects, bound methods, builtins without a signature,
decorated functions, TorchScript) passes."""

from __future__ import annotations

import functools
import math

import pytest
import torch

import pydiffbridge as pdb
from pydiffbridge import errors as E

D = torch.float64
T = torch.linspace(0.0, 1.0, 3, dtype=D)


def _y0():
    return torch.ones(2, dtype=D)


class NoT(torch.nn.Module):
    def forward(self, y):
        return -y


class NoForward(torch.nn.Module):
    pass


class KwOnly(torch.nn.Module):
    def forward(self, t, y, *, scale):
        return -scale * y


BAD_FUNCS = {
    "int": (3, "got 3 of type int"),
    "none": (None, "got None of type NoneType"),
    "str": ("f", "of type str"),
    "one_arg": (lambda y: -y, "too many positional arguments"),
    "three_args": (lambda t, y, z: -y, "missing a required argument: 'z'"),
    "module_forward_y": (NoT(), "NoT.forward(y)"),
    "module_kwonly": (KwOnly(), "missing a required argument: 'scale'"),
    "module_class": (torch.nn.Linear, "the class Linear, not a module"),
    "no_forward": (NoForward(), "without a forward method"),
}


@pytest.mark.parametrize("name", sorted(BAD_FUNCS))
@pytest.mark.parametrize("entry", ["odeint", "solve", "adjoint", "batched", "scipy"])
def test_bad_func_rejected_with_the_expected_signature(name, entry):
    func, words = BAD_FUNCS[name]
    with pytest.raises(E.RHSError) as info:
        if entry == "odeint":
            pdb.odeint(func, _y0(), T)
        elif entry == "solve":
            pdb.solve(func, _y0(), T)
        elif entry == "adjoint":
            pdb.odeint_adjoint(func, _y0(), T, adjoint_params=())
        elif entry == "batched":
            pdb.solve(func, _y0()[None], T, batch_dims=1)
        else:
            pytest.importorskip("scipy")
            pdb.odeint(func, _y0(), T, backend="scipy")
    msg = str(info.value)
    assert words in msg
    assert "func" in msg and "(t, y)" in msg
    assert isinstance(info.value, TypeError)  # as the raw error was


class CallableObject:
    def __call__(self, t, y):
        return -y


class Method:
    def rhs(self, t, y):
        return -y


class ArgsModule(torch.nn.Module):
    def forward(self, *args):
        return -args[1]


class ExtraDefaults(torch.nn.Module):
    def forward(self, t, y, scale=1.0, *, shift=0.0):
        return -scale * y + shift


def _decorated():
    def deco(fn):
        @functools.wraps(fn)
        def inner(*a, **k):
            return fn(*a, **k)
        return inner

    @deco
    def f(t, y):
        return -y

    return f


GOOD_FUNCS = {
    "lambda": lambda t, y: -y,
    "varargs": lambda *a: -a[1],
    "kwargs": lambda t, y, **kw: -y,
    "partial": functools.partial(lambda k, t, y: -k * y, 1.0),
    "partial_kw": functools.partial(lambda t, y, k: -k * y, k=1.0),
    "callable_object": CallableObject(),
    "bound_method": Method().rhs,
    "args_module": ArgsModule(),
    "extra_defaults": ExtraDefaults(),
    "decorated": _decorated(),
    "perturb_kw": lambda t, y, perturb=None: -y,
}


@pytest.mark.parametrize("name", sorted(GOOD_FUNCS))
def test_funcs_callable_as_t_y_pass(name):
    out = pdb.odeint(GOOD_FUNCS[name], _y0(), T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D))
    if name != "perturb_kw":
        out = pdb.solve(GOOD_FUNCS[name], _y0()[None], T, batch_dims=1, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.ys[-1, 0], torch.full((2,), math.exp(-1.0), dtype=D))


def test_builtin_without_signature_passes():
    # torch.sub(t, y) = t - y: a builtin whose signature Python cannot read
    out = pdb.odeint(torch.sub, torch.zeros(1, dtype=D), T, rtol=1e-10, atol=1e-12)
    exact = T - 1 + torch.exp(-T)  # y' = t - y, y(0) = 0
    torch.testing.assert_close(out[:, 0], exact, rtol=1e-7, atol=1e-9)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_torchscript_function_passes():
    @torch.jit.script
    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return -y

    out = pdb.odeint(f, _y0(), T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D))


def test_module_with_forward_pre_hook_is_not_second_guessed():
    m = NoT()
    m.register_forward_pre_hook(lambda mod, args: (args[1],))  # (t, y) -> (y,)
    out = pdb.odeint(m, _y0(), T, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D))


@pytest.mark.parametrize("event_fn,words", [
    (lambda y: y[0] - 0.5, "too many positional arguments"),
    (lambda t, y, z: y[0], "missing a required argument: 'z'"),
    (0.5, "got 0.5 of type float"),
])
def test_bad_event_fn_rejected(event_fn, words):
    calls = []

    def f(t, y):
        calls.append(t)
        return -y

    with pytest.raises(E.RHSError, match=r"event_fn.*event_fn\(t, y\) -> tensor") as info:
        pdb.odeint_event(f, _y0(), torch.tensor(0.0, dtype=D), event_fn=event_fn)
    assert words in str(info.value)
    with pytest.raises(E.RHSError, match="event_fn"):
        pdb.odeint(f, _y0(), T, event_fn=event_fn)
    assert not calls


def test_good_event_fn_variants_pass():
    def f(t, y):
        return -y

    for ev in (lambda t, y: y[0] - 0.5, lambda *a: a[1][0] - 0.5,
               functools.partial(lambda c, t, y: y[0] - c, 0.5)):
        t_ev, _ = pdb.odeint_event(f, _y0(), torch.tensor(0.0, dtype=D), event_fn=ev,
                                   rtol=1e-10, atol=1e-12)
        assert abs(float(t_ev) - math.log(2.0)) < 1e-7


def test_bad_grid_constructor_signature_rejected():
    with pytest.raises(E.RHSError, match=r"grid_constructor\(func, y0, t\)"):
        pdb.odeint(lambda t, y: -y, _y0(), T, method="rk4",
                   options={"grid_constructor": lambda t: t})
    with pytest.raises(E.RHSError, match=r"grid_constructor.*callable.*got 3"):
        pdb.odeint(lambda t, y: -y, _y0(), T, method="rk4", options={"grid_constructor": 3})
    out = pdb.odeint(lambda t, y: -y, _y0(), T, method="rk4",
                     options={"grid_constructor": lambda f, y0, t: torch.linspace(0, 1, 101)})
    torch.testing.assert_close(out[-1], torch.full((2,), math.exp(-1.0), dtype=D))


def test_signature_check_is_cached_per_definition():
    from pydiffbridge import _validate as V

    def make(k):
        return lambda t, y: -k * y

    V.check_callable(make(1.0), "func", "func(t, y)")
    n = len(V._SIG_CACHE)
    for k in range(50):  # the same definition: one entry, however many closures
        V.check_callable(make(float(k)), "func", "func(t, y)")
    assert len(V._SIG_CACHE) == n
