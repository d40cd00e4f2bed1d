"""Layer application: OCI semantics, diff IDs, diffs, and every known breakout."""

from __future__ import annotations

import hashlib
import io
import os
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from berth.daemon.storage.archive import UnsafeLayer, apply_layer, write_diff
from berth.shim.wire.errors import FailedPrecondition, InvalidArgument

SENTINEL = b"do not touch\n"


def entry(
    name: str,
    kind: bytes = tarfile.REGTYPE,
    data: bytes = b"",
    mode: int = 0o644,
    linkname: str = "",
    uid: int = 0,
    gid: int = 0,
) -> tuple[tarfile.TarInfo, bytes]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = mode
    info.linkname = linkname
    info.uid, info.gid = uid, gid
    info.mtime = 1_000_000
    info.size = len(data) if kind == tarfile.REGTYPE else 0
    return info, data


def layer(*entries: tuple[tarfile.TarInfo, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in entries:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    sentinel = outside / "sentinel"
    sentinel.write_bytes(SENTINEL)
    sentinel.chmod(0o600)
    return {"root": root, "outside": outside, "sentinel": sentinel}


def untouched(world: dict[str, Path]) -> None:
    s = world["sentinel"]
    assert s.read_bytes() == SENTINEL
    assert stat.S_IMODE(s.stat().st_mode) == 0o600
    assert s.stat().st_nlink == 1
    assert sorted(p.name for p in world["outside"].iterdir()) == ["sentinel"]


def apply(world: dict[str, Path], data: bytes, **kw: object) -> object:
    return apply_layer(str(world["root"]), io.BytesIO(data), **kw)  # type: ignore[arg-type]


def test_files_dirs_links_and_diff_id(world: dict[str, Path]) -> None:
    data = layer(
        entry("etc/", tarfile.DIRTYPE, mode=0o755),
        entry("etc/hostname", data=b"box\n", mode=0o644, uid=1, gid=2),
        entry("bin/", tarfile.DIRTYPE, mode=0o755),
        entry("bin/busybox", data=b"\x7fELF", mode=0o4755),
        entry("bin/sh", tarfile.SYMTYPE, linkname="busybox"),
        entry("bin/ls", tarfile.LNKTYPE, linkname="bin/busybox"),
        entry("run/fifo", tarfile.FIFOTYPE, mode=0o640),
    )
    result = apply(world, data)
    root = world["root"]
    assert (root / "etc/hostname").read_bytes() == b"box\n"
    assert (root / "etc/hostname").stat().st_uid == 1
    assert stat.S_IMODE((root / "bin/busybox").stat().st_mode) == 0o4755  # setuid kept
    assert os.readlink(root / "bin/sh") == "busybox"
    assert (root / "bin/ls").stat().st_ino == (root / "bin/busybox").stat().st_ino
    assert stat.S_ISFIFO((root / "run/fifo").stat().st_mode)
    assert result.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()  # type: ignore[attr-defined]


def test_diff_id_mismatch_is_an_error(world: dict[str, Path]) -> None:
    with pytest.raises(FailedPrecondition, match="diff ID"):
        apply(world, layer(entry("a", data=b"x")), expected_diff_id="sha256:" + "0" * 64)


def test_whiteouts_and_opaque_directories(world: dict[str, Path]) -> None:
    apply(
        world,
        layer(
            entry("a/", tarfile.DIRTYPE),
            entry("a/old", data=b"1"),
            entry("a/keep", data=b"2"),
            entry("b/", tarfile.DIRTYPE),
            entry("b/x", data=b"3"),
            entry("c", data=b"4"),
        ),
    )
    apply(
        world,
        layer(
            entry("a/.wh.old"), entry("b/.wh..wh..opq"), entry("b/new", data=b"5"), entry(".wh.c")
        ),
    )
    root = world["root"]
    assert sorted(p.name for p in (root / "a").iterdir()) == ["keep"]
    assert sorted(p.name for p in (root / "b").iterdir()) == ["new"]
    assert not (root / "c").exists()


def test_opaque_marker_after_new_entries_keeps_them(world: dict[str, Path]) -> None:
    apply(world, layer(entry("d/", tarfile.DIRTYPE), entry("d/lower", data=b"1")))
    apply(
        world,
        layer(entry("d/", tarfile.DIRTYPE), entry("d/fresh", data=b"2"), entry("d/.wh..wh..opq")),
    )
    assert sorted(p.name for p in (world["root"] / "d").iterdir()) == ["fresh"]


# --- breakouts: each leaves the sentinel outside the root untouched ----------------------


def test_absolute_path(world: dict[str, Path]) -> None:
    target = str(world["sentinel"])
    apply(world, layer(entry(target, data=b"pwned")))
    untouched(world)
    assert (world["root"] / target.lstrip("/")).read_bytes() == b"pwned"


def test_dot_dot_path(world: dict[str, Path]) -> None:
    apply(
        world,
        layer(
            entry("../outside/sentinel", data=b"pwned"),
            entry("a/../../../outside/sentinel", data=b"pwned"),
        ),
    )
    untouched(world)


def test_symlink_absolute(world: dict[str, Path]) -> None:
    apply(
        world,
        layer(
            entry("link", tarfile.SYMTYPE, linkname=str(world["outside"])),
            entry("link/sentinel", data=b"pwned"),
            entry("link/new", data=b"pwned"),
        ),
    )
    untouched(world)


def test_symlink_up_and_out(world: dict[str, Path]) -> None:
    apply(
        world,
        layer(
            entry("dir/", tarfile.DIRTYPE),
            entry("dir/link", tarfile.SYMTYPE, linkname="../../../../../outside"),
            entry("dir/link/sentinel", data=b"pwned"),
        ),
    )
    untouched(world)


def test_hardlink_up_and_out(world: dict[str, Path]) -> None:
    with pytest.raises(UnsafeLayer, match=r"'h' points to .*outside the layer"):
        apply(world, layer(entry("h", tarfile.LNKTYPE, linkname="../outside/sentinel")))
    with pytest.raises(UnsafeLayer, match=r"'h' points to .*not in the layer"):
        apply(world, layer(entry("h", tarfile.LNKTYPE, linkname=str(world["sentinel"]))))
    untouched(world)


def test_hardlink_through_a_symlink_then_chmod(world: dict[str, Path]) -> None:
    # CVE-2021-32760: a link to a symlink pointing out, then a mode change on it.
    apply(
        world,
        layer(
            entry("s", tarfile.SYMTYPE, linkname=str(world["sentinel"])),
            entry("h", tarfile.LNKTYPE, linkname="s"),
            entry("h", tarfile.LNKTYPE, linkname="s", mode=0o4777),
        ),
    )
    apply(world, layer(entry("s", tarfile.DIRTYPE, mode=0o777)))
    untouched(world)


def test_chmod_through_a_symlink(world: dict[str, Path]) -> None:
    apply(world, layer(entry("s", tarfile.SYMTYPE, linkname=str(world["sentinel"]))))
    apply(world, layer(entry("s", data=b"", mode=0o4777)))  # replaces, never follows
    untouched(world)
    assert stat.S_ISREG((world["root"] / "s").lstat().st_mode)


def test_directory_replacing_a_symlink(world: dict[str, Path]) -> None:
    apply(world, layer(entry("d", tarfile.SYMTYPE, linkname=str(world["outside"]))))
    apply(
        world, layer(entry("d/", tarfile.DIRTYPE, mode=0o777), entry("d/sentinel", data=b"pwned"))
    )
    untouched(world)
    assert (world["root"] / "d").is_dir() and not (world["root"] / "d").is_symlink()


@pytest.mark.parametrize("name", [".wh..", "a/.wh..", ".wh.", "a/.wh."])
def test_whiteout_of_a_parent_or_of_the_root(world: dict[str, Path], name: str) -> None:
    (world["root"] / "a").mkdir()
    with pytest.raises(UnsafeLayer):
        apply(world, layer(entry(name)))
    untouched(world)
    assert (world["root"] / "a").is_dir()


def test_whiteout_through_a_symlink(world: dict[str, Path]) -> None:
    apply(world, layer(entry("link", tarfile.SYMTYPE, linkname=str(world["outside"]))))
    apply(world, layer(entry("link/.wh.sentinel"), entry("link/.wh..wh..opq")))
    untouched(world)


def test_device_nodes_need_the_policy(world: dict[str, Path]) -> None:
    info, _ = entry("dev/sda", tarfile.BLKTYPE)
    info.devmajor, info.devminor = 8, 0
    result = apply(world, layer((info, b"")))
    assert not (world["root"] / "dev/sda").exists()
    assert result.skipped_devices == 1  # type: ignore[attr-defined]
    apply(world, layer((info, b"")), allow_devices=True)
    assert stat.S_ISBLK((world["root"] / "dev/sda").lstat().st_mode)


def test_garbage_is_a_clear_error(world: dict[str, Path]) -> None:
    with pytest.raises(InvalidArgument):
        apply(world, b"\x00garbage" * 100)


def test_write_diff_round_trips(tmp_path: Path) -> None:
    lower, upper, replay = tmp_path / "lower", tmp_path / "upper", tmp_path / "replay"
    for d in (lower, upper, replay):
        d.mkdir()
    for root in (lower, replay):
        (root / "keep").write_bytes(b"same")
        (root / "gone").write_bytes(b"x")
        (root / "dir").mkdir()
        (root / "dir/inner").write_bytes(b"y")
        (root / "changed").write_bytes(b"old")
    os.utime(replay / "changed", ns=(5, 5))
    os.utime(lower / "changed", ns=(5, 5))
    (upper / "keep").write_bytes(b"same")
    os.utime(upper / "keep", ns=(os.stat(lower / "keep").st_mtime_ns,) * 2)
    (upper / "changed").write_bytes(b"new!")
    (upper / "added").write_bytes(b"z")
    out = io.BytesIO()
    diff_id = write_diff(str(lower), str(upper), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = [m.name for m in tar]
    assert names == ["added", "changed", ".wh.dir", ".wh.gone"]  # "keep" is unchanged
    result = apply_layer(str(replay), io.BytesIO(out.getvalue()))
    assert result.diff_id == diff_id
    assert sorted(p.name for p in replay.iterdir()) == ["added", "changed", "keep"]
    assert (replay / "changed").read_bytes() == b"new!"


def test_a_diff_lists_paths_in_sorted_order_as_before(tmp_path: Path) -> None:
    """Diff IDs stay what earlier berths made: entries in the order of their sorted paths,
    where a sibling like "a-b" comes between "a" and what is in "a/"."""
    upper = tmp_path / "upper"
    (upper / "a" / "x").mkdir(parents=True)
    for name in ("a-b", "a.b", "a/y", "a/x/z", "b"):
        (upper / name).write_bytes(b"1")
    out = io.BytesIO()
    write_diff(None, str(upper), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        names = [m.name for m in tar]
    assert names == sorted(names) == ["a", "a-b", "a.b", "a/x", "a/x/z", "a/y", "b"]


def test_a_directory_replaced_by_a_file_diffs_to_a_layer_that_applies(tmp_path: Path) -> None:
    """A directory of the lower tree that the upper made a file: the file replaces it
    whole. Whiteouts were written beneath the file for the directory's entries, and the
    layer did not apply ("Not a directory")."""
    lower, upper, replay = tmp_path / "lower", tmp_path / "upper", tmp_path / "replay"
    for root in (lower, replay):
        (root / "d" / "sub").mkdir(parents=True)
        (root / "d" / "f").write_bytes(b"1")
        (root / "d" / "sub" / "g").write_bytes(b"2")
    upper.mkdir()
    (upper / "d").write_bytes(b"a file now")
    out = io.BytesIO()
    diff_id = write_diff(str(lower), str(upper), out)
    with tarfile.open(fileobj=io.BytesIO(out.getvalue())) as tar:
        assert [m.name for m in tar] == ["d"]
    assert apply_layer(str(replay), io.BytesIO(out.getvalue())).diff_id == diff_id
    assert (replay / "d").read_bytes() == b"a file now"


def test_diffing_a_large_tree_takes_memory_bounded_by_its_directories(tmp_path: Path) -> None:
    """A writable layer of 30,000 entries in 300 directories: the diff indexed both trees
    whole and tarfile kept every header it wrote (30 MB); now one directory is listed at
    a time and no header is kept."""
    import tracemalloc

    upper = tmp_path / "upper"
    for d in range(300):
        directory = upper / f"d{d:03d}"
        directory.mkdir(parents=True)
        for i in range(100):
            os.symlink("target", directory / f"l{i:03d}")  # quick to make, no content

    class Discard(io.RawIOBase):
        def writable(self) -> bool:
            return True

        def write(self, data: Any) -> int:
            return len(data)

    tracemalloc.start()
    try:
        write_diff(None, str(upper), Discard())
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 << 20, f"the diff peaked at {peak} bytes"
