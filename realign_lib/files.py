"""Small, crash-safe file helpers shared by every stage.

Whole files are written to a temporary sibling and renamed into place (``os.replace`` is atomic on
POSIX), so a killed process never leaves a half-written file under the final name. JSON-lines
readers name the file and line of any malformed record.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

__all__ = ["atomic_write_text", "atomic_save_npy", "atomic_torch_save", "jsonable", "write_json", "read_json",
           "write_jsonl", "read_jsonl", "iter_jsonl", "append_jsonl", "repair_jsonl_tail", "read_appended", "safe_join",
           "RunLock", "kernels_of", "read_text", "check_settings"]


@contextmanager
def _atomic(path: str | os.PathLike, mode: str):
    """Open a temporary sibling of ``path`` for writing; on success fsync it and rename it onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({"encoding": "utf-8"} if "b" not in mode else {})) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically (temp file in the same folder, fsync, rename)."""
    with _atomic(path, "w") as fh:
        fh.write(text)
    return Path(path)


def atomic_save_npy(path: str | os.PathLike, array) -> Path:
    """``numpy.save`` to a temporary sibling, then rename: a killed run leaves no truncated ``.npy``."""
    import numpy as np

    with _atomic(path, "wb") as fh:
        np.save(fh, array)
    return Path(path)


def atomic_torch_save(path: str | os.PathLike, obj: Any) -> Path:
    """``torch.save`` to a temporary sibling, then rename (tensors and plain containers, for
    ``torch.load(weights_only=True)``)."""
    import torch

    with _atomic(path, "wb") as fh:
        torch.save(obj, fh)
    return Path(path)


def jsonable(obj: Any) -> Any:
    """``obj`` with NaN / ±inf floats as ``None`` and numpy scalars / arrays as Python values (strict JSON)."""
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):  # numpy scalar or array
        return jsonable(obj.tolist())
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    return obj


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as strict JSON (NaN and infinities become ``null``)."""
    return atomic_write_text(path, json.dumps(jsonable(obj), indent=indent, ensure_ascii=False, allow_nan=False)
                             + "\n")


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error if it is not valid JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return json.loads(_utf8(path.read_bytes(), path))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> Path:
    """Atomically write ``records`` as JSON lines (one object per line)."""
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def append_jsonl(path: str | os.PathLike, records: Iterable[dict]) -> None:
    """Append records, one line each, flushed and fsynced (for resumable, append-only logs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def _utf8(raw: bytes, path, lineno: int | None = None) -> str:
    """``raw`` decoded as UTF-8, or an error naming the file, line and column of the first bad byte."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_start = raw.rfind(b"\n", 0, err.start) + 1
        if lineno is None:
            lineno = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 text (byte {raw[err.start]:#04x} at column "
                         f"{err.start - line_start + 1}); save the file as UTF-8") from None


def read_text(path: str | os.PathLike) -> str:
    """A UTF-8 text file's content; a byte that is not UTF-8 raises naming file, line and column."""
    path = Path(path)
    return _utf8(path.read_bytes(), path)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Read JSON lines; blank lines are ignored; a malformed line raises naming file and line."""
    return list(iter_jsonl(path))


def iter_jsonl(path: str | os.PathLike) -> Iterator[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, 1):
            line = _utf8(raw, path, lineno)
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg}); fix or delete that line") from err
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}")
            yield rec


def repair_jsonl_tail(path: str | os.PathLike) -> int:
    """Cut a half-written last line (no trailing newline) left by a killed writer; returns bytes cut.

    Append-only files have one writer that ends every record with a newline, so a kill can only
    leave the *last* line incomplete; everything before it is whole.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    with open(path, "rb+") as fh:
        fh.seek(0, os.SEEK_END)
        size = fh.tell()
        if size == 0:
            return 0
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return 0
        chunk, end, keep = 65536, size, 0
        while end > 0:
            start = max(0, end - chunk)
            fh.seek(start)
            k = fh.read(end - start).rfind(b"\n")
            if k >= 0:
                keep = start + k + 1
                break
            end = start
        fh.truncate(keep)
        fh.flush()
        os.fsync(fh.fileno())
        return size - keep


def read_appended(path: str | os.PathLike, repair: bool = True) -> list[dict]:
    """Records of an append-only JSON-lines file that a killed run may have left behind.

    A missing file is empty; a half-written last line is dropped (and, with ``repair``, cut from
    the file so appending continues cleanly); a malformed *complete* line still raises, naming
    file and line (the file is damaged, not interrupted).
    """
    path = Path(path)
    if not path.is_file():
        return []
    if repair:
        repair_jsonl_tail(path)
        return read_jsonl(path)
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    out = []
    for lineno, line in enumerate(_utf8(data[:end], path).splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: malformed JSON line ({err.msg}); fix or delete that line") from err
    return out


def safe_join(root: str | os.PathLike, name: str, where: str = "") -> Path:
    """``root / name``, refusing a ``name`` that leads outside ``root`` (``../``, an absolute path, a
    symlink out). ``where`` (file and line, or sample id) goes into the error."""
    root = Path(root)
    p = (root / name).resolve()
    base = root.resolve()
    if p != base and base not in p.parents:
        raise ValueError(f"{where + ': ' if where else ''}image path {name!r} leads outside the image folder "
                         f"{root}; image paths must be relative to it and stay inside it")
    return p


class RunLock:
    """One run per run folder: ``with RunLock(run_dir):`` holds ``<run_dir>/.realign.lock``
    (created exclusively, holding the pid). A second holder fails at once naming the first. A lock
    whose process is gone (killed, machine restarted) is taken over — but not while a notebook kernel
    that process started still runs (after ``kill -9`` of ``realign run`` its kernel writes on for a few
    seconds, until it notices): the lock belongs to the run, kernels included. Those kernels are found
    by the ``JPY_PARENT_PID`` that Jupyter gives them (Linux ``/proc``); the new holder waits up to
    ``wait`` seconds for them to end, then fails naming them."""

    def __init__(self, folder: str | os.PathLike, log=None, wait: float = 30.0):
        self.path = Path(folder) / ".realign.lock"
        self.log = log
        self.wait = wait

    def __enter__(self) -> "RunLock":
        import socket
        import time

        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                # an unreadable lock is being written by a run that just started, unless it is old
                if self._recent() if holder is None else self._alive(holder):
                    holder = holder or {"pid": "?", "host": "?", "since": "just now"}
                    raise RuntimeError(f"{self.path.parent} is in use by another run (pid {holder.get('pid')} on "
                                       f"{holder.get('host')}, since {holder.get('since')}); wait for it to end or "
                                       f"stop it — two runs in one folder would mix their files") from None
                if holder is not None:
                    self._wait_for_kernels(holder)
                if self.log:
                    self.log(f"{self.path}: taking over a stale lock ({holder})")
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as fh:
                fh.write(json.dumps(me))
            return self
        raise RuntimeError(f"{self.path}: could not take the lock")

    def __exit__(self, *exc) -> None:
        self.path.unlink(missing_ok=True)

    def _wait_for_kernels(self, holder: dict) -> None:
        """Block while kernels of the dead holder still run (up to ``wait`` s), else raise naming them."""
        import time

        deadline = time.time() + self.wait
        kernels = kernels_of(holder.get("pid"))
        if kernels and self.log:
            self.log(f"{self.path}: the previous run (pid {holder.get('pid')}) is gone but its notebook kernel "
                     f"(pid {', '.join(map(str, kernels))}) still runs: waiting for it to end")
        while kernels and time.time() < deadline:
            time.sleep(0.2)
            kernels = kernels_of(holder.get("pid"))
        if kernels:
            raise RuntimeError(f"{self.path.parent} is still written by a notebook kernel of a stopped run (pid "
                               f"{', '.join(map(str, kernels))}); wait for it to end or stop it (kill "
                               f"{' '.join(map(str, kernels))}) — two runs in one folder would mix their files")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None  # half written or gone: treat as stale

    def _recent(self, seconds: float = 5.0) -> bool:
        import time

        try:
            return time.time() - self.path.stat().st_mtime < seconds
        except OSError:
            return False

    @staticmethod
    def _alive(holder: dict) -> bool:
        import socket

        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname():
            return True  # another machine's run (a shared folder): never taken over
        if not isinstance(pid, int) or pid <= 0:
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def check_settings(sig_path: str | os.PathLike, signature: dict, files, on_change: str = "restart", log=print) -> None:
    """Results in ``files`` are reused only if made with ``signature`` (kept as JSON at ``sig_path``).

    Other settings, or results without a settings record: with ``on_change="restart"`` the files are
    deleted (saying which settings changed), otherwise it raises. Then ``signature`` is written."""
    sig_path, files = Path(sig_path), [Path(p) for p in files]
    old = read_json(sig_path) if sig_path.is_file() else None
    if old is None and not any(p.exists() for p in files):
        why = None  # nothing made yet
    elif old is None:
        why = f"results without a settings record ({sig_path.name})"
    elif old != signature:
        why = f"other settings ({', '.join(sorted(k for k in set(old) | set(signature) if old.get(k) != signature.get(k)))})"
    else:
        why = None
    if why:
        if on_change != "restart":
            raise ValueError(f"{sig_path.parent}: earlier results were made with {why}; delete "
                             f"{', '.join(p.name for p in files)} or pass on_change='restart'")
        log(f"earlier {', '.join(p.name for p in files)} made with {why}: discarded")
        for p in files:
            if p.exists():
                p.unlink()
    write_json(sig_path, signature)


def kernels_of(pid) -> list[int]:
    """Live processes that Jupyter started as kernels of process ``pid`` (their environment holds
    ``JPY_PARENT_PID=<pid>``), on a system with ``/proc``; empty elsewhere or for a bad pid."""
    if not isinstance(pid, int) or pid <= 0 or not Path("/proc").is_dir():
        return []
    want = f"JPY_PARENT_PID={pid}".encode()
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or another user's
            continue
        if want in env.split(b"\0") and state != "Z":  # a zombie writes nothing
            out.append(int(entry.name))
    return sorted(out)
