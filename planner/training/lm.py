"""Causal language-model tasks: next-token loss over plain texts, or over the response alone of
prompt/response pairs (instruction tuning: the prompt's tokens are labelled -100, so they are
read but never predicted). The metric is minus the validation loss per predicted token (higher
is better, as everywhere in peftplan); its perplexity is ``exp(-metric)``.

    >>> from peftplan.planner import Task
    >>> pairs = [{"prompt": f"{a}+{a}=", "response": str(2 * a)} for a in range(10)]
    >>> task = Task.for_causal_lm(tiny_llama(), char_tokenizer(), pairs, prompt_column="prompt",
    ...                           response_column="response", max_length=16)
    >>> sorted(task.train_batches[0]), task.metric_name
    (['attention_mask', 'input_ids', 'labels'], 'minus loss per token')

Examples come from a ``.txt`` file (one example per non-blank line), a CSV, JSON/JSONL or
Parquet file (read by `datasets`), a `datasets.Dataset` or ``DatasetDict``, or a list of
strings or of dicts.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import Parts, chat_parts, check_conversation, fit, kept
from .device import inference
from .files import load_table, text_cell

IGNORE = -100  # the label of a token that is read but not predicted (torch's cross-entropy ignore_index)
Batch = dict[str, torch.Tensor]
Example = Any  # a text, a (prompt, response) pair, or a conversation (`chat.Conversation`)


@dataclass(frozen=True)
class LMColumns:
    """Which columns hold the text, the prompt and the response (instruction data), or the
    conversation (chat data: a list of ``{"role", "content"}`` messages)."""

    text: str | None = "text"
    prompt: str | None = None
    response: str | None = None
    messages: str | None = None

    @classmethod
    def of(
        cls, text: str | None, prompt: str | None, response: str | None, messages: str | None = None
    ) -> LMColumns | None:
        """The columns named (None when none is: `resolve` picks them from the data)."""
        if (prompt is None) != (response is None):
            raise ValueError(
                "instruction data needs both prompt_column and response_column (--prompt-column, "
                "--response-column); give both, or text_column alone for plain text"
            )
        kinds = [
            k
            for k, given in (
                ("text_column", text),
                ("prompt_column and response_column", prompt),
                ("messages_column", messages),
            )
            if given is not None
        ]
        if len(kinds) > 1:
            raise ValueError(
                f"give one kind of data: text_column for plain text, prompt_column and response_column for "
                f"instruction data, or messages_column for chat data, not {' and '.join(kinds)}"
            )
        if not kinds:
            return None
        return cls(text, None, None) if text is not None else cls(None, prompt, response, messages)

    @property
    def instruction(self) -> bool:
        return self.prompt is not None

    def resolve(self, have: list[str], source: str) -> LMColumns:
        """These columns checked against the table's ``have``."""
        for role, name in (
            ("text", self.text),
            ("prompt", self.prompt),
            ("response", self.response),
            ("messages", self.messages),
        ):
            if name is not None and name not in have:
                raise ValueError(
                    f"{source} has no {role} column {name!r}; its columns are {have}: pass "
                    f"{role}_column=... (--{role}-column on the command line)"
                )
        return self


def default_columns(have: list[str], source: str) -> LMColumns:
    """``messages`` when the data has it, else ``text``, else ``prompt`` and ``response``."""
    if "messages" in have:
        return LMColumns(None, messages="messages")
    if "text" in have:
        return LMColumns()
    if "prompt" in have and "response" in have:
        return LMColumns(None, "prompt", "response")
    raise ValueError(
        f"{source} has columns {have} but none of 'messages', 'text', or 'prompt' and 'response': name "
        "them with messages_column=..., text_column=..., or prompt_column=... and response_column=... "
        "(--messages-column, --text-column, --prompt-column, --response-column)"
    )


