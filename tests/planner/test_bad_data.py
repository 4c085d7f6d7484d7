"""Users' data files, chat data and causal-LM tasks under bad input: each case an exception of a
stated type whose message names the file, column, row or split and the fix — and a data file
rewritten in place is read again, never served stale from the `datasets` cache."""

from __future__ import annotations

import json
import os
import re
import warnings
from types import SimpleNamespace

import pytest
import torch

import peftplan as pp
from peftplan.planner.training import lm
from tests.zoo import bert_classifier, char_tokenizer, chat_tokenizer, llama

datasets = pytest.importorskip("datasets")
FIVE = SimpleNamespace(config=SimpleNamespace(num_labels=5))  # all a classification task asks of its model


def classify(path, **kw):
    return pp.Task.for_sequence_classification(FIVE, char_tokenizer(), path, **{"validation": None, **kw})


def texts_of(task) -> list[str]:
    tok = char_tokenizer()
    return sorted(
        "".join(tok.convert_ids_to_tokens([i for i in row.tolist() if i > 3]))  # 0-3: pad, BOS, EOS, unknown
        for b in task.train_batches
        for row in b["input_ids"]
    )


# -- data files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, problem",
    [
        (
            "empty_cell.csv",
            "text,label\nhi,pos\nyo,\nok,neg\n",
            r"empty_cell.csv: data row 2 has no label in column 'label' "
            r"\(an empty cell\): fill it in or drop the row",
        ),
        ("empty_int.csv", "text,label\nhi,1\nyo,\nok,0\n", r"empty_int.csv: data row 2 has no label in column 'label'"),
        (
            "mixed.jsonl",
            '{"text": "a", "label": 1}\n{"text": "b", "label": "pos"}\n',
            r"mixed.jsonl: column 'label' mixes class numbers \(1\) and class names \('pos'\): write every label the same way",
        ),
        ("zero.csv", "", r"zero.csv is empty \(0 bytes\): write the examples into it"),
        (
            "latin.csv",
            "text,label\ncafé,1\n".encode("latin-1"),
            r"latin.csv is not UTF-8 text: line 2 has byte 0xe9; save it "
            r"as UTF-8 \(from Latin-1: iconv",
        ),
        (
            "latin.tsv",
            "1\tok\n0\tcafé\n".encode("latin-1"),
            r"latin.tsv is not UTF-8 text: line 2 has byte 0xe9; save it as UTF-8",
        ),
        (
            "twice.csv",
            "text,text,label\na,b,1\nc,d,0\n",
            r"twice.csv: the header row names column\(s\) \['text'\] more than once "
            r".*pair_column=\.\.\. reads a sentence pair's second text",
        ),
        (
            "one_to_five.csv",
            "text,label\na,1\nb,2\nc,3\nd,4\ne,5\n",
            r"labels run from 1 to 5, but class numbers count from 0 "
            r"\(the model's 5 classes are 0 to 4\): renumber the labels 0 to 4",
        ),
    ],
)
def test_bad_data_files_name_the_file_the_problem_and_the_fix(tmp_path, name, content, problem):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    before = path.read_bytes()
    with pytest.raises(ValueError, match=problem):
        classify(path)
    assert path.read_bytes() == before


def test_a_folder_given_as_evaluation_data_is_called_a_folder(tmp_path):
    (tmp_path / "train.csv").write_text("text,label\na,1\nb,0\n")
    (tmp_path / "dev").mkdir()
    with pytest.raises(ValueError, match=r"dev is a folder, not a data file: give a .tsv, .csv"):
        classify(tmp_path / "train.csv", dev=tmp_path / "dev")


@pytest.mark.parametrize(
    "validation, problem",
    [
        (
            "0.2",
            r"validation='0.2' is a string, read as the path of validation data \(there is no such file\): give the "
            r"number 0.2",
        ),
        (float("nan"), "validation must be a fraction in \\(0, 1\\) or a count, got nan"),
    ],
)
def test_a_validation_share_that_is_not_a_number_is_named(tmp_path, validation, problem):
    (tmp_path / "train.csv").write_text("text,label\n" + "".join(f"t{i},{i % 2}\n" for i in range(10)))
    with pytest.raises(ValueError, match=problem):
        classify(tmp_path / "train.csv", validation=validation)
    assert (
        len(classify(tmp_path / "train.csv", validation=0.2).validation_batches[0]["labels"]) == 2
    )  # the number works


def test_a_file_rewritten_with_its_old_modification_time_is_read_again(tmp_path):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\naaa,0\nbbb,1\n")
    os.utime(path, (1e9, 1e9))
    assert texts_of(classify(path)) == ["aaa", "bbb"]
    path.write_text("text,label\nzzz,1\nyyy,0\n")  # what cp -p, rsync -a and tar x do: new bytes, the old time
    os.utime(path, (1e9, 1e9))
    assert texts_of(classify(path)) == ["yyy", "zzz"]


# -- causal LM and chat data -----------------------------------------------------------------


