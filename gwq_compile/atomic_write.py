"""Crash-safe writes, the one home of them: a file (:func:`write_text`, :func:`write_json`)
goes through a temporary file and ``os.replace``; a folder (:func:`write_folder`) is built
beside the old one and swapped in with one atomic rename (Linux
``renameat2(RENAME_EXCHANGE)``).  A process killed at any moment leaves the old or the new
version, never neither and never a partial file.

Example:
    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "r.json"
    >>> write_json(p, {"a": 1}).read_text()
    '{\\n  "a": 1\\n}\\n'
    >>> folder = write_folder(p.parent / "ck", lambda tmp: (tmp / "w.txt").write_text("x"))
    >>> sorted(f.name for f in folder.iterdir())
    ['w.txt']
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

__all__ = ["BACKUP_MARK", "TEMP_MARK", "remove_stale_temporaries", "write_folder", "write_json", "write_text"]

# Temporary sibling folders of a folder write in progress: ".<name>.gwq-tmp-XXXX" (the new
# folder being built) and ".<name>.gwq-old-XXXX" (the old one, only where no atomic exchange exists).
TEMP_MARK, BACKUP_MARK = ".gwq-tmp-", ".gwq-old-"
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the folders ``a`` and ``b``; False where the OS or filesystem cannot."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, f"could not swap {a} and {b}: {os.strerror(err)}")


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``: never a partial file."""
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot write {str(path)!r}: the folder {str(path.parent)!r} does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        # mkstemp creates 0600; give the result the permissions a plain open() would have.
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, obj: object) -> Path:
    """:func:`write_text` of ``json.dumps(obj, indent=2)``."""
    return write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def _carry_over(old: Path, new: Path, replaced: Callable[[str], bool]) -> None:
    """Hard-link into ``new`` what ``old`` holds that ``new`` does not and that is not ``replaced``."""
    for entry in old.iterdir():
        target = new / entry.name
        if target.exists() or target.is_symlink() or replaced(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.copytree(entry, target, symlinks=True, copy_function=os.link)
        elif entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        else:
            os.link(entry, target)


def remove_stale_temporaries(out: Path) -> None:
    """Delete what an interrupted write of the folder ``out`` left beside it (put a lone backup
    back first) and the hidden ``.tmp`` files an interrupted :func:`write_text` left inside it."""
    siblings = [p for p in out.parent.iterdir() if p.name.startswith((f".{out.name}{TEMP_MARK}", f".{out.name}{BACKUP_MARK}"))]
    backups = [p for p in siblings if p.name.startswith(f".{out.name}{BACKUP_MARK}")]
    if not out.exists() and backups and (backups[0] / "old").is_dir():  # killed between the fallback's two renames
        os.rename(backups[0] / "old", out)
    for p in siblings:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    if out.is_dir():
        for p in out.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink()


def write_folder(out: str | os.PathLike, build: Callable[[Path], None], replaced: Callable[[str], bool] = lambda name: False) -> Path:
    """Build a folder with ``build(tmp)`` and put it at ``out`` in one atomic step.

    A process killed at any moment leaves ``out`` as it was or as built, never neither.
    The new folder and files get normal permissions (``0o777``/``0o666`` less the umask, or
    the old folder's mode); everything in an old ``out`` that ``build`` did not write and whose
    name ``replaced`` does not claim is kept.
    """
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{str(out)!r} exists and is not a folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}{TEMP_MARK}", dir=out.parent))
    try:
        build(tmp)
        written = [p for p in tmp.rglob("*") if p.is_file() and not p.is_symlink()]
        if out.is_dir():
            _carry_over(out, tmp, replaced)
        mask = _umask()
        for p in written:
            os.chmod(p, 0o666 & ~mask)
            _fsync(p)
        os.chmod(tmp, (out.stat().st_mode & 0o7777) if out.is_dir() else 0o777 & ~mask)
        _fsync(tmp)
        if not out.exists():
            os.rename(tmp, out)
        elif _exchange(tmp, out):
            shutil.rmtree(tmp)  # now the old folder
        else:  # no atomic exchange here: old aside, new in; a kill in between is repaired by the next save
            backup = Path(tempfile.mkdtemp(prefix=f".{out.name}{BACKUP_MARK}", dir=out.parent))
            os.rename(out, backup / "old")
            os.rename(tmp, out)
            shutil.rmtree(backup)
        _fsync(out.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
