"""Tokenizer: loading and its errors, encode/decode against sentencepiece itself, streaming detokenization against
full decoding. The oracle is a plain sentencepiece processor over the same file (and mistral_common's copy of the
Mixtral tokenizer, where installed)."""
import hashlib
import os
import random
import re
import shutil

import pytest
import sentencepiece as spm
import torch

from mixtral_ext.tokenizer import BUNDLED_TOKENIZER, Tokenizer

TEXTS = [
    "Hello my name is",
    "",
    " ",
    "  two leading spaces and two trailing  ",
    "\n\nnewlines\tand\ttabs\r\n",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 中文, 한국어, עברית, العربية",
    "emoji 🙂🚀👩‍👩‍👧 and rare CJK 𠜎𠜱𠝹 (byte fallback)",
    "def f(x):\n    return {'a': [1, 2, 3]}  # code\n\n```python\nprint(f(1))\n```",
    "<s> [INST] not special [/INST] </s> <unk>",
    "a" * 500,
    "   \u00a0\u2009\u3000 unusual spaces",
    "€100 ≈ ¥15000; ∑∫√ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def sp():
    return spm.SentencePieceProcessor(model_file=BUNDLED_TOKENIZER)


def random_texts(n, seed=0):
    """Random strings mixing ASCII, whitespace runs, and characters that need byte fallback."""
    rng = random.Random(seed)
    alphabet = (list("abcdefghijklmnopqrstuvwxyz ABCXYZ0123456789.,;:!?'\"()[]{}<>/\\-_=+*&^%$#@~`|")
                + [" ", "  ", "\n", "\t", "é", "ß", "ж", "中", "文", "🙂", "𠜎", "\u200b", "ﬁ", "Å", "\u0301"])
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60))) for _ in range(n)]


def random_ids(rng, n):
    """Ids biased towards the hard cases: byte-fallback pieces (3..258), specials (0, 1, 2), bare-space pieces."""
    out = []
    for _ in range(n):
        r = rng.random()
        if r < 0.35:
            out.append(rng.randint(3, 258))
        elif r < 0.45:
            out.append(rng.choice([0, 1, 2]))
        elif r < 0.55:
            out.append(rng.choice([28705, 259, 260, 13]))  # "▁", "▁▁", "▁▁▁▁", "<0x0A>"
        else:
            out.append(rng.randint(0, 31999))
    return out


