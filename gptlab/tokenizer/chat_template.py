"""The chat template: how system/user/assistant turns become token ids.

Each turn is wrapped in its role's reserved start/end tokens:

    <|system_start|>You are helpful.<|system_end|><|user_start|>Hi<|user_end|><|assistant_start|>Hello!<|assistant_end|>

A prompt for generation ends with ``<|assistant_start|>``; the model answers and stops at
``<|assistant_end|>`` (end of turn). Content is encoded as plain text, so a user typing a special-token
string cannot forge a turn boundary. For SFT the loss mask covers assistant content and the
assistant-end token only (the model must learn to stop, not to predict what the user says).

Tools: when a conversation has tools, each is described on one line of the system turn
(``gptlab.tools.describe``). An assistant turn may end with calls, each wrapped in the tool tokens, and
each result comes back as a ``tool`` turn wrapped in the same tokens::

    <|system_start|>Tools:
    calculator(expression: string) - exact arithmetic<|system_end|><|user_start|>What is 1234 * 5678?<|user_end|>
    <|assistant_start|><|tool_start|>calculator {"expression": "1234 * 5678"}<|tool_end|><|assistant_end|>
    <|tool_start|>7006652<|tool_end|><|assistant_start|>1234 * 5678 = 7006652.<|assistant_end|>

Inside an assistant turn the tool tokens hold a call; between turns they hold a result. The call and
its closing tokens are trained on; a result is not (the model must learn to ask, never to make up what
a tool says).

Pictures: a user turn's content may be a list of OpenAI-style parts, ``{"type": "text", "text": ...}``
and ``{"type": "image_url", ...}`` (or ``{"type": "image"}``). Each picture becomes ``image_tokens``
copies of ``<|image|>``, whose embeddings a vision model replaces with the picture's
(model/vision.py); a tokenizer-level view needs only how many there are. With ``image_tokens`` 0 (a
text-only model) a picture is refused.

The same template is exported as a Jinja string (``CHAT_TEMPLATE_JINJA``) for Hugging Face tokenizers
(conversations without tool calls).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

from gptlab.data.formats import TRANSCRIPT_NAMES, check_tool_calls, render_transcript
from gptlab.errors import GptlabError
from gptlab.tokenizer import (ASSISTANT_END, ASSISTANT_START, IMAGE, SYSTEM_END, SYSTEM_START, TOOL_END,
                              TOOL_START, USER_END, USER_START, Tokenizer)
from gptlab.tools import describe, format_call

ROLES = {
    "system": (SYSTEM_START, SYSTEM_END),
    "user": (USER_START, USER_END),
    "assistant": (ASSISTANT_START, ASSISTANT_END),
    "tool": (TOOL_START, TOOL_END),
}

CHAT_TEMPLATE_JINJA = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)


def _role_ids(tok: Tokenizer, role: str) -> tuple[int, int]:
    if role not in ROLES:
        raise GptlabError(f"unknown role {role!r} (expected system, user, assistant or tool)")
    start, end = (tok.special_id(t) for t in ROLES[role])
    if start is None or end is None:
        raise GptlabError("this tokenizer has no chat tokens; train one with `gptlab tokenizer train`")
    return start, end


def has_chat_tokens(tok: Tokenizer) -> bool:
    return all(tok.special_id(t) is not None for t in (USER_START, USER_END, ASSISTANT_START, ASSISTANT_END))


def require_chat_tokens(tok: Tokenizer, run_dir) -> None:
    """Chat needs the role tokens; imported GPT-2 tokenizers do not have them."""
    if not has_chat_tokens(tok):
        raise GptlabError(f"{run_dir}: the tokenizer has no chat tokens (<|user_start|> ...); re-import with "
                          "`gptlab import HF_DIR --out RUN --add-chat-tokens` and fine-tune with `gptlab sft`")


def validate_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise GptlabError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not (
                isinstance(m.get("content"), str) or (m["role"] == "user" and _is_parts(m.get("content")))):
            raise GptlabError(f"message {i} must be {{'role': system|user|assistant|tool, 'content': str}} "
                              "(a user turn may hold a list of text and image parts)")
        if m["role"] == "system" and i != 0:
            raise GptlabError(f"message {i}: a system message may only come first")
        if m.get("tool_calls"):
            if m["role"] != "assistant":
                raise GptlabError(f"message {i}: only an assistant turn makes tool calls")
            check_tool_calls(m["tool_calls"], f"message {i}")
    return messages


IMAGE_PART_TYPES = ("image", "image_url")


def _is_parts(content) -> bool:
    return isinstance(content, list) and all(
        isinstance(p, dict) and (p.get("type") in IMAGE_PART_TYPES or
                                 (p.get("type") == "text" and isinstance(p.get("text"), str))) for p in content)


def content_text(m: dict) -> str:
    """A message's text (the text parts of a list content, joined)."""
    c = m["content"]
    return c if isinstance(c, str) else "".join(p["text"] for p in c if p.get("type") == "text")


