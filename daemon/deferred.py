"""Standard modules that berthd imports but rarely uses, loaded at their first use.

Importing this module stands in for `ssl`, `hmac` and `hashlib` (berthd's main imports it
before anything else); `defer` does the same for other modules.

trio imports `ssl` (for trio.SSLStream) and `hmac` (for DTLS cookies) at its own import, and
berthd imports `hashlib` for content digests. All three load OpenSSL: libssl and libcrypto
mapped and initialised cost berthd ~5 MiB of its RSS (measured: `import trio` 23.9 MiB, 19.2
with these deferred), though a berthd that never pulls over TLS never uses ssl, and one that
only runs containers never hashes. A module object stands in for each until an attribute is
asked of it; then the real module is imported and its namespace copied onto the stand-in, so
every holder of either sees the same functions from then on.

Why not importlib.util.LazyLoader: on CPython 3.11 an `import ssl` of a module already in
sys.modules reads its `__spec__` (to check that it is not still initialising), which loads a
LazyLoader module at once. This stand-in answers `__spec__` and other dunders itself.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

__all__ = ["defer"]

_lock = threading.Lock()  # trio's worker threads may be the first to touch one


class _Deferred(types.ModuleType):
    def __getattr__(self, attr: str) -> Any:
        # only for attributes not yet in the namespace, so once loaded never again
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(attr)
        return getattr(_load(self), attr)


def _load(stand_in: _Deferred) -> types.ModuleType:
    name = stand_in.__name__
    with _lock:
        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
            try:
                real = importlib.import_module(name)
            except BaseException:
                sys.modules[name] = stand_in
                raise
            stand_in.__dict__.update(real.__dict__)
        return sys.modules[name]


def defer(*names: str) -> None:
    """Stand in for each module not imported yet (one already imported is left alone)."""
    for name in names:
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None:
            continue
        stand_in = _Deferred(name)
        stand_in.__spec__ = spec
        stand_in.__file__ = spec.origin
        sys.modules[name] = stand_in


defer("ssl", "hmac", "hashlib")
