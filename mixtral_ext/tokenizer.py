"""Tokenizer: sentencepiece over Mixtral's tokenizer.model, the Instruct chat format, and streaming detokenization.

    tok = Tokenizer.from_pretrained(path)        # a directory holding tokenizer.model, or the file itself
    ids = tok.encode("Hello my name is")         # BOS first, no EOS
    ids = tok.encode_chat([{"role": "user", "content": "Hi"}])
    text = tok.decode(ids)                        # special tokens dropped
    stream = tok.stream_decoder()                 # feed generated ids one at a time, print what comes back

Chat format: Mistral's v1 Instruct template, token for token what mistral_common's `MistralTokenizer.v1()` produces
(tests/test_chat.py compares the two over many conversations). Each user turn is the sentencepiece encoding of the
one string `"[INST] " + content + " [/INST]"` (so it gets one prefix space, and `[INST]` is plain text: a message
that contains "[INST]" cannot forge a turn boundary, it is encoded as the same ordinary pieces); each assistant
turn is `encode(content) + [EOS]`; the whole conversation starts with one BOS. The model card writes the user turn
as tok("[INST]") + tok(content) + tok("[/INST]"), which gives the same ids for content without leading or trailing
whitespace (sentencepiece here never merges across a space); mistral_common's single string is what we follow.

Fine-tunes: the checkpoint's Hugging Face tokenizer files are read too (HFExtras). Tokens added beyond
tokenizer.model (ChatML's <|im_start|>/<|im_end|>, ids 32000+) decode to their text, an id past every known token
(a vocabulary padded to a round size) decodes to nothing, and a chat template of the checkpoint's own (not in the
[INST] format) is rendered as transformers renders it (uses_template). Without tokenizer.model, tokenizer.json
(read with the `tokenizers` library) takes its place.
"""
import json
import operator
import os
import re
from collections.abc import Mapping

import sentencepiece as spm

# The Mixtral tokenizer shipped with the package (see data/NOTICE): used by the demo, which has no checkpoint.
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokenizer.model")

# mistral_common v1 joins the contents it merges (consecutive same-role messages, text chunks, several system
# messages, the system prompt and the first user message) with this separator.
_JOIN = "\n\n"
_MAX_ID = 1 << 31  # token ids are int32 in every format we read
_MARK = ("\U000f0000", "\U000f0001")  # private-use characters around control-token text inside a message
_ROLES = ("system", "user", "assistant")
_KEYS = {"system": {"role", "content"}, "user": {"role", "content"},
         "assistant": {"role", "content", "tool_calls", "prefix"}}


