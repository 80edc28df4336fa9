"""tokenizer.json (orthserve/tokenizer.py) gives open_clip's token ids, and the service tokenizes without torch."""
from __future__ import annotations

import json
import random
import subprocess
import sys

import numpy as np
import pytest
from open_clip.tokenizer import SimpleTokenizer

import orthserve
from orthserve.tokenizer import _bpe_tokenizer, load_tokenizer, write_tokenizer

from conftest import REPO

MODELS = {"ViT-B-32": ("clip-bpe", 77), "orthserve-mini": ("hf", 32)}  # kind, the model's context length
CLASSES = ["golden retriever", "tabby cat", "Boeing 747", "crème brûlée", "T-shirt", "jack-o'-lantern", "日本の猫"]
TEMPLATES = ["a photo of a {}.", "a blurry photo of the {}!", "itap of my {}", "{}"]
CORPUS = [
    *(t.format(c) for t in TEMPLATES for c in CLASSES),
    # unicode: accents (composed and combining), scripts, emoji (with joiners), fullwidth, ligatures, quotes, case
    "Crème brûlée", "naïve café", "e\u0301te\u0301 (combining accents)", "日本の猫", "Ελληνικά", "русский текст",
    "عربى", "🐟🐠 fish", "👩\u200d👩\u200d👧 family", "ＦＵＬＬＷＩＤＴＨ letters", "ﬁsh and ﬂowers", "“curly” ‘quotes’",
    "İstanbul", "Straße ǅ", "\u0345", "a\u0345b", "-\u0345🚈", "\u0558\u058b new letters", "\U0001e4d0\U0001e4d1",
    # HTML entities and mojibake (ftfy and html.unescape, twice)
    "rock &amp; roll", "&lt;b&gt;bold&lt;/b&gt;", "&amp;amp; twice", "it&#39;s", "a&nbsp;b", "cafÃ©", "â€œquotedâ€\x9d",
    # empty-looking, control and invisible characters
    "", " ", "\t\n", "...", "\u200b", "\ufeffbom", "a\u00adb", "\u200fRTL", "\x00nul", "\x1b[31mred",
    # punctuation, digits, case, contractions
    "?!?!", "MiXeD CaSe", "1234567890", "3.14159 and 1,000,000", "a-b_c/d e.f", "it's they're we've I'm you'll he'd",
    "IT'S DON'T", "it'ſ", "tab\tsep", "new\nline", "  leading and trailing  ", "under_score",
    # special tokens written out: open_clip's regex finds them only where a word starts (not after punctuation)
    "<start_of_text> literal", "<end_of_text>", "x<start_of_text>y", "(<end_of_text>)", "!<start_of_text>",
    "<<end_of_text>>", "<end_of_text><start_of_text>", "'<end_of_text>", "<START_OF_TEXT>", "<ſtart_of_text>",
    "[CLS] [SEP] [PAD] [UNK] [MASK]",
    # longer than any context
    "word " * 300, "supercalifragilisticexpialidocious " * 40, "x" * 500, " ".join(map(str, range(400))),
]


def random_texts(count: int, seed: int = 0) -> list[str]:
    """Strings drawn from Latin, Greek, Cyrillic, kana, CJK, emoji, combining marks, odd spaces, special tokens and
    letters newer than tokenizers' Unicode tables."""
    rng = random.Random(seed)
    pools = [range(32, 127), range(160, 0x250), range(0x300, 0x370), range(0x370, 0x3FF), range(0x400, 0x4FF),
             range(0x3040, 0x30FF), range(0x4E00, 0x4F00), range(0x1F300, 0x1F6FF), range(0x1E4D0, 0x1E4FA),
             [0x200B, 0x200D, 0xFEFF, 0xA0, 0x2028, 0x3000, 9, 10, 13, 0x85, 0x345, 0x17F, 0x212A, 0x558, 0x88F]]
    words = ["<start_of_text>", "<end_of_text>", "'s", "'ll", "&amp;", "[SEP]"]

    def piece() -> str:
        return rng.choice(words) if rng.random() < 0.05 else chr(rng.choice(rng.choice(pools)))

    return ["".join(piece() for _ in range(rng.randint(0, 40))) for _ in range(count)]


