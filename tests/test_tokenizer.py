"""tokenizer.json (orthserve/tokenizer.py) gives open_clip's token ids, and the service tokenizes without torch."""
from __future__ import annotations

import random
import unicodedata

import numpy as np
import pytest

import orthserve
from orthserve.tokenizer import load_tokenizer, write_tokenizer

CORPUS = [
    "golden retriever", "a photo of a golden retriever.", "a blurry photo of the Golden-Retriever!", "Crème brûlée",
    "naïve café", "e\u0301te\u0301 (combining accents)", "日本の猫", "Ελληνικά", "русский текст", "عربى", "🐟🐠 fish",
    "ＦＵＬＬＷＩＤＴＨ letters", "ﬁsh and ﬂowers", "“curly” ‘quotes’", "rock &amp; roll", "&lt;b&gt;bold&lt;/b&gt;",
    "cafÃ©", "", " ", "\t\n", "...", "\u200b", "\u0345", "a\u0345b", "-\u0345🚈", "?!?!", "MiXeD CaSe", "1234567890",
    "a-b_c/d e.f", "it's they're we've I'm you'll he'd", "<start_of_text> literal", "<end_of_text>",
    "[CLS] [SEP] [PAD] [UNK]", "word " * 300, "supercalifragilisticexpialidocious " * 40, "x" * 500,
    "tab\tsep", "new\nline", "  leading and trailing  ", "under_score",
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings drawn from Latin, Greek, Cyrillic, kana, CJK, emoji, combining marks and odd spaces."""
    rng = random.Random(seed)
    pools = [range(32, 127), range(160, 0x250), range(0x300, 0x370), range(0x370, 0x3FF), range(0x400, 0x4FF),
             range(0x3040, 0x30FF), range(0x4E00, 0x4F00), range(0x1F300, 0x1F6FF),
             [0x200B, 0x200D, 0xFEFF, 0xA0, 0x2028, 0x3000, 9, 10, 13, 0x85, 0x345]]
    return ["".join(chr(rng.choice(rng.choice(pools))) for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module", params=["ViT-B-32", "orthserve-mini"])
def pair(request, tmp_path_factory):
    """(open_clip tokenizer, the tokenizer.json loader, context length) for one model."""
    reference = orthserve.get_tokenizer(request.param)
    length = reference.context_length
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    info = write_tokenizer(reference, path, length)
    assert info["kind"] == {"ViT-B-32": "clip-bpe", "orthserve-mini": "hf"}[request.param]
    assert info["context_length"] == length == {"ViT-B-32": 77, "orthserve-mini": 32}[request.param]
    return reference, load_tokenizer(path, info), length


def test_token_ids_equal_open_clip(pair):
    reference, ours, length = pair
    texts = CORPUS + random_texts(1000)
    expected = np.asarray(reference(texts, context_length=length))
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(texts), length)
    mismatched = [t for t, a, b in zip(texts, got, expected) if (a != b).any()]
    assert not mismatched, mismatched[:5]


def test_the_word_split_agrees_with_open_clip_on_every_code_point():
    """open_clip splits words with Python's `regex`; tokenizers with its own engine.  Per character, the only
    difference is U+0345, which the loader turns into a space (orthserve/tokenizer.py)."""
    import regex
    from tokenizers import Tokenizer

    simple = orthserve.get_tokenizer("ViT-B-32")
    pre = Tokenizer.from_str(_bpe_json(simple)).pre_tokenizer
    differ = []
    for code in range(0x110000):
        char = chr(code)
        if 0xD800 <= code <= 0xDFFF or char.isspace():  # surrogates; spaces are collapsed before splitting
            continue
        if regex.findall(simple.pat, char) != [char] or len(pre.pre_tokenize_str(char)) != 1:
            differ.append(unicodedata.name(char, hex(code)))
    assert differ == ["COMBINING GREEK YPOGEGRAMMENI"]


def _bpe_json(simple) -> str:
    from orthserve.tokenizer import _bpe_tokenizer

    return _bpe_tokenizer(simple).to_str()


def test_a_bad_tokenizer_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    info = write_tokenizer(orthserve.get_tokenizer("ViT-B-32"), path, 77)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(path, {**info, "kind": "sentencepiece"})
    with pytest.raises(ValueError, match="context length 16"):
        load_tokenizer(path, {**info, "context_length": 16})
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable tokenizer.json"):
        load_tokenizer(path, info)
