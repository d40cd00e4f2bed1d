"""berthd's and berth-grpc's resident memory: what keeps it down must keep working.

- `berth.daemon.deferred`: ssl, hmac and hashlib stand-ins until first use, so a berthd that
  never hashes never maps OpenSSL;
- `berth.native.malloc_trim` after storage work, so freed heap goes back to the kernel;
- berth-grpc's fixed malloc mmap threshold (supervisor.environment).
The figures themselves are measured by scripts/bench (memory), never asserted here.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from berth.daemon.grpc import supervisor
from tests.support.helpers import Daemon

PROBE = "berth_deferred_probe"


def _python(code: str, path: Path) -> str:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(path), *sys.path]))
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_a_deferred_module_runs_at_its_first_attribute_and_once(tmp_path: Path) -> None:
    (tmp_path / f"{PROBE}.py").write_text(
        "import os\nos.write(1, b'loaded\\n')\nVALUE = 42\ndef answer():\n    return VALUE\n"
    )
    out = _python(
        f"""
        import sys
        from berth.daemon import deferred
        deferred.defer("{PROBE}")
        import {PROBE}                      # an import statement alone does not load it
        import {PROBE} as again
        print("imported", "{PROBE}" in sys.modules)
        print("value", {PROBE}.VALUE)       # the first attribute does, once
        from {PROBE} import answer
        print("answer", answer(), again.answer is answer)
        print("same", sys.modules["{PROBE}"].answer is {PROBE}.answer)
        try:
            {PROBE}.missing
        except AttributeError:
            print("missing raises")
        import json
        deferred.defer("json")              # already imported: left as it is
        print("json kept", type(sys.modules["json"]).__name__)
        """,
        tmp_path,
    )
    assert out.splitlines() == [
        "imported True",
        "loaded",
        "value 42",
        "answer 42 True",
        "same True",
        "missing raises",
        "json kept module",
    ]


def test_threads_racing_for_a_deferred_module_run_it_once(tmp_path: Path) -> None:
    (tmp_path / f"{PROBE}.py").write_text(
        "import os, time\nos.write(1, b'loaded\\n')\ntime.sleep(0.2)\nVALUE = 7\n"
    )
    out = _python(
        f"""
        import threading
        from berth.daemon import deferred
        deferred.defer("{PROBE}")
        import {PROBE}
        start = threading.Barrier(8)
        seen = []
        def first_use():
            start.wait()
            seen.append({PROBE}.VALUE)  # all but one wait for the one that runs it
        threads = [threading.Thread(target=first_use) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print("seen", seen)
        """,
        tmp_path,
    )
    assert out.splitlines() == ["loaded", "seen [7, 7, 7, 7, 7, 7, 7, 7]"]


def test_an_import_of_a_deferred_module_while_it_loads_waits_until_it_is_whole(
    tmp_path: Path,
) -> None:
    (tmp_path / f"{PROBE}.py").write_text("import time\nEARLY = 1\ntime.sleep(0.5)\nLATE = 2\n")
    out = _python(
        f"""
        import threading, time
        from berth.daemon import deferred
        deferred.defer("{PROBE}")
        import {PROBE}
        first = threading.Thread(target=lambda: {PROBE}.EARLY)  # starts the load
        first.start()
        time.sleep(0.2)                                         # the load is halfway
        import importlib
        late = importlib.import_module("{PROBE}").LATE          # an import of its own
        first.join()
        print("late", late)
        """,
        tmp_path,
    )
    assert out.splitlines() == ["late 2"]


def test_a_deferred_module_that_fails_raises_importerror_and_may_be_tried_again(
    tmp_path: Path,
) -> None:
    (tmp_path / "berth_deferred_pkg").mkdir()
    (tmp_path / "berth_deferred_pkg" / "__init__.py").write_text("")
    (tmp_path / "berth_deferred_pkg" / "sub.py").write_text(
        "import os\n"
        "__all__ = ['VALUE']\n"
        "if not os.path.exists(os.environ['MARK']):\n"
        "    open(os.environ['MARK'], 'w').close()\n"
        "    raise RuntimeError('first time')\n"
        "VALUE = 5\n"
    )
    os.environ["MARK"] = str(tmp_path / "mark")
    try:
        out = _python(
            """
            from berth.daemon import deferred
            deferred.defer("berth_deferred_pkg.sub")
            import berth_deferred_pkg.sub
            sub = berth_deferred_pkg.sub        # bound on its package, as an import binds it
            try:
                sub.VALUE
            except ImportError as exc:
                print("failed", type(exc.__cause__).__name__, "VALUE" in vars(sub))
            print("again", berth_deferred_pkg.sub.VALUE)
            from berth_deferred_pkg.sub import *
            print("star", VALUE)
            """,
            tmp_path,
        )
    finally:
        del os.environ["MARK"]
    assert out.splitlines() == ["failed RuntimeError False", "again 5", "star 5"]


def test_berthd_s_stand_ins_become_the_real_ssl_hmac_and_hashlib(tmp_path: Path) -> None:
    """The three stdlib modules berthd defers work once used, including what their code
    writes into sys.modules[__name__] as it runs (ssl's enums, made by enum._convert_)."""
    out = _python(
        """
        import sys
        from berth.daemon import deferred   # stands in for ssl, hmac, hashlib
        import trio                         # imports ssl and hmac itself
        print("before", "_ssl" in sys.modules, "_hashlib" in sys.modules)
        import hashlib, hmac, ssl
        context = ssl.create_default_context()
        print("ssl", context.verify_mode == ssl.CERT_REQUIRED, ssl.PROTOCOL_TLS_CLIENT.name)
        print("hmac", hmac.new(b"k", b"m", "sha256").hexdigest()[:8])
        print("hashlib", hashlib.sha256(b"").hexdigest()[:8])
        print("trio", trio.SSLStream.__name__)
        """,
        tmp_path,
    )
    assert out.splitlines() == [
        "before False False",
        "ssl True PROTOCOL_TLS_CLIENT",
        "hmac b60090e3",
        "hashlib e3b0c442",
        "trio SSLStream",
    ]


def test_berthd_starts_without_openssl_and_loads_it_to_hash(daemon: Daemon) -> None:
    def maps() -> str:
        return Path(f"/proc/{daemon.pid}/maps").read_text()

    assert daemon.call("version")
    assert "libcrypto" not in maps()  # trio imports ssl and hmac; stand-ins until used
    data = os.urandom(100_000)
    with daemon.client() as c:
        c.call("content.write.open", {"ref": "footprint"})
        c.call("content.write.chunk", {"ref": "footprint", "data": data})
        digest = c.call("content.write.commit", {"ref": "footprint"})["digest"]
    assert digest == "sha256:" + hashlib.sha256(data).hexdigest()
    assert "libcrypto" in maps()  # hashlib, loaded by its first use, is OpenSSL's


def test_malloc_trim_gives_fragmented_heap_back(tmp_path: Path) -> None:
    out = _python(
        """
        from berth.native import malloc_trim
        def rss():
            for line in open("/proc/self/status"):
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) // 1024
        # a freed mmapped block raises glibc's mmap threshold: the next ones are heap
        first = bytearray(4 << 20)
        del first
        blocks = [bytearray(1 << 20) for _ in range(64)]
        keep = bytearray(1 << 20)                    # pins the heap's top
        before = rss()
        del blocks
        freed = rss()
        released = malloc_trim()
        print(before - freed, rss() - freed, released)
        """,
        tmp_path,
    )
    kept_after_free, change, released = out.split()
    assert int(kept_after_free) < 8  # glibc kept the 64 MiB ...
    assert int(change) <= -48 and released == "True"  # ... until the trim


def test_berth_grpc_runs_with_a_fixed_mmap_threshold() -> None:
    tunable = f"glibc.malloc.mmap_threshold={supervisor.MMAP_THRESHOLD}"
    assert supervisor.environment({"PATH": "/bin"}) == {"PATH": "/bin", "GLIBC_TUNABLES": tunable}
    merged = supervisor.environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})
    assert merged["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{tunable}"
    own = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=65536"}
    assert supervisor.environment(own) == own  # an operator's own choice stands
