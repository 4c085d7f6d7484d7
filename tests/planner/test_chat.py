"""Chat data and the answer metrics: assistant-only labels against a hand computation and
against transformers' own assistant mask, the output layer at labelled positions only against
the model's full loss (values and gradients), choice accuracy against per-candidate
likelihoods summed by hand, exact match against unbatched greedy decoding."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import peftplan as pp
from peftplan.planner.training import answers, chat, lm
from peftplan.planner.training.evaluate import metric_and_loss, validation_loss
from tests.zoo import chat_tokenizer, gpt2, llama, qwen2

CHAT = [
    {"role": "system", "content": "be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "yo"},
    {"role": "user", "content": "ok?"},
    {"role": "assistant", "content": "ok!"},
]
QA = [
    ("good film", "yes"),
    ("dull film", "no"),
    ("fine day", "yes"),
    ("sad end", "no"),
    ("nice cast", "yes"),
    ("bad plot", "no"),
    ("fun ride", "yes"),
    ("weak act", "no"),
]


def conversation(q: str, a: str) -> list[dict]:
    return [{"role": "user", "content": f"{q}?"}, {"role": "assistant", "content": a}]


def labelled(tok, ids, labels) -> str:
    return tok.decode([i for i, y in zip(ids, labels) if y != -100])


def test_only_the_assistant_turns_and_their_end_marker_are_labelled():
    tok = chat_tokenizer()
    ids, labels = chat.encode_chat(tok, CHAT, 128)
    assert (
        tok.decode(ids)
        == "<|system|>be brief.<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>ok?<|end|><|assistant|>ok!<|end|>"
    )
    # by hand: the labels are the ids exactly where the two assistant turns' contents and end markers are
    text = tok.decode(ids)
    want: list[int] = []
    for content in ("yo<|end|>", "ok!<|end|>"):
        start = len(
            tok(text[: text.index("<|assistant|>" + content) + len("<|assistant|>")], add_special_tokens=False)[
                "input_ids"
            ]
        )
        want += range(start, start + len(tok(content, add_special_tokens=False)["input_ids"]))
    assert [i for i, y in enumerate(labels) if y != -100] == want
    assert all(labels[i] == ids[i] for i in want)
    assert labelled(tok, ids, labels) == "yo<|end|>ok!<|end|>"


def test_the_labels_match_transformers_assistant_mask_on_a_template_that_marks_them():
    tok = chat_tokenizer()
    marked = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{% if m['role'] == 'assistant' %}{% generation %}"
        "{{ m['content'] + '<|end|>' }}{% endgeneration %}{% else %}{{ m['content'] + '<|end|>' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
    )
    tok.chat_template = marked
    theirs = tok.apply_chat_template(CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, labels = chat.encode_chat(tok, CHAT, 128)
    assert ids == theirs["input_ids"]
    assert [int(y != -100) for y in labels] == theirs["assistant_masks"]


def test_a_long_conversation_keeps_the_start_of_its_last_answer():
    tok = chat_tokenizer()
    long = [{"role": "user", "content": "x" * 40}, {"role": "assistant", "content": "abcdefghij"}]
    ids, labels = chat.encode_chat(tok, long, 16)
    assert len(ids) == 16 and labelled(tok, ids, labels) == "abcdefgh"  # half the length for the answer
    assert tok.decode(ids[:1]) == "<|user|>"  # the first token stays


def test_bad_conversations_and_templates_are_named():
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match=r"row 1 of column 'messages' has no assistant turn"):
        pp.Task.for_causal_lm(
            llama(), tok, [{"messages": conversation("a", "b")}, {"messages": [{"role": "user", "content": "x"}]}]
        )
    with pytest.raises(ValueError, match=r"row 0 of column 'messages': message 0 is .* with string values"):
        pp.Task.for_causal_lm(llama(), tok, [{"messages": [{"role": "user", "content": 3}]}], validation=None)
    bare = chat_tokenizer()
    bare.chat_template = None
    with pytest.raises(ValueError, match="has no chat template"):
        chat.encode_chat(bare, CHAT, 64)
    rewriting = chat_tokenizer()  # renders the last turn differently from the same turn followed by others
    rewriting.chat_template = "{% for m in messages %}{{ m['content'] }}{% if loop.last %}!{% endif %}{% endfor %}"
    with pytest.raises(ValueError, match="renders a conversation's start differently"):
        chat.encode_chat(rewriting, CHAT, 64)
    with pytest.raises(ValueError, match="give one kind of data"):
        pp.Task.for_causal_lm(llama(), tok, [], text_column="text", messages_column="messages")


def test_a_jsonl_file_of_conversations_becomes_a_task(tmp_path):
    tok = chat_tokenizer()
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps({"messages": conversation(q, a)}) + "\n" for q, a in QA))
    task = pp.Task.for_causal_lm(llama(), tok, path, validation=2, batch_size=4)
    answers_seen = sorted(
        labelled(tok, x.tolist(), y.tolist()) for b in task.train_batches for x, y in zip(b["input_ids"], b["labels"])
    )
    assert len(answers_seen) == 6 and set(answers_seen) <= {"yes<|end|>", "no<|end|>"}


@pytest.mark.parametrize("family", [llama, gpt2, qwen2])
def test_the_output_layer_runs_at_labelled_positions_only_with_the_models_loss_and_gradients(family):
    torch.manual_seed(0)
    tok = chat_tokenizer()
    base = family().eval()  # no dropout: the two forwards must see the same network
    (batch,) = lm.lm_batches(tok, [conversation(q, a) for q, a in QA[:3]], 3, 64)
    head_rows = []
    base.get_output_embeddings().register_forward_hook(
        lambda m, inp, out: head_rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0])
    )
    ours = copy.deepcopy(base)
    loss = lm.causal_lm_loss(ours, batch)
    assert head_rows[-1] == lm.predicted_tokens(batch) < batch["input_ids"].numel()
    theirs = base(**batch).loss  # the model's own: logits at every position
    torch.testing.assert_close(loss, theirs)
    loss.backward()
    theirs.backward()
    for (name, a), b in zip(ours.named_parameters(), base.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_that_scales_its_logits_keeps_its_full_forward():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(
        Gemma2Config(
            vocab_size=99,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            final_logit_softcapping=5.0,
        )
    ).eval()
    assert lm.output_layer(model) is None
    (batch,) = lm.lm_batches(chat_tokenizer(), [conversation(q, a) for q, a in QA[:3]], 3, 64)
    with torch.no_grad():
        torch.testing.assert_close(lm.causal_lm_loss(model, batch), model(**batch).loss)


def choice_task(model, **kw):
    return pp.Task.for_causal_lm(
        model,
        chat_tokenizer(),
        [{"messages": conversation(q, a)} for q, a in QA],
        metric="choice",
        choices=["no", "yes"],
        validation=4,
        batch_size=3,
        **kw,
    )


def test_choice_accuracy_is_the_likeliest_answer_by_summed_log_probabilities():
    torch.manual_seed(0)
    model, tok = llama().eval(), chat_tokenizer()
    task = choice_task(model)
    held = [x for b in task.validation_batches for x in _examples(b, tok)]
    hits, total, tokens = 0, 0.0, 0
    with torch.no_grad():
        for convo, right in held:  # by hand: one full forward per candidate, log-softmax summed over the answer
            scores = []
            for k, c in enumerate(("no", "yes")):
                ids, labels = chat.encode_chat(tok, chat.with_answer(convo, c), 64)
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1], -1)
                picked = [logp[t, labels[t + 1]] for t in range(len(ids) - 1) if labels[t + 1] != -100]
                scores.append(float(sum(picked)))
                if k == right:
                    total, tokens = total - scores[-1], tokens + len(picked)
            hits += int(max(range(2), key=scores.__getitem__) == right)
    acc, loss = answers.choice_accuracy_and_loss(model, task.validation_batches)
    assert acc == hits / len(held) and loss == pytest.approx(total / tokens, rel=1e-5)
    assert metric_and_loss(model, task, task.validation_batches) == (acc, pytest.approx(loss, rel=1e-6))
    assert validation_loss(model, task, task.validation_batches) == pytest.approx(loss, rel=1e-5)  # the right answers'
    assert task.metric_name == "choice accuracy"


@pytest.mark.parametrize("family", [llama, gpt2, qwen2])
def test_candidates_scored_after_one_shared_prompt_score_as_whole_rows(family):
    torch.manual_seed(0)
    model, tok = family().eval(), chat_tokenizer()
    data = [{"messages": conversation(q, a)} for q, a in QA]  # prompts of several lengths: left padding
    (batch,) = answers.choice_batches(tok, [d["messages"] for d in data], ("no", "yes", "maybe not"), 8, 64)
    with torch.no_grad():
        shared = answers.shared_prompt_logits(model, batch)
        whole = lm.labelled_logits(model, batch)
    assert shared is not None
    for a, b in zip(shared, whole):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    odd = {**batch, "input_ids": batch["input_ids"].clone()}
    odd["input_ids"][1, 2] += 1  # the second candidate's prompt differs from the first's: rows run whole
    assert answers.shared_prompt_logits(model, odd) is None


def _examples(batch, tok):
    """(conversation, index of its right answer) of each example of a choice batch, decoded back."""
    out = []
    for b, right in enumerate(batch["choice"].tolist()):
        ids = [t for t, m in zip(batch["input_ids"][2 * b].tolist(), batch["attention_mask"][2 * b].tolist()) if m]
        text = tok.decode(ids)
        q = text[len("<|user|>") : text.index("<|end|>")]
        out.append((conversation(q[:-1], ("no", "yes")[right]), right))
    return out


def test_exact_match_decodes_batched_greedy_answers_as_unbatched_ones():
    torch.manual_seed(0)
    model, tok = llama().eval(), chat_tokenizer()
    data = [{"messages": conversation(q, a)} for q, a in QA[:4]]  # prompts of different lengths: left padding
    task = pp.Task.for_causal_lm(model, tok, data, data, metric="exact_match", validation=None, batch_size=4)
    got, refs = answers.ExactMatch(tok).answers(model, task.eval_batches[0])
    assert refs == [a for _, a in QA[:4]]
    longest = max(len(tok(a + "<|end|>", add_special_tokens=False)["input_ids"]) for _, a in QA[:4])
    for (q, _), answer in zip(QA, got):  # by hand, one prompt at a time (no padding)
        prompt = tok(
            chat.render(tok, conversation(q, "")[:1], generation_prompt=True),
            add_special_tokens=False,
            return_tensors="pt",
        )
        out = model.generate(
            **prompt, max_new_tokens=longest + 2, do_sample=False, pad_token_id=0, eos_token_id=tok.eos_token_id
        )
        assert answer == answers.ExactMatch(tok).decode(out[0, prompt["input_ids"].shape[1] :].tolist())
    assert task.metric(model, task.eval_batches) == sum(answers.normalise(g) == r for g, r in zip(got, refs)) / 4
    assert task.metric_name == "exact match"


class Scripted(torch.nn.Module):
    """A 'model' whose greedy answers are given: generate() appends them after the prompts."""

    def __init__(self, tok, replies):
        super().__init__()
        self.w, self.tok, self.replies = torch.nn.Parameter(torch.zeros(1)), tok, replies

    def generate(self, input_ids, **_):
        rows = [torch.tensor(self.tok(r + "<|end|>", add_special_tokens=False)["input_ids"]) for r in self.replies]
        width = max(len(r) for r in rows)
        return torch.cat([input_ids, torch.stack([torch.nn.functional.pad(r, (0, width - len(r))) for r in rows])], 1)


def test_exact_match_counts_answers_equal_once_normalised():
    tok = chat_tokenizer()
    data = [{"messages": conversation(q, a)} for q, a in QA[:4]]  # yes, no, yes, no
    task = pp.Task.for_causal_lm(llama(), tok, data, data, metric="exact_match", validation=None, batch_size=4)
    replies = ["yes", "no, really", "  yes!", "yes"]  # equal, not, equal once normalised, not
    assert task.metric(Scripted(tok, replies), task.eval_batches) == 0.5


def test_answer_metrics_need_answers_and_choices():
    tok = chat_tokenizer()
    with pytest.raises(ValueError, match="give choices"):
        pp.Task.for_causal_lm(llama(), tok, [{"messages": conversation(q, a)} for q, a in QA], metric="choice")
    with pytest.raises(ValueError, match=r"answer 'maybe' is not one of the choices \['no', 'yes'\]"):
        pp.Task.for_causal_lm(
            llama(),
            tok,
            [{"messages": conversation("q", "maybe")}] * 4,
            metric="choice",
            choices=["no", "yes"],
            validation=2,
        )
    with pytest.raises(ValueError, match="plain texts have no answer"):
        pp.Task.for_causal_lm(llama(), tok, ["a text", "another", "third"], metric="exact_match", validation=1)
    with pytest.raises(ValueError, match="unknown causal-LM metric 'bleu'"):
        pp.Task.for_causal_lm(llama(), tok, ["a", "b", "c"], metric="bleu", validation=1)
