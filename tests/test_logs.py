"""Known-harmless dependency messages are dropped at their loggers; everything else still shows."""
from __future__ import annotations

import logging

import orthserve
from orthserve import logs

POOLER_REPORT = ("\x1b[1mBertModel LOAD REPORT\x1b[0m from: /x\nKey | Status |  | \n---+---+--+-\n"
                 "pooler.dense.bias   | UNEXPECTED |  | \npooler.dense.weight | UNEXPECTED |  | \n\nNotes:\n"
                 "- UNEXPECTED:\tcan be ignored when loading from different task/architecture")


def test_loading_mini_prints_no_load_report_or_partial_warning(caplog, capfd):
    with caplog.at_level(logging.INFO):
        orthserve.load_model("orthserve-mini", "none")
    text = caplog.text + "".join(capfd.readouterr())
    assert "LOAD REPORT" not in text and "initialized partially" not in text and "Loading weights" not in text


def test_only_the_pooler_report_is_dropped():
    assert logs.only_unused_pooler(POOLER_REPORT)
    other = POOLER_REPORT.replace("pooler.dense.bias   | UNEXPECTED", "encoder.layer.0.attention.self.query.weight | MISSING")
    assert not logs.only_unused_pooler(other)
    assert not logs.only_unused_pooler("something else entirely")


def test_dropped_filters_one_logger_only_inside_the_block(caplog):
    emitter, neighbour = logging.getLogger("orthserve.test.emitter"), logging.getLogger("orthserve.test.neighbour")
    with caplog.at_level(logging.WARNING):
        with logs.dropped("orthserve.test.emitter", lambda m: m.startswith("harmless")):
            emitter.warning("harmless thing")
            emitter.warning("real problem")
            neighbour.warning("harmless elsewhere")
        emitter.warning("harmless after the block")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["real problem", "harmless elsewhere", "harmless after the block"]
