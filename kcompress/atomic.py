"""The one atomic writer, for files and folders: write beside the target, fsync, rename into place, fsync the folder.

:func:`atomic_path` yields a temporary path that a library writes to (``np.savez_compressed``, ``fig.savefig``,
``model.save``, ``save_weights``); on a clean exit the result is committed. A reader sees the old output or the new
one, never half of one, and a kill at any point leaves the old output in place. Outputs get the mode a plain
``open()`` would give them under the user's umask (files ``0o666 & ~umask``, folders ``0o777 & ~umask``), not the
owner-only mode of ``mkstemp``/``mkdtemp``.

Gotchas:

- The temporary path keeps the target's file name inside a hidden ``.kcompress-*`` folder beside the target (same
  file system, so the rename is atomic; same extension, so libraries that choose the format by extension, or that
  append one such as ``np.savez``, do the right thing). A kill leaves that folder behind; it is never read.
- Replacing an existing folder (a SavedModel) swaps the two atomically where Linux allows (``renameat2`` with
  ``RENAME_EXCHANGE``) and then deletes the old one. Elsewhere the old folder is first renamed aside, the new one
  renamed into place, then the old one deleted: a kill in the tiny window between those two renames leaves no
  folder at the target, and the old one complete in the hidden ``.kcompress-*`` folder beside it.
- No TensorFlow here; :mod:`kcompress.io` re-exports these for model files.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from kcompress.errors import KcompressError

__all__ = [
    "current_umask",
    "file_mode",
    "dir_mode",
    "check_output_path",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
]

_PREFIX = ".kcompress-"


def current_umask() -> int:
    """The process umask, read without changing it where ``/proc`` allows (the classic set-and-restore otherwise)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: ``0o666 & ~umask`` (0644 under umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """The mode ``os.mkdir`` gives a new folder: ``0o777 & ~umask`` (0755 under umask 022)."""
    return 0o777 & ~current_umask()


def check_output_path(path: str, overwrite: bool) -> None:
    """Refuses an existing output unless ``overwrite``; the message names the flag."""
    if os.path.lexists(path) and not overwrite:
        raise KcompressError(f"{path} exists; pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KcompressError(f"cannot write {path}: folder {parent} does not exist")


def _fsync_path(path: str, directory: bool) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the data itself was synced
        if not directory:
            raise
    finally:
        os.close(fd)


def _finish(tmp: str) -> None:
    """fsync and set umask modes on everything under ``tmp`` (a file or a folder)."""
    fmode, dmode = file_mode(), dir_mode()
    if os.path.isdir(tmp) and not os.path.islink(tmp):
        for root, dirs, files in os.walk(tmp):
            for name in files:
                p = os.path.join(root, name)
                if not os.path.islink(p):
                    os.chmod(p, fmode)
                    _fsync_path(p, directory=False)
            for name in dirs:
                os.chmod(os.path.join(root, name), dmode)
            _fsync_path(root, directory=True)
        os.chmod(tmp, dmode)
    elif os.path.isfile(tmp):
        os.chmod(tmp, fmode)
        _fsync_path(tmp, directory=False)
    else:
        raise KcompressError(f"nothing was written to {tmp}")


def _exchange(a: str, b: str) -> bool:
    """Atomically swaps two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``); False where unsupported."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    import errno

    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), b)


def _commit(tmp: str, path: str, workdir: str) -> None:
    """Moves the finished ``tmp`` to ``path`` (replacing what is there) and fsyncs the parent folder."""
    parent = os.path.dirname(os.path.abspath(path))
    replacing_dir = os.path.lexists(path) and (os.path.isdir(path) or os.path.isdir(tmp))
    if not replacing_dir:
        os.replace(tmp, path)  # a file replaces a file atomically
    elif _exchange(tmp, path):
        pass  # the old output is now at tmp, removed with workdir
    else:
        aside = os.path.join(workdir, "old")
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
    _fsync_path(parent, directory=True)


@contextlib.contextmanager
def atomic_path(path: str, overwrite: bool = False) -> Iterator[str]:
    """Yields a temporary path to write a file or a folder to; commits it to ``path`` when the block ends cleanly.

    Raises :class:`~kcompress.errors.KcompressError` before anything is written when ``path`` exists and not
    ``overwrite``. An exception in the block (or in the commit) leaves ``path`` as it was."""
    path = os.fspath(path).rstrip("/") or "/"
    check_output_path(path, overwrite)
    parent = os.path.dirname(os.path.abspath(path))
    workdir = tempfile.mkdtemp(prefix=_PREFIX, dir=parent)
    try:
        tmp = os.path.join(workdir, os.path.basename(path))
        yield tmp
        _finish(tmp)
        _commit(tmp, path, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def atomic_write_bytes(path: str, data: bytes, overwrite: bool = False) -> None:
    """Writes ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path, overwrite) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def atomic_write_text(path: str, text: str, overwrite: bool = False) -> None:
    """Writes ``text`` (UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
