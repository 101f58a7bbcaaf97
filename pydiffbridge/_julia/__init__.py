"""The Julia boundary.  :mod:`pydiffbridge._julia.runtime` is the only module that imports
juliacall; nothing here starts Julia until a Julia solve (or ``julia install``) asks for it."""

from .runtime import (
    JuliaStatus,
    availability,
    get_module,
    install,
    julia_source_path,
    status,
)

__all__ = ["JuliaStatus", "availability", "get_module", "install", "julia_source_path", "status"]
