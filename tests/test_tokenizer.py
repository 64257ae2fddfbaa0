"""Tokenizer: lossless round trips for both kinds, the tokenizer CLI, and Hugging Face compatibility."""
from __future__ import annotations

import re

import pytest

from gptlab.cli import main
from gptlab.tokenizer import EOT, USER_START, Tokenizer
from gptlab.tokenizer.commands import token_bytes

from conftest import cli, user_error

CORPUS = ("The cat sat on the mat. The dog sat on the log.\n" * 20
          + "To be, or not to be, that is the question.\n" * 10
          + "苹果 => apple\n香蕉 => banana\n23 + 58 = 81\n" * 10)
HARD = [
    "The cat sat on the mat",
    "中文字符和混合 English 文本，还有标点。",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷",
    "  leading, trailing and   multiple spaces  ",
    "tabs\tnew\nlines\r\nand\u000bvertical\u000cfeed",
    "control \x00\x01\x07\x1b[0m\x7f chars",
    "zero\u200bwidth and combining e\u0301 and nbsp\u00a0here",
    f"literal specials {EOT} and {USER_START} stay text",
    "",
    "\n\n\n",
]


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="module", params=["bpe", "char"])
def trained(request, tmp_path_factory):
    tok = Tokenizer.train([CORPUS], vocab_size=400, kind=request.param)
    folder = tmp_path_factory.mktemp(f"tok_{request.param}")
    tok.save(folder)
    return tok, folder


@pytest.mark.parametrize("text", HARD)
def test_lossless_round_trip(trained, text):
    tok, folder = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.eot_id not in ids  # special-token strings are never interpreted in text
    assert Tokenizer.load(folder).encode(text) == ids  # saved and loaded: same ids


def test_transformers_loads_tokenizer_json(trained):
    transformers = pytest.importorskip("transformers")
    tok, folder = trained
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))
    for text in HARD:
        if EOT in text:
            continue  # transformers treats added-token strings as control tokens, by design
        ids = hf.encode(text, add_special_tokens=False)
        assert ids == tok.encode(text)
        assert hf.decode(ids) == text


def test_cli_train_encode_decode(tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(CORPUS, encoding="utf-8")
    for kind in ("bpe", "char"):
        out_dir = tmp_path / kind
        rc, out, _ = cli(capsys, "tokenizer", "train", "--data", corpus, "--vocab-size", 300,
                         "--kind", kind, "--out", out_dir)
        assert rc == 0 and (out_dir / "tokenizer.json").is_file()
        assert re.search(r"vocab size [\d,]+", out) and "chars/token" in out and " s" in out
        text = "The cat sat on the mat\n苹果 😀"
        rc, out, _ = cli(capsys, "tokenizer", "encode", out_dir, text)
        assert rc == 0
        rows = [l.split(None, 2) for l in out.splitlines()[1:-1]]
        ids = [int(r[1]) for r in rows]
        assert ids == Tokenizer.load(out_dir).encode(text)
        assert "'The'" in out or "'T'" in out
        rc, out, _ = cli(capsys, "tokenizer", "decode", out_dir, *ids)
        assert rc == 0 and out == text + "\n"
        rc, out, _ = cli(capsys, "tokenizer", "decode", out_dir, ",".join(map(str, ids)))
        assert out == text + "\n"


def test_cli_train_reports_compression_on_builtin_mixture(tmp_path, capsys, monkeypatch):
    from gptlab.data import mixture
    monkeypatch.setattr(mixture, "ensure_mixture", lambda: mixture.write_mixture(None, 0, 400))
    rc, out, _ = cli(capsys, "tokenizer", "train", "--data", "mixture:2", "--vocab-size", 300,
                     "--out", tmp_path / "t")
    assert rc == 0 and "weights are ignored" in out
    ratio = float(re.search(r"= ([\d.]+) chars/token", out).group(1))
    assert ratio > 1.0


def test_token_bytes_shows_partial_utf8(trained):
    tok, _ = trained
    ids = tok.encode("😀")
    pieces = [token_bytes(tok, i) for i in ids]
    assert b"".join(pieces) == "😀".encode("utf-8")
    assert token_bytes(tok, tok.eot_id) == EOT


def test_cli_errors(tmp_path, trained, capsys):
    _, folder = trained
    assert "no tokenizer.json" in user_error(capsys, "tokenizer", "encode", tmp_path, "hi")
    assert "out of range" in user_error(capsys, "tokenizer", "decode", folder, "1", "999999")
    assert "not a token id" in user_error(capsys, "tokenizer", "decode", folder, "12x")
    corpus = tmp_path / "c.txt"
    corpus.write_text("hello")
    assert "--vocab-size" in user_error(capsys, "tokenizer", "train", "--data", corpus,
                                        "--vocab-size", 10, "--out", tmp_path / "o")
    assert "no such file or folder" in user_error(capsys, "tokenizer", "train", "--data",
                                                  tmp_path / "missing.txt", "--out", tmp_path / "o")
    (tmp_path / "bad.txt").write_bytes(b"ok\xffno")
    assert "not UTF-8 (invalid byte at offset 2)" in user_error(
        capsys, "tokenizer", "train", "--data", tmp_path / "bad.txt", "--out", tmp_path / "o")


def test_help_texts(capsys):
    for argv in (["tokenizer", "--help"], ["tokenizer", "train", "--help"],
                 ["tokenizer", "encode", "--help"], ["tokenizer", "decode", "--help"],
                 ["data", "--help"], ["data", "prepare", "--help"], ["data", "shakespeare", "--help"],
                 ["data", "mixture", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "usage: gptlab" in out and len(out) > 200
    assert main(["tokenizer"]) == 2  # no subcommand: help, not a traceback


def test_char_tokenizer_fast_path_matches_the_hf_pipeline():
    """encode() of a char tokenizer is a Python table look-up; it must give exactly the ids of the
    Hugging Face pipeline stored in tokenizer.json (which other tools load), unseen characters included."""
    import random
    tok = Tokenizer.train(["abc 012\n猫狗, hello.", "xyz!"], kind="char")
    rng = random.Random(0)
    alphabet = list("abcxyzq 012\n\t,.!?'\"") + ["猫", "加", "😀", "é", "\u0301", "<|user_start|>", "\r\n"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        ids = tok.encode(text)
        assert ids == tok._plain.encode(text, add_special_tokens=False).ids
        assert tok.decode(ids) == text
    assert tok.encode_batch(["猫q", ""]) == [tok.encode("猫q"), []]
