"""Text -> tokens -> ids, and back.

Two kinds, both stored as a standard Hugging Face ``tokenizer.json`` (so ``tokenizers`` and
``transformers`` load them as they are):

* ``bpe``: byte-level BPE as in GPT-2. Every UTF-8 string round-trips because the base alphabet is the
  256 bytes.
* ``char``: one token per character seen in training, with byte fallback (``<0x..>`` tokens) for any
  character it never saw, so it round-trips losslessly too. Used for char-level baselines.

Both reserve the same special tokens up front (end of text, padding, mask, chat roles, GPT-1 task
tokens, spares), so later stages (chat, SFT, fine-tuning, BERT) never need to retrain the tokenizer.
Ordinary text is always encoded *without* interpreting special-token strings: a user who types
"<|user_start|>" gets the characters, not the control token. Control tokens are added by ids.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Iterator

from tokenizers import AddedToken, Regex
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from gptlab.errors import GptlabError

EOT = "<|endoftext|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
# GPT-1 task input transformations: start, delimiter ($ in the paper) and extract tokens.
START, DELIM, EXTRACT = "<|start|>", "<|delim|>", "<|extract|>"
SYSTEM_START, SYSTEM_END = "<|system_start|>", "<|system_end|>"
USER_START, USER_END = "<|user_start|>", "<|user_end|>"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"
TOOL_START, TOOL_END = "<|tool_start|>", "<|tool_end|>"
IMAGE = "<|image|>"

SPECIAL_TOKENS = [
    EOT, PAD, MASK, START, DELIM, EXTRACT,
    SYSTEM_START, SYSTEM_END, USER_START, USER_END, ASSISTANT_START, ASSISTANT_END,
    TOOL_START, TOOL_END, IMAGE,
] + [f"<|reserved_{i}|>" for i in range(5)]

# GPT-2's pre-tokenisation pattern: contractions, letter runs, digit runs, punctuation runs, spaces.
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# The default: the same, but every digit is its own piece (as LLaMA and PaLM do), so "481" is 4,8,1
# and never an arbitrary merge like "48","1": place value stays visible, which arithmetic needs.
_DIGIT_SPLIT = _GPT2_SPLIT.replace(r" ?\p{N}+", r" ?\p{N}")
_SPLITS = {"split": _DIGIT_SPLIT, "runs": _GPT2_SPLIT}
_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _not_unicode(text) -> Exception:
    """The error for a text the Rust tokenizer refuses: a str holding a lone UTF-16 surrogate (what
    Python makes of bytes that are not UTF-8 in argv or a file read with surrogateescape)."""
    if isinstance(text, str) and _has_surrogate(text):
        return GptlabError("the text is not valid Unicode (it holds a lone surrogate such as \\udced, e.g. from "
                           "bytes that are not UTF-8)")
    return TypeError(f"text must be a string, not {type(text).__name__}")


class Tokenizer:
    """A trained tokenizer. ``encode`` never interprets special tokens; use the ``*_id`` attributes."""

    def __init__(self, hf: HFTokenizer):
        self.hf = hf
        spec = json.loads(hf.to_str())
        self.kind = "char" if spec["model"].get("byte_fallback") else "bpe"
        # A twin without added tokens encodes user text literally (specials stay plain characters).
        plain_spec = dict(spec, added_tokens=[])
        self._plain = HFTokenizer.from_str(json.dumps(plain_spec))
        self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        # A char tokenizer is a table look-up: done in Python it is ~20x faster than the merge-less BPE
        # pipeline, which matters for corpora of millions of characters (pre-training caches them once).
        self._char_ids = ({t: i for t, i in self._plain.get_vocab().items() if len(t) == 1}
                          if self.kind == "char" else None)
        self._byte_ids = ([self._plain.token_to_id(t) for t in _BYTE_TOKENS] if self.kind == "char" else None)
        self.eot_id = self.special_id(EOT)
        if self.eot_id is None:
            raise GptlabError("tokenizer has no end-of-text token <|endoftext|>")

    # ----- construction -------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int = 4096, kind: str = "bpe",
              min_frequency: int = 2, digits: str = "split") -> "Tokenizer":
        """``digits``: "split" (one piece per digit, the default) or "runs" (GPT-2's digit runs)."""
        if digits not in _SPLITS:
            raise GptlabError(f"unknown --digits {digits!r} (choose split or runs)")
        specials = [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS]
        if kind == "bpe":
            if vocab_size < 256 + len(SPECIAL_TOKENS):
                raise GptlabError(f"--vocab-size must be at least {256 + len(SPECIAL_TOKENS)} for byte-level BPE")
            hf = HFTokenizer(models.BPE())
            hf.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Split(Regex(_SPLITS[digits]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ])
            hf.decoder = decoders.ByteLevel()
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
            hf.train_from_iterator(texts, trainer=trainer)
        elif kind == "char":
            chars: set[str] = set()
            for t in texts:
                chars.update(t)
            vocab = {}
            for tok in SPECIAL_TOKENS + _BYTE_TOKENS + sorted(chars):
                vocab.setdefault(tok, len(vocab))
            hf = HFTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token=None))
            # One piece per character keeps the (merge-less) BPE model fast on long texts.
            hf.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
            hf.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
        else:
            raise GptlabError(f"unknown tokenizer kind {kind!r} (choose bpe or char)")
        hf.add_special_tokens(specials)
        return cls(hf)

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a folder (tokenizer.json, or GPT-2's vocab.json + merges.txt) or a json file."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if file.is_file():
            try:
                return cls(HFTokenizer.from_file(str(file)))
            except Exception as e:  # tokenizers raises plain Exceptions for bad files
                raise GptlabError(f"{file}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
        if path.is_dir() and (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
            return cls.from_vocab_merges(path / "vocab.json", path / "merges.txt")
        raise GptlabError(f"{path}: no tokenizer.json (or vocab.json + merges.txt) found")

    @classmethod
    def from_vocab_merges(cls, vocab_file: Path, merges_file: Path) -> "Tokenizer":
        """GPT-2's original files: a byte-level BPE with <|endoftext|> as its only special token."""
        try:
            bpe = models.BPE.from_file(str(vocab_file), str(merges_file))
        except Exception as e:
            raise GptlabError(f"{vocab_file.parent}: cannot read vocab.json/merges.txt ({e})") from None
        hf = HFTokenizer(bpe)
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        hf.add_special_tokens([AddedToken(EOT, special=True, normalized=False)])
        return cls(hf)

    def save(self, folder: str | Path) -> Path:
        from gptlab.io import atomic_write_text
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "tokenizer.json", self.hf.to_str(pretty=True))
        return folder / "tokenizer.json"

    # ----- use ----------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self._char_ids is not None:
            return self._encode_chars(text)
        try:
            return self._plain.encode(text, add_special_tokens=False).ids
        except TypeError:
            raise _not_unicode(text) from None

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if self._char_ids is not None:
            return [self._encode_chars(t) for t in texts]
        try:
            return [e.ids for e in self._plain.encode_batch(texts, add_special_tokens=False)]
        except TypeError:
            raise next((_not_unicode(t) for t in texts if isinstance(t, str) and _has_surrogate(t)),
                       TypeError("texts must be strings")) from None

    def _encode_chars(self, text: str) -> list[int]:
        table, out = self._char_ids, []
        for ch in text:
            i = table.get(ch)
            if i is None:   # a character never seen in training: its UTF-8 bytes, as byte fallback does
                out.extend(self._byte_ids[b] for b in ch.encode("utf-8", "surrogatepass"))
            else:
                out.append(i)
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=skip_special)

    def tokens(self, text: str) -> list[tuple[str, int]]:
        """(readable token, id) pairs: what the model sees for ``text``."""
        ids = self.encode(text)
        return [(self.decode([i]), i) for i in ids]

    def special_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.hf.id_to_token(i)

    @property
    def pad_id(self) -> int:
        """<|pad|>'s id, or end-of-text's where there is none (imported GPT-2 tokenizers): padded
        positions are masked out, so any id serves, but one the model knows keeps exports sane."""
        pid = self.special_id(PAD)
        return self.eot_id if pid is None else pid

    def same_as(self, other: "Tokenizer") -> bool:
        """The same vocabulary, merges and special tokens (two runs' ids mean the same text)."""
        return self.hf.to_str() == other.hf.to_str()

    @property
    def special_ids(self) -> set[int]:
        return {i for t in SPECIAL_TOKENS if (i := self.hf.token_to_id(t)) is not None}

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"


def iter_texts(texts: Iterable[str], chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Cut long texts into ~1 MB pieces at line boundaries so the BPE trainer can parallelise."""
    for t in texts:
        start = 0
        while start < len(t):
            end = min(len(t), start + chunk_chars)
            if end < len(t):
                nl = t.rfind("\n", start, end)
                end = nl + 1 if nl > start else end
            yield t[start:end]
            start = end
