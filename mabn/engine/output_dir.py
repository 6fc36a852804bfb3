"""What a training run's ``OUTPUT_DIR`` guarantees: one trainer at a time, results written whole and readable,
and ``"finished": true`` only beside the files it vouches for.

* :class:`OutputDirLock`: ``OUTPUT_DIR/.lock`` names the host and pid of the trainer that holds the directory. A
  second trainer is refused while the holder is alive; a lock left by a dead process on this host (or, from
  another host, one whose heartbeat stopped more than :data:`STALE_AFTER_S` ago) is taken over.
* :func:`write_file_atomically`: a results file is written beside its target and renamed over it, created like
  any other file (the umask applies), and a full disk is reported as such, naming the file.
* :func:`run_finished`: the test that launchers use to skip a run: the flag in ``metrics.json`` *and* the final
  model on disk.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import threading
import time
import uuid
from typing import Callable, Optional

LOCK_FILE = ".lock"
METRICS_FILE = "metrics.json"
FINAL_MODEL = "model_final.pth"
STALE_AFTER_S = 600.0  # a lock of another host whose heartbeat is older than this is abandoned
HEARTBEAT_S = 60.0


class OutputError(OSError):
    """An output file that cannot be written (full disk, read-only directory); the message names the file."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno 28]"
        return self.strerror or super().__str__()


class OutputDirLockedError(RuntimeError):
    """Another trainer, still alive, holds the output directory."""


def write_error(path: str, error: OSError, kept: str = "") -> OutputError:
    """``error`` (from writing ``path``) as an :class:`OutputError` that names the file and the cause."""
    cause = "no space left on device" if error.errno == errno.ENOSPC else (error.strerror or str(error))
    note = f"; {kept}" if kept else ""
    return OutputError(error.errno, f"cannot write {path}: {cause}{note}")


def write_file_atomically(path: str, write: Callable, binary: bool = False, kept: str = "") -> str:
    """``write(file)`` into a temporary file beside ``path``, flushed to disk, then renamed over ``path``: a reader or
    a crash never sees half a file, and the previous ``path`` stays until the new one is whole. The file is created
    with ``open`` (mode 0666 less the umask, like every other output). Any OSError becomes an :class:`OutputError`
    naming ``path`` (``kept`` says what is left, e.g. the previous checkpoint)."""
    directory = os.path.dirname(os.path.abspath(path))
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.makedirs(directory, exist_ok=True)
        with open(tmp, "wb" if binary else "w") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise write_error(path, e, kept) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def write_json_atomically(payload, path: str, **dump_options) -> str:
    """``payload`` as JSON (one trailing newline) through :func:`write_file_atomically`."""
    def write(f):
        json.dump(payload, f, **dump_options)
        f.write("\n")

    return write_file_atomically(path, write)


def run_finished(directory: str) -> bool:
    """Whether the run in ``directory`` is done: ``metrics.json`` says ``"finished": true`` and the final model it
    vouches for exists (a run stopped between the two, e.g. by a full disk, is not finished)."""
    try:
        with open(os.path.join(directory, METRICS_FILE)) as f:
            flag = json.load(f).get("finished")
    except (OSError, ValueError, AttributeError):
        return False
    final = os.path.join(directory, FINAL_MODEL)
    return bool(flag) and os.path.isfile(final) and os.path.getsize(final) > 0


# ----------------------------------------------------------------------------- the lock
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _read_lock(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            holder = json.load(f)
        return holder if isinstance(holder, dict) else {}
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable or half written: treated as abandoned


def _stale(holder: dict, path: str) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        return not _pid_alive(holder["pid"])
    try:
        return time.time() - os.path.getmtime(path) > STALE_AFTER_S
    except FileNotFoundError:
        return True


class OutputDirLock:
    """``OUTPUT_DIR/.lock`` held by this process from :meth:`acquire` to :meth:`release`, its mtime refreshed every
    :data:`HEARTBEAT_S` seconds so that a trainer on another host can tell a live holder from a dead one."""

    def __init__(self, output_dir: str):
        self.path = os.path.join(output_dir, LOCK_FILE)
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: Optional[threading.Thread] = None

    def acquire(self) -> "OutputDirLock":
        me = {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token, "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        directory = os.path.dirname(self.path)
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as e:  # a file where the directory should be, no permission to create it
            kind = "a file, not a directory" if os.path.isfile(directory) else (e.strerror or str(e))
            raise OutputError(e.errno, f"OUTPUT_DIR {directory} cannot be used: {kind}") from None
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read_lock(self.path)
            if holder is not None and not _stale(holder, self.path):
                raise OutputDirLockedError(
                    f"OUTPUT_DIR {os.path.dirname(self.path)} is in use by another trainer (pid {holder.get('pid')} on "
                    f"host {holder.get('host')}, since {holder.get('since')}); choose another OUTPUT_DIR, or stop that "
                    f"run (if it is dead on another host, remove {self.path})") from None
            write_json_atomically(me, self.path)  # a stale lock is taken over
            if (_read_lock(self.path) or {}).get("token") != self.token:  # another trainer took it over first
                raise OutputDirLockedError(f"OUTPUT_DIR {os.path.dirname(self.path)} was just taken by another trainer") from None
        except OSError as e:  # a read-only OUTPUT_DIR
            raise write_error(self.path, e) from None
        else:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        self._heartbeat = threading.Thread(target=self._beat, name="output-dir-lock", daemon=True)
        self._heartbeat.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError:
                pass  # a vanished lock shows at release; the heartbeat must never kill a run

    def release(self) -> None:
        self._stop.set()
        if (_read_lock(self.path) or {}).get("token") == self.token:
            os.remove(self.path)
