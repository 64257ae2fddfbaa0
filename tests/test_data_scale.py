"""Corpora at scale: .parquet, .jsonl.gz and .jsonl.zst sources (and folders of them) read as
streams; large files cut into chunks that encode to exactly the ids of the whole text; chunks encoded
in parallel worker processes into memmapped shards; an interrupted tokenisation resumed without
re-encoding finished shards; tokenizer training on a --max-chars sample."""
import gzip
import json

import numpy as np
import pytest

import gptlab.data.tokens as tokens
from conftest import cli, user_error
from gptlab.data.corpus import parse_source, plan_chunks
from gptlab.data.tokens import TokenDataset
from gptlab.errors import GptlabError
from gptlab.tokenizer import Tokenizer

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

DOCS = [f"Document {i}: the {'quick ' * (i % 5)}brown fox, 12{i} + 7 = {127 + i}.\nSecond line {i}.\n"
        for i in range(300)] + ["unicode: 苹果 => apple ✓"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(DOCS, vocab_size=400)


def write_jsonl(path, docs, opener=open):
    with opener(path, "wb") as f:
        for d in docs:
            f.write((json.dumps({"text": d, "id": 1}, ensure_ascii=False) + "\n").encode())


def write_formats(folder, docs):
    """The same documents as .jsonl, .jsonl.gz, .jsonl.zst and .parquet (several row groups)."""
    folder.mkdir(parents=True, exist_ok=True)
    q = len(docs) // 4
    write_jsonl(folder / "a.jsonl", docs[:q])
    write_jsonl(folder / "b.jsonl.gz", docs[q:2 * q], gzip.open)
    with open(folder / "c.jsonl.zst", "wb") as raw:
        with zstandard.ZstdCompressor().stream_writer(raw) as f:
            for d in docs[2 * q:3 * q]:
                f.write((json.dumps({"text": d}) + "\n").encode())
    table = pa.table({"id": list(range(len(docs) - 3 * q)), "text": docs[3 * q:]})
    pq.write_table(table, folder / "d.parquet", row_group_size=20)


def expected_ids(tok, docs):
    out = []
    for d in docs:
        out += tok.encode(d) + [tok.eot_id]
    return out


def test_formats_read_as_one_folder_and_tokenize(tmp_path, tok):
    write_formats(tmp_path / "corpus", DOCS)
    src = parse_source(str(tmp_path / "corpus"))
    assert [f.name for f in src.files()] == ["a.jsonl", "b.jsonl.gz", "c.jsonl.zst", "d.parquet"]
    assert list(src.documents()) == DOCS
    for name in ("b.jsonl.gz", "c.jsonl.zst", "d.parquet"):   # each one on its own too
        assert list(parse_source(str(tmp_path / "corpus" / name)).documents())
    ds = TokenDataset.prepare([str(tmp_path / "corpus")], tok, workers=1, chunk_bytes=2000)
    assert ds.parts[0].tokens.tolist() == expected_ids(tok, DOCS)
    assert ds.parts[0].meta["num_documents"] == len(DOCS) and len(ds.parts[0].meta["shards"]) > 4


def test_chunked_text_and_jsonl_match_whole_encoding(tmp_path, tok):
    text = "".join(DOCS) * 3
    (tmp_path / "big.txt").write_text(text)
    write_jsonl(tmp_path / "big.jsonl", DOCS)
    chunks = plan_chunks([tmp_path / "big.txt"], 1000)
    assert len(chunks) > 10 and chunks[0].start == 0 and all(a.end == b.start for a, b in zip(chunks, chunks[1:]))
    ds = TokenDataset.prepare([str(tmp_path / "big.txt"), str(tmp_path / "big.jsonl")], tok, workers=1,
                              chunk_bytes=1000)
    assert ds.parts[0].tokens.tolist() == tok.encode(text) + [tok.eot_id]
    assert ds.parts[0].meta["num_documents"] == 1
    assert ds.parts[1].tokens.tolist() == expected_ids(tok, DOCS)
    # Slices across shard boundaries read the stream as one (what training windows do).
    stream, whole = ds.parts[1].tokens, np.array(expected_ids(tok, DOCS))
    for a, b in [(0, 5), (990, 1700), (len(whole) - 3, len(whole)), (5, 5)]:
        assert stream[a:b].tolist() == whole[a:b].tolist()


def test_parallel_workers_equal_one_process(tmp_path, tok):
    write_formats(tmp_path / "corpus", DOCS * 4)
    one = TokenDataset.prepare([str(tmp_path / "corpus")], tok, workers=1, chunk_bytes=4000,
                               cache_dir=tmp_path / "c1")
    two = TokenDataset.prepare([str(tmp_path / "corpus")], tok, workers=2, chunk_bytes=4000,
                               cache_dir=tmp_path / "c2")
    assert not two.parts[0].reused and two.parts[0].tokens.tolist() == one.parts[0].tokens.tolist()
    assert two.parts[0].meta["shards"] == one.parts[0].meta["shards"]


def test_interrupted_tokenization_resumes(tmp_path, tok, monkeypatch):
    (tmp_path / "c.txt").write_text("".join(DOCS) * 2)
    real, calls, armed = tokens._encode_chunk, [], [True]

    def flaky(chunk, *a):
        calls.append(chunk.start)
        if armed[0] and len(calls) == 4:
            raise KeyboardInterrupt   # Ctrl-C in the middle of the fourth shard
        return real(chunk, *a)

    monkeypatch.setattr(tokens, "_encode_chunk", flaky)
    with pytest.raises(KeyboardInterrupt):
        TokenDataset.prepare([str(tmp_path / "c.txt")], tok, workers=1, chunk_bytes=1500)
    [folder] = list((tokens.gptlab_home() / "tokens").iterdir())
    assert not (folder / "meta.json").exists() and len(list((folder / "shards").glob("*.json"))) == 3
    assert not list((folder / "shards").glob(".*tmp"))          # the cut-off shard left nothing behind
    calls.clear()
    armed[0] = False
    ds = TokenDataset.prepare([str(tmp_path / "c.txt")], tok, workers=1, chunk_bytes=1500)
    n = len(ds.parts[0].meta["shards"])
    assert len(calls) == n - 3                                  # only the missing shards were encoded
    assert ds.parts[0].tokens.tolist() == tok.encode("".join(DOCS) * 2) + [tok.eot_id]


@pytest.mark.parametrize("name,write,needle", [
    ("x.jsonl.gz", lambda p: p.write_bytes(gzip.compress(b'{"text": "a"}\n\n{"text": 3}\n')), ":3: \"text\" is not a string"),
    ("x.jsonl.zst", lambda p: p.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "a"}\n{oops\n')), ":2: not valid JSON"),
    ("x.parquet", lambda p: pq.write_table(pa.table({"body": ["a"]}), p), "no \"text\" column (columns: body)"),
    ("x.parquet", lambda p: pq.write_table(pa.table({"text": [1, 2]}), p), "holds int64, not strings"),
    ("x.parquet", lambda p: p.write_bytes(b"not parquet at all"), "not a Parquet file"),
    ("x.txt.gz", lambda p: p.write_bytes(gzip.compress(b"hi")), "read as .jsonl.gz or .jsonl.zst"),
])
def test_bad_files_are_one_line_errors(tmp_path, tok, capsys, name, write, needle):
    tok.save(tmp_path / "tok")
    write(tmp_path / name)
    msg = user_error(capsys, "data", "prepare", "--data", tmp_path / name, "--tokenizer", tmp_path / "tok")
    assert needle in msg and name in msg


def test_bad_line_in_a_later_chunk_names_its_line(tmp_path, tok):
    lines = [json.dumps({"text": f"line {i} " * 20}) for i in range(200)]
    lines[150] = "{broken"
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(GptlabError, match=r"c.jsonl:151: not valid JSON"):
        TokenDataset.prepare([str(tmp_path / "c.jsonl")], tok, workers=1, chunk_bytes=2000)


def test_tokenizer_train_max_chars_and_formats(tmp_path, capsys, monkeypatch):
    write_formats(tmp_path / "corpus", DOCS)
    seen = []
    real = Tokenizer.train.__func__

    def spy(cls, texts, **kw):
        texts = list(texts)
        seen.append(sum(len(t) for t in texts))
        return real(cls, texts, **kw)

    monkeypatch.setattr(Tokenizer, "train", classmethod(spy))
    rc, out, _ = cli(capsys, "tokenizer", "train", "--data", tmp_path / "corpus", "--vocab-size", "300",
                     "--max-chars", "5000", "--out", tmp_path / "tok")
    assert rc == 0 and seen == [5000] and "read 5,000 characters (--max-chars 5,000" in out
    rc, out, _ = cli(capsys, "tokenizer", "train", "--data", tmp_path / "corpus", "--vocab-size", "300",
                     "--out", tmp_path / "tok2")
    assert rc == 0 and seen[-1] == sum(len(d) for d in DOCS)
    assert "--max-chars must be positive" in user_error(
        capsys, "tokenizer", "train", "--data", tmp_path / "corpus", "--max-chars", "0", "--out", tmp_path / "t3")
