"""Standard modules that berthd imports but rarely uses, loaded at their first use.

Importing this module stands in for `ssl`, `hmac` and `hashlib` (berthd's main imports it
before anything else); `defer` does the same for other pure-Python modules.

trio imports `ssl` (for trio.SSLStream) and `hmac` (for DTLS cookies) at its own import, and
berthd imports `hashlib` for content digests. All three load OpenSSL: libssl and libcrypto
mapped and initialised cost berthd ~5 MiB of its RSS (measured: `import trio` 23.9 MiB, 19.2
with these deferred), though a berthd that never pulls over TLS never uses ssl, and one that
only runs containers never hashes. When the first attribute is asked of a stand-in, the
module's code runs and the stand-in takes its whole namespace, so every holder sees the
real module from then on.

Why not importlib.util.LazyLoader, which does the same: on CPython 3.11 an `import ssl` of a
module already in sys.modules reads its `__spec__` (to check that it is not still
initialising), which loads a LazyLoader module at once. This stand-in answers `__spec__`
and the other dunders itself.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["defer"]

_locks: dict[str, threading.RLock] = {}  # per module: trio's worker threads may race for one
_running: set[str] = set()  # modules whose code is running now (in the thread holding the lock)


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        # only for attributes not in the namespace: before the load, or missing after it
        if attr.startswith("__") and attr.endswith("__") and attr != "__all__":
            raise AttributeError(attr)
        name = self.__name__
        with _locks[name]:
            if name in _running:  # asked while its own code runs (a circular import)
                raise AttributeError(f"partially initialised module {name!r} has no {attr!r}")
            if type(self) is _Deferred:
                _run(self)
        return getattr(self, attr)


def _run(stand_in: _Deferred) -> None:
    """Import the module for real, through the import system (its module lock and
    `_initializing` make a thread's `import` of it wait until it is whole; ssl's enums,
    made by `enum._convert_`, are written into `sys.modules[__name__]`, which is the new
    module meanwhile), then give the stand-in that whole namespace at once, so a thread
    holding the stand-in never sees half of it (it waits on the lock for anything not
    there yet). The new module stays sys.modules' entry. The functions' globals are its
    namespace: a global rebound later through the stand-in is not seen by them (nothing in
    berthd does)."""
    name = stand_in.__name__
    if sys.modules.get(name) is stand_in:
        del sys.modules[name]
    _running.add(name)
    try:
        real = importlib.import_module(name)
    except BaseException as exc:  # the stand-in stays as it was: the next use tries again
        sys.modules.setdefault(name, stand_in)
        if isinstance(exc, Exception):
            raise ImportError(f"deferred import of {name} failed: {exc}", name=name) from exc
        raise
    finally:
        _running.discard(name)
    stand_in.__dict__.update(real.__dict__)
    stand_in.__class__ = types.ModuleType  # type: ignore[assignment]  # a plain module now


def defer(*names: str) -> None:
    """Stand in for each module not imported yet (one already imported is left alone)."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)  # imports the parent package, if any
        if spec is None or spec.loader is None or not hasattr(spec.loader, "get_code"):
            continue  # not there, or not Python source: imported as usual
        stand_in = _Deferred(name)
        # __spec__, __loader__, __file__, __package__, __cached__, as the import sets them
        stand_in.__dict__.update(importlib.util.module_from_spec(spec).__dict__)
        _locks[name] = threading.RLock()
        sys.modules[name] = stand_in
        parent, _, child = name.rpartition(".")
        if parent in sys.modules:  # as the import binds a submodule on its package
            setattr(sys.modules[parent], child, stand_in)


defer("ssl", "hmac", "hashlib")
