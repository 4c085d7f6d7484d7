"""Chat data: a conversation (a list of ``{"role", "content"}`` messages) is rendered with the
tokenizer's own chat template and trained on its assistant turns only — each turn's content and
the end-of-turn marker the template writes after it — as TRL's ``assistant_only_loss`` does.
The system prompt, the user turns and the template's headers are read but never predicted.

An assistant turn's characters are found by rendering the conversation up to it with the
generation prompt (where the turn starts) and up to its end (where it ends); trailing
whitespace after the end-of-turn marker stays unlabelled. Tokens are matched to characters by
the tokenizer's offsets, so any fast tokenizer and any template whose renderings of a prefix of
the conversation are prefixes of the whole rendering work.

    >>> tok = chat_tokenizer()  # one token per character, a ChatML-like template (tests/zoo.py)
    >>> ids, labels = encode_chat(tok, [{"role": "user", "content": "hi"},
    ...                                 {"role": "assistant", "content": "yo"}], 64)
    >>> tok.decode(ids)
    '<|user|>hi<|end|><|assistant|>yo<|end|>'
    >>> tok.decode([i for i, y in zip(ids, labels) if y != -100])
    'yo<|end|>'
"""

from __future__ import annotations

from typing import Any

IGNORE = -100  # a token read but not predicted (as in lm.py)
Conversation = list[dict[str, str]]


def check_conversation(value: Any, source: str, column: str, row: int) -> Conversation:
    """``value`` as a conversation: a non-empty list of messages with string ``role`` and
    ``content``, at least one of them an assistant turn (what is trained on)."""
    where = f"{source}: row {row} of column {column!r}"
    if not isinstance(value, (list, tuple)) or not value:
        hint = (
            " (it looks like JSON text: parse it with json.loads first)"
            if isinstance(value, str) and value.lstrip().startswith("[")
            else ""
        )
        raise ValueError(
            f"{where} holds {type(value).__name__} {str(value)[:80]!r} where a conversation is expected: "
            f'a list of {{"role": ..., "content": ...}} messages{hint}'
        )
    out = []
    for i, message in enumerate(value):
        bad = [k for k in ("role", "content") if not isinstance(message, dict) or not isinstance(message.get(k), str)]
        if bad:
            raise ValueError(
                f"{where}: message {i} is {str(message)[:80]!r}, whose {' and '.join(repr(k) for k in bad)} "
                'is missing or not a string; each message is {"role": ..., "content": ...} with string '
                "values"
            )
        out.append({"role": message["role"], "content": message["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise ValueError(
            f"{where} has no assistant turn, so nothing to learn from: roles are {[m['role'] for m in out]}"
        )
    return out


def render(tokenizer: Any, messages: Conversation, generation_prompt: bool = False) -> str:
    """The conversation as the tokenizer's chat template writes it (text, not ids)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            f"the tokenizer ({type(tokenizer).__name__}) has no chat template, so conversations cannot be "
            "rendered: use an instruction-tuned model's tokenizer, set tokenizer.chat_template, or give "
            "prompt_column and response_column instead of messages"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Any, messages: Conversation) -> tuple[str, list[tuple[int, int]]]:
    """(rendered conversation, the character spans of its assistant turns)."""
    text = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = render(tokenizer, messages[: i + 1])
        if not through.startswith(before) or not text.startswith(through):
            raise ValueError(
                "the chat template renders a conversation's start differently from the whole (it rewrites "
                f"earlier turns), so assistant turn {i} cannot be located; give prompt_column and "
                "response_column instead of messages"
            )
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def encode_chat(tokenizer: Any, messages: Conversation, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of a conversation: labels are the ids inside assistant turns, -100
    elsewhere. Too long, it keeps the start of its last assistant turn (at least half the
    length) and the end of what precedes it, as `lm.encode` does for a prompt and response."""
    return fit(*chat_parts(tokenizer, messages), max_length)


def chat_parts(tokenizer: Any, messages: Conversation) -> Parts:
    """A conversation as `Parts`: what precedes its last assistant turn, and that turn on."""
    text, spans = assistant_spans(tokenizer, messages)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow tokenizer without character offsets; load the fast one "
            "(AutoTokenizer.from_pretrained(..., use_fast=True))"
        )
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(encoded["input_ids"])
    labels = [
        t if any(a <= start < b for a, b in spans) else IGNORE for t, (start, _) in zip(ids, encoded["offset_mapping"])
    ]
    last = spans[-1][0]
    cut = next((k for k, (start, _) in enumerate(encoded["offset_mapping"]) if start >= last), len(ids))
    return ids[:cut], labels[:cut], ids[cut:], labels[cut:]


Parts = tuple[list[int], list[int], list[int], list[int]]  # (prompt ids, their labels, response ids, their labels)


def fit(
    p: list[int], p_labels: list[int], r: list[int], r_labels: list[int], max_length: int
) -> tuple[list[int], list[int]]:
    """Prompt ``p`` and response ``r`` (with their labels) joined in at most ``max_length``
    tokens: the response keeps its start (at least half the length, or all of it; `kept`), the
    prompt its first token (often BOS) and its end.

    >>> fit([1, 2, 3, 4], [-100] * 4, [5, 6, 7, 8], [5, 6, 7, 8], 5)
    ([1, 3, 4, 5, 6], [-100, -100, -100, 5, 6])
    """
    if len(p) + len(r) > max_length:
        keep = kept(len(p), len(r), max_length)
        r, r_labels = r[:keep], r_labels[:keep]
        room = max_length - keep
        if len(p) > room:
            head = min(1, room)
            tail = room - head
            p = p[:head] + (p[len(p) - tail :] if tail else [])
            p_labels = p_labels[:head] + (p_labels[len(p_labels) - tail :] if tail else [])
    return p + r, p_labels + r_labels


def kept(prompt: int, response: int, max_length: int) -> int:
    """How many of a response's ``response`` tokens `fit` keeps after a ``prompt``-token prompt.

    >>> kept(40, 10, 16), kept(2, 10, 16)
    (8, 10)
    """
    if prompt + response <= max_length:
        return response
    return min(response, max(max_length // 2, max_length - prompt))


def answer(example: Any) -> str:
    """The answer an example trains on: a pair's response, a conversation's last assistant turn."""
    if isinstance(example, tuple):
        return example[1]
    if isinstance(example, list):
        return next(m["content"] for m in reversed(example) if m["role"] == "assistant")
    raise ValueError(
        "plain texts have no answer to score: answer metrics (choice, exact_match) need prompt and "
        "response columns or messages"
    )


def with_answer(example: Any, text: str) -> Any:
    """``example`` with its answer (see `answer`) replaced by ``text``."""
    if isinstance(example, tuple):
        return (example[0], text)
    answer(example)  # a conversation without one is an error
    last = max(i for i, m in enumerate(example) if m["role"] == "assistant")
    return [*example[:last], {"role": "assistant", "content": text}, *example[last + 1 :]]
