"""The only writer: atomic files, an exclusive lock on an output folder, JSON without NaN.

Every file probekit writes goes through `atomic_write`: the content is written to a unique temporary
file in the destination's folder (``tempfile.mkstemp``), flushed to disk (``fsync``), then renamed
onto the destination (``os.replace``). A reader sees the old file or the new one, never half of one;
a writer that raises leaves no temporary file behind.

An output folder (a command's ``--out``) is used through `output_dir`:

    with output_dir(out, overwrite=False):      # checks, creates, locks; stages every write under out
        write_json(out / "patch.json", obj)     # written to a temporary name now ...
    # ... and renamed into place here, all together, only if the block succeeded

`prepare_out` checks everything first (a file, a path under a file, a folder that cannot be written,
a non-empty folder without ``overwrite``), before a byte is written. The folder is then locked with
``fcntl.flock`` on ``<out>/.probekit.lock`` for the whole block: a second command on the same folder
is refused at once. The kernel drops the lock when the process ends, so a killed command leaves at
most a lock file that the next command takes over (it is ignored when checking for emptiness).
If the block fails, nothing it wrote under the folder appears, and a folder it created is removed.

JSON convention (`write_json`, `dumps_json`, `json_text`): non-finite floats (NaN, Infinity, -Infinity) are not
valid JSON and are written as ``null``. When the top-level value is an object, a ``"nan_reason"``
key is added that says where and what was replaced: ``{"values[*][*]": "NaN written as null (3
entries)"}`` (list indices shown as ``[*]``). `probekit.results.Result.from_json` reads ``null``
inside ``values`` and ``extra`` back as NaN.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from probekit.tasks import ProbekitError

LOCK_NAME = ".probekit.lock"
NAN_KEY = "nan_reason"

_STAGE: contextvars.ContextVar[_Stage | None] = contextvars.ContextVar("probekit_io_stage", default=None)


# ---------------------------------------------------------------------------- atomic files


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a directory be opened / synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp_path)`` to a unique temporary file next to ``path``, fsync, then rename onto ``path``.

    Inside `output_dir` the rename of a path under that folder waits until the block succeeds.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        stage = _STAGE.get()
        if stage is not None and stage.covers(path):
            stage.add(tmp, path)
        else:
            os.replace(tmp, path)
            _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_text(path: str | Path, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_bytes(path: str | Path, data: bytes) -> Path:
    """``data`` to ``path``, atomically."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_figure(fig, path: str | Path, **savefig_kwargs) -> Path:
    """``fig.savefig`` to a temporary name, then rename (format from the suffix of ``path``)."""
    path = Path(path)
    fmt = savefig_kwargs.pop("format", path.suffix[1:].lower() or "png")
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **savefig_kwargs))


def write_csv(path: str | Path, frame) -> Path:
    """A pandas DataFrame as CSV (no index)."""
    return atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def open_append(path: str | Path):
    """An append-only log file (one record per line, flushed by the caller); the one non-atomic writer."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return open(path, "a", encoding="utf-8")


# ---------------------------------------------------------------------------- JSON without NaN


def finite_json(obj) -> tuple[object, dict[str, str]]:
    """``obj`` with numpy scalars as Python numbers, every non-finite float replaced by ``None``, and the
    `NAN_KEY` note (empty if none)."""
    counts: dict[tuple[str, str], int] = {}

    def walk(x, where: str):
        if type(x).__module__ == "numpy" and getattr(x, "ndim", None) == 0:  # a numpy scalar: its Python value
            x = x.item()
        if isinstance(x, float) and not math.isfinite(x):
            kind = "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
            counts[(where or "(top)", kind)] = counts.get((where or "(top)", kind), 0) + 1
            return None
        if isinstance(x, dict):
            return {k: walk(v, f"{where}/{k}" if where else str(k)) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{where}[*]") for v in x]
        return x

    clean = walk(obj, "")
    note: dict[str, str] = {}
    for (where, kind), c in counts.items():
        text = f"{kind} written as null ({c} entr{'y' if c == 1 else 'ies'})"
        note[where] = f"{note[where]}; {text}" if where in note else text
    return clean, note


def dumps_json(obj, indent: int | None = 2) -> str:
    """Strict JSON text of ``obj`` (see the module docstring for how NaN/Infinity are written)."""
    clean, note = finite_json(obj)
    if note and isinstance(clean, dict):
        clean = {**clean, NAN_KEY: note}
    return json.dumps(clean, indent=indent, allow_nan=False) + ("\n" if indent is not None else "")


def write_json(path: str | Path, obj, indent: int | None = 2) -> Path:
    """Write ``obj`` as strict JSON (NaN/Infinity -> null plus a ``"nan_reason"`` note), atomically."""
    return write_text(path, dumps_json(obj, indent=indent))


def json_text(obj, path: str | Path | None = None) -> str:
    """Compact strict JSON text of ``obj`` (`dumps_json` without indent); with ``path``, also written there
    atomically. What the results' ``to_json(path=None)`` return."""
    text = dumps_json(obj, indent=None)
    if path is not None:
        write_text(path, text)
    return text


