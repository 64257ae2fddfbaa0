"""``gptlab tokenizer train | encode | decode``: train a tokenizer and look at what it does."""
from __future__ import annotations

import re
import sys
import time

from gptlab.errors import GptlabError


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte -> printable-character table used by byte-level BPE tokens."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)  # unprintable bytes are shifted past 255, in order
            extra += 1
    return {c: b for b, c in chars.items()}


_MEASURE_CHARS = 16 << 20  # compression is measured on at most this much text
_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tok, i: int) -> bytes | str:
    """The bytes a token stands for, or its string for special tokens."""
    t = tok.id_to_token(i)
    if t is None:
        raise GptlabError(f"token id {i} is out of range (vocab size {tok.vocab_size})")
    if i in tok.special_ids:
        return t
    if tok.kind == "char":
        m = _BYTE_TOKEN.match(t)
        return bytes([int(m.group(1), 16)]) if m else t.encode("utf-8")
    dec = _byte_decoder()
    if all(c in dec for c in t):
        return bytes(dec[c] for c in t)
    return t.encode("utf-8")


def _show(piece: bytes | str) -> str:
    if isinstance(piece, str):
        return piece  # a special token, shown as written
    try:
        return repr(piece.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(piece)  # part of a multi-byte character: show the raw bytes


def _run_train(args) -> int:
    from gptlab.data.corpus import parse_sources
    from gptlab.tokenizer import Tokenizer, iter_texts
    sources = parse_sources(args.data)
    if args.max_chars is not None and args.max_chars < 1:
        raise GptlabError(f"--max-chars must be positive, got {args.max_chars}")
    if any(s.weight != 1 for s in sources):
        print("note: weights are ignored for tokenizer training (every document is read once)")
    if args.vocab_size < 1:
        raise GptlabError(f"--vocab-size must be positive, got {args.vocab_size}")
    t0 = time.time()
    seen = [0]
    tok = Tokenizer.train(iter_texts(_sample(sources, args.max_chars, seen)), vocab_size=args.vocab_size,
                          kind=args.kind, min_frequency=args.min_frequency, digits=args.digits)
    train_s = time.time() - t0
    print(f"read {seen[0]:,} characters" + (f" (--max-chars {args.max_chars:,}: the corpus's first ones)"
                                           if args.max_chars is not None else ""))
    path = tok.save(args.out)
    print(f"trained a {tok.kind} tokenizer in {train_s:.1f} s: vocab size {tok.vocab_size:,}"
          + (" (one token per character seen, plus bytes and specials; --vocab-size does not apply)"
             if tok.kind == "char" else ""))
    t1 = time.time()
    n_chars = n_tokens = 0
    for chunk in _chunks(iter_texts(_sample(sources, None, [0]), chunk_chars=1 << 16)):
        n_chars += sum(len(c) for c in chunk)
        n_tokens += sum(len(ids) for ids in tok.encode_batch(chunk))
        if n_chars >= _MEASURE_CHARS:  # a big corpus: its first part tells the ratio well enough
            break
    print(f"compression: {n_chars:,} chars -> {n_tokens:,} tokens = "
          f"{n_chars / max(n_tokens, 1):.2f} chars/token (measured in {time.time() - t1:.1f} s)")
    print(f"saved {path}")
    return 0


def _sample(sources, max_chars: int | None, seen: list[int]):
    """The sources' text, streamed in bounded pieces (Source.texts), stopping after ``max_chars``
    characters; ``seen[0]`` counts what was read."""
    for s in sources:
        before = seen[0]
        for text in s.texts():
            if max_chars is not None and seen[0] + len(text) >= max_chars:
                text = text[:max_chars - seen[0]]
                seen[0] += len(text)
                yield text
                return
            seen[0] += len(text)
            yield text
        if seen[0] == before:
            raise GptlabError(f"--data {s.spec}: empty corpus (no text in {s.resolve()})")


def _chunks(texts, size: int = 64):
    batch = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _run_encode(args) -> int:
    from gptlab.tokenizer import Tokenizer
    tok = Tokenizer.load(args.tokenizer)
    text = args.text if args.text is not None else sys.stdin.read()
    ids = tok.encode(text)
    print(f"{'#':>4}  {'id':>7}  token")
    for n, i in enumerate(ids):
        print(f"{n:>4}  {i:>7}  {_show(token_bytes(tok, i))}")
    print(f"{len(ids)} tokens for {len(text)} characters")
    return 0


def _run_decode(args) -> int:
    from gptlab.tokenizer import Tokenizer
    tok = Tokenizer.load(args.tokenizer)
    ids = []
    for s in args.ids:
        for part in s.replace(",", " ").split():
            try:
                i = int(part)
            except ValueError:
                raise GptlabError(f"not a token id: {part!r}") from None
            if not 0 <= i < tok.vocab_size:
                raise GptlabError(f"token id {i} is out of range (vocab size {tok.vocab_size})")
            ids.append(i)
    print(tok.decode(ids, skip_special=args.skip_special))
    return 0


def register(sub) -> None:
    from gptlab.data.commands import add_data_argument
    p = sub.add_parser("tokenizer", help="train a tokenizer, encode and decode text",
                       description="Train a byte-level BPE (GPT-2 style) or character tokenizer on "
                       "a corpus, and show how text maps to token ids and back.")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")

    t = tsub.add_parser("train", help="train a tokenizer on a corpus",
                        description="Train a tokenizer on the --data corpora and save OUT/"
                        "tokenizer.json (a standard Hugging Face file). Prints the vocabulary size, "
                        "the compression on the corpus (characters per token) and the time taken.")
    add_data_argument(t)
    t.add_argument("--vocab-size", type=int, default=4096,
                   help="target vocabulary size for bpe, specials included (default 4096)")
    t.add_argument("--kind", choices=["bpe", "char"], default="bpe",
                   help="bpe: byte-level BPE as in GPT-2; char: one token per character with byte "
                   "fallback (default bpe)")
    t.add_argument("--min-frequency", type=int, default=2,
                   help="bpe only: merge pairs seen at least this often (default 2)")
    t.add_argument("--digits", choices=["split", "runs"], default="split",
                   help="bpe only: split: every digit its own token, as LLaMA does (default); runs: "
                   "GPT-2's digit runs, which BPE merges into arbitrary chunks")
    t.add_argument("--max-chars", type=int, default=None, metavar="N",
                   help="train on the first N characters of the corpus only (a large corpus needs far "
                   "less text than it holds to learn its merges; default: all of it)")
    t.add_argument("--out", required=True, metavar="DIR", help="folder to write tokenizer.json to")
    t.set_defaults(func=_run_train)

    e = tsub.add_parser("encode", help="show the tokens and ids of a text",
                        description="Print each token of TEXT (escaped, so spaces and newlines "
                        "show) with its id. Special-token strings in TEXT are plain text.")
    e.add_argument("tokenizer", metavar="DIR", help="folder with tokenizer.json (or the file)")
    e.add_argument("text", nargs="?", help="text to encode (default: read standard input)")
    e.set_defaults(func=_run_encode)

    d = tsub.add_parser("decode", help="turn token ids back into text",
                        description="Print the text of the given token ids (space- or comma-"
                        "separated).")
    d.add_argument("tokenizer", metavar="DIR", help="folder with tokenizer.json (or the file)")
    d.add_argument("ids", nargs="+", metavar="ID", help="token ids")
    d.add_argument("--skip-special", action="store_true", help="leave out special tokens")
    d.set_defaults(func=_run_decode)
