"""Class names, in one form per use (documented in docs/CLASSNAMES.md).

* A **class-names file** (``--classnames`` of every command line): one class per line,
  ``<id> <readable name>``: the first word is the class's folder (or CSV label), the rest the
  name used in the prompts, as in the ``classnames.txt`` of CoOp / Tiny-ImageNet. A line with a
  single word is both id and name. Blank lines and ``#`` comments are skipped. The file's order
  is the class order where no folders decide it (``python -m export --model``).
* A **label list** (``export --labels`` and the service's ``labels``): a JSON list of strings
  (``["golden retriever", "tabby cat"]``), or names separated by commas (``golden retriever,
  tabby cat``); the JSON form for names that contain a comma.

Torch-free: the service uses it too.
"""
from __future__ import annotations

import json
from pathlib import Path

FILE_FORMAT = "'<id> <readable name>' per line (a one-word line is both)"


class ClassNamesError(ValueError):
    """A class-names file or label list that cannot be used; the message says where and why."""


def read_classnames(path: str | Path) -> dict[str, str]:
    """``{id: readable name}`` in file order."""
    path = Path(path)
    if not path.is_file():
        raise ClassNamesError(f"class-names file {path} does not exist")
    names: dict[str, str] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, _, readable = line.partition(" ")
        if key in names:
            raise ClassNamesError(f"{path}:{number}: id {key!r} appears twice (the format is {FILE_FORMAT})")
        names[key] = readable.strip() or key
    if not names:
        raise ClassNamesError(f"class-names file {path} has no class names (the format is {FILE_FORMAT})")
    return names


def parse_labels(text: str) -> list[str]:
    """A JSON list of strings or comma-separated names -> the names, stripped (empty comma items dropped)."""
    text = text.strip()
    if text.startswith(("[", "{")):  # JSON (a JSON object is a mistake to name, not one label '{"a": 1}')
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ClassNamesError('labels: expected a JSON list of strings, e.g. ["cat", "dog"], or names separated '
                                  "by commas, e.g. cat, dog")
        return [v.strip() for v in value]  # as given: an empty entry is the caller's to hear about
    return [n for n in (part.strip() for part in text.split(",")) if n]  # "a, b," is a and b