# ---------------------------------------------------------------------------- output folders


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def folder_entries(folder: Path) -> list[str]:
    """The names in ``folder``, leaving out the lock file a probekit command holds there."""
    return sorted(p.name for p in folder.iterdir() if p.name != LOCK_NAME)


def prepare_out(folder: str | Path, overwrite: bool = False, what: str = "--out") -> Path:
    """Check that ``folder`` can be the output folder, before anything is written; returns it as a Path.

    Refuses: a file; a path under a file; a folder (or its nearest existing parent) that cannot be
    written; a non-empty folder unless ``overwrite``.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ProbekitError(f"{what} {folder} is a file; expected a directory")
    base = _nearest_existing(folder.absolute())
    if not base.is_dir():
        raise ProbekitError(f"{what} {folder} is under the file {base}; expected a directory path")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ProbekitError(f"{what} {folder}: {base} is not writable; choose a folder you can write to")
    if folder.is_dir() and not overwrite and folder_entries(folder):
        raise ProbekitError(f"output directory {folder} is not empty; choose another or pass --overwrite")
    return folder


def ensure_empty_dir(folder: str | Path, overwrite: bool = False) -> Path:
    """`prepare_out`, then create ``folder`` (for writers that are not a whole command, e.g. `save_model`)."""
    folder = prepare_out(folder, overwrite=overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class _Stage:
    """Temporary files under ``folder`` waiting to be renamed into place together."""

    def __init__(self, folder: Path):
        self.folder = folder.resolve()
        self.pending: dict[Path, Path] = {}  # destination -> temporary file

    def covers(self, path: Path) -> bool:
        return path.resolve().is_relative_to(self.folder)

    def add(self, tmp: Path, path: Path) -> None:
        old = self.pending.pop(path.resolve(), None)
        if old is not None:
            old.unlink(missing_ok=True)
        self.pending[path.resolve()] = tmp

    def commit(self) -> None:
        for dest, tmp in self.pending.items():
            os.replace(tmp, dest)
        for d in {dest.parent for dest in self.pending}:
            _fsync_dir(d)
        self.pending.clear()

    def discard(self) -> None:
        for tmp in self.pending.values():
            tmp.unlink(missing_ok=True)
        self.pending.clear()


@contextlib.contextmanager
def lock_dir(folder: str | Path, what: str = "--out") -> Iterator[Path]:
    """Hold an exclusive ``flock`` on ``<folder>/.probekit.lock``; refuse at once if another process has it."""
    import fcntl

    folder = Path(folder)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _busy(folder, what) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder removed the file while we waited to open it: it is still busy
            raise ProbekitError(f"{what} {folder} is in use by another probekit command; try again")
        try:
            yield folder
        finally:
            path.unlink(missing_ok=True)  # removed while still held, so no one locks a dead file
    finally:
        os.close(fd)


def _busy(folder: Path, what: str) -> ProbekitError:
    """The one error for a folder whose lock another process holds."""
    return ProbekitError(f"{what} {folder} is in use by another probekit command (lock {Path(folder) / LOCK_NAME}); "
                         "wait for it to finish or choose another folder")


def _refuse_if_busy(folder: Path, what: str) -> None:
    """Refuse when another process holds the folder's lock (probed without creating anything)."""
    import fcntl

    try:
        fd = os.open(folder / LOCK_NAME, os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        raise _busy(folder, what) from None
    finally:
        os.close(fd)


def _created_dirs(folder: Path) -> list[Path]:
    """The folders ``folder.mkdir(parents=True)`` would create, outermost first."""
    missing = []
    p = folder.absolute()
    while not p.exists():
        missing.append(p)
        p = p.parent
    return missing[::-1]


@contextlib.contextmanager
def output_dir(folder: str | Path, overwrite: bool = False, stage: bool = True,
               what: str = "--out") -> Iterator[Path]:
    """Check (`prepare_out`), create and lock ``folder`` for the block; with ``stage``, writes under it
    appear only when the block succeeds. On failure, a folder the block created is removed again."""
    prepare_out(folder, overwrite=True, what=what)
    folder = Path(folder)
    _refuse_if_busy(folder, what)  # a busy folder is reported as busy, not as non-empty
    prepare_out(folder, overwrite=overwrite, what=what)
    created = _created_dirs(folder)
    folder.mkdir(parents=True, exist_ok=True)
    st = _Stage(folder) if stage else None
    token = _STAGE.set(st) if st is not None else None
    ok = False
    try:
        with lock_dir(folder, what=what):
            if not overwrite and folder_entries(folder):  # filled between the check and the lock
                raise ProbekitError(f"output directory {folder} is not empty; choose another or pass --overwrite")
            yield folder
            if st is not None:
                st.commit()
            ok = True
    finally:
        if token is not None:
            _STAGE.reset(token)
        if st is not None:
            st.discard()
        if not ok:
            if st is not None and created:  # everything under a folder we created is ours: empty folders go
                for root, _, _ in sorted(os.walk(folder), key=lambda w: -len(w[0])):
                    with contextlib.suppress(OSError):
                        os.rmdir(root)
            for d in reversed(created):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only succeeds while empty
