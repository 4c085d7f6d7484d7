"""Metrics a user judges a causal LM by, beside its loss: ``choice`` accuracy (each candidate
answer of a fixed set scored by its likelihood after the prompt, the likeliest one taken:
deterministic and cheap) and ``exact_match`` (the greedy answer, normalised, equal to the
reference). Both score the answer of instruction or chat examples (a pair's response, a
conversation's last assistant turn).

A choice batch holds every candidate of each example as a row of its own — example ``b``'s
candidate ``k`` is row ``b * K + k`` — and ``choice``, the index of each right answer; its loss
is the right answers' (`lm.gold`).

    >>> tok = chat_tokenizer()
    >>> chat = [{"role": "user", "content": "ok?"}, {"role": "assistant", "content": "yes"}]
    >>> (batch,) = choice_batches(tok, [chat], ("no", "yes"), batch_size=8, max_length=64)
    >>> batch["input_ids"].shape[0], batch["choice"].tolist()
    (2, [1])
    >>> normalise("  The  answer: Paris! ")
    'the answer paris'
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from .chat import answer, fit, with_answer
from .device import inference
from .lm import (
    IGNORE,
    Batch,
    Example,
    collate,
    cut_answers,
    gold,
    labelled_logits,
    lm_batches,
    negative_token_loss,
    output_layer,
    pad_id,
    parts,
)


def choice_batches(
    tokenizer: Any, examples: list[Example], choices: Sequence[str], batch_size: int, max_length: int
) -> list[Batch]:
    """Choice batches of ``batch_size`` examples, each example's answer one of ``choices``."""
    index = {c: i for i, c in enumerate(choices)}
    pad, out = pad_id(tokenizer), []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        right = []
        for i, x in enumerate(chunk, start):
            if answer(x) not in index:
                raise ValueError(
                    f"example {i}'s answer {answer(x)[:80]!r} is not one of the choices {list(choices)}: "
                    "fix the data or the choices"
                )
            right.append(index[answer(x)])
        candidates = [with_answer(x, c) for x in chunk for c in choices]
        encoded = [parts(tokenizer, x) for x in candidates]
        for j, lost, need in cut_answers(candidates, encoded, max_length)[:1]:
            raise ValueError(
                f"example {start + j // len(choices)} with the answer {choices[j % len(choices)]!r} takes "
                f"{need} tokens, and max_length={max_length} cuts {lost} of the answer's: choice scoring "
                "compares whole answers; raise max_length"
            )
        out.append({**collate([fit(*x, max_length) for x in encoded], pad), "choice": torch.tensor(right)})
    return out


