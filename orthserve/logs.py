"""Known-harmless messages of our dependencies, dropped where they are emitted.

Each filter sits on the one logger that emits the message and drops only records that match it,
for the duration of one call; no log level is lowered and every other message still shows.
"""
from __future__ import annotations

import contextlib
import logging
import re
from typing import Callable, Iterator

Predicate = Callable[[str], bool]


class _Drop(logging.Filter):
    def __init__(self, predicate: Predicate) -> None:
        super().__init__()
        self.predicate = predicate

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.predicate(record.getMessage())


@contextlib.contextmanager
def dropped(logger_name: str | None, predicate: Predicate) -> Iterator[None]:
    """Inside the block, records of logger ``logger_name`` (None: root) whose message matches are dropped."""
    logger, drop = logging.getLogger(logger_name), _Drop(predicate)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def only_unused_pooler(message: str) -> bool:
    """transformers' load report for MiniLM when its only complaint is the unused pooler.

    open_clip's text tower mean-pools the token states, so BERT's pooler weights in the checkpoint
    are expected to be left unused ("UNEXPECTED"); any other row keeps the report.
    """
    if "LOAD REPORT" not in message:
        return False
    rows = [line for line in message.splitlines()  # the table's rows: "key | STATUS | ..."
            if "|" in line and re.search(r"\b(UNEXPECTED|MISSING|MISMATCH\w*|CONVERSION)\b", line)]
    return bool(rows) and all(line.strip().startswith("pooler.") and "UNEXPECTED" in line for line in rows)


def partially_initialized(model_name: str) -> Predicate:
    """open_clip's "initialized partially" when the text tower came from its package and ours follow."""
    return lambda message: message == f"Model {model_name} initialized partially."


def constant_folding_failed(message: str) -> bool:
    """onnxscript's constant folder trying (and leaving to onnxruntime) a shape expression with a dynamic batch."""
    return message.startswith("Evaluation failed:")


def quantizer_preprocessing_hint(message: str) -> bool:
    """onnxruntime's quantizer suggesting its shape pre-processing, which our fused graphs do not need."""
    return message.startswith("Please consider to run pre-processing before quantization")
