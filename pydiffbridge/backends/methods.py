"""One method-name map across engines.

Every row names one integration scheme and how each engine spells it.  A user may ask any
backend for a canonical name (``dopri5``), a name native to that engine (``DOP853``, ``Rodas5``)
or another engine's name for the same scheme (``DP5`` on SciPy means ``RK45``).  Matching is
case-insensitive.  A name no row of the engine knows raises
:class:`~pydiffbridge.errors.UnknownMethodError` that lists the engine's methods and says on
which other backend the method exists.

Sources for the correspondences: SciPy ``solve_ivp`` documentation (RK45 = Dormand-Prince
5(4), RK23 = Bogacki-Shampine 3(2), DOP853 = Hairer's 8(5,3)); OrdinaryDiffEq.jl solver list
(DP5, BS3, DP8, Tsit5, Vern6-9, Rodas4/5/5P, Rosenbrock23, Kvaerno5, KenCarp4, TRBDF2,
RadauIIA5, FBDF, QNDF); MATLAB's ode23s is Rosenbrock23 (Shampine & Reichelt 1997).
"""

from __future__ import annotations

from ..errors import UnknownMethodError

__all__ = ["ENGINES", "TABLE", "native_methods", "resolve", "where_available"]

ENGINES = ("torch", "scipy", "julia")

#: canonical name -> {engine: native name}; a missing engine means "not available there".
TABLE: dict[str, dict[str, str]] = {
    # explicit Runge-Kutta pairs shared by the engines
    "dopri5": {"torch": "dopri5", "scipy": "RK45", "julia": "DP5"},
    "bosh3": {"torch": "bosh3", "scipy": "RK23", "julia": "BS3"},
    "dopri8": {"torch": "dopri8", "scipy": "DOP853", "julia": "DP8"},
    "tsit5": {"torch": "tsit5", "julia": "Tsit5"},
    # torch-only fixed-step / low-order schemes (Julia spellings where they exist)
    "fehlberg2": {"torch": "fehlberg2"},
    "adaptive_heun": {"torch": "adaptive_heun", "julia": "Heun"},
    "euler": {"torch": "euler", "julia": "Euler"},
    "midpoint": {"torch": "midpoint", "julia": "Midpoint"},
    "heun2": {"torch": "heun2"},
    "heun3": {"torch": "heun3"},
    "rk4": {"torch": "rk4", "julia": "RK4"},
    "explicit_adams": {"torch": "explicit_adams"},
    "implicit_adams": {"torch": "implicit_adams"},
    "fixed_adams": {"torch": "fixed_adams"},
    # torch-only fixed-grid implicit Runge-Kutta methods (solvers/implicit.py)
    "implicit_euler": {"torch": "implicit_euler"},
    "implicit_midpoint": {"torch": "implicit_midpoint"},
    "trapezoid": {"torch": "trapezoid"},
    "radauiia3": {"torch": "radauIIA3"},
    "gl4": {"torch": "gl4"},
    "gl6": {"torch": "gl6"},
    "sdirk2": {"torch": "sdirk2"},
    # stiff and engine-native methods
    # the 3-stage Radau IIA scheme: adaptive on SciPy and Julia, on a fixed grid on torch
    "radau": {"torch": "radauIIA5", "scipy": "Radau", "julia": "RadauIIA5"},
    "bdf": {"scipy": "BDF", "julia": "FBDF"},
    "lsoda": {"scipy": "LSODA"},
    "qndf": {"julia": "QNDF"},
    # adaptive stiff methods native on torch too (solvers/rosenbrock.py, esdirk.py)
    "rodas4": {"torch": "rodas4", "julia": "Rodas4"},
    "rodas5": {"torch": "rodas5", "julia": "Rodas5"},
    "rodas5p": {"julia": "Rodas5P"},
    "rosenbrock23": {"torch": "rosenbrock23", "julia": "Rosenbrock23"},
    "kvaerno5": {"torch": "kvaerno5", "julia": "Kvaerno5"},
    "kencarp4": {"julia": "KenCarp4"},
    "trbdf2": {"torch": "trbdf2", "julia": "TRBDF2"},  # torch: on a fixed grid
    "vern6": {"julia": "Vern6"},
    "vern7": {"julia": "Vern7"},
    "vern8": {"julia": "Vern8"},
    "vern9": {"julia": "Vern9"},
    # Julia's automatic stiffness switching (the nearest thing to LSODA there)
    "autotsit5": {"julia": "AutoTsit5(Rosenbrock23())"},
    "autovern7": {"julia": "AutoVern7(Rodas5())"},
    # torch's tsit5 <-> rodas5 switching (solvers/autoswitch.py; the counterpart of Julia's
    # AutoTsit5(Rodas5()), which has no row of its own here)
    "auto": {"torch": "auto"},
}

# lower-case spelling (canonical or any engine's) -> canonical row name
_LOOKUP: dict[str, str] = {}
for _canon, _row in TABLE.items():
    _LOOKUP[_canon] = _canon
    for _native in _row.values():
        _LOOKUP.setdefault(_native.lower(), _canon)
# common extra spellings
_LOOKUP.update({"rk45": "dopri5", "dp5": "dopri5", "rk23": "bosh3", "bs3": "bosh3",
                "dop853": "dopri8", "dp8": "dopri8", "radauiia5": "radau", "fbdf": "bdf",
                "rk4_classic": "rk4", "explicit_euler": "euler", "ode23s": "rosenbrock23",
                "autotsit5(rosenbrock23())": "autotsit5", "autovern7(rodas5())": "autovern7"})


def native_methods(engine: str) -> list[str]:
    """The names ``engine`` itself uses, in table order."""
    return [row[engine] for row in TABLE.values() if engine in row]


def where_available(method: str) -> list[str]:
    """Engines that have ``method`` (any spelling); ``[]`` for an unknown name."""
    canon = _LOOKUP.get(str(method).lower())
    return [e for e in ENGINES if canon is not None and e in TABLE[canon]]


def resolve(engine: str, method: str) -> str:
    """Map ``method`` (canonical or any engine's spelling) to ``engine``'s native name.

    Raises:
        UnknownMethodError: naming the engine's methods and where else the method exists.
    """
    if not isinstance(method, str):
        raise UnknownMethodError(f"method must be a string, got {type(method).__name__}")
    canon = _LOOKUP.get(method.lower())
    if canon is not None and engine in TABLE[canon]:
        return TABLE[canon][engine]
    others = [e for e in where_available(method) if e != engine]
    hint = ""
    if others:
        alts = ", ".join(f"backend={e!r} (method={TABLE[canon][e]!r})" for e in others)
        hint = f" It is available with {alts}."
    elif canon is None:
        hint = " No engine knows this name; check the spelling."
    raise UnknownMethodError(
        f"method {method!r} is not available on backend {engine!r}.{hint} Methods of "
        f"{engine!r}: {', '.join(native_methods(engine))}.")
