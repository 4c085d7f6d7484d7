"""`peftplan search --task FILE`: a CSV with named columns and class names, a separate
evaluation file, and a worker that rebuilds the same task from the study."""

from __future__ import annotations

import json
import random

import pytest

import peftplan as pp
from peftplan.cli import main

pytest.importorskip("datasets")
MODEL = "tests.zoo:minilm_vocab_classifier"


def write_reviews(path, n, seed=0):
    rng = random.Random(seed)
    rows = ["stars,review"]
    for _ in range(n):
        good = rng.random() < 0.5
        rows.append(
            f"{'good' if good else 'bad'},{' '.join(rng.sample('the plot actor music film'.split(), 3))} "
            f"{'great' if good else 'awful'}"
        )
    path.write_text("\n".join(rows) + "\n")
    return path


def test_search_on_a_data_file_with_named_columns(tmp_path, capsys):
    train, test = write_reviews(tmp_path / "reviews.csv", 40), write_reviews(tmp_path / "test.csv", 8, seed=1)
    url = f"sqlite:///{tmp_path / 'study.db'}"
    search = [
        "search",
        MODEL,
        "--task",
        str(train),
        "--eval",
        str(test),
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--tokenizer",
        "minilm",
        "--budget",
        "1%",
        "--strategy",
        "random",
        "--trials",
        "2",
        "--steps",
        "2",
        "--batch-size",
        "8",
        "--storage",
        url,
        "--threads",
        "1",
        "-q",
        "-o",
        str(tmp_path / "plan.json"),
    ]
    assert main(search) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["provenance"]["labels"] == ["bad", "good"]
    worker = ["worker", url, "-q", "--threads", "1", "-o", str(tmp_path / "again.json"), "--allow", MODEL]
    assert main(worker) == 0  # rebuilt the task from the stored file and columns; nothing left to run
    assert json.loads((tmp_path / "again.json").read_text())["sites"] == plan["sites"]

    capsys.readouterr()
    assert main([*search[:7], "body", *search[8:]]) == 2
    assert "reviews.csv has no text column 'body'; its columns are ['stars', 'review']" in capsys.readouterr().err


def test_plan_on_a_data_file(tmp_path, capsys):
    train = write_reviews(tmp_path / "reviews.csv", 16)
    out = tmp_path / "plan.json"
    argv = [
        "plan",
        MODEL,
        "--budget",
        "1%",
        "--task",
        str(train),
        "--tokenizer",
        "minilm",
        "--text-column",
        "review",
        "--label-column",
        "stars",
        "--batches",
        "1",
        "--batch-size",
        "8",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    assert pp.Plan.load(out).provenance["labels"] == ["bad", "good"]


def test_search_a_causal_lm_on_instruction_data(tmp_path, capsys):
    from tests.zoo import char_tokenizer

    char_tokenizer().save_pretrained(tmp_path / "tok")
    rng = random.Random(0)
    words = "the cat dog sat ran far home".split()
    lines = [json.dumps({"q": " ".join(rng.sample(words, 3)), "a": " ".join(rng.sample(words, 2))}) for _ in range(24)]
    (tmp_path / "chat.jsonl").write_text("\n".join(lines) + "\n")
    url = f"sqlite:///{tmp_path / 'study.db'}"
    data = ["--task", str(tmp_path / "chat.jsonl"), "--causal-lm", "--prompt-column", "q", "--response-column", "a"]
    data += ["--tokenizer", str(tmp_path / "tok")]
    search = ["search", "tests.zoo:llama", *data, "--max-length", "24", "--budget", "5%", "--strategy", "random"]
    search += ["--trials", "2"]
    search += ["--steps", "2", "--batch-size", "4", "--storage", url, "--threads", "1", "-q"]
    search += ["-o", str(tmp_path / "plan.json")]
    assert main(search) == 0
    out = capsys.readouterr().out
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert plan["provenance"]["kind"] == "causal-lm"
    perplexity = float(out.split("validation perplexity ")[1].split()[0].replace(",", ""))
    assert perplexity == pytest.approx(2.718281828 ** -plan["objectives"]["metric"], rel=1e-3)
    worker = ["worker", url, "-q", "--threads", "1", "-o", str(tmp_path / "again.json"), "--allow", "tests.zoo:llama"]
    assert main(worker) == 0  # rebuilt the causal LM task from the stored source
    assert json.loads((tmp_path / "again.json").read_text())["sites"] == plan["sites"]

    assert main([a for a in search if a != "--causal-lm"]) == 2
    assert (
        "--prompt-column and --response-column are for a causal language model: add --causal-lm"
        in capsys.readouterr().err
    )
    # the one-shot plan scores its sites by grad² of the same next-token loss
    plan_argv = [
        "plan",
        "tests.zoo:llama",
        "--budget",
        "5%",
        *data,
        "--batch-size",
        "4",
        "--batches",
        "2",
        "-o",
        str(tmp_path / "proxy.json"),
    ]
    assert main(plan_argv) == 0
    proxy = json.loads((tmp_path / "proxy.json").read_text())
    assert proxy["provenance"]["kind"] == "causal-lm" and proxy["provenance"]["scores"] == "grad2"
