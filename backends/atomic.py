"""Crash-safe writes: a kill -9 (or a full disk) in the middle of a save leaves the old file or
artifact or the new one, never a half-written file or plan and tensors from different saves.

`write_atomic` writes one file (a plan, a front, a plot) through a temporary file and a rename.

`replace_dir` builds the new artifact in a temporary sibling directory with a unique name,
fsyncs it, then swaps it for the target in one rename (Linux ``renameat2(RENAME_EXCHANGE)``
when the target exists) and deletes the old one. `read_files` reads an artifact's files
through one handle on its directory, so a save swapping it meanwhile cannot mix them either.

    >>> import tempfile
    >>> root = Path(tempfile.mkdtemp())
    >>> with replace_dir(root / "run", names={"a.txt"}) as tmp:
    ...     _ = (tmp / "a.txt").write_text("new")
    >>> read_files(root / "run", ["a.txt"])
    {'a.txt': b'new'}

Temporary directories are named ``.<target>.tmp-<pid>-<random>``; one left by a killed
process (its pid no longer runs) is removed by the next save into the same place.
"""

from __future__ import annotations

import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .base import PlanError

__all__ = ["read_files", "replace_dir", "write_atomic"]

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


@contextmanager
def replace_dir(directory: str | os.PathLike, *, names: set[str]) -> Iterator[Path]:
    """Yield an empty temporary directory; when the block ends without an error, it replaces
    ``directory`` as a whole. ``names`` are the entries an artifact may hold: an existing
    ``directory`` with anything else in it is refused (`PlanError`), as replacing it would
    delete those files.

    >>> with replace_dir("out/run1", names={"plan.json"}) as tmp:
    ...     _ = (tmp / "plan.json").write_text("{}")
    >>> sorted(p.name for p in Path("out/run1").iterdir())
    ['plan.json']
    """
    target = _followed(Path(directory).absolute())
    mode = _check_target(target, names)
    target.parent.mkdir(parents=True, exist_ok=True)
    _sweep(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, mode)
        _file_modes(tmp, target)
        _fsync_tree(tmp)
        _commit(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after the commit: the old artifact


def read_files(directory: str | os.PathLike, names: Iterable[str]) -> dict[str, bytes]:
    """The bytes of ``names`` (paths relative to ``directory``), all from one version of it.

    A missing file is `FileNotFoundError` naming it; a save that swapped the directory between
    two reads is retried.
    """
    directory, names = Path(directory), list(names)
    for _attempt in range(3):
        try:
            fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"no artifact directory {directory}") from None
        except NotADirectoryError:
            raise NotADirectoryError(f"{directory} is a file, not an artifact directory") from None
        try:
            return {name: _read_at(fd, name) for name in names}
        except FileNotFoundError as e:
            missing = e.filename
            if (directory / missing).exists():  # swapped by a concurrent save while reading: read again
                continue
            raise FileNotFoundError(f"{directory} has no {missing}") from None
        finally:
            os.close(fd)
    raise PlanError(f"{directory} kept changing while it was read (concurrent saves?); read it again")


def _read_at(dir_fd: int, name: str) -> bytes:
    try:
        fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, "missing", name) from None
    with os.fdopen(fd, "rb") as f:
        return f.read()


def _followed(target: Path) -> Path:
    """The folder a symbolic link ``target`` points to (the artifact goes there; the link
    stays); a link to nothing is an error saying so, not a half-done rename."""
    if not target.is_symlink():
        return target
    real = target.resolve()
    if not real.exists():
        raise PlanError(
            f"{target} is a symbolic link to {os.readlink(target)}, which does not exist: create that folder "
            "(the artifact is written into it), or remove the link and save again"
        )
    return real


def _file_modes(tmp: Path, target: Path) -> None:
    """Each new file gets the mode of the one it replaces, else what the umask gives a new file
    (writers such as safetensors create theirs private to their owner, next to a plan.json that
    is not: another account could read the plan but not load the weights)."""
    umask = os.umask(0)
    os.umask(umask)
    for dirpath, _dirs, files in os.walk(tmp):
        for name in files:
            old = target / Path(dirpath).relative_to(tmp) / name
            os.chmod(os.path.join(dirpath, name), old.stat().st_mode & 0o7777 if old.is_file() else 0o666 & ~umask)


def _check_target(target: Path, names: set[str]) -> int:
    """The mode the new directory gets (the old one's, else the umask's); refuses a target
    that is a file or holds entries an artifact does not."""
    if not target.exists():
        umask = os.umask(0)
        os.umask(umask)
        return 0o777 & ~umask
    if not target.is_dir():
        raise PlanError(f"{target} is a file; give a directory for the artifact")
    foreign = sorted(p.name for p in target.iterdir() if p.name not in names)
    if foreign:
        raise PlanError(
            f"{target} holds {foreign[:10]}, which are not part of this artifact; saving replaces the "
            "directory as a whole, so save into a new or empty directory (or move those files out)"
        )
    return target.stat().st_mode & 0o7777


def _sweep(target: Path) -> None:
    """Remove temporary directories of ``target`` left by processes that no longer run."""
    for p in target.parent.glob(f".{target.name}.tmp-*"):
        pid = p.name[len(target.name) + 6 :].split("-")[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(dirpath)


def _fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename still orders the writes
        pass
    finally:
        os.close(fd)


def _commit(tmp: Path, target: Path) -> None:
    """Put ``tmp`` at ``target``; the previous artifact, if any, ends up at ``tmp``."""
    try:
        os.rename(tmp, target)  # no target (or an empty one): one atomic rename
    except OSError as e:
        if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
            raise
        _exchange(tmp, target)
    _fsync_dir(target.parent)


def _exchange(a: Path, b: Path) -> None:
    """Swap two directories atomically; where the OS cannot, move ``b`` aside first (a kill
    between the two renames then leaves the old artifact at ``a``, not at ``b``)."""
    rename2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None) if os.name == "posix" else None
    if rename2 is not None:
        if rename2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP):  # other errors are real
            raise OSError(err, f"cannot replace {b}: {os.strerror(err)}")
    aside = a.with_name(a.name + "-old")
    os.rename(b, aside)
    os.rename(a, b)
    os.rename(aside, a)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename. The
    file gets the mode of the one it replaces, else what the umask gives a new file (a bare
    temporary file would be private to its owner).

    >>> import tempfile
    >>> write_atomic(Path(tempfile.mkdtemp()) / "plan.json", "{}").read_text()
    '{}'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask
