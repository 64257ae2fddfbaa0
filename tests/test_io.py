"""gptlab.io: a file appears whole or not at all, and unreadable text is one line naming the file."""
import os

import pytest

from gptlab.errors import GptlabError
from gptlab.io import atomic_open, atomic_write_bytes, read_text


def test_atomic_open_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / "tokens.bin"
    atomic_write_bytes(path, b"old")
    with pytest.raises(RuntimeError):
        with atomic_open(path) as f:
            f.write(b"half of the new")
            raise RuntimeError("killed mid-write")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["tokens.bin"]   # no temp file left
    with atomic_open(path) as f:
        f.write(b"new")
        assert path.read_bytes() == b"old"          # readers see the old file until the block ends
    assert path.read_bytes() == b"new"
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()   # not mkstemp's private 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_read_text_errors_name_the_flag_and_the_file(tmp_path):
    bad = tmp_path / "prompts.txt"
    bad.write_bytes(b"ok\n\xff")
    with pytest.raises(GptlabError, match=r"^--prompts-file .*prompts.txt: not UTF-8 at byte 3$"):
        read_text(bad, "--prompts-file")
    with pytest.raises(GptlabError, match=r"missing.txt: no such file$"):
        read_text(tmp_path / "missing.txt")
    bad.write_text("hello", encoding="utf-8")
    assert read_text(bad) == "hello"
