"""Files a run reads and folders it writes, checked before anything is loaded.

Inputs must be regular files: a FIFO, a device or a folder where a file is expected is refused by
``os.stat`` alone, before anything opens it (opening a FIFO for reading blocks until a writer
appears, so an unchecked one hangs the run). Output folders must exist or be creatable, be folders,
and be writable (a real temporary file is created and removed); free space below the estimated size
of one save is a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
from pathlib import Path

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

_NON_REGULAR = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def describe_mode(mode: int) -> str:
    """``a FIFO (named pipe)``, ``a folder``... for an ``st_mode``."""
    for test, text in _NON_REGULAR:
        if test(mode):
            return text
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def require_file(path: str | os.PathLike[str], flag: str, what: str = "file") -> Path:
    """``path`` as a Path if it is a regular file (symlinks followed); else a UserError naming ``flag``.

    Only ``os.stat`` is called: a FIFO or device is never opened.
    """
    p = Path(path).expanduser()
    try:
        mode = os.stat(p).st_mode
    except FileNotFoundError:
        raise UserError(f"{flag}: {p} does not exist") from None
    except OSError as exc:
        raise UserError(f"{flag}: cannot access {p} ({exc.strerror or exc})") from None
    if not stat.S_ISREG(mode):
        raise UserError(f"{flag}: {p} is {describe_mode(mode)}; expected a regular {what}")
    return p


def require_file_or_folder(path: str | os.PathLike[str], flag: str, what: str = "file") -> Path:
    """Like :func:`require_file`, but a folder is accepted too (diffusers model folders)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    return require_file(p, flag, what + " or folder")


def free_bytes(folder: Path) -> int:
    """Free space for an unprivileged writer in ``folder``'s file system."""
    return shutil.disk_usage(folder).free


def warn_if_low_space(folder: Path, flag: str, need_bytes: int, what: str) -> bool:
    """Log a warning when ``folder`` has less free space than ``need_bytes``; True if it warned."""
    if need_bytes <= 0:
        return False
    free = free_bytes(folder)
    if free >= need_bytes:
        return False
    logger.warning("%s: %s has %s free, less than the about %s of %s; the save will fail unless space is "
                   "freed", flag, folder, format_size(free), format_size(need_bytes), what)
    return True


def _probe_write(folder: Path, flag: str) -> None:
    try:
        fd, name = tempfile.mkstemp(prefix=".tsumugi-write-check-", dir=folder)
    except OSError as exc:
        raise UserError(f"{flag}: cannot write in {folder} ({exc.strerror or exc}); expected a writable folder") \
            from None
    try:
        os.write(fd, b"x")
        os.fsync(fd)
    except OSError as exc:
        raise UserError(f"{flag}: cannot write in {folder} ({exc.strerror or exc}); expected a writable folder") \
            from None
    finally:
        os.close(fd)
        os.unlink(name)  # ours: created just now by mkstemp


def _mode_or_none(p: Path, flag: str) -> int | None:
    """``st_mode`` of an output path, ``None`` when it does not exist yet."""
    try:
        return os.stat(p).st_mode
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UserError(f"{flag}: cannot access {p} ({exc.strerror or exc})") from None


def require_output_dir(path: str | os.PathLike[str], flag: str, need_bytes: int = 0, what: str = "one save") -> Path:
    """Create ``path`` if needed, prove it is a writable folder, warn when it lacks room for ``what``."""
    p = Path(path).expanduser()
    mode = _mode_or_none(p, flag)
    if mode is not None and not stat.S_ISDIR(mode):
        raise UserError(f"{flag}: {p} is {describe_mode(mode)}; expected a folder (existing or to be created)")
    if mode is None:
        try:
            p.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"{flag}: cannot create the folder {p} ({exc.strerror or exc})") from None
    _probe_write(p, flag)
    warn_if_low_space(p, flag, need_bytes, what)
    return p


def require_output_file(path: str | os.PathLike[str], flag: str, need_bytes: int = 0, what: str = "the file") -> Path:
    """An output file: not a folder (or other non-file), its folder writable with room for ``what``."""
    p = Path(path).expanduser()
    mode = _mode_or_none(p, flag)
    if mode is not None and not stat.S_ISREG(mode):
        raise UserError(f"{flag}: {p} is {describe_mode(mode)}; expected the name of a file to write")
    require_output_dir(p.parent if str(p.parent) else Path("."), flag, need_bytes, what)
    return p