def read_examples(source: Any, columns: LMColumns | None, what: str) -> list[Example]:
    """Texts, or (prompt, response) pairs, from a path, a `datasets.Dataset` or a list."""
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.suffix.lower() == ".txt":
            if columns is not None and columns.text is None:
                raise ValueError(
                    f"{path} is a text file (one example per line): instruction and chat data with "
                    "named columns come as CSV, JSON/JSONL or Parquet"
                )
            if not path.is_file():
                raise FileNotFoundError(f"{path}: no such data file")
            texts = [line.rstrip("\r\n") for line in path.open(encoding="utf-8") if line.strip()]
            if not texts:
                raise ValueError(f"{path} has no examples")
            return texts
        return _table_examples(load_table(path), columns, str(path))
    if isinstance(getattr(source, "column_names", None), list):
        return _table_examples(source, columns, f"the {what}")
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError(f"the {what} is an empty list")
        if all(isinstance(x, str) for x in source):
            if columns is not None and columns.text is None:
                raise ValueError(
                    f"the {what} is a list of strings: instruction and chat data are lists of dicts with "
                    "the prompt and response, or messages, columns"
                )
            return list(source)
        if all(isinstance(x, dict) for x in source):
            return _table_examples(_table_of(source, what), columns, f"the {what}")
        raise TypeError(f"the {what} mixes types: give a list of strings, or of dicts with named columns")
    raise TypeError(
        f"the {what} is a {type(source).__name__}: give a path (.txt, .csv, .json, .jsonl, .parquet), a "
        "datasets.Dataset or DatasetDict, or a list of strings or dicts"
    )


def _table_of(rows: list[dict], what: str) -> Any:
    """A list of dicts as a `datasets.Dataset`; a column holding values of different kinds
    (lists in some rows, strings in others) is named."""
    import datasets

    for key in dict.fromkeys(k for row in rows for k in row):
        kinds = sorted(
            {
                "list" if isinstance(row[key], (list, tuple)) else type(row[key]).__name__
                for row in rows
                if row.get(key) is not None
            }
        )
        if len(kinds) > 1:
            row = next(
                i
                for i, r in enumerate(rows)
                if r.get(key) is not None
                and ("list" if isinstance(r[key], (list, tuple)) else type(r[key]).__name__) != kinds[0]
            )
            raise ValueError(
                f"the {what}: column {key!r} holds {' and '.join(kinds)} values (row {row} is "
                f"{str(rows[row][key])[:80]!r}); give every row the same kind: for chat data, a list of "
                '{"role": ..., "content": ...} messages'
            )
    return datasets.Dataset.from_list(list(rows))


def cut_answers(examples: list[Example], encoded: list[Parts], max_length: int) -> list[tuple[int, int, int]]:
    """(index, answer tokens cut, tokens the whole example takes) of each example (not a plain
    text) whose answer ``max_length`` cuts."""
    cut = [
        (i, len(r) - kept(len(p), len(r), max_length), len(p) + len(r))
        for i, (x, (p, _, r, _)) in enumerate(zip(examples, encoded))
        if not isinstance(x, str)
    ]
    return [c for c in cut if c[1] > 0]


def check_causal_lm(model: Any) -> None:
    """A Hugging Face model given for a causal-LM task must have an output layer over the
    vocabulary: a classifier or a bare encoder is refused here, not by a shape error later.

    >>> from transformers import BertConfig, BertForSequenceClassification
    >>> check_causal_lm(BertForSequenceClassification(BertConfig(hidden_size=8, num_hidden_layers=1,
    ...     num_attention_heads=1, intermediate_size=8, vocab_size=10)))
    Traceback (most recent call last):
    ...
    ValueError: BertForSequenceClassification is not a causal language model (it has no output layer over the vocabulary), so it cannot predict the next token: load it with AutoModelForCausalLM (load_model(spec, causal_lm=True), --causal-lm on the command line), or give a classification task (Task.for_sequence_classification)
    """
    get = getattr(model, "get_output_embeddings", None)
    if isinstance(model, nn.Module) and callable(get) and get() is None:
        raise ValueError(
            f"{type(model).__name__} is not a causal language model (it has no output layer over the "
            "vocabulary), so it cannot predict the next token: load it with AutoModelForCausalLM "
            "(load_model(spec, causal_lm=True), --causal-lm on the command line), or give a "
            "classification task (Task.for_sequence_classification)"
        )


def check_predicts(batches: list[Batch], what: str, name: str, max_length: int) -> None:
    """Batches (of a split that has any) must predict at least one token between them."""
    if batches and not any(predicted_tokens(b) for b in batches):
        raise ValueError(
            f"no {what} example of {name!r} has a token to predict: the responses are empty or the prompts "
            f"fill max_length={max_length}, so every {what} score would fail; fix the {what} data or raise "
            "max_length"
        )


