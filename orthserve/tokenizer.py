"""The text tower's tokenizer as a ``tokenizer.json`` (Hugging Face ``tokenizers``), so the service needs no torch.

Export writes it with :func:`write_tokenizer` from the model's own open_clip tokenizer; the service reads it with
:func:`load_tokenizer`, which imports only ``tokenizers``, ``ftfy`` and the standard library.  Token ids equal
open_clip's for every text (tests/test_tokenizer.py; export checks it again on its verification texts).

The manifest's ``tokenizer`` entry (what :func:`write_tokenizer` returns, what :func:`load_tokenizer` needs)::

    {"file": "tokenizer.json",    # next to the manifest
     "kind": "clip-bpe" | "hf",   # open_clip's SimpleTokenizer | a Hugging Face fast tokenizer (HFTokenizer)
     "clean": "lower" | "whitespace" | "canonicalize",  # open_clip's text cleaning, done in Python (clean_text)
     "context_length": 77,        # ids are [N, context_length]; tokenizer.json truncates and pads to it
     "pad_id": 0,
     "strip_sep_id": 102}         # only when open_clip replaces the separator by 0 (HFTokenizer(strip_sep_token))

- ``clip-bpe``: CLIP's byte-level BPE.  Its vocabulary and merge ranks go into a ``tokenizers`` BPE model, bytes
  map to the same printable characters (``ByteLevel``), ``<start_of_text>``/``<end_of_text>`` frame the ids, and
  truncation keeps the first ``context_length - 2`` tokens, padding with id 0, as open_clip does.  open_clip
  splits words with the ``regex`` module (its own, recent Unicode tables, case-insensitive); ``tokenizers``' regex
  engine has older tables, so the split pattern spells its letter, number and punctuation classes out as code
  point ranges taken from ``regex`` at export (:func:`_word_pattern`).
- ``hf``: the Hugging Face fast tokenizer's own ``tokenizer.json``, truncating and padding as open_clip asks it to.

open_clip cleans text in Python before tokenizing (``ftfy.fix_text``, HTML entities, whitespace, lower case or
punctuation removal); ``tokenizers``' normalizers cannot express ftfy, so :func:`clean_text` repeats those steps.
"""
from __future__ import annotations

import html
import string
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

KINDS = ("clip-bpe", "hf")
CLEANINGS = ("lower", "whitespace", "canonicalize")
_PUNCTUATION = str.maketrans("", "", string.punctuation)
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_SURROGATES = range(0xD800, 0xE000)  # never in text that reached us as UTF-8; onig refuses them in a class


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


@lru_cache(maxsize=1)
def _every_code_point() -> str:
    return "".join(map(chr, range(0x110000)))  # index == code point


@lru_cache(maxsize=None)
def _code_points_matching(one_char_pattern: str) -> str:
    """The code points that ``regex`` (open_clip's engine), ignoring case as open_clip does, matches with a
    one-character pattern, as an onig character class: ``[\\x{41}-\\x{5a}...]``."""
    import regex

    ranges = []
    for run in regex.finditer(f"(?:{one_char_pattern})+", _every_code_point(), flags=regex.IGNORECASE):
        start, stop = run.span()
        for lo, hi in ((start, min(stop, _SURROGATES.start)), (max(start, _SURROGATES.stop), stop)):
            if lo < hi:
                ranges.append(f"\\x{{{lo:x}}}" if hi - lo == 1 else f"\\x{{{lo:x}}}-\\x{{{hi - 1:x}}}")
    return "[" + "".join(ranges) + "]"


def _caseless(literal: str) -> str:
    """``literal`` matched as ``regex`` matches it ignoring case (e.g. ``'s`` also matches ``'S`` and ``'ſ``)."""
    import regex

    return "".join(_code_points_matching(regex.escape(char)) for char in literal)


def _word_pattern(simple) -> str:
    """open_clip's word regex (specials, contractions, letter runs, single digits, punctuation runs), with every
    character class spelled out from ``regex``, so tokenizers' engine and Unicode version cannot change the split."""
    specials = [simple.decoder[i] for i in simple.all_special_ids]
    classes = {"letters": r"[\p{L}]", "digit": r"[\p{N}]", "other": r"[^\s\p{L}\p{N}]"}
    expected = "|".join([*specials, *_CONTRACTIONS, f"{classes['letters']}+", classes["digit"], f"{classes['other']}+"])
    if simple.pat.pattern != expected:
        raise ValueError(f"open_clip's word pattern changed ({simple.pat.pattern!r}, expected {expected!r}); "
                         "update orthserve/tokenizer.py")
    letters, digit, other = (_code_points_matching(p) for p in classes.values())
    return "|".join([*(_caseless(word) for word in [*specials, *_CONTRACTIONS]), f"{letters}+", digit, f"{other}+"])


