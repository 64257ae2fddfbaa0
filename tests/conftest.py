"""Shared fixtures: an isolated GPTLAB_HOME per test and a small tokenizer trained in-process; and the
CLI helpers (``from conftest import cli, user_error``)."""

import pytest
import torch

SAMPLE_TEXT = (
    "To be, or not to be, that is the question:\n"
    "Whether 'tis nobler in the mind to suffer\n"
    "The slings and arrows of outrageous fortune,\n"
    "Or to take arms against a sea of troubles\n"
    "And by opposing end them. To die—to sleep,\n"
    "No more; and by a sleep to say we end\n"
    "23 + 58 = 81\n苹果 => apple\n香蕉 => banana\n"
) * 20


def cli(capsys, *argv):
    """Run the gptlab CLI in-process: (exit code, stdout, stderr)."""
    from gptlab.cli import main
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def user_error(capsys, *argv) -> str:
    """Run the CLI expecting a user error: exit 2, exactly one 'error:' line, no traceback."""
    rc, out, err = cli(capsys, *argv)
    lines = err.strip().splitlines()
    assert rc == 2, (out, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def gptlab_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.mktemp("gptlab_home")
    monkeypatch.setenv("GPTLAB_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def small_tokenizer():
    from gptlab.tokenizer import Tokenizer
    return Tokenizer.train([SAMPLE_TEXT], vocab_size=400)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(SAMPLE_TEXT * 5, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that spin
    waiting for each other make them many times slower; restore the setting afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