class Tokenizer:
    """A sentencepiece model plus Mixtral's special ids and chat format."""

    def __init__(self, processor, path=None, extras=None):
        self.sp = processor
        self.path = path
        self.sp_size = processor.vocab_size()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.unk_id = processor.unk_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{path}: this sentencepiece model defines no BOS/EOS tokens; not a Mixtral tokenizer")
        # What decode(skip_special_tokens=True) drops: control tokens (<s>, </s>) and <unk>, which sentencepiece
        # would otherwise render as " ⁇ ".
        self._special = set(i for i in range(self.sp_size) if processor.is_control(i) or processor.is_unknown(i))
        # A fine-tune's tokenizer files (HFExtras): tokens added beyond the sentencepiece model ({id: (text,
        # special)}), its chat template, and the `tokenizers` tokenizer that encodes what the template renders.
        self.extras = extras or HFExtras()
        self.added = {i: t for i, t in self.extras.added.items() if i >= self.sp_size}
        self._special.update(i for i, (_, special) in self.added.items() if special)
        self._special = frozenset(self._special)
        for name in ("bos", "eos"):  # the checkpoint's tokenizer_config.json may name another one (ChatML: <|im_end|>)
            text = self.extras.tokens.get(name)
            i = self.token_to_id(text) if text else None
            if i is not None:
                setattr(self, f"{name}_id", i)
        self.vocab_size = max([self.sp_size] + [i + 1 for i in self.added])

    @classmethod
    def from_pretrained(cls, path):
        """From a checkpoint directory (its tokenizer.model, or a single tokenizer.model.v* as Mistral ships it; or,
        without those, its tokenizer.json: what transformers >= 5 saves) or from the .model file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
            if _only_tokenizer_json(path):
                extras = HFExtras.read(path)
                return cls(_FastPieces(extras, os.path.join(path, "tokenizer.json")), path, extras)
            path = _find_model_file(path)
        elif not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
        try:
            with open(path, "rb") as f:
                proto = f.read()
        except OSError as exc:
            raise OSError(f"{path}: cannot read the tokenizer ({exc.strerror or exc})") from None
        processor = spm.SentencePieceProcessor()
        try:
            # From the bytes read above, so that an unreadable file is our OSError and a bad one this ValueError.
            processor.LoadFromSerializedProto(proto)
        except (RuntimeError, OSError, TypeError) as exc:
            raise ValueError(f"{path}: not a valid sentencepiece model ({exc})") from None
        return cls(processor, path, HFExtras.read(os.path.dirname(os.path.abspath(path))))

    @classmethod
    def bundled(cls):
        """The Mixtral tokenizer shipped inside the package (identical to the checkpoints' tokenizer.model)."""
        return cls.from_pretrained(BUNDLED_TOKENIZER)

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    def token_to_id(self, text):
        """The id of a whole token written as text ("<s>", "<|im_end|>"), or None."""
        for i, (content, _) in self.added.items():
            if content == text:
                return i
        i = self.sp.piece_to_id(text)
        return i if i != self.unk_id or text == self.sp.id_to_piece(self.unk_id) else None

    def control_strings(self, text):
        """The substrings of `text` that spell a control token ("<s>", "[INST]", an added special token): encode()
        and encode_chat() keep them literal text, which a user pasting a model card's prompt may not expect."""
        names = {self.sp.id_to_piece(i) for i in (self.bos_id, self.eos_id) if i < self.sp_size}
        names |= {"[INST]", "[/INST]"} | {content for content, special in self.added.values() if special}
        names |= {t for t in self.extras.tokens.values() if t}
        return sorted(n for n in names if n and n in text)

    # ---- plain text ------------------------------------------------------------------------------------------------
    def encode(self, text, add_bos=True, add_eos=False):
        """Token ids of `text`, with sentencepiece's prefix space. Text that spells "<s>" is ordinary text."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.sp.encode(text)
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def decode(self, ids, skip_special_tokens=True):
        """Text of `ids` (a list of ints or a 1-D tensor). Special tokens are dropped, or with
        skip_special_tokens=False written as their pieces ("<s>", "</s>", "<unk>")."""
        ids = self._check_ids(ids)
        if skip_special_tokens and not self.added:
            return self.sp.decode([i for i in ids if i not in self._special and i < self.sp_size])
        parts, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._special and i < self.sp_size:
                run.append(i)
                continue
            if i is not None and skip_special_tokens and i in self._special:
                continue
            if run:
                text = self.sp.decode(run)
                # sentencepiece drops the prefix space of the first piece it decodes; only the first piece of the
                # whole text should lose it, not the first piece after a special token.
                if parts and self.sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                parts.append(text)
                run = []
            if i is not None:
                parts.append(self.id_to_piece(i))
        return "".join(parts)

    def id_to_piece(self, i):
        """The piece of id i; an added token's text; "" for an id beyond both (a model's padded vocabulary)."""
        (i,) = self._check_ids([i])
        if i < self.sp_size:
            return self.sp.id_to_piece(i)
        return self.added.get(i, ("", False))[0]

    def stream_decoder(self, context=(), skip_special_tokens=True):
        """A StreamDecoder for ids that continue `context` (e.g. the prompt's ids): its first piece keeps its
        leading space, as it would in the decoded prompt + continuation."""
        return StreamDecoder(self, context, skip_special_tokens)

    def _check_ids(self, ids):
        if hasattr(ids, "tolist"):  # a tensor or an array
            ids = ids.tolist()
        out = []
        for i in ids:
            if isinstance(i, bool) or not hasattr(i, "__index__"):
                raise TypeError(f"token ids must be ints, got {type(i).__name__}")
            i = operator.index(i)  # numpy / torch integer scalars too
            # Ids past the tokenizer are the model's: added tokens, or the padding of a vocabulary rounded up to a
            # multiple of 64/128 (they decode to nothing). Only what no vocabulary holds is an error.
            if not 0 <= i < _MAX_ID:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}) and of any model's")
            out.append(i)
        return out

    # ---- chat ------------------------------------------------------------------------------------------------------
    @property
    def uses_template(self):
        """Whether encode_chat renders the checkpoint's own chat template: yes for a fine-tune's format (ChatML...),
        no without a template or with one in Mistral's [INST] format (Mixtral-Instruct's own), which mistral_common's
        v1 encoding below reproduces token for token (the template rendering would differ in spaces)."""
        template = self.extras.chat_template
        return template is not None and "[INST]" not in template

    def _encode_template(self, messages):
        """Render the checkpoint's chat template as transformers' apply_chat_template(add_generation_prompt=True)
        does (a sandboxed jinja2 environment with trim_blocks and lstrip_blocks; messages, add_generation_prompt,
        tools=None, documents=None and the special tokens' texts bos_token, eos_token, unk_token, pad_token as
        variables; raise_exception, strftime_now, tojson) and encode the result without adding special tokens.
        Control-token text inside a message stays literal text (transformers' sanitize_control_tokens=True), so a
        message cannot forge a turn."""
        for n, m in enumerate(messages):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
                raise ValueError(f"message {n}: expected a dict with a 'role' and a 'content'")
            if m.get("prefix"):
                raise ValueError(f"message {n}: 'prefix' (continuing an answer) is not supported with a chat template")
        controls = set()
        for m in messages:
            if isinstance(m.get("content"), str):
                controls.update(self.control_strings(m["content"]))
        if not controls:
            return self._encode_controls(self.extras.render(messages, self._template_tokens()))
        # Control-token text in a message is wrapped in two private-use marks (marks already there are dropped
        # first, so none can be forged), the template renders, and each marked span is encoded as plain text.
        pattern = re.compile("|".join(map(re.escape, sorted(controls, key=len, reverse=True))))
        marked = []
        for m in messages:
            m = dict(m)
            if isinstance(m.get("content"), str):
                text = m["content"].replace(_MARK[0], "").replace(_MARK[1], "")
                m["content"] = pattern.sub(lambda x: _MARK[0] + x.group(0) + _MARK[1], text)
            marked.append(m)
        ids = []
        rendered = self.extras.render(marked, self._template_tokens())
        for k, part in enumerate(re.split(f"{_MARK[0]}(.*?){_MARK[1]}", rendered, flags=re.S)):
            part = part.replace(_MARK[0], "").replace(_MARK[1], "")
            if not part:
                continue
            encode = self._encode_literal if k % 2 else self._encode_controls
            if not ids:
                ids = encode(part)
                continue
            # A piece that continues the text must not get the prefix space sentencepiece gives the start of a
            # text: encoded after a newline, whose ids are then taken off again.
            newline = encode("\n")
            piece = encode("\n" + part)
            ids += piece[len(newline):] if piece[:len(newline)] == newline else encode(part)
        return ids

    def _template_tokens(self):
        out = {f"{name}_token": self.extras.tokens.get(name) for name in ("bos", "eos", "unk", "pad")}
        out["bos_token"] = out["bos_token"] or self.sp.id_to_piece(self.bos_id)
        out["eos_token"] = out["eos_token"] or self.id_to_piece(self.eos_id)
        out["unk_token"] = out["unk_token"] or self.sp.id_to_piece(self.unk_id)
        return out

    def _encode_controls(self, text):
        """Ids of template output: control-token texts become their ids. With the checkpoint's tokenizer.json, the
        `tokenizers` library encodes it (transformers' fast tokenizer, identical ids); without it, the text is split
        at the added tokens' and <s>/</s> texts and sentencepiece encodes each piece."""
        if self.extras.fast is not None:
            return self.extras.fast.encode(text, add_special_tokens=False).ids
        controls = {self.id_to_piece(i): i for i in (self.bos_id, self.eos_id)}
        controls.update({content: i for i, (content, _) in self.added.items()})
        ids = []
        pattern = "(" + "|".join(map(re.escape, sorted(controls, key=len, reverse=True))) + ")"
        for k, part in enumerate(re.split(pattern, text)):
            if k % 2:
                ids.append(controls[part])
            elif part:
                ids += self.sp.encode(part)
        return ids

    def _encode_literal(self, text):
        if self.extras.fast is not None:
            self.extras.fast.encode_special_tokens = True  # "<|im_end|>" in a message is its characters
            try:
                return self.extras.fast.encode(text, add_special_tokens=False).ids
            finally:
                self.extras.fast.encode_special_tokens = False
        return self.sp.encode(text)

    def encode_chat(self, messages):
        """Token ids of a conversation in Mistral's v1 Instruct format, ready for generation of the next answer.
        (When the checkpoint has a chat template of its own, not in the [INST] format, that template is rendered
        instead: see uses_template.)

        `messages`: dicts {"role": "system" | "user" | "assistant", "content": str or [{"type": "text", "text":
        str}, ...]}; an assistant message may carry "prefix": True (only as the last message: the answer is
        continued, so it gets no EOS). Follows mistral_common v1 exactly:
        - consecutive messages of one role are merged (contents joined with a blank line, empty ones skipped);
          system messages are taken out (they still separate runs), joined, and put with a blank line in front of
          the first user message; a conversation that does not start with a user message gets an empty one first;
        - message text is used verbatim (no stripping);
        - refused with ValueError: no messages, an unknown role (tools are not in the v1 format), unknown keys,
          non-text content, a lone assistant message, a system message right after an assistant one, an assistant
          message with empty content or tool calls, and a final assistant message without "prefix": True.
        """
        if isinstance(messages, (str, bytes, Mapping)) or not hasattr(messages, "__iter__"):
            raise ValueError("encode_chat expects a list of messages (dicts with 'role' and 'content')")
        if self.uses_template:
            return self._encode_template(list(messages))
        msgs = [_check_message(m, n) for n, m in enumerate(messages)]
        _check_structure(msgs)

        system = [m["text"] for m in msgs if m["role"] == "system" and m["truthy"]]
        system_prompt = _JOIN.join(system) if system else None

        # Runs of one role; a system message ends a run (so user, system, user gives two user turns) and is dropped.
        turns = []
        for n, m in enumerate(msgs):
            if n == 0 or m["role"] != msgs[n - 1]["role"]:
                turns.append([])
            turns[-1].append(m)
        turns = [run for run in turns if run[0]["role"] != "system"]
        if not turns or turns[0][0]["role"] != "user":
            turns.insert(0, [{"role": "user", "text": "", "prefix": False}])

        ids = [self.bos_id]
        first_user = True
        for run in turns:
            text = _JOIN.join(m["text"] for m in run if m["text"])
            if run[0]["role"] == "user":
                if first_user and system_prompt:
                    text = system_prompt + _JOIN + text
                first_user = False
                ids += self.sp.encode(f"[INST] {text} [/INST]")
            else:
                if not text:
                    raise ValueError("an assistant message has no text (the v1 format has no empty answers)")
                ids += self.sp.encode(text)
                if not any(m["prefix"] for m in run):
                    ids.append(self.eos_id)
        return ids


class StreamDecoder:
    """Incremental detokenization: put(id) returns the text that id completes, so that the concatenation of all
    put() results and the final flush() equals tok.decode(ids) (or, with a context, the decoded context +
    continuation minus the decoded context).

    Decoding ids one at a time is wrong twice over: sentencepiece drops the prefix space of the first piece it
    decodes ("▁world" alone gives "world"), and a character spread over byte-fallback pieces (<0xE2><0x82><0xAC>
    is "€") decodes piecewise to replacement characters. So each step decodes a short window that starts one
    emitted chunk back (its first piece takes the space loss for both decodes compared) and emits the difference,
    and holds text back while it ends in U+FFFD, the mark of an incomplete UTF-8 sequence. Sentencepiece replaces
    each bad byte on its own, so a window that starts where the text was clean decodes to exactly the tail of the
    full decode; the windows stay a few tokens long.
    """

    def __init__(self, tokenizer, context=(), skip_special_tokens=True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._ids = [i for i in tokenizer._check_ids(context) if i not in tokenizer._special and i < tokenizer.sp_size]
        self._prefix = 0  # window start: a clean point one emitted chunk back
        self._read = len(self._ids)  # everything before this has been emitted
        # Once any text precedes the window, its first piece keeps its prefix space (only the very first piece of
        # a text loses it). With a non-empty window start this cancels out between the two decodes compared.
        self._started = bool(self._ids)

    def put(self, token_id):
        """Add one id (an int or a one-element tensor); return the newly completed text (maybe "")."""
        if hasattr(token_id, "item"):
            token_id = token_id.item()
        (token_id,) = self.tokenizer._check_ids([token_id])
        if token_id in self.tokenizer._special or token_id >= self.tokenizer.sp_size:
            if self.skip_special_tokens and token_id in self.tokenizer._special:
                return ""
            text = self.flush() + self.tokenizer.id_to_piece(token_id)  # an added token's text, or ""
            self._started = self._started or bool(text)
            return text
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read = self._read, len(self._ids)
            self._started = True
            return after[len(before):]
        return ""

    def flush(self):
        """Return the text held back: at the end of the stream, an incomplete byte sequence as replacement
        characters. Call it once the ids are finished (put() of a kept special token calls it too)."""
        before = self._decode(self._ids[self._prefix:self._read])
        after = self._decode(self._ids[self._prefix:])
        # The next window starts empty: a held-back byte must not combine with bytes that come after the flush
        # (decode(skip_special_tokens=False) decodes the runs between special tokens separately too).
        self._prefix = self._read = len(self._ids)
        self._started = self._started or bool(after)
        return after[len(before):]

    def _decode(self, ids):
        if not ids:
            return ""
        space = " " if self._started and self.tokenizer.sp.id_to_piece(ids[0]).startswith("\u2581") else ""
        return space + self.tokenizer.sp.decode(ids)


def _only_tokenizer_json(directory):
    names = os.listdir(directory)
    return "tokenizer.json" in names and not any(n == "tokenizer.model" or n.startswith("tokenizer.model.")
                                                 for n in names)


class _FastPieces:
    """A tokenizer.json (the `tokenizers` library) behind the sentencepiece calls Tokenizer makes, for checkpoints
    saved without tokenizer.model. It must be sentencepiece-style: byte-fallback BPE over U+2581-marked pieces (as
    Mixtral's and its fine-tunes' are), whose decoder, like sentencepiece, drops the first piece's prefix space and
    turns each byte of an incomplete UTF-8 sequence into one U+FFFD (StreamDecoder relies on both)."""

    def __init__(self, extras, path):
        fast = extras.fast
        if fast is None:
            raise ValueError(f"{path}: reading a tokenizer.json needs the `tokenizers` library (pip install tokenizers)")
        self.fast, self.path = fast, path
        self.size = fast.get_vocab_size(with_added_tokens=False)
        special = {i for i, t in fast.get_added_tokens_decoder().items() if t.special and i < self.size}
        ids = {}
        for name, default in (("bos", "<s>"), ("eos", "</s>"), ("unk", "<unk>")):
            # The base vocabulary's own (an added EOS such as <|im_end|> is taken over by Tokenizer afterwards).
            found = [fast.token_to_id(t) for t in (extras.tokens.get(name), default) if t]
            ids[name] = next((i for i in found if i is not None and i < self.size), -1)
        self.ids, self.special = ids, special
        if "\u2581" not in "".join(fast.id_to_token(i) or "" for i in range(min(self.size, 1000))):
            raise ValueError(f"{path}: not a sentencepiece-style (U+2581) tokenizer; Mixtral's tokenizer.json is one")

    def vocab_size(self):
        return self.size

    def bos_id(self):
        return self.ids["bos"]

    def eos_id(self):
        return self.ids["eos"]

    def unk_id(self):
        return self.ids["unk"]

    def is_control(self, i):
        return i in self.special and i != self.ids["unk"]

    def is_unknown(self, i):
        return i == self.ids["unk"]

    def encode(self, text):
        # Control-token text is plain text, as sentencepiece reads it.
        self.fast.encode_special_tokens = True
        try:
            return self.fast.encode(text, add_special_tokens=False).ids
        finally:
            self.fast.encode_special_tokens = False

    def decode(self, ids):
        return self.fast.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i):
        return self.fast.id_to_token(i)

    def piece_to_id(self, piece):
        i = self.fast.token_to_id(piece)
        return self.ids["unk"] if i is None or i >= self.size else i


def _find_model_file(directory):
    path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(path):
        return path
    versioned = sorted(n for n in os.listdir(directory) if n.startswith("tokenizer.model."))
    if len(versioned) == 1:
        return os.path.join(directory, versioned[0])
    if versioned:
        raise FileNotFoundError(f"{directory}: several tokenizer files ({', '.join(versioned)}); pass one of them")
    raise FileNotFoundError(f"{directory}: no tokenizer.model (nor tokenizer.json) in this directory")


def _text_of(content, where):
    """(merged text, truthiness as mistral_common sees it) of a message's content: a str, or text chunks whose
    non-empty texts are joined like separate messages."""
    if isinstance(content, str):
        return content, bool(content)
    if isinstance(content, (list, tuple)):
        texts = []
        for chunk in content:
            if not isinstance(chunk, Mapping) or chunk.get("type") != "text" or set(chunk) != {"type", "text"} \
                    or not isinstance(chunk["text"], str):
                raise ValueError(f"{where}: content chunks must be {{'type': 'text', 'text': str}} (the v1 format "
                                 f"has text only), got {chunk!r:.80}")
            texts.append(chunk["text"])
        return _JOIN.join(t for t in texts if t), bool(content)
    raise ValueError(f"{where}: content must be a str or a list of text chunks, got {type(content).__name__}")


def _check_message(m, n):
    if not isinstance(m, Mapping):
        raise ValueError(f"message {n}: expected a dict with 'role' and 'content', got {type(m).__name__}")
    role = m.get("role")
    if role not in _ROLES:
        extra = " (tool messages and tool calls are not part of the v1 Instruct format)" if role == "tool" else ""
        raise ValueError(f"message {n}: unknown role {role!r}; expected one of {list(_ROLES)}{extra}")
    where = f"message {n} ({role})"
    unknown = sorted(set(m) - _KEYS[role])
    if unknown:
        raise ValueError(f"{where}: unexpected key(s) {unknown}; a {role} message has {sorted(_KEYS[role])}")
    if "content" not in m and role != "assistant":
        raise ValueError(f"{where}: no 'content'")
    content = m.get("content")
    text, truthy = ("", False) if content is None and role == "assistant" else _text_of(content, where)
    prefix = m.get("prefix", False)
    if not isinstance(prefix, bool):
        raise ValueError(f"{where}: 'prefix' must be a bool, got {prefix!r}")
    if role == "assistant":
        if m.get("tool_calls"):
            raise ValueError(f"{where}: tool calls are not part of the v1 Instruct format")
        if not truthy:
            raise ValueError(f"{where}: an assistant message needs non-empty content")
    return {"role": role, "text": text, "truthy": truthy, "prefix": prefix}


def _check_structure(msgs):
    """mistral_common's request validation (test mode), for the roles the v1 format has."""
    if not msgs:
        raise ValueError("a conversation needs at least one message")
    if len(msgs) == 1 and msgs[0]["role"] not in ("user", "system"):
        raise ValueError("a conversation must start with a user or system message")
    for n in range(1, len(msgs)):
        if msgs[n - 1]["role"] == "assistant" and msgs[n]["role"] == "system":
            raise ValueError(f"message {n}: a system message cannot follow an assistant message")
    for n, m in enumerate(msgs[:-1]):
        if m["prefix"]:
            raise ValueError(f"message {n}: only the last message may be an assistant prefix ('prefix': True)")
    last = msgs[-1]
    if len(msgs) > 1 and last["role"] == "assistant" and not last["prefix"]:
        raise ValueError("the conversation ends with an assistant message: nothing is left to generate (give it "
                         "'prefix': True to have the model continue that answer)")


class HFExtras:
    """What a checkpoint's Hugging Face tokenizer files add to tokenizer.model: added tokens ({id: (text,
    special)}) from tokenizer.json (read with the `tokenizers` library, which then also encodes template output) and
    tokenizer_config.json's added_tokens_decoder; the chat template (chat_template.jinja, chat_template.json or
    tokenizer_config.json's "chat_template"); the special tokens' texts ({"bos": "<s>", "eos": "<|im_end|>"...})."""

    def __init__(self, added=None, chat_template=None, tokens=None, fast=None, source=None):
        self.added, self.chat_template, self.tokens, self.fast = added or {}, chat_template, tokens or {}, fast
        self.source = source
        self._compiled = None

    @classmethod
    def read(cls, directory):
        added, tokens, template, fast = {}, {}, None, None
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        if config:
            for i, entry in (config.get("added_tokens_decoder") or {}).items():
                if isinstance(entry, Mapping) and isinstance(entry.get("content"), str) and str(i).isdigit():
                    added[int(i)] = (entry["content"], bool(entry.get("special", True)))
            for name in ("bos", "eos", "unk", "pad"):
                value = config.get(f"{name}_token")
                value = value.get("content") if isinstance(value, Mapping) else value
                if isinstance(value, str):
                    tokens[name] = value
            template = config.get("chat_template")
        path = os.path.join(directory, "tokenizer.json")
        if os.path.isfile(path):
            try:
                import tokenizers
                fast = tokenizers.Tokenizer.from_file(path)
            except ImportError:
                fast = None  # the template still renders; added tokens come from tokenizer_config.json
            except Exception as exc:  # tokenizers raises its own Exception subclass for a bad file
                raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from None
            if fast is not None:
                for i, token in fast.get_added_tokens_decoder().items():
                    added[int(i)] = (token.content, bool(token.special))
        jinja = os.path.join(directory, "chat_template.jinja")
        if os.path.isfile(jinja):
            with open(jinja, encoding="utf-8") as f:
                template = f.read()
        elif os.path.isfile(os.path.join(directory, "chat_template.json")):
            template = (_read_json(os.path.join(directory, "chat_template.json")) or {}).get("chat_template", template)
        if isinstance(template, list):  # several named templates: transformers' default is the one named "default"
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            template = named.get("default")
        if template is not None and not isinstance(template, str):
            template = None
        return cls(added, template, tokens, fast, directory)

    def render(self, messages, special_tokens):
        if self._compiled is None:
            self._compiled = _compile_template(self.chat_template, self.source)
        try:
            import jinja2
            return self._compiled.render(messages=messages, add_generation_prompt=True, tools=None, documents=None,
                                         **special_tokens)
        except jinja2.TemplateError as exc:
            raise ValueError(f"the chat template of {self.source} refused the conversation: {exc}") from None


def _read_json(path):
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{path}: unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def _compile_template(template, source):
    """A chat template compiled the way transformers compiles it: templates come from the Hub and are untrusted,
    so the environment is jinja2's immutable sandbox."""
    try:
        import jinja2
        import jinja2.ext
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ImportError(f"{source} has a chat template of its own; rendering it needs jinja2 "
                          f"(pip install jinja2)") from None

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        import datetime
        return datetime.datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.TemplateError as exc:
        raise ValueError(f"{source}: the chat template does not compile ({exc})") from None
