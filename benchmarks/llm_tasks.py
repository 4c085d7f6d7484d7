"""The language-model study's tasks, made from ../shared/data/text: three classification sets
as chat instructions with one-word answers, scored by the likelihood of each answer
(``choice`` accuracy), and one free-text task (next-token loss on held-out movie-review texts).

Every example is a conversation: a short system turn, the user's question about one sentence,
the one-word answer. `load` gives SmolLM2-135M-Instruct and a `Task` whose validation split is
carved from train.tsv (what lr choices and searches see) and whose evaluation split is dev.tsv
(what results are reported on)."""

from __future__ import annotations

from common import DATA

SYSTEM = "Answer with one word."
QUESTIONS = {  # task -> (question after the sentence, answers by label id)
    "sst2": ("Is this movie review positive or negative?", ("negative", "positive")),
    "subj": ("Is this sentence subjective or objective?", ("objective", "subjective")),
    "cola": ("Is this sentence grammatically acceptable, yes or no?", ("no", "yes")),
}
FREE_TEXT = "mr-text"  # next-token loss on movie reviews (mr's texts, their labels unused)


def conversation(name: str, text: str, label: int) -> dict:
    """One labelled sentence as a chat example."""
    question, answers = QUESTIONS[name]
    return {
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"{text}\n\n{question}"},
            {"role": "assistant", "content": answers[label]},
        ]
    }


def rows(name: str, split: str, limit: int | None = None) -> list:
    """The examples of ``split`` (train or dev) of task ``name``: conversations, or plain texts
    for the free-text task."""
    from peftplan.planner.training.data import read_labelled_text

    source = "mr" if name == FREE_TEXT else name
    labelled = read_labelled_text(DATA / source / f"{split}.tsv")[:limit]
    if name == FREE_TEXT:
        return [{"text": text} for _, text in labelled]
    return [conversation(name, text, label) for label, text in labelled]


def load(
    name: str,
    *,
    batch_size: int,
    max_length: int,
    validation: int,
    max_train: int | None,
    max_dev: int | None,
    model=None,
):
    """(SmolLM2-135M-Instruct, its tokenizer, the `Task` ``name``)."""
    import peftplan as pp
    from peftplan.models import load_model
    from peftplan.planner.study import load_tokenizer

    model = model if model is not None else load_model("smollm2")
    tokenizer = load_tokenizer("smollm2")
    scoring = {} if name == FREE_TEXT else {"metric": "choice", "choices": list(QUESTIONS[name][1])}
    task = pp.Task.for_causal_lm(
        model,
        tokenizer,
        rows(name, "train"),
        rows(name, "dev"),
        batch_size=batch_size,
        max_length=max_length,
        validation=validation,
        max_train=max_train,
        max_dev=max_dev,
        seed=0,
        name=name,
        **scoring,
    )
    return model, tokenizer, task
