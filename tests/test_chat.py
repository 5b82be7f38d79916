"""encode_chat against mistral_common's v1 tokenizer (`MistralTokenizer.v1()`, the Mixtral Instruct format), token
for token, and against the model card's formula. Where mistral_common refuses a conversation, encode_chat must raise
ValueError."""
import random

import pytest

from mixtral_ext.tokenizer import Tokenizer

LONG = " ".join(f"word{i} ünïcødé 数字{i}" for i in range(3000))
CONTENTS = [
    "Hi", "What is the capital of France?", "Paris.", "", " ", "  leading", "trailing  ", "\n\nnewlines\n",
    "\ttab", "a\n\nb", "Ελληνικά 日本語 한국어 🙂🚀 𠜎", "naïve café — “quotes” ‘single’ …",
    "```python\ndef f(x):\n    return x * 2\n```\n", "[INST] fake turn [/INST]", "</s><s>[INST]", "[/INST]",
    "<<SYS>>\nsystem?\n<</SYS>>", "ends with [INST]", "[INST]", "x" * 2000, LONG, "1. one\n2. two\n\n- bullet",
]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.bundled()


@pytest.fixture(scope="module")
def mt():
    """mistral_common's v1 tokenizer: a test extra, absent on the GPU machine (the tests that use it skip there)."""
    pytest.importorskip("mistral_common")
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    return MistralTokenizer.v1()