def choice_scores(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(log-likelihood of each candidate (B, K), summed loss of the right answers, their tokens).
    The prompt each example's candidates share runs once (`shared_prompt_logits`) where the
    model allows, else every row runs whole."""
    shared = shared_prompt_logits(model, batch)
    logits, targets, rows = shared if shared is not None else labelled_logits(model, batch)
    nll = F.cross_entropy(logits.float(), targets, reduction="none")  # (N,)
    per_row = torch.zeros(batch["input_ids"].shape[0], device=nll.device).index_add_(0, rows, nll)
    scores = -per_row.view(batch["choice"].shape[0], -1)  # (B, K)
    right = batch["choice"].to(scores.device)
    tokens = torch.zeros_like(per_row).index_add_(0, rows, torch.ones_like(nll)).view_as(scores)
    return scores, -scores.gather(1, right[:, None]).sum(), int(tokens.gather(1, right[:, None]).sum())


def shared_prompt_logits(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`lm.labelled_logits` of a choice batch, its prompts run once: each example's prompt
    (left-padded) fills a key-value cache, copied to its K candidates, whose answer tokens then
    run after it. None where the model has no plain output layer (`lm.output_layer`) or an
    example's rows differ before their answers (the full rows then run)."""
    parts = output_layer(model)
    if parts is None:
        return None
    backbone, head = parts
    device = next(model.parameters()).device
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    n, k = batch["choice"].shape[0], ids.shape[0] // batch["choice"].shape[0]
    starts = (labels != IGNORE).int().argmax(1)  # (B*K,) the first answer token of each row
    ends = mask.sum(1)
    first = ids[::k]  # (B, T) each example's first candidate
    if (starts.view(n, k) != starts[::k, None]).any() or any(
        not torch.equal(ids[r, : starts[r]], first[r // k, : starts[r]]) for r in range(ids.shape[0])
    ):
        return None
    width, p = int(starts.max()), starts[::k]
    prompt = torch.stack([torch.cat([first[b].new_zeros(width - int(p[b])), first[b, : int(p[b])]]) for b in range(n)])
    prompt_mask = (torch.arange(width, device=device)[None] >= (width - p)[:, None]).long()  # (B, P) left padding
    out = backbone(
        input_ids=prompt,
        attention_mask=prompt_mask,
        position_ids=(prompt_mask.cumsum(1) - 1).clamp(min=0),
        use_cache=True,
    )
    cache = out["cache"] if "cache" in out else out["past_key_values"]
    cache.batch_repeat_interleave(k)
    length = int((ends - starts).max())
    offsets = starts[:, None] + torch.arange(length, device=device)[None]  # (B*K, A)
    inside = offsets < ends[:, None]
    answer = torch.where(inside, ids.gather(1, offsets.clamp(max=ids.shape[1] - 1)), 0)
    after = backbone(
        input_ids=answer,
        attention_mask=torch.cat([prompt_mask.repeat_interleave(k, 0), inside.long()], 1),
        position_ids=offsets,
        **{_cache_argument(backbone): cache},
        use_cache=True,
    ).last_hidden_state  # (B*K, A, H)
    # position starts+j is predicted by the prompt's last state (j = 0), else by answer token j-1
    states = torch.cat([out.last_hidden_state[:, -1].repeat_interleave(k, 0)[:, None], after[:, :-1]], 1)
    targets = torch.where(inside, labels.gather(1, offsets.clamp(max=ids.shape[1] - 1)), IGNORE)
    keep = targets != IGNORE
    return head(states[keep]), targets[keep], keep.nonzero()[:, 0]


def _cache_argument(backbone: nn.Module) -> str:
    """The name a backbone's forward takes its key-value cache by: ``cache`` (transformers 5.2x and
    later), else ``past_key_values``."""
    return _cache_argument_of(type(backbone))


@functools.cache
def _cache_argument_of(cls: type) -> str:  # read once per class, not on every validation batch
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def choice_accuracy_and_loss(model: nn.Module, batches: list[Batch]) -> tuple[float, float]:
    """(share of examples whose likeliest candidate is the right answer, the right answers' loss
    per token), in one forward pass per batch, in eval mode without gradients."""
    hits = n = tokens = 0
    total = 0.0
    with inference(model):
        for batch in batches:
            scores, loss, k = choice_scores(model, batch)
            hits += int((scores.argmax(1).cpu() == batch["choice"].cpu()).sum())
            n, total, tokens = n + len(batch["choice"]), total + float(loss), tokens + k
    if not n:
        raise ValueError("there are no examples to score")
    return hits / n, total / max(tokens, 1)


def choice_accuracy(model: nn.Module, batches: list[Batch]) -> float:
    """Share of examples whose likeliest candidate answer is the right one."""
    return choice_accuracy_and_loss(model, batches)[0]


def normalise(text: str) -> str:
    """Lower case, punctuation dropped, whitespace collapsed: how exact answers are compared."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class ExactMatch:
    """Share of examples whose greedy answer (decoded up to the end of turn, `normalise`-d) equals
    the reference answer. A model without ``generate`` cannot be scored this way."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def __call__(self, model: nn.Module, batches: list[Batch]) -> float:
        if not hasattr(model, "generate"):
            raise ValueError(
                f"exact_match generates answers, and {type(model).__name__} has no generate(); use "
                "metric='choice' or the loss"
            )
        hits = n = 0
        with inference(model):
            for batch in batches:
                got, want = self.answers(model, gold(batch))
                hits += sum(normalise(a) == normalise(b) for a, b in zip(got, want))
                n += len(want)
        return hits / n if n else float("nan")

    def answers(self, model: nn.Module, batch: Batch) -> tuple[list[str], list[str]]:
        """(greedy answers, reference answers) of one batch: each prompt is the example up to its
        first labelled token, left-padded for generation."""
        device = next(model.parameters()).device
        prompts, refs = [], []
        for ids, labels in zip(batch["input_ids"], batch["labels"]):
            first = int((labels != IGNORE).nonzero()[0, 0])
            prompts.append(ids[:first].tolist())
            refs.append([int(t) for t in labels[first:] if t != IGNORE])
        width, pad = max(len(p) for p in prompts), pad_id(self.tokenizer)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max(len(r) for r in refs) + 2,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        return [self.decode(row[width:].tolist()) for row in out], [self.decode(r) for r in refs]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` up to the first end-of-sequence token, special tokens left out."""
        eos = self.tokenizer.eos_token_id
        return self.tokenizer.decode(ids[: ids.index(eos)] if eos in ids else ids, skip_special_tokens=True)


METRICS = ("loss", "choice", "exact_match")  # what `Task.for_causal_lm(metric=...)` accepts


def scoring(metric: str, tokenizer: Any, choices: Sequence[str] | None, batch_size: int, max_length: int):
    """(metric function, how held-out examples become batches) for a causal-LM ``metric``:
    ``"loss"`` (minus the loss per token), ``"choice"`` (over ``choices``) or ``"exact_match"``."""
    if metric not in METRICS:
        raise ValueError(f"unknown causal-LM metric {metric!r}; choose one of {list(METRICS)}")
    if (metric == "choice") != (choices is not None):
        raise ValueError("metric='choice' scores a fixed set of answers: give choices=[...] (and only then)")
    if choices is not None and (len(set(choices)) < 2 or not all(isinstance(c, str) and c for c in choices)):
        raise ValueError(f"choices={choices!r}: give at least two distinct, non-empty answers")
    if metric == "choice":
        return choice_accuracy, lambda xs: choice_batches(tokenizer, xs, choices, batch_size, max_length)
    if metric == "loss":
        return negative_token_loss, lambda xs: lm_batches(tokenizer, xs, batch_size, max_length, what="held-out")

    def answered(xs: list[Example]) -> list[Batch]:
        for x in xs:
            answer(x)  # plain texts have none: an error saying so
        return lm_batches(tokenizer, xs, batch_size, max_length, what="held-out", whole=True)

    return ExactMatch(tokenizer), answered