@pytest.fixture(scope="module", params=list(MODELS))
def model(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def reference(model):
    return orthserve.get_tokenizer(model)


def served(reference, tmp_path, length: int):
    """The tokenizer.json loader for ``reference`` at ``length``, and its manifest entry."""
    info = write_tokenizer(reference, tmp_path / "tokenizer.json", length)
    return load_tokenizer(tmp_path / "tokenizer.json", info), info


def assert_same_ids(reference, ours, texts: list[str], length: int):
    expected = np.asarray(reference(texts, context_length=length))
    got = ours(texts)
    assert got.dtype == np.int64 and got.shape == expected.shape == (len(texts), length)
    mismatched = [t for t, a, b in zip(texts, got, expected) if (a != b).any()]
    assert not mismatched, mismatched[:5]


def test_token_ids_equal_open_clip(model, reference, tmp_path):
    kind, length = MODELS[model]
    assert reference.context_length == length
    ours, info = served(reference, tmp_path, length)
    assert info["kind"] == kind and info["context_length"] == length and info["file"] == "tokenizer.json"
    json.dumps(info)  # it goes into the manifest
    assert_same_ids(reference, ours, CORPUS + random_texts(2000), length)


@pytest.mark.parametrize("length", [3, 8])
def test_token_ids_equal_open_clip_at_a_short_context(reference, tmp_path, length):
    ours, _ = served(reference, tmp_path, length)
    assert_same_ids(reference, ours, CORPUS + random_texts(200, seed=1), length)


@pytest.mark.parametrize("clean", ["whitespace", "canonicalize"])
def test_other_clip_cleanings(clean, tmp_path):
    """Without lower-casing open_clip's case-insensitive regex matters ("IT'S", "<START_OF_TEXT>")."""
    reference = SimpleTokenizer(clean=clean)
    ours, info = served(reference, tmp_path, 77)
    assert info["clean"] == clean
    assert_same_ids(reference, ours, CORPUS + random_texts(500, seed=2), 77)


def test_one_string_or_none(tmp_path):
    reference = orthserve.get_tokenizer("ViT-B-32")
    ours, _ = served(reference, tmp_path, 77)
    assert (ours("a dog") == reference("a dog").numpy()).all()
    assert ours([]).shape == (0, 77) and ours([]).dtype == np.int64


def test_the_word_split_is_open_clips_on_every_code_point():
    """open_clip splits words with the `regex` module (recent Unicode tables, ignoring case); tokenizers' engine
    has older tables.  Every code point between letters and between punctuation (which tells letters, digits,
    punctuation and dropped characters apart), and every cased one inside the special tokens and contractions,
    splits the same way.  The probes are joined by spaces, which both drop; a chunk that differs is rechecked one
    probe at a time."""
    import regex

    simple = orthserve.get_tokenizer("ViT-B-32")
    pre = _bpe_tokenizer(simple).pre_tokenizer

    def differs(text: str) -> bool:
        return regex.findall(simple.pat, text) != [text[a:b] for _, (a, b) in pre.pre_tokenize_str(text)]

    chars = [chr(code) for code in range(0x110000) if not 0xD800 <= code <= 0xDFFF]
    probes = [probe for c in chars for probe in (f"a{c}a", f"!{c}!")]
    words = ["<start_of_text>", "<end_of_text>", "'s", "'t", "'re", "'ve", "'m", "'ll", "'d"]
    cased = [c for c in chars if c.lower() != c or c.upper() != c]
    probes += [word[:i] + c + word[i + 1:] for c in cased for word in words for i in range(len(word))]
    chunk = 50_000
    differ = [probe for start in range(0, len(probes), chunk) if differs(" ".join(probes[start:start + chunk]))
              for probe in probes[start:start + chunk] if differs(probe)]
    assert not differ, [(p, [hex(ord(c)) for c in p]) for p in differ[:10]]


def test_the_service_side_imports_neither_torch_nor_open_clip(tmp_path):
    """A fresh interpreter loads both kinds of tokenizer.json and gets open_clip's ids with only tokenizers."""
    texts = ["a photo of a golden retriever.", "rock &amp; roll", "", "(<end_of_text>)", "word " * 100]
    expected = {}
    for model in MODELS:
        reference = orthserve.get_tokenizer(model)
        (tmp_path / model).mkdir()
        info = write_tokenizer(reference, tmp_path / model / "tokenizer.json", reference.context_length)
        (tmp_path / model / "info.json").write_text(json.dumps(info))
        expected[model] = np.asarray(reference(texts)).tolist()
    code = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from orthserve.tokenizer import load_tokenizer\n"
        "root, texts = Path(sys.argv[1]), json.loads(sys.argv[2])\n"
        "ids = {m.name: load_tokenizer(m / 'tokenizer.json', json.loads((m / 'info.json').read_text()))(texts).tolist()"
        " for m in root.iterdir()}\n"
        "loaded = [m for m in ('torch', 'open_clip', 'transformers') if m in sys.modules]\n"
        "print(json.dumps({'ids': ids, 'loaded': loaded}))"
    )
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path), json.dumps(texts)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["loaded"] == []
    assert result["ids"] == expected


def test_a_bad_tokenizer_file_is_a_clear_error(tmp_path):
    path = tmp_path / "tokenizer.json"
    info = write_tokenizer(orthserve.get_tokenizer("ViT-B-32"), path, 77)
    with pytest.raises(ValueError, match="unknown tokenizer kind"):
        load_tokenizer(path, {**info, "kind": "sentencepiece"})
    with pytest.raises(ValueError, match="context length 16"):
        load_tokenizer(path, {**info, "context_length": 16})
    with pytest.raises(ValueError, match="missing.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path / "missing.json", info)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(path, info)