def _bpe_tokenizer(simple) -> "Tokenizer":  # noqa: F821 - tokenizers' class
    """open_clip's ``SimpleTokenizer`` as a ``tokenizers.Tokenizer``."""
    from tokenizers import AddedToken, Regex, Tokenizer, models, pre_tokenizers
    from tokenizers.processors import TemplateProcessing

    if getattr(simple, "reduction_fn", None) is not None:
        raise ValueError("open_clip tokenizers with a reduction mask (random/shuffle/syntax) are not supported")
    merges = [pair for pair, _ in sorted(simple.bpe_ranks.items(), key=lambda item: item[1])]
    tokenizer = Tokenizer(models.BPE(vocab=dict(simple.encoder), merges=merges, end_of_word_suffix="</w>",
                                     fuse_unk=False))
    # keep the words open_clip's regex finds (re.findall), drop what lies between them
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_word_pattern(simple)), behavior="removed", invert=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    specials = [simple.decoder[i] for i in simple.all_special_ids]
    tokenizer.add_special_tokens([AddedToken(t, normalized=False) for t in specials])
    sot, eot = specials[:2]
    tokenizer.post_processor = TemplateProcessing(single=f"{sot} $A {eot}", special_tokens=[
        (sot, simple.sot_token_id), (eot, simple.eot_token_id)])
    return tokenizer


def write_tokenizer(open_clip_tokenizer, path: Path, context_length: int) -> dict[str, Any]:
    """Write ``path`` (tokenizer.json) reproducing ``open_clip_tokenizer`` at ``context_length``; returns the
    manifest's ``tokenizer`` entry (module docstring)."""
    from open_clip.tokenizer import SimpleTokenizer

    path = Path(path)
    strip_sep = None
    if isinstance(open_clip_tokenizer, SimpleTokenizer):
        tokenizer, kind, pad_id = _bpe_tokenizer(open_clip_tokenizer), "clip-bpe", 0
        pad_token, padding_side, truncation_side = open_clip_tokenizer.decoder[0], "right", "right"
    elif getattr(getattr(open_clip_tokenizer, "tokenizer", None), "backend_tokenizer", None) is not None:
        if getattr(open_clip_tokenizer, "tokenizer_mode", "") == "clips":
            raise ValueError("open_clip's 'clips' tokenizer mode is not supported by tokenizer.json export")
        from tokenizers import Tokenizer

        hf = open_clip_tokenizer.tokenizer
        tokenizer, kind = Tokenizer.from_str(hf.backend_tokenizer.to_str()), "hf"
        pad_id, pad_token = int(hf.pad_token_id), str(hf.pad_token)
        padding_side, truncation_side = hf.padding_side, hf.truncation_side
        if getattr(open_clip_tokenizer, "strip_sep_token", False):
            strip_sep = int(hf.sep_token_id)
    else:
        raise ValueError(f"cannot write a tokenizer.json for {type(open_clip_tokenizer).__name__}: expected "
                         "open_clip's SimpleTokenizer or a Hugging Face fast tokenizer")
    tokenizer.enable_truncation(max_length=context_length, direction=truncation_side)
    tokenizer.enable_padding(length=context_length, pad_id=pad_id, pad_token=pad_token, direction=padding_side)
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
    if (tokenizer.truncation or {}).get("max_length") != length or (tokenizer.padding or {}).get("length") != length:
        raise ValueError(f"{path} does not truncate and pad to the manifest's context length {length}")
    specials = [token.content for token in tokenizer.get_added_tokens_decoder().values()]

    def words(text: str) -> list[str]:
        """open_clip's words of a CLIP text.  tokenizers finds ``<end_of_text>`` anywhere, open_clip only where its
        regex starts a word (not in "!<end_of_text>", whose words are "!<", "end", ...): given the words, tokenizers
        matches special tokens only as whole words.  Texts without one skip this (one word, split as usual)."""
        if not any(special in text for special in specials):
            return [text]
        return [text[start:stop] for _, (start, stop) in tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    def tokenize(texts: Sequence[str]) -> np.ndarray:
        texts = [texts] if isinstance(texts, str) else list(texts)  # open_clip takes one string too
        cleaned = [clean_text(text, how) for text in texts]
        if info["kind"] == "clip-bpe":
            encodings = tokenizer.encode_batch([words(text) for text in cleaned], is_pretokenized=True)
        else:
            encodings = tokenizer.encode_batch(cleaned)
        ids = np.asarray([e.ids for e in encodings], dtype=np.int64).reshape(len(texts), length)
        if sep is not None:
            ids[ids == sep] = 0
        return ids

    return tokenize
