"""Export: fold a training run's adapters, write verified ONNX + manifest (ART_DIR), optionally into BentoML.

``python -m export --run RUN_DIR --out ART_DIR`` or ``--model NAME --pretrained TAG``;
the format is in ``docs/CONTRACTS.md`` and read back by :mod:`orthserve.artifact`.
"""
from .pipeline import ExportError, VerificationError, export_artifact
from .source import Source, from_model, from_run

__all__ = ["export_artifact", "ExportError", "VerificationError", "Source", "from_model", "from_run"]
