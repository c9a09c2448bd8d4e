"""Issue 20: a new classification head is one line, not transformers' load-report table; other missing or
unexpected weights keep the full report."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

import ode_bert


@pytest.fixture(autouse=True)
def transformers_warnings_on(caplog: pytest.LogCaptureFixture) -> None:
    """The report is a warning: show it even if an earlier test quietened transformers' logging."""
    caplog.set_level(logging.WARNING, logger="transformers.modeling_utils")


def _reports(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if "LOAD REPORT" in record.getMessage()]


def test_new_head_is_one_line(
    tiny_model: str, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    model, _ = ode_bert.load_model(tiny_model, num_labels=3)
    lines = [line for line in capsys.readouterr().err.splitlines() if "new classification head" in line]
    assert lines == [
        "ode-bert: new classification head (classifier.bias, classifier.weight; 3 labels), randomly "
        "initialised: fine-tune it before use"
    ]
    assert _reports(caplog) == []
    assert model.classifier.out_features == 3


def test_other_missing_weights_keep_the_full_report(
    tiny_model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    """An encoder saved without its pooler: the pooler's weights are missing too, so the report stays."""
    config = BertConfig.from_pretrained(tiny_model)
    torch.manual_seed(0)
    BertModel(config, add_pooling_layer=False).save_pretrained(tmp_path)
    BertTokenizerFast.from_pretrained(tiny_model).save_pretrained(tmp_path)
    ode_bert.load_model(str(tmp_path), num_labels=2)
    (report,) = _reports(caplog)
    assert "pooler.dense.weight" in report and "classifier.weight" in report and "MISSING" in report
    assert "new classification head" not in capsys.readouterr().err
