"""The text tower's tokenizer as a ``tokenizer.json`` (Hugging Face ``tokenizers``), so the service needs no torch.

Export writes it with :func:`write_tokenizer` from the model's own open_clip tokenizer; the service reads it with
:func:`load_tokenizer`, which imports only ``tokenizers``, ``ftfy`` and the standard library.  Token ids equal
open_clip's for every text (tests/test_tokenizer.py; export checks it again on its verification texts):

- ``clip-bpe``: open_clip's ``SimpleTokenizer`` (CLIP's byte-level BPE).  Its vocabulary and merge ranks go into
  a ``tokenizers`` BPE model; its regex splits words (the non-matching text, whitespace, is dropped); bytes map to
  the same printable characters (``ByteLevel``); ``<start_of_text>`` and ``<end_of_text>`` frame the ids;
  truncation keeps the first ``context_length - 2`` and padding uses id 0, as open_clip does.
- ``hf``: open_clip's ``HFTokenizer`` (and SigLIP's): the Hugging Face fast tokenizer's own ``tokenizer.json``,
  with truncation and padding to ``context_length`` as open_clip asks for them.

open_clip cleans text in Python before tokenizing (``ftfy.fix_text``, HTML entities, whitespace, lower case or
punctuation removal); ``tokenizers``' normalizers cannot express ftfy, so :func:`clean_text` repeats those steps
here and the manifest names which (``clean``).
"""
from __future__ import annotations

import html
import string
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

KINDS = ("clip-bpe", "hf")
CLEANINGS = ("lower", "whitespace", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
# open_clip splits words with Python's `regex` module, case-insensitively: U+0345 (a combining mark that case-folds
# to a letter) then matches none of its alternatives: it is dropped and ends the word, like a space, while the
# tokenizers regex keeps it.  Over all of Unicode it is the one character where the two disagree
# (tests/test_tokenizer.py checks every code point), so the loader turns it into a space.
_DROPPED_BY_CLIP_REGEX = str.maketrans({"\u0345": " "})


def clean_text(text: str, how: str) -> str:
    """open_clip's text cleaning: ``lower`` (its default for CLIP), ``whitespace`` (Hugging Face tokenizers) or
    ``canonicalize`` (SigLIP: no punctuation, lower case)."""
    import ftfy

    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    if how == "canonicalize":
        text = text.replace("_", " ").translate(_PUNCTUATION).lower()
    text = " ".join(text.split())
    return text.lower() if how == "lower" else text


def _cleaning_of(open_clip_tokenizer) -> str:
    """Which of :data:`CLEANINGS` an open_clip tokenizer applies (it keeps a function, not the name)."""
    from open_clip import tokenizer as oc

    if type(open_clip_tokenizer).__name__ == "SigLipTokenizer":
        return "canonicalize"
    fn = getattr(open_clip_tokenizer, "clean_fn", None)
    for how in CLEANINGS:
        if fn is oc.get_clean_fn(how):
            return how
    raise ValueError(f"{type(open_clip_tokenizer).__name__} cleans text with {fn!r}, which tokenizer.json cannot "
                     "reproduce")


def _bpe_tokenizer(simple) -> "Tokenizer":  # noqa: F821 - tokenizers' class
    """open_clip's ``SimpleTokenizer`` as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    if getattr(simple, "reduction_fn", None) is not None:
        raise ValueError("open_clip tokenizers with a reduction mask (random/shuffle/syntax) are not supported")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    tokenizer = Tokenizer(models.BPE(vocab=dict(simple.encoder), merges=merges, end_of_word_suffix="</w>",
                                     fuse_unk=False))
    specials = [simple.decoder[i] for i in simple.all_special_ids]
    # the words open_clip's regex finds (re.findall): keep the matches, drop what lies between them
    words = r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(words), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    sot, eot = specials[:2]
    tokenizer.post_processor = TemplateProcessing(single=f"{sot} $A {eot}", special_tokens=[
        (sot, simple.sot_token_id), (eot, simple.eot_token_id)])
    return tokenizer


def write_tokenizer(open_clip_tokenizer, path: Path, context_length: int) -> dict[str, Any]:
    """Write ``path`` (tokenizer.json) reproducing ``open_clip_tokenizer`` at ``context_length``; returns the
    manifest's ``tokenizer`` entry (``file``, ``kind``, ``clean``, ``context_length``, ``pad_id``, ...)."""
    from open_clip.tokenizer import SimpleTokenizer

    path = Path(path)
    if isinstance(open_clip_tokenizer, SimpleTokenizer):
        tokenizer, kind, pad_id, pad_token = _bpe_tokenizer(open_clip_tokenizer), "clip-bpe", 0, \
            open_clip_tokenizer.decoder[0]
        strip_sep = None
    elif getattr(getattr(open_clip_tokenizer, "tokenizer", None), "backend_tokenizer", None) is not None:
        if getattr(open_clip_tokenizer, "tokenizer_mode", "") == "clips":
            raise ValueError("open_clip's 'clips' tokenizer mode is not supported by tokenizer.json export")
        from tokenizers import Tokenizer

        hf = open_clip_tokenizer.tokenizer
        tokenizer, kind = Tokenizer.from_str(hf.backend_tokenizer.to_str()), "hf"
        pad_id, pad_token = int(hf.pad_token_id), str(hf.pad_token)
        strip_sep = int(hf.sep_token_id) if getattr(open_clip_tokenizer, "strip_sep_token", False) else None
    else:
        raise ValueError(f"cannot write a tokenizer.json for {type(open_clip_tokenizer).__name__}: expected open_clip's "
                         "SimpleTokenizer or a Hugging Face fast tokenizer")
    tokenizer.enable_truncation(max_length=context_length)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token)
    tokenizer.save(str(path))
    info = {"file": path.name, "kind": kind, "clean": _cleaning_of(open_clip_tokenizer),
            "context_length": int(context_length), "pad_id": pad_id}
    if strip_sep is not None:
        info["strip_sep_id"] = strip_sep  # open_clip replaces the separator by 0 for these towers
    return info


def load_tokenizer(path: Path, info: dict[str, Any]) -> Callable[[Sequence[str]], np.ndarray]:
    """``texts -> int64 [N, context_length]``, equal to the open_clip tokenizer :func:`write_tokenizer` read."""
    from tokenizers import Tokenizer

    path = Path(path)
    if info.get("kind") not in KINDS or info.get("clean") not in CLEANINGS:
        raise ValueError(f"{path}: unknown tokenizer kind {info.get('kind')!r} or cleaning {info.get('clean')!r} "
                         f"(this orthserve reads kinds {KINDS}); re-export the artifact")
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizers raises its own Exception for a bad file
        raise ValueError(f"{path} is not a readable tokenizer.json: {err}") from err
    length, how, sep = int(info["context_length"]), info["clean"], info.get("strip_sep_id")
    drop = _DROPPED_BY_CLIP_REGEX if info["kind"] == "clip-bpe" else {}
    if (tokenizer.truncation or {}).get("max_length") != length or (tokenizer.padding or {}).get("length") != length:
        raise ValueError(f"{path} does not truncate and pad to the manifest's context length {length}")

    def tokenize(texts: Sequence[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch([clean_text(t, how).translate(drop) for t in texts])
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), length)
        if sep is not None:
            ids[ids == sep] = 0
        return ids

    return tokenize