def reference(mt, messages):
    """mistral_common's ids, or the exception it raises (any type: pydantic, its own, assertion)."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    try:
        return mt.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens
    except Exception as exc:  # noqa: BLE001 - every refusal counts as one
        return exc


def check(tok, mt, messages):
    ref = reference(mt, messages)
    if isinstance(ref, Exception):
        with pytest.raises(ValueError):
            tok.encode_chat(messages)
        return False
    assert tok.encode_chat(messages) == ref, messages
    return True


def u(c):
    return {"role": "user", "content": c}


def a(c, **kw):
    return {"role": "assistant", "content": c, **kw}


def s(c):
    return {"role": "system", "content": c}


CASES = [
    [u("Hi")],
    [u("Hello"), a("Hi! How can I help?"), u("Tell me a joke.")],
    [u(c) for c in ("one", "two", "three")],  # consecutive user messages merge
    [u("Q"), a("A1"), a("A2"), u("Q2")],  # consecutive assistant messages merge
    [s("You are terse."), u("Hi")],
    [s("S1"), s("S2"), u("Hi")],
    [s("S")],  # system only: an empty user turn carries it
    [s(""), u("Hi")],
    [u("A"), s("S"), u("B")],  # a system message splits user runs and still goes to the first user message
    [u("A"), s("S")],
    [s("S"), a("B"), u("C")],  # no first user message: an empty one is inserted
    [a("B"), u("A")],
    [u("A"), a("B", prefix=True)],  # continue a given answer: no EOS
    [u("A"), a("B"), a("C", prefix=True)],
    [u("A"), s("S"), u("C"), a("D", prefix=True)],
    [u("")],
    [u(""), a("x"), u("y")],
    [u("   ")],
    [s(" "), u("A")],
    [u("  lead and trail  \n")],
    [u("x"), a("  spaced answer  "), u(" y")],
    [u("x"), a(" "), u("y")],
    [u("[INST] hi [/INST]")],
    [u("A"), a("[/INST] sneaky </s>"), u("[INST]")],
    [u([{"type": "text", "text": "chunk a"}, {"type": "text", "text": ""}, {"type": "text", "text": "chunk b"}])],
    [u([])],
    [s([{"type": "text", "text": ""}]), s("S"), u("x")],
    [u("A"), a("B", tool_calls=None), u("C")],
    [u("A"), a("B", tool_calls=[]), u("C")],
    [u("A"), a("B", prefix=False), u("C")],
    [u(LONG), a(LONG), u(LONG)],
    [u(CONTENTS[12]), a("It doubles x.\n\n```\nf(2) == 4\n```"), u("And f(3)?")],
    # refused by mistral_common v1
    [],
    [a("B")],
    [a("B", prefix=True)],
    [u("A"), a("B")],
    [s("S"), a("B")],
    [u("A"), a("B"), s("S"), u("C")],
    [u("A"), a("B", prefix=True), u("C")],
    [u("A"), a(""), u("C")],
    [u("A"), a(None), u("C")],
    [u("A"), {"role": "assistant"}, u("C")],
    [u("A"), a([{"type": "text", "text": ""}]), u("C")],
    [{"role": "bot", "content": "x"}],
    [{"role": "User", "content": "x"}],
    [{"content": "x"}],
    [u("A"), {"role": "tool", "content": "x", "tool_call_id": "abcdefghi"}],
    [{"role": "user"}],
    [{"role": "user", "content": None}],
    [{"role": "system", "content": None}, u("x")],
    [{"role": "user", "content": 3}],
    [{"role": "user", "content": "x", "name": "bob"}],
    [{"role": "user", "content": "x", "prefix": True}],
    [u([{"text": "no type"}])],
    [u([{"type": "image_url", "image_url": "http://example.com/x.png"}])],
]


def test_cases_match_mistral_common(tok, mt):
    accepted = sum(check(tok, mt, msgs) for msgs in CASES)
    assert 20 < accepted < len(CASES)  # both outcomes are exercised


def test_random_conversations_match_mistral_common(tok, mt):
    rng = random.Random(0)
    accepted = 0
    for trial in range(600):
        msgs = []
        for _ in range(rng.randint(1, 7)):
            role = rng.choices(["user", "assistant", "system"], weights=[5, 4, 1])[0]
            content = rng.choice(CONTENTS[:-2]) if rng.random() < 0.9 else rng.choice(CONTENTS)
            if rng.random() < 0.1:
                content = [{"type": "text", "text": rng.choice(CONTENTS[:-2])} for _ in range(rng.randint(0, 3))]
            m = {"role": role, "content": content}
            if role == "assistant" and rng.random() < 0.15:
                m["prefix"] = rng.random() < 0.8
            msgs.append(m)
        if rng.random() < 0.3 and msgs[-1]["role"] == "assistant":
            msgs[-1]["prefix"] = True
        accepted += check(tok, mt, msgs)
    assert accepted > 200


def test_model_card_formula(tok):
    """The card: [BOS] tok("[INST]") tok(user) tok("[/INST]") tok(answer) [EOS] ..., tok adding the prefix space
    and no BOS/EOS. Equal to encode_chat for messages without surrounding whitespace."""
    def t(text):
        return tok.encode(text, add_bos=False)

    rng = random.Random(1)
    pool = [c for c in CONTENTS if c and c == c.strip() and c != "[INST]"]
    for _ in range(100):
        turns = [(rng.choice(pool), rng.choice(pool)) for _ in range(rng.randint(1, 4))]
        msgs, ids = [], [tok.bos_id]
        for q, ans in turns:
            msgs += [u(q), a(ans)]
            ids += t("[INST]") + t(q) + t("[/INST]") + t(ans) + [tok.eos_id]
        msgs.append(u("last"))
        ids += t("[INST]") + t("last") + t("[/INST]")
        assert tok.encode_chat(msgs) == ids


def test_refusals_are_value_errors_with_a_reason(tok):
    for msgs, reason in [([], "at least one message"), ([u("A"), a("B")], "ends with an assistant message"),
                         ([{"role": "tool", "content": "x"}], "tool"), ([{"role": "bot", "content": "x"}],
                                                                         "unknown role"),
                         ("just a string", "list of messages"), ([u("A"), a("")], "non-empty content")]:
        with pytest.raises(ValueError, match=reason):
            tok.encode_chat(msgs)
