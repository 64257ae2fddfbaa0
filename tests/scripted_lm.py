"""A stand-in language model whose every next token comes from a script: tests of the tool loop and of
function calling need a model that calls a tool on cue, which a tiny trained one does not do reliably.

``ScriptedLM(tok, reply)``: ``reply(conversation_text)`` returns the whole assistant turn to produce (a
text in which special tokens may appear as strings, e.g. ``'<|tool_start|>calculator {...}<|tool_end|>'``),
given the rendered conversation up to the last ``<|assistant_start|>``. The model emits that turn token
by token, wherever generation was paused and resumed, then end-of-turn.
"""
from types import SimpleNamespace

import torch

from gptlab.tokenizer import ASSISTANT_END, ASSISTANT_START, SPECIAL_TOKENS


class _Cache:
    def __init__(self, n):
        self.ctx = [[] for _ in range(n)]

    @property
    def lengths(self):
        return [len(c) for c in self.ctx]

    def reset(self, rows=None):
        for r in range(len(self.ctx)) if rows is None else rows:
            self.ctx[r] = []


def encode_with_specials(tok, text: str) -> list[int]:
    ids, rest = [], text
    while rest:
        at = [(rest.find(s), s) for s in SPECIAL_TOKENS if rest.find(s) != -1]
        if not at:
            return ids + tok.encode(rest)
        i, s = min(at)
        ids += tok.encode(rest[:i]) + [tok.special_id(s)]
        rest = rest[i + len(s):]
    return ids


class ScriptedLM(torch.nn.Module):
    def __init__(self, tok, reply, block_size: int = 4096):
        super().__init__()
        self.tok, self.reply = tok, reply
        self.config = SimpleNamespace(block_size=block_size, arch="scripted")
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.cache = None
        self.start = tok.special_id(ASSISTANT_START)

    def new_cache(self, batch_size, max_len=None, dtype=None):
        self.cache = _Cache(batch_size)
        return self.cache

    def hidden(self, idx, pos=None, cache=None, rows=None, segments=None):
        rows = list(range(idx.shape[0])) if rows is None else rows
        for r, seq in zip(rows, idx.tolist()):
            cache.ctx[r] += seq
        return torch.tensor(rows, dtype=torch.float)[:, None, None].expand(len(rows), idx.shape[1], 1)

    def decode(self, tokens, cache, rows):
        for r, t in zip(rows, tokens):
            cache.ctx[r].append(int(t))
        return torch.tensor(rows, dtype=torch.float)[:, None]

    def lm_logits(self, h):
        rows = [int(x) for x in h.reshape(-1).tolist()]
        out = torch.full((len(rows), self.tok.vocab_size), -1e4)
        for i, r in enumerate(rows):
            ctx = self.cache.ctx[r]
            at = len(ctx) - 1 - ctx[::-1].index(self.start)
            plan = encode_with_specials(self.tok, self.reply(self.tok.decode(ctx[:at]))) + [
                self.tok.special_id(ASSISTANT_END)]
            done = len(ctx) - at - 1
            out[i, plan[min(done, len(plan) - 1)]] = 0.0
        return out.reshape(*h.shape[:-1], -1)
