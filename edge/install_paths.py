"""Files inside a root directory, as the machine it will become sees them.

`edge install --root R` writes into an image being built (an SD card's root, a
test's directory). Its symlinks were made for that machine: R/var/lib/edge ->
/data/edge means R/data/edge, not /data/edge of the machine doing the install.
`inside()` follows links the way that machine's kernel will, an absolute target
from R, and refuses a path that climbs out of R; writes go to a temporary file
beside the target and are renamed over it, so a rename replaces a link rather
than writing through it, and a reader (or a second install) never sees half a
file. One install at a time holds `locked(R)`.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path, PurePosixPath

from edge.errors import EdgeError

__all__ = ["InstallError", "inside", "locked", "make_dirs", "write_file"]

_MAX_LINKS = 40  # as Linux's ELOOP


class InstallError(EdgeError):
    """`edge install` or `edge uninstall` cannot go on: a path, account or file is not right."""


def _parts(path: str) -> list[str]:
    return [part for part in PurePosixPath(path).parts if part not in ("/", ".")]


def inside(root: Path, path: str, *, follow_last: bool = True) -> Path:
    """The real path under `root` that the absolute `path` names on the image.

    With `follow_last=False` a link at the last component is the result itself
    (to remove it, or to replace it with a file).
    """
    pending = _parts(path)
    last = pending.pop() if not follow_last and pending else None
    where: list[str] = []
    links = 0
    via = ""
    while pending:
        part = pending.pop(0)
        if part == "..":
            if not where and root != Path("/"):  # at / itself, '..' is / again
                raise InstallError(f"{path} in {root} leads out of it{via}: edge install"
                                   " reads and writes only inside the root")
            del where[-1:]
            continue
        here = root.joinpath(*where, part)
        try:
            target = os.readlink(here)
        except OSError:  # not a link, or not there yet (then nothing under it is a link)
            where.append(part)
            continue
        links += 1
        if links > _MAX_LINKS:
            raise InstallError(f"{here}: too many levels of symbolic links")
        via = f" (through the link {here} -> {target})"
        if target.startswith("/"):
            where = []
        pending[:0] = _parts(target)
    found = root.joinpath(*where)
    return found / last if last is not None else found


def make_dirs(path: Path, mode: int = 0o755) -> None:
    """Create `path` and its missing parents with `mode` (not what root's umask leaves)."""
    missing: list[Path] = []
    at = path
    while not at.exists():
        if at.is_symlink():
            raise InstallError(f"{at} is a link to nothing ({os.readlink(at)})")
        missing.append(at)
        at = at.parent
    if not at.is_dir():
        raise InstallError(f"{at} is not a directory")
    for directory in reversed(missing):
        directory.mkdir()
        directory.chmod(mode)


def write_file(path: Path, text: str, mode: int, *, replace: bool = True) -> bool:
    """Write `path` whole through a temporary file and a rename; return whether it was written.

    With `replace=False` an existing file wins, even one a concurrent install
    made a moment ago (the new file is linked in only where nothing is).
    """
    make_dirs(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
            os.fchmod(file.fileno(), mode)
            file.flush()
            os.fsync(file.fileno())  # a device may lose power right after an install
        if replace:
            os.replace(tmp, path)
            return True
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


@contextmanager
def locked(root: Path, waiting: Callable[[], None]) -> Iterator[None]:
    """Hold the install lock of `root`: a flock on the directory itself, so the image keeps
    no lock file. `waiting()` is called once if another install holds it."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)