def conversation(q, a):
    return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]


CHATS = [{"messages": conversation(f"q{i}", "yes" if i % 2 else "no")} for i in range(8)]


def test_a_classifier_given_for_a_causal_lm_task_is_refused_up_front():
    with pytest.raises(
        ValueError,
        match=r"BertForSequenceClassification is not a causal language model .*load it with "
        r"AutoModelForCausalLM \(load_model\(spec, causal_lm=True\), --causal-lm",
    ):
        pp.Task.for_causal_lm(bert_classifier(), char_tokenizer(), ["a text"] * 8, validation=2)


def test_validation_data_with_nothing_to_predict_is_refused_before_any_trial():
    tok = char_tokenizer(bos=False)  # an empty text is its EOS alone, and the first token is never predicted
    with pytest.raises(
        ValueError, match=r"no validation example of 'dataset' has a token to predict.*fix the validation data"
    ):
        pp.Task.for_causal_lm(llama(), tok, ["abc"] * 4, validation=["", ""])
    with pytest.raises(ValueError, match=r"no evaluation example of 'dataset' has a token to predict"):
        pp.Task.for_causal_lm(llama(), tok, ["abc"] * 4, ["", ""], validation=2)
    task = pp.Task.for_causal_lm(llama(), tok, ["abc"] * 4, validation=["ab", ""])  # one token to predict is enough
    assert sum(lm.predicted_tokens(b) for b in task.validation_batches) == 2  # "b" and EOS after "a"


@pytest.mark.parametrize(
    "rows, problem",
    [
        (
            [{"messages": json.dumps(conversation("a", "b"))}] * 4,
            r"row 0 of column 'messages' holds str '\[.*where a "
            r"conversation is expected.*\(it looks like JSON text: parse it with json.loads first\)",
        ),
        (
            CHATS[:3] + [{"messages": "hello"}],
            r"the training data: column 'messages' holds list and str values \(row 3 is "
            r"'hello'\); give every row the same kind",
        ),
        (
            [{"messages": [{"content": "a"}, {"role": "assistant", "content": "b"}]}] * 4,
            r"row 0 of column 'messages': message "
            r"0 is .*, whose 'role' is missing or not a string",
        ),
    ],
)
def test_bad_conversations_are_named(rows, problem):
    with pytest.raises(ValueError, match=problem):
        pp.Task.for_causal_lm(llama(), chat_tokenizer(), rows, validation=1)


def test_a_tokenizer_without_a_chat_template_is_named_with_the_fixes():
    with pytest.raises(
        ValueError,
        match=r"has no chat template.*set tokenizer.chat_template, or give prompt_column and "
        r"response_column instead of messages",
    ):
        pp.Task.for_causal_lm(llama(), char_tokenizer(), CHATS, validation=2)


LONG = [{"messages": conversation("x" * 40, "positive" if i % 2 else "negative")} for i in range(8)]


def test_answers_cut_by_max_length_are_said_and_refused_where_compared_whole():
    tok = chat_tokenizer()  # one token per character: 43 for the prompt and its markers, 9 for an answer and its end
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training examples' cut answers are said too
        with pytest.raises(
            ValueError,
            match=r"example 0 with the answer 'negative' takes 52 tokens, and max_length=12 "
            r"cuts 3 of the answer's: choice scoring compares whole answers",
        ):
            pp.Task.for_causal_lm(
                llama(), tok, LONG, metric="choice", choices=["negative", "positive"], max_length=12, validation=2
            )
        with pytest.raises(
            ValueError,
            match=r"held-out example 0 takes 52 tokens, and max_length=12 cuts 3 of its "
            r"answer's, so it cannot be compared whole: raise max_length",
        ):
            pp.Task.for_causal_lm(llama(), tok, LONG, metric="exact_match", max_length=12, validation=2)
    with pytest.warns(UserWarning) as caught:
        task = pp.Task.for_causal_lm(llama(), tok, LONG, max_length=12, validation=2)
    said = "\n".join(str(w.message) for w in caught)
    assert re.search(
        r"6 of 6 training examples are longer than max_length=12 and lose the end of their answer \(example "
        r"0 takes 52 tokens and loses 3 of its answer\), so the model then never learns to finish them: "
        r"raise max_length",
        said,
    )
    assert (
        "2 of 2 held-out examples are longer than max_length=12" in said
        and "their scores leave those tokens out" in said
    )
    kept = [tok.decode(x[y != -100]) for b in task.train_batches for x, y in zip(b["input_ids"], b["labels"])]
    assert set(kept) <= {"negati", "positi"}  # by hand: half of 12 tokens for the answer, the rest of the prompt
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # whole answers: nothing to say
        task = pp.Task.for_causal_lm(
            llama(), tok, LONG, metric="choice", choices=["negative", "positive"], max_length=64, validation=2
        )
    assert torch.equal(task.validation_batches[0]["choice"].bool(), task.validation_batches[0]["choice"] == 1)
