"""One run per ``--output_dir``/``--output_name``: ``<output_dir>/<output_name>.lock``.

The lock file holds the PID and host of the run. A second run is refused; a lock left by a process
that no longer exists on this host is taken over with a warning. The lock is released when the run
ends, on success or error (and at interpreter exit as a last resort).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

from tsumugi.errors import UserError

logger = logging.getLogger(__name__)

_held: dict[Path, OutputLock] = {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputLock:
    def __init__(self, path: Path, content: dict) -> None:
        self.path, self.content = path, content

    @classmethod
    def acquire(cls, output_dir: str | Path, output_name: str) -> OutputLock:
        path = Path(output_dir) / f"{output_name}.lock"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output_dir {path.parent} cannot be created: {e.strerror or e}") from e
        earlier = _held.pop(path.resolve(), None)
        if earlier is not None:  # an earlier run in this process that ended without releasing it
            earlier.release()
        content = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                cls._take_over_if_stale(path, content["host"])
                continue
            except OSError as e:
                raise UserError(f"cannot create the lock file {path} in --output_dir: {e.strerror or e}") from e
            with os.fdopen(fd, "w") as f:
                json.dump(content, f)
            lock = cls(path, content)
            _held[path.resolve()] = lock
            return lock
        raise UserError(f"cannot take the lock {path} (it keeps reappearing)")

    @staticmethod
    def _take_over_if_stale(path: Path, host: str) -> None:
        try:
            holder = json.loads(path.read_text(encoding="utf-8"))
            pid, holder_host = int(holder["pid"]), str(holder["host"])
        except FileNotFoundError:
            return
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{path} exists but is not a tsumugi lock file ({e}); if no other run writes to "
                            "this --output_dir/--output_name, delete it") from e
        if holder_host == host and not _alive(pid):
            logger.warning("%s: taking over the lock of process %d, which no longer runs", path, pid)
            path.unlink(missing_ok=True)
            return
        raise UserError(
            f"another run (process {pid} on {holder_host}, started {holder.get('started', '?')}) is writing to "
            f"{path.parent} with --output_name {path.name.removesuffix('.lock')} (lock file {path}); wait for "
            "it to end or choose another --output_dir/--output_name"
        )

    def release(self) -> None:
        _held.pop(self.path.resolve(), None)
        try:
            if json.loads(self.path.read_text(encoding="utf-8")).get("pid") == self.content["pid"]:
                self.path.unlink()
        except (OSError, ValueError, AttributeError):
            pass


@atexit.register
def _release_all() -> None:
    for lock in list(_held.values()):
        lock.release()
