"""Put an artifact into the BentoML model store so a Bento can include it by tag."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from orthserve.artifact import MANIFEST_FILE


def check_name(name: str) -> str:
    """Fail before a long export if BentoML would refuse the name (or ``name:version``)."""
    import bentoml

    try:
        bentoml.Tag.from_taglike(name)
    except Exception as err:  # bentoml raises its own InvalidArgument / ValueError
        raise ValueError(f"invalid --bento-model name {name!r}: {err}") from None
    return name


def _metadata(value):
    """BentoML metadata takes no None: drop None entries (the full manifest is among the stored files)."""
    if isinstance(value, dict):
        return {k: _metadata(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_metadata(v) for v in value if v is not None]
    return value


def store(name: str, artifact_dir: Path, manifest: dict) -> str:
    """Copy the artifact's files into a new store entry; the manifest is its metadata. Returns the tag."""
    import bentoml

    labels = {"model": manifest["model"], "method": manifest["method"], "format": "orthserve-artifact"}
    with bentoml.models.create(name, module="orthserve.artifact", labels=labels, metadata=_metadata(json.loads(json.dumps(manifest)))) as model:
        for path in sorted(Path(artifact_dir).iterdir()):
            shutil.copy2(path, Path(model.path) / path.name)
        assert (Path(model.path) / MANIFEST_FILE).is_file()
    return str(model.tag)
