"""Small, careful file helpers shared by every stage.

Everything that must survive a crash goes through here: whole files are written to a temporary file in
the same folder, flushed, fsynced and renamed over the target (rename is atomic on POSIX), and records
that accumulate (labels, metrics) are appended one line at a time and fsynced.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Iterator

from gptlab.errors import GptlabError


def gptlab_home() -> Path:
    """The cache folder: $GPTLAB_HOME, else ~/.cache/gptlab."""
    home = os.environ.get("GPTLAB_HOME")
    path = Path(home).expanduser() if home else Path.home() / ".cache" / "gptlab"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise GptlabError(f"{path}: cannot create the gptlab home folder ({e.strerror or e}); "
                          "set GPTLAB_HOME to a writable folder") from None
    return path


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write that appears at ``path`` whole or not at all: the block writes a temporary
    file in the same folder, which is fsynced and renamed over ``path`` when the block ends without an
    error (and removed when it raises). For files too large to hold in memory first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())   # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_open(path) as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def atomic_write_jsonl(path: str | os.PathLike, rows) -> None:
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def append_jsonl(path: str | os.PathLike, row: dict, fsync: bool = True) -> None:
    """Append one JSON record as a line; fsync so a crash right after loses nothing."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def read_text(path: str | os.PathLike, flag: str | None = None, encoding: str = "utf-8") -> str:
    """A text file's contents; a missing file or a byte that is not UTF-8 is one line naming the file
    (after ``flag``, the option it came from, when given)."""
    path = Path(path)
    where = f"{flag} {path}" if flag else str(path)
    if not path.is_file():
        raise GptlabError(f"{where}: no such file")
    try:
        return path.read_text(encoding=encoding)
    except UnicodeDecodeError as e:
        raise GptlabError(f"{where}: not UTF-8 at byte {e.start}") from None


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise GptlabError(f"{path}: no such file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GptlabError(f"{path}: not valid JSON ({e})") from None


def iter_jsonl(path: str | os.PathLike, skip_partial_last: bool = False) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, record) for each non-blank line; a bad line raises GptlabError naming it.

    ``skip_partial_last`` tolerates a final line without a newline that does not parse (a write cut
    short by a crash in an append-only log), which resumable writers want.
    """
    path = Path(path)
    lines = read_text(path).split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            if skip_partial_last and i == len(lines):
                return
            raise GptlabError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise GptlabError(f"{path}:{i}: expected a JSON object")
        yield i, obj


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Like ``atomic_open``, for writers that insist on opening a file name themselves (e.g. the
    ``gguf`` package's writer): the block writes the yielded temporary path, which is fsynced and renamed
    over ``path`` when the block ends without an error (and removed when it raises)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)
