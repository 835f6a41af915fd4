"""Crash-safe file helpers: atomic replacement, JSON, JSON lines, writability checks.

Every file the package writes goes through ``atomic_write``: a kill at any moment leaves either
the old file or the new one, never a torn mix.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import tempfile
import threading
from pathlib import Path
from typing import Callable

from .errors import UserError

_UMASK = os.umask(0)
os.umask(_UMASK)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable: without this a power cut can undo it."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems cannot fsync a directory; the rename itself is still atomic
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and move the result to ``path`` only once it is complete on disk."""
    atomic_write_together([(path, write)])


def atomic_write_together(writes: list[tuple[Path, Callable[[str], object]]]) -> None:
    """``atomic_write`` of several files, which are moved into place together only once all are
    complete on disk (a SIGINT or SIGTERM waits for the renames): the checkpoints of runs trained
    together, where a kill between two runs' writes used to leave one run ahead of the others.
    Before the first rename, a journal of them is written where the files' directories meet, so
    that the next process to lock a directory above them finishes the renames that a SIGKILL or a
    power cut interrupted (``remove_stale_temporaries``)."""
    staged: list[tuple[str, Path]] = []
    journal = None
    try:
        for path, write in writes:
            path = Path(path)
            if "\0" in str(path):  # the OS's "embedded null byte" is a ValueError, not an OSError
                raise UserError(f"cannot write {str(path)!r}: a path cannot hold a NUL character")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
                os.close(fd)
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror}") from None
            staged.append((tmp, path))
            try:
                write(tmp)
                os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
            except OSError as e:
                raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        if len(staged) > 1:
            journal = _write_journal(staged)
        with stop_signals_deferred():  # a signal held back until the renames are durable too
            for tmp, path in staged:
                try:
                    os.replace(tmp, path)
                except OSError as e:
                    raise UserError(f"cannot write {path}: {e.strerror or e}") from None
            for directory in {path.parent for _, path in staged}:
                fsync_dir(directory)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):  # not moved into place: a failed or interrupted write
                _remove(tmp)
        if journal is not None:
            _remove(journal)


_JOURNAL_PREFIX = ".together."  # a temporary's name (is_temporary): what a lock does not finish, it removes