def count_images(messages: list[dict]) -> int:
    return sum(1 for m in messages if isinstance(m["content"], list)
               for p in m["content"] if p.get("type") in IMAGE_PART_TYPES)


def _encode_content(tok: Tokenizer, content, image_tokens: int) -> list[int]:
    if isinstance(content, str):
        return tok.encode(content)
    ids: list[int] = []
    for p in content:
        if p["type"] == "text":
            ids += tok.encode(p["text"])
            continue
        image_id = tok.special_id(IMAGE)
        if image_tokens < 1 or image_id is None:
            raise GptlabError("this model is text-only (it has no vision encoder), so it cannot take images")
        ids += [image_id] * image_tokens
    return ids


def tool_preamble(tools: list[dict]) -> str:
    """The system-turn text that tells the model which tools it may call, one per line."""
    return "Tools:\n" + "\n".join(describe(t) for t in tools)


def with_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """``messages`` with the tool descriptions added to the system turn (one is made if there is none)."""
    if not tools:
        return messages
    if messages and messages[0]["role"] == "system":
        sys = messages[0]["content"]
        return [{"role": "system", "content": (sys + "\n" if sys else "") + tool_preamble(tools)}] + messages[1:]
    return [{"role": "system", "content": tool_preamble(tools)}] + list(messages)


def _turn(tok: Tokenizer, m: dict, image_tokens: int = 0) -> tuple[list[int], list[int]]:
    """One message's ids and its SFT mask (assistant content, calls and closing tokens are trained on)."""
    start, end = _role_ids(tok, m["role"])
    train = 1 if m["role"] == "assistant" else 0
    ids, mask = [start] + _encode_content(tok, m["content"], image_tokens), [0]
    mask += [train] * (len(ids) - 1)
    if m.get("tool_calls"):
        call_start, call_end = _role_ids(tok, "tool")
        for c in m["tool_calls"]:
            body = [call_start] + tok.encode(format_call(c["name"], c["arguments"])) + [call_end]
            ids += body
            mask += [1] * len(body)
    return ids + [end], mask + [train]


def render(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
           image_tokens: int = 0) -> tuple[list[int], list[int]]:
    """Ids of a whole conversation and a 0/1 mask marking the tokens an SFT loss should train on."""
    ids: list[int] = []
    mask: list[int] = []
    for m in with_tools(validate_messages(messages), tools):
        t_ids, t_mask = _turn(tok, m, image_tokens)
        ids += t_ids
        mask += t_mask
    return ids, mask


def render_prompt(tok: Tokenizer, messages: list[dict], tools: list[dict] | None = None,
                  image_tokens: int = 0) -> list[int]:
    """Ids of the conversation so far plus ``<|assistant_start|>``: what generation continues."""
    ids, _ = render(tok, messages, tools, image_tokens)
    return ids + [_role_ids(tok, "assistant")[0]]


def end_of_turn_id(tok: Tokenizer) -> int:
    return _role_ids(tok, "assistant")[1]


@dataclass
class FittedPrompt:
    ids: list[int]
    messages: list[dict]
    dropped: int          # how many of the oldest non-system turns were left out