def _table_examples(table: Any, columns: LMColumns | None, source: str) -> list[Example]:
    have = list(table.column_names)
    columns = (columns or default_columns(have, source)).resolve(have, source)
    if len(table) == 0:
        raise ValueError(f"{source} has no examples")
    if columns.messages is not None:
        return [check_conversation(v, source, columns.messages, i) for i, v in enumerate(table[columns.messages])]
    if not columns.instruction:
        return [text_cell(v, source, columns.text) for v in table[columns.text]]
    prompts = [text_cell(v, source, columns.prompt) for v in table[columns.prompt]]
    return list(zip(prompts, (text_cell(v, source, columns.response) for v in table[columns.response])))


def encode(tokenizer: Any, example: Example, max_length: int) -> tuple[list[int], list[int]]:
    """(token ids, labels) of one example, at most ``max_length`` tokens. A text is predicted
    whole (after the tokenizer's own special tokens, then its end-of-sequence token); of a
    (prompt, response) pair only the response and the end-of-sequence token are, the prompt's
    labels being -100; of a conversation the assistant turns (`chat.encode_chat`). A pair too
    long keeps the start of the response (at least half the length, or all of it) and the end
    of the prompt (its first token kept: often BOS).

    >>> class Chars:  # a tokenizer of one id per character, BOS 1, EOS 2
    ...     bos_token_id, eos_token_id = 1, 2
    ...     def __call__(self, text, add_special_tokens=True):
    ...         return {"input_ids": ([1] if add_special_tokens else []) + [ord(c) for c in text]}
    >>> encode(Chars(), ("ab", "c"), 16)
    ([1, 97, 98, 99, 2], [-100, -100, -100, 99, 2])
    """
    return fit(*parts(tokenizer, example), max_length)