def _write_journal(staged: list[tuple[str, Path]]) -> str:
    """A durable list of ``staged``'s renames, in the directory where their directories meet,
    with names relative to it."""
    base = Path(os.path.commonpath([str(path.parent.resolve()) for _, path in staged]))
    pairs = [[os.path.relpath(Path(tmp).resolve(), base), os.path.relpath(path.parent.resolve() / path.name, base)] for tmp, path in staged]
    try:
        fd, journal = tempfile.mkstemp(dir=base, prefix=_JOURNAL_PREFIX, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(pairs, f)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise UserError(f"cannot write {base}: {e.strerror or e}") from None
    fsync_dir(base)
    return journal


def _finish_journaled_renames(journal: Path) -> None:
    """Finish the renames of an ``atomic_write_together`` call that a killed process left (its
    files were complete on disk before its first rename); an unreadable journal finishes none."""
    try:
        pairs = json.loads(journal.read_text())
    except (OSError, ValueError):
        return
    base = journal.parent
    if not (isinstance(pairs, list) and all(isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs)):
        return
    moved = set()
    for tmp, path in pairs:
        if any(Path(n).is_absolute() or ".." in Path(n).parts for n in (tmp, path)):
            continue  # not one this package wrote
        if (base / tmp).is_file():
            try:
                os.replace(base / tmp, base / path)
            except OSError:
                continue  # e.g. a directory in the way now: the temporary is removed, the old file stays
            moved.add((base / path).parent)
    for parent in moved:
        fsync_dir(parent)


def atomic_copy(source: Path, path: Path) -> None:
    """Copy ``source`` to ``path`` with ``atomic_write``: a reader never sees half a copy."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


class StopSignals:
    """SIGINT and SIGTERM set a flag that the holder reads when it can act on it: the training loop
    after each step, so a preempted run checkpoints the step it finished instead of dying
    mid-write. Handlers are installed only in the main thread (Python's rule; Python runs them
    there whichever thread the OS delivers to) and where Python installed the ones they replace,
    which are restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                if signal.getsignal(sig) is not None:  # one Python did not install could not be put back
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, exc_type, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if exc_type is None and self.received is not None:
            # Received after the holder last looked (during a run's final checkpoint or grid): it
            # is handled now, as it would have been without this block, never dropped.
            signal.raise_signal(self.received)


@contextlib.contextmanager
def stop_signals_deferred():
    """SIGINT and SIGTERM held back until the block ends, then handled as they would have been: a
    few renames that make one change must all happen, or none."""
    stops = StopSignals()
    try:
        with stops:
            yield
    except BaseException:
        if stops.received is not None:  # the renames failed: the signal still takes effect
            signal.raise_signal(stops.received)
        raise


def replace_set(directory: Path, names: list[str], write, *, busy: str | None = None) -> list[Path]:
    """Write files that belong together (``sample``'s grid, arrays and animation; an export's
    weights, config and guidance) as one set: ``write(staging)`` writes those of ``names`` it
    makes, by their own names, into a temporary directory beside them; then they replace their
    old versions together, and the other ``names`` (an earlier set's) are removed. A SIGINT or
    SIGTERM waits for the renames, so an interruption leaves the old set or the new one, whole,
    and no temporary behind. One set is written into a directory at a time, so that two writers'
    renames never interleave: the second waits for the first, or, given ``busy``, is refused with
    that message. Returns the paths written."""
    directory = Path(directory)
    with _one_writer(directory, busy):
        return _replace_set(directory, names, write)


@contextlib.contextmanager
def _one_writer(directory: Path, busy: str | None):
    """An exclusive ``flock`` on the directory itself, not on a lock file (which a Hub clone of an
    export would push)."""
    import fcntl

    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (fcntl.LOCK_NB if busy else 0))
        except BlockingIOError:
            raise UserError(busy) from None
        yield
    finally:
        os.close(fd)  # releases the lock


def _replace_set(directory: Path, names: list[str], write) -> list[Path]:
    for stale in directory.glob(".set.*.tmp"):  # a staging directory its killed (SIGKILL) writer left
        if stale.is_dir() and not _process_alive(stale.name.split(".")[2]):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(dir=directory, prefix=f".set.{os.getpid()}.", suffix=".tmp"))
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror}") from None
    try:
        write(staging)
        made = [name for name in names if (staging / name).is_file()]
        for name in made:  # on disk before the renames that publish them, with the usual permissions
            os.chmod(staging / name, 0o666 & ~_UMASK)  # safetensors creates its files 0600
            with open(staging / name, "rb+") as f:
                os.fsync(f.fileno())
        with stop_signals_deferred():
            for name in made:
                os.replace(staging / name, directory / name)
            for name in set(names) - set(made):
                _remove(str(directory / name))
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror or e}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fsync_dir(directory)
    return [directory / name for name in made]


def _process_alive(pid: str) -> bool:
    """Whether process ``pid`` (text, as a file name holds it) exists; a name that is no pid counts as alive (left alone)."""
    if not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a number no pid can be)
    return True


def is_temporary(name: str) -> bool:
    """Whether a file name is that of an unfinished write: ``atomic_write``'s (".NAME.XXXX.tmp"),
    or the one safetensors (0.8: Rust's tempfile, ".tmpXXXXXX") writes a file through before
    renaming it, which a kill in the middle of a checkpoint leaves behind."""
    return (name.startswith(".") and name.endswith(".tmp")) or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", name) is not None