def fit_prompt(tok: Tokenizer, messages: list[dict], max_tokens: int, tools: list[dict] | None = None,
               image_tokens: int = 0) -> FittedPrompt:
    """Drop the oldest turns (keeping a leading system message) until the prompt fits ``max_tokens``.

    With ``tools`` their descriptions join the system turn, which is always kept.
    Raises GptlabError when even the last message alone (with the system message) does not fit.
    Linear: turns are encoded newest first, each once, and a turn too long to fit in what room is left
    (judged by its length, see ``max_token_chars``) is not encoded at all, so a huge conversation costs
    about as much as the part of it that fits.
    """
    original = validate_messages(messages)   # what the caller gave: FittedPrompt.messages has no preamble
    messages = with_tools(original, tools)
    system = messages[:1] if messages[0]["role"] == "system" else []
    rest = messages[len(system):]
    widest = max_token_chars(tok)
    start_id = _role_ids(tok, "assistant")[0]
    if system and _longer_than(system[0], max_tokens - 1, widest):   # the system turn (tools included)
        raise GptlabError(f"the system message does not fit in the context window ({max_tokens} tokens)")
    head = render(tok, system)[0] if system else []
    room = max_tokens - len(head) - 1   # the closing <|assistant_start|>
    kept: list[list[int]] = []
    for m in reversed(rest):
        if _longer_than(m, room, widest):
            break
        ids = _turn(tok, m, image_tokens)[0]
        if len(ids) > room:
            break
        kept.append(ids)
        room -= len(ids)
    if not kept:
        raise GptlabError(f"the last message does not fit in the context window ({max_tokens} tokens)")
    dropped = len(rest) - len(kept)
    ids = head + [i for turn in reversed(kept) for i in turn] + [start_id]
    return FittedPrompt(ids, original[:len(original) - len(rest)] + rest[dropped:], dropped)


def _longer_than(m: dict, room: int, widest: int) -> bool:
    """True when message ``m`` cannot fit in ``room`` tokens, judged by its length alone (no tokenising):
    each token stands for at most ``widest`` characters, so a longer text needs more tokens than fit."""
    chars = len(content_text(m)) + sum(len(format_call(c["name"], c["arguments"])) for c in m.get("tool_calls") or ())
    return room < 2 or chars > (room - 2) * widest


_WIDEST: "weakref.WeakKeyDictionary[Tokenizer, int]" = weakref.WeakKeyDictionary()


def max_token_chars(tok: Tokenizer) -> int:
    """An upper bound on the characters one token of ``tok`` stands for (its longest vocabulary entry:
    a byte-level entry holds one character per byte, and a byte decodes to at most one character)."""
    if tok not in _WIDEST:
        _WIDEST[tok] = max((len(t) for i in range(tok.vocab_size) if (t := tok.id_to_token(i))), default=1)
    return _WIDEST[tok]


def parse_reply(tok: Tokenizer, ids: list[int]) -> str:
    """Text of generated ids up to (not including) the end-of-turn token."""
    end = end_of_turn_id(tok)
    if end in ids:
        ids = ids[: ids.index(end)]
    return tok.decode(ids, skip_special=True)


# ----- a plain-text transcript, for models that never saw the template --------------------------------
def transcript_prompt(tok: Tokenizer, messages: list[dict], demos: list[list[dict]], max_tokens: int) -> list[int]:
    """Ids of ``demos`` (whole conversations, k-shot demonstrations) then ``messages``, each a transcript
    separated by a blank line, ending with ``Assistant:`` for the model to continue; the answer ends at
    the next newline. The oldest demonstrations are dropped until the prompt fits ``max_tokens``."""
    query = render_transcript(messages) + TRANSCRIPT_NAMES["assistant"] + ":"
    shots = [render_transcript(d) for d in demos]
    while True:
        ids = [tok.eot_id] + tok.encode("\n".join(shots + [query]))
        if len(ids) <= max_tokens:
            return ids
        if not shots:
            raise GptlabError(f"the prompt does not fit in the context window ({max_tokens} tokens)")
        shots = shots[1:]