def parts(tokenizer: Any, example: Example) -> Parts:
    """An example's tokens before it is cut to a length (`chat.fit`): (prompt ids, their labels,
    response ids, their labels); a text is all response."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(example, list):
        return chat_parts(tokenizer, example)
    if isinstance(example, str):
        ids = list(tokenizer(example)["input_ids"])
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        return [], [], ids, list(ids)
    prompt, response = example
    p = list(tokenizer(prompt)["input_ids"])
    r = list(tokenizer(response, add_special_tokens=False)["input_ids"]) + ([eos] if eos is not None else [])
    return p, [IGNORE] * len(p), r, list(r)


def pad_id(tokenizer: Any) -> int:
    """What batches are padded with: the pad token, else the end-of-sequence token, else 0."""
    return next(
        (
            t
            for t in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
            if t is not None
        ),
        0,
    )


def collate(encoded: list[tuple[list[int], list[int]]], pad: int) -> Batch:
    """``input_ids``, ``attention_mask`` and ``labels`` of encoded examples, right-padded to the
    longest (padding masked and labelled -100).

    >>> collate([([5, 6], [5, 6]), ([7], [-100])], pad=0)["labels"].tolist()
    [[5, 6], [-100, -100]]
    """
    width = max(len(ids) for ids, _ in encoded)
    ids = torch.full((len(encoded), width), pad, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    labels = torch.full((len(encoded), width), IGNORE, dtype=torch.long)
    for row, (x, y) in enumerate(encoded):
        ids[row, : len(x)], mask[row, : len(x)], labels[row, : len(y)] = torch.tensor(x), 1, torch.tensor(y)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_batches(
    tokenizer: Any,
    examples: list[Example],
    batch_size: int,
    max_length: int,
    *,
    what: str = "training",
    whole: bool = False,
) -> list[Batch]:
    """Batches of ``input_ids``, ``attention_mask`` and ``labels``, each right-padded to its longest
    example (`collate`). Answers (responses, assistant turns) that ``max_length`` cuts are said:
    a warning for ``what`` data trained or scored by its loss, an error when answers are
    compared ``whole`` (exact match)."""
    encoded = [parts(tokenizer, x) for x in examples]
    check_cut(examples, encoded, max_length, what, whole)
    pad = pad_id(tokenizer)
    return [
        collate([fit(*x, max_length) for x in encoded[i : i + batch_size]], pad)
        for i in range(0, len(encoded), batch_size)
    ]


def check_cut(examples: list[Example], encoded: list[Parts], max_length: int, what: str, whole: bool) -> None:
    """Say which answers ``max_length`` cuts (plain texts are cut silently: long texts are
    trained on their starts): a warning, or with ``whole`` an error naming the first example."""
    cut = cut_answers(examples, encoded, max_length)
    if not cut:
        return
    i, lost, need = cut[0]
    if whole:
        raise ValueError(
            f"{what} example {i} takes {need} tokens, and max_length={max_length} cuts {lost} of its answer's, "
            "so it cannot be compared whole: raise max_length"
        )
    after = (
        "the model then never learns to finish them" if what == "training" else "their scores leave those tokens out"
    )
    warnings.warn(
        f"{len(cut)} of {len(examples)} {what} examples are longer than max_length={max_length} and lose the "
        f"end of their answer (example {i} takes {need} tokens and loses {lost} of its answer), so {after}: "
        "raise max_length to keep them whole",
        stacklevel=4,
    )


def model_inputs(batch: Batch, device: torch.device) -> Batch:
    """What the model reads of a batch (not its labels, nor a choice batch's answer index), on ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k != "labels" and not k.startswith("choice")}


def gold(batch: Batch) -> Batch:
    """A choice batch's rows of the right answers (`answers.choice_batches`); any other batch as it is."""
    if "choice" not in batch:
        return batch
    k = batch["input_ids"].shape[0] // batch["choice"].shape[0]
    rows = torch.arange(batch["choice"].shape[0], device=batch["choice"].device) * k + batch["choice"]
    return {key: v[rows.to(v.device)] for key, v in batch.items() if key != "choice"}


SCALED_LOGITS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def output_layer(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(backbone, output layer) of a Hugging Face causal LM (or peft's wrapper of one) whose
    logits are the output layer of the backbone's last hidden state, so that it can run at
    chosen positions only; None for any other model (its full forward is used)."""
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: the model it wraps
    prefix = getattr(hf, "base_model_prefix", None)
    backbone = getattr(hf, prefix, None) if prefix else None
    if not hasattr(hf, "get_output_embeddings") or not isinstance(backbone, nn.Module) or backbone is hf:
        return None
    if any(getattr(hf.config, name, None) not in (None, 1, 1.0) for name in SCALED_LOGITS):
        return None  # logits capped or scaled after the output layer
    head = hf.get_output_embeddings()
    return (backbone, head) if isinstance(head, nn.Module) else None


def labelled_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(logits, targets, rows) at the positions whose next token is labelled: the logits at
    position ``t`` predict the label at ``t + 1``. The output layer runs at those positions only
    (prompt tokens never reach the vocabulary-sized projection) where `output_layer` allows."""
    device = next(model.parameters()).device
    inputs = model_inputs(batch, device)
    labels = batch["labels"].to(device)[:, 1:]
    mask = labels != IGNORE
    parts = output_layer(model)
    if parts is None:
        logits = model(**inputs).logits[:, :-1][mask]
    else:
        backbone, head = parts
        hidden = backbone(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        logits = head(hidden[:, :-1][mask])  # (N, V): N labelled positions
    return logits, labels[mask], mask.nonzero()[:, 0]


def token_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
    """(summed next-token cross-entropy, predicted tokens) of one batch (of a choice batch, its
    right answers)."""
    logits, targets, _ = labelled_logits(model, gold(batch))
    return F.cross_entropy(logits.float(), targets, reduction="sum"), int(targets.numel())


def causal_lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Mean next-token cross-entropy over the batch's predicted tokens (0, with a graph, when a
    batch predicts none)."""
    total, n = token_loss(model, batch)
    return total / max(n, 1)


def predicted_tokens(batch: Batch) -> int:
    """Tokens a batch's loss is the mean over: what its validation loss is weighted by."""
    return int((gold(batch)["labels"][:, 1:] != IGNORE).sum())


def negative_token_loss(model: nn.Module, batches: list[Batch]) -> float:
    """Minus the mean next-token loss over every predicted token of ``batches`` (higher is
    better; the perplexity is ``exp`` of minus this), in eval mode without gradients."""
    total = n = 0.0
    with inference(model):
        for batch in batches:
            s, k = token_loss(model, batch)
            total, n = total + float(s), n + k
    if not n:
        raise ValueError(
            "the batches predict no token: every label is -100 (empty responses, or prompts filling max_length)"
        )
    return -total / n