def remove_stale_temporaries(directory: Path) -> None:
    """Finish the renames of files written together that a killed process journaled, and delete
    the temporary files of every other write it never finished. Call it only while holding the
    directory's lock, when no write of another process can be in flight."""
    temporaries = [tmp for tmp in Path(directory).rglob(".*") if is_temporary(tmp.name) and tmp.is_file()]
    for journal in temporaries:
        if journal.name.startswith(_JOURNAL_PREFIX):  # first: they move temporaries into place
            _finish_journaled_renames(journal)
    for tmp in temporaries:
        _remove(str(tmp))


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def ensure_writable_dir(directory: Path) -> None:
    """Fail early, with one line, if results could not be written to ``directory``."""
    if Path(directory).exists() and not Path(directory).is_dir():
        raise UserError(f"{directory} is a file, where a directory is to be written; choose another")
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-test")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UserError(f"cannot write to {directory}: {e.strerror}") from None


def ensure_writable_file(path: Path) -> None:
    """Fail early, with one line, if a file could not be written at ``path``: its directory is not
    writable, or a directory is in its place."""
    ensure_writable_dir(Path(path).parent)
    if Path(path).is_dir():
        raise UserError(f"{path} is in the way: it is written as a file, and a directory is there; move it away")


def write_json(path: Path, obj) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(dumps_strict(obj, indent=2) + "\n"))


def _finite_or_none(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite_or_none(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite_or_none(v) for v in obj]
    return obj


def dumps_strict(obj, **kwargs) -> str:
    """JSON that strict readers accept: NaN and infinities become null."""
    return json.dumps(_finite_or_none(obj), allow_nan=False, **kwargs)


def loads_strict(text: str | bytes):
    """``json.loads`` of JSON proper: NaN and Infinity, which Python's reader takes, are a ValueError."""

    def refuse(constant: str):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def read_jsonl(path: Path, repair: bool = False, strict: bool = False) -> list[dict]:
    """The JSON-object lines of ``path``. A trailing line without its newline that is not JSON (a
    write that was interrupted) is ignored, and with ``repair`` cut off so that the next append
    starts cleanly; one that is JSON only lost its newline, and ``repair`` gives it back. Other
    lines that are not JSON objects are skipped, or with ``strict`` refused with their number."""
    path = Path(path)
    if not path.is_file():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    tail = data[len(complete):]
    if tail and _json_object(tail) is not None:  # only the newline is missing
        complete = data + b"\n"
        if repair:
            with open(path, "ab") as f:
                f.write(b"\n")
    elif tail and repair:
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    records = []
    for number, line in enumerate(complete.splitlines(), 1):
        rec = _json_object(line)
        if rec is not None:
            records.append(rec)
        elif strict and line.strip():
            raise UserError(f"line {number} of {path} is not a JSON record (damaged or edited by hand): restore the file, or delete the line")
    return records


def _json_object(line: bytes) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(dumps_strict(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


LOCK_NAME = ".lock"


class DirectoryLock:
    """One process per run directory: an exclusive ``flock`` on DIR/.lock, held while the object
    lives. The OS releases it when the holder dies, so a lock left by a killed process never
    blocks; the file holds the holder's pid so that the error can name it."""

    def __init__(self, directory: Path):
        import fcntl

        self.path = Path(directory) / LOCK_NAME
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise UserError(f"cannot write to {directory}: {e.strerror}") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            error = self.in_use(directory, self.fd)
            os.close(self.fd)
            raise error from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)
        remove_stale_temporaries(directory)

    @staticmethod
    def in_use(directory: Path, lock_fd: int, advice: str = "wait for it or choose another --out") -> UserError:
        """The error for ``directory``, naming the pid its holder wrote into the lock file."""
        holder = os.pread(lock_fd, 32, 0).decode(errors="replace").strip() or "unknown"
        return UserError(f"{directory} is in use by another simple-dit process (pid {holder}); {advice}")

    @staticmethod
    def check_free(directory: Path, advice: str = "wait for it or choose another --out") -> None:
        """Raise ``in_use`` where another process holds ``directory``, touching nothing: what is in
        a directory that another process is writing says nothing yet."""
        import fcntl

        try:
            fd = os.open(Path(directory) / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            raise DirectoryLock.in_use(directory, fd, advice) from None
        finally:
            os.close(fd)  # and with it the probe's shared lock

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "DirectoryLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()
