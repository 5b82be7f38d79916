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
"""
import operator
import os
from collections.abc import Mapping

import sentencepiece as spm

# The Mixtral tokenizer shipped with the package (see data/NOTICE): used by the demo, which has no checkpoint.
BUNDLED_TOKENIZER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "tokenizer.model")

# mistral_common v1 joins the contents it merges (consecutive same-role messages, text chunks, several system
# messages, the system prompt and the first user message) with this separator.
_JOIN = "\n\n"
_ROLES = ("system", "user", "assistant")
_KEYS = {"system": {"role", "content"}, "user": {"role", "content"},
         "assistant": {"role", "content", "tool_calls", "prefix"}}


class Tokenizer:
    """A sentencepiece model plus Mixtral's special ids and chat format."""

    def __init__(self, processor, path=None):
        self.sp = processor
        self.path = path
        self.vocab_size = processor.vocab_size()
        self.bos_id = processor.bos_id()
        self.eos_id = processor.eos_id()
        self.unk_id = processor.unk_id()
        if min(self.bos_id, self.eos_id) < 0:
            raise ValueError(f"{path}: this sentencepiece model defines no BOS/EOS tokens; not a Mixtral tokenizer")
        # What decode(skip_special_tokens=True) drops: control tokens (<s>, </s>) and <unk>, which sentencepiece
        # would otherwise render as " ⁇ ".
        self._special = frozenset(i for i in range(self.vocab_size)
                                  if processor.is_control(i) or processor.is_unknown(i))

    @classmethod
    def from_pretrained(cls, path):
        """From a checkpoint directory (its tokenizer.model, or a single tokenizer.model.v* as Mistral ships it) or
        from the .model file itself."""
        path = os.fspath(path)
        if os.path.isdir(path):
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
        return cls(processor, path)

    @classmethod
    def bundled(cls):
        """The Mixtral tokenizer shipped inside the package (identical to the checkpoints' tokenizer.model)."""
        return cls.from_pretrained(BUNDLED_TOKENIZER)

    def __repr__(self):
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

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
        if skip_special_tokens:
            return self.sp.decode([i for i in ids if i not in self._special])
        parts, run = [], []
        for i in ids + [None]:
            if i is not None and i not in self._special:
                run.append(i)
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
                parts.append(self.sp.id_to_piece(i))
        return "".join(parts)

    def id_to_piece(self, i):
        return self.sp.id_to_piece(self._check_ids([i])[0])

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
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
            out.append(i)
        return out

    # ---- chat ------------------------------------------------------------------------------------------------------
    def encode_chat(self, messages):
        """Token ids of a conversation in Mistral's v1 Instruct format, ready for generation of the next answer.

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
        self._ids = [i for i in tokenizer._check_ids(context) if i not in tokenizer._special]
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
        if token_id in self.tokenizer._special:
            if self.skip_special_tokens:
                return ""
            text = self.flush() + self.tokenizer.sp.id_to_piece(token_id)
            self._started = True
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


def _find_model_file(directory):
    path = os.path.join(directory, "tokenizer.model")
    if os.path.isfile(path):
        return path
    versioned = sorted(n for n in os.listdir(directory) if n.startswith("tokenizer.model."))
    if len(versioned) == 1:
        return os.path.join(directory, versioned[0])
    if versioned:
        raise FileNotFoundError(f"{directory}: several tokenizer files ({', '.join(versioned)}); pass one of them")
    hint = " (it has tokenizer.json only; the sentencepiece tokenizer.model is needed)" if os.path.exists(
        os.path.join(directory, "tokenizer.json")) else ""
    raise FileNotFoundError(f"{directory}: no tokenizer.model in this directory{hint}")


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
