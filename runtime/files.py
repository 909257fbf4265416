"""Files a job writes: atomic text / JSON files and atomic output folders with a completion marker;
and the JSONL rows jobs read (``read_jsonl``).

An output is a directory; it is *complete* when it holds the marker file ``.complete``,
written last (``atomic_dir`` writes it into a temporary sibling and renames the directory
into place, so a reader never sees a half-written output under the final name). Temporary
siblings left by a killed writer (``.<name>.partial-*``, ``.<name>.old-*``) are never
mistaken for outputs and are removed by ``clean_partials``.

Below the jobs layer (``runtime.jobs.common`` re-exports every name): the driver, the
prompts and the trainers import it without the job entry points. Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "COMPLETE_MARKER",
    "atomic_dir",
    "atomic_write_json",
    "atomic_write_text",
    "clean_partials",
    "fsync_tree",
    "is_complete",
    "link_tree",
    "mark_complete",
    "read_jsonl",
]

COMPLETE_MARKER = ".complete"
_PARTIAL = ".partial-"  # temporary sibling being written: .<name>.partial-<host>-<pid>-<hex>
_OLD = ".old-"  # a replaced output on its way out:       .<name>.old-<host>-<pid>-<hex>


# --------------------------------------------------------------------------- files


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory's fsync makes its entries durable)."""
    flags = os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0)
    try:
        fd = os.open(path, flags)
    except OSError:  # e.g. a platform that cannot open directories: best effort
        return
    try:
        os.fsync(fd)
    except OSError as exc:  # some filesystems refuse fsync on directories
        if exc.errno not in (errno.EINVAL, errno.EBADF, errno.EACCES):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file and directory under ``root`` (directories after their entries)."""
    for dirpath, _dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            _fsync_path(Path(dirpath) / name)
        _fsync_path(Path(dirpath))


def _tag() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}{_PARTIAL}{_tag()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)  # atomic on POSIX within one filesystem
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)
    return path


def atomic_write_json(path: str | os.PathLike[str], obj: Any, *, indent: int | None = 2) -> Path:
    """``atomic_write_text`` of ``obj`` as JSON (sorted keys, trailing newline)."""
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=True) + "\n")


def is_complete(path: str | os.PathLike[str]) -> bool:
    """True when ``path`` is a directory holding the completion marker."""
    p = Path(path)
    return p.is_dir() and (p / COMPLETE_MARKER).is_file()


def mark_complete(path: str | os.PathLike[str], **info: Any) -> Path:
    """Write the completion marker into the directory ``path`` (for writers that fill the
    final directory in place; ``atomic_dir`` calls this itself)."""
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "host": socket.gethostname(), **info}
    return atomic_write_json(Path(path) / COMPLETE_MARKER, record)


def link_tree(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Fill the existing folder ``dst`` with ``src``'s files as hard links, copies where the
    filesystem refuses links (another filesystem): an output that holds the same bytes as
    a folder of the run costs no copy (a 245 B model's weights are about 490 GB). Only for
    files nobody rewrites in place: a link shares its content."""
    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:
            shutil.copy2(a, b)

    for item in Path(src).iterdir():
        if item.is_dir():
            shutil.copytree(item, Path(dst) / item.name, copy_function=link_or_copy)
        else:
            link_or_copy(str(item), str(Path(dst) / item.name))


def clean_partials(final: str | os.PathLike[str]) -> list[Path]:
    """Remove temporary siblings of ``final`` left by a killed writer; returns what went.

    One writer per output at a time is assumed (the scheduler runs a job once at a time).
    """
    final = Path(final)
    removed: list[Path] = []
    if not final.parent.is_dir():
        return removed
    for prefix in (f".{final.name}{_PARTIAL}", f".{final.name}{_OLD}"):
        for stale in final.parent.glob(prefix + "*"):
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False  # filesystem without exchange (some network filesystems)
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], *, marker: bool = True,
               **marker_info: Any) -> Iterator[Path]:
    """Yield a temporary sibling of ``final`` to write into; on success it becomes ``final``.

    On a clean exit: the completion marker is written (last), every file and folder is
    fsynced, and the directory is renamed to ``final``. An existing ``final`` is replaced
    atomically where the filesystem can swap two directories (renameat2 exchange); elsewhere
    it is first renamed aside (a crash in that instant leaves no ``final`` and a stale
    ``.old`` sibling, never a mixed directory). On an exception the temporary is removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clean_partials(final)
    tmp = final.parent / f".{final.name}{_PARTIAL}{_tag()}"
    tmp.mkdir()
    try:
        yield tmp
        if marker:
            mark_complete(tmp, **marker_info)
        fsync_tree(tmp)
        if final.exists() or final.is_symlink():
            if final.is_dir() and not final.is_symlink() and _exchange(tmp, final):
                shutil.rmtree(tmp)  # tmp now holds the old output
            else:
                old = final.parent / f".{final.name}{_OLD}{_tag()}"
                os.rename(final, old)
                os.rename(tmp, final)
                if old.is_dir() and not old.is_symlink():
                    shutil.rmtree(old)
                else:
                    old.unlink()
        else:
            os.rename(tmp, final)
        _fsync_path(final.parent)
    except BaseException:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- reading


def read_jsonl(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield json.loads(line)
