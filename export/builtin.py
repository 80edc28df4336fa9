"""``make artifact``: does the built-in model's artifact need (re-)exporting?

    python -m export.builtin ART_DIR    # exit 0: export it; exit 1: it is up to date

Yes when ART_DIR has no artifact, when the artifact does not load (an older orthserve's schema), or when
it is an export of orthserve-mini's embedded weights older than the weights file (a new default model).
An artifact of another model (``make serve ARTIFACT=artifacts/mine``) is never replaced for being old.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from orthserve.artifact import MANIFEST_FILE, ArtifactError, load_artifact

WEIGHTS = Path(__file__).resolve().parents[1] / "orthserve" / "weights" / "orthserve-mini.safetensors"


def needs_export(artifact: str | Path, weights: Path = WEIGHTS) -> bool:
    manifest_path = Path(artifact) / MANIFEST_FILE
    if not manifest_path.is_file():
        return True
    try:
        load_artifact(artifact, verify=False)
    except ArtifactError:
        return True
    manifest = json.loads(manifest_path.read_text())
    built_in = manifest.get("model") == "orthserve-mini" and manifest.get("pretrained") == "default"
    return built_in and weights.is_file() and weights.stat().st_mtime > manifest_path.stat().st_mtime


if __name__ == "__main__":
    sys.exit(0 if needs_export(sys.argv[1]) else 1)