# ---- loading -------------------------------------------------------------------------------------------------------
def test_bundled_file_is_the_mixtral_tokenizer(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.unk_id) == (32000, 1, 2, 0)
    with open(BUNDLED_TOKENIZER, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    notice = open(os.path.join(os.path.dirname(BUNDLED_TOKENIZER), "NOTICE")).read()
    assert re.search(r"SHA-256: ([0-9a-f]{64})", notice).group(1) == digest


def test_bundled_file_equals_mistral_common_copy():
    mc = pytest.importorskip("mistral_common")
    ref = os.path.join(os.path.dirname(mc.__file__), "data", "tokenizer.model.v1")
    with open(ref, "rb") as a, open(BUNDLED_TOKENIZER, "rb") as b:
        assert a.read() == b.read()


def test_from_pretrained_dir_and_file(tmp_path, tok):
    shutil.copy(BUNDLED_TOKENIZER, tmp_path / "tokenizer.model")
    for path in (tmp_path, tmp_path / "tokenizer.model", str(tmp_path)):
        t = Tokenizer.from_pretrained(path)
        assert t.encode("Hello my name is") == tok.encode("Hello my name is")
    # Mistral's consolidated downloads name it tokenizer.model.v1 (or .v3); a lone versioned file is found too.
    other = tmp_path / "mistral"
    other.mkdir()
    shutil.copy(BUNDLED_TOKENIZER, other / "tokenizer.model.v1")
    assert Tokenizer.from_pretrained(other).vocab_size == 32000
    shutil.copy(BUNDLED_TOKENIZER, other / "tokenizer.model.v3")
    with pytest.raises(FileNotFoundError, match="several tokenizer files"):
        Tokenizer.from_pretrained(other)
    # A path with non-ASCII characters.
    odd = tmp_path / "modèle 日本"
    odd.mkdir()
    shutil.copy(BUNDLED_TOKENIZER, odd / "tokenizer.model")
    assert Tokenizer.from_pretrained(odd).vocab_size == 32000


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer file"):
        Tokenizer.from_pretrained(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model"):
        Tokenizer.from_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")  # tokenizer.json alone is read (tests/test_finetune.py)
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    os.remove(tmp_path / "tokenizer.json")
    bad = tmp_path / "tokenizer.model"
    for content in (b"", b"not a sentencepiece model at all", open(BUNDLED_TOKENIZER, "rb").read()[:1000]):
        bad.write_bytes(content)
        with pytest.raises(ValueError, match="not a valid sentencepiece model"):
            Tokenizer.from_pretrained(tmp_path)


# ---- encode / decode -----------------------------------------------------------------------------------------------
def test_encode_matches_sentencepiece(tok, sp):
    for text in TEXTS + random_texts(300):
        ref = sp.encode(text)
        assert tok.encode(text) == [1] + ref
        assert tok.encode(text, add_bos=False) == ref
        assert tok.encode(text, add_bos=False, add_eos=True) == ref + [2]
    with pytest.raises(TypeError):
        tok.encode(b"bytes")


def test_decode_round_trip(tok, sp):
    for text in TEXTS + random_texts(300, seed=1):
        ids = tok.encode(text)
        assert tok.decode(ids) == sp.decode(ids[1:])
        # sentencepiece normalises nothing in Mixtral's model (no NFKC, spaces kept), so text comes back exactly.
        assert tok.decode(ids) == text
        assert tok.decode(torch.tensor(ids)) == text


def test_decode_special_tokens(tok, sp):
    rng = random.Random(2)
    for _ in range(300):
        ids = random_ids(rng, rng.randint(0, 30))
        assert tok.decode(ids) == sp.decode([i for i in ids if i > 2])
        # Without byte pieces (which a special token in between keeps from combining), dropping the rendered
        # specials from the kept text gives the skipped text, up to the space after a special token (kept there:
        # only the first piece of a text loses its prefix space).
        ids = [i for i in ids if not 3 <= i <= 258]
        kept = tok.decode(ids, skip_special_tokens=False)
        assert re.sub(r"<s>|</s>|<unk>", "", kept).replace(" ", "") == tok.decode(ids).replace(" ", "")
        assert kept.count("</s>") >= ids.count(2)
    assert tok.decode([1, 22557, 2], skip_special_tokens=False) == "<s> Hello</s>"
    assert tok.decode([0]) == ""  # sentencepiece alone renders <unk> as " ⁇ "
    assert tok.decode([22557, 32000, 32001]) == "Hello"  # ids past the tokenizer (a padded vocabulary): nothing
    for bad in ([-1], [5, 1 << 40]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            tok.decode(bad)
    with pytest.raises(TypeError):
        tok.decode([1.5])


# ---- streaming -----------------------------------------------------------------------------------------------------
def stream(tok, ids, context=(), skip_special_tokens=True):
    dec = tok.stream_decoder(context, skip_special_tokens=skip_special_tokens)
    pieces = [dec.put(i) for i in ids]
    return pieces, "".join(pieces) + dec.flush()


def test_one_at_a_time_decoding_is_wrong(tok):
    """Why a stream decoder is needed: the naive per-id decode loses spaces and splits characters."""
    ids = tok.encode("Hello world 🙂 €", add_bos=False)
    assert "".join(tok.decode([i]) for i in ids) != tok.decode(ids)
    assert stream(tok, ids)[1] == tok.decode(ids)


def test_stream_equals_full_decode_on_text(tok):
    for text in TEXTS + random_texts(300, seed=3):
        ids = tok.encode(text)
        pieces, out = stream(tok, ids)
        assert out == text
        # Valid UTF-8 never shows a replacement character mid-stream: partial characters are held back.
        assert all("\ufffd" not in p for p in pieces)
        assert stream(tok, ids, skip_special_tokens=False)[1] == tok.decode(ids, skip_special_tokens=False)


def test_stream_equals_full_decode_on_random_ids(tok):
    rng = random.Random(4)
    for trial in range(1500):
        ids = random_ids(rng, rng.randint(0, 48))
        skip = trial % 2 == 0
        assert stream(tok, ids, skip_special_tokens=skip)[1] == tok.decode(ids, skip_special_tokens=skip), ids


def test_stream_with_context_keeps_the_first_space(tok):
    """Continuing a prompt: the text streamed is decode(prompt + new) minus decode(prompt)."""
    rng = random.Random(5)
    for trial in range(600):
        prompt = tok.encode(random_texts(1, seed=trial)[0] or "x")
        new = random_ids(rng, rng.randint(1, 24))
        full, head = tok.decode(prompt + new), tok.decode(prompt)
        assert full.startswith(head)
        assert stream(tok, new, context=prompt)[1] == full[len(head):], (prompt, new)
    prompt, new = tok.encode("Hello my name is"), tok.encode("John", add_bos=False)  # "▁John"
    assert stream(tok, new, context=prompt)[1] == " John"
    assert stream(tok, new)[1] == "John"


def test_stream_accepts_tensor_ids(tok):
    ids = tok.encode("tensors, one at a time: 日本")
    dec = tok.stream_decoder()
    assert "".join(dec.put(torch.tensor([i])) for i in ids) + dec.flush() == tok.decode(ids)
    assert dec.put(40000) == "" and dec.flush() == ""  # past every piece (a padded vocabulary): never a crash
    with pytest.raises(ValueError):
        dec.put(-3)
