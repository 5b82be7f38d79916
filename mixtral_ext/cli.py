"""The `mixtral-ext` command (also `python -m mixtral_ext`): generate, chat, demo, bench.

    mixtral-ext demo                                   # tiny random-weight Mixtral, real code path, seconds on a CPU
    mixtral-ext generate --model DIR --prompt "Hello my name is" --max-new-tokens 32
    mixtral-ext generate --model DIR --chat --prompt "Write a haiku about GPUs."
    mixtral-ext generate --model DIR --prompt-file prompt.txt --stop "###" --repetition-penalty 1.1
    echo "Hello" | mixtral-ext generate --model DIR --prompt -
    mixtral-ext chat --model DIR                       # multi-turn Instruct chat; EOF (Ctrl-D) or /exit ends it
    mixtral-ext generate --model DIR --quantize int8 ...   # int8 (or int4) expert weights: 80 GB (40 GB) GPUs
    mixtral-ext bench [--quick]                        # bench/bench_kernels.py and bench/bench_e2e.py (needs a GPU)
    mixtral-ext bench --model DIR                      # prefill and decode tokens/s of a checkpoint, any device
    torchrun --nproc-per-node 2 -m mixtral_ext generate --model DIR ...   # tensor parallel over 2 GPUs

Under torchrun every rank runs the same command on its shard of the model and rank 0 alone prints (an error is
printed by every rank, prefixed with its rank). Generated text streams to stdout; statistics (tokens/s) go to stderr.
Every error is one line on stderr and a non-zero exit status (2 for bad arguments, 1 otherwise); MIXTRAL_EXT_DEBUG=1
shows the traceback instead.
All CLI state lives here: the library functions it calls take their inputs as parameters.
"""
import argparse
import io
import os
import subprocess
import sys
import tempfile
import time

PROG = "mixtral-ext"
_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _nonneg_float(text):
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _top_p(text):
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _nonneg_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def build_parser():
    from . import __version__

    p = _Parser(prog=PROG, description="Mixtral-8x7B inference with hand-written CUDA kernels.")
    p.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{generate,chat,demo,bench,doctor}")

    def model_args(q, required):
        q.add_argument("--model", required=required, metavar="DIR",
                       help="checkpoint directory (Hugging Face or Mistral consolidated layout)")
        q.add_argument("--tokenizer", metavar="PATH", help="tokenizer.model or its directory (default: --model)")
        q.add_argument("--expert-parallel", action="store_true",
                       help="under torchrun: E/N whole experts per rank (default: tensor parallel, every expert split)")
        quantize_arg(q)

    def quantize_arg(q):
        q.add_argument("--quantize", choices=["int8", "int4"], default=None,
                       help="store the expert weights as int8 (per output row) or int4 (per 128 inputs), quantized "
                            "while loading: Mixtral-8x7B then fits an 80 GB (int8) or 40 GB (int4) GPU")

    def run_args(q, max_new, seed_help="sampling seed (with T > 0)"):
        q.add_argument("--max-new-tokens", type=_positive_int, default=max_new, metavar="N")
        q.add_argument("--temperature", type=_nonneg_float, default=0.0, metavar="T",
                       help="0 (default) decodes greedily; > 0 samples")
        q.add_argument("--top-p", type=_top_p, default=1.0, metavar="P", help="nucleus sampling (with T > 0)")
        q.add_argument("--top-k", type=_nonneg_int, default=0, metavar="K", help="0 = off (with T > 0)")
        q.add_argument("--seed", type=int, default=None, metavar="S", help=seed_help)
        q.add_argument("--repetition-penalty", type=_positive_float, default=1.0, metavar="R",
                       help="> 1 discourages repeating tokens already in the text (transformers' penalty)")
        q.add_argument("--stop", action="append", default=[], metavar="STRING",
                       help="stop when the text reaches STRING (not printed); repeatable")
        q.add_argument("--device", choices=["cuda", "cpu"], default=None,
                       help="default: cuda when a GPU is available, else cpu")
        q.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                       help="default: bf16 on cuda, fp32 on cpu")

    g = sub.add_parser("generate", help="continue a prompt (or answer it, with --chat), streaming")
    model_args(g, True)
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", metavar="TEXT", help="the prompt; - reads it from stdin")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file (- for stdin)")
    g.add_argument("--chat", action="store_true", help="wrap the prompt as one user turn of the Instruct format")
    g.add_argument("--system", metavar="TEXT", help="a system prompt (with --chat)")
    run_args(g, 64)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="interactive multi-turn chat (Instruct format), streaming")
    model_args(c, True)
    c.add_argument("--system", metavar="TEXT", help="a system prompt")
    run_args(c, 256)
    c.set_defaults(func=cmd_chat)

    d = sub.add_parser("demo", help="the embedded demo: a tiny random-weight Mixtral, real tokenizer and code path")
    model_args(d, False)
    source = d.add_mutually_exclusive_group()
    source.add_argument("--prompt", default=None, metavar="TEXT", help="default: a fixed prompt; - reads stdin")
    source.add_argument("--prompt-file", metavar="PATH", help="read the prompt from a file (- for stdin)")
    run_args(d, 32, seed_help="seed of the random weights (default 0) and of sampling")
    d.set_defaults(func=cmd_demo)

    b = sub.add_parser("bench", help="run bench/bench_kernels.py and bench/bench_e2e.py (needs a CUDA GPU); with "
                                     "--model (or under torchrun), time prefill and decode of that checkpoint")
    b.add_argument("--quick", action="store_true", help="fewer sizes")
    model_args(b, False)
    b.add_argument("--prompt-tokens", type=_positive_int, default=128, metavar="N", help="with --model (default 128)")
    b.add_argument("--new-tokens", type=_positive_int, default=32, metavar="N", help="with --model (default 32)")
    b.add_argument("--device", choices=["cuda", "cpu"], default=None,
                   help="with --model; default: cuda when a GPU is available, else cpu")
    b.add_argument("--dtype", choices=sorted(_DTYPES), default=None, help="with --model; default: bf16 on cuda, "
                                                                          "fp32 on cpu")
    b.set_defaults(func=cmd_bench)

    dr = sub.add_parser("doctor", help="the environment, then every op's kernel (GPU, else the CPU emulator) "
                                       "against the reference; exit status 1 on a failure")
    dr.add_argument("--emu", action="store_true", help="use the emulator even when a GPU is present")
    dr.add_argument("--only", action="append", default=None, metavar="OP", help="check only this op; repeatable")
    dr.add_argument("--emu-arch", type=int, choices=[80, 90], action="append", default=None, metavar="ARCH",
                    help="with the emulator: the prefill paths of this architecture only (default: 80 and 90)")
    dr.set_defaults(func=cmd_doctor)
    return p


def _launched():
    """(rank, world size) that torchrun gave this process; (0, 1) otherwise."""
    try:
        return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 0, 1


_ERR = [None]  # where error lines go: stderr, kept when the other output of a rank other than 0 is silenced


def _error_line(text):
    rank, world = _launched()
    where = f" (rank {rank} of {world})" if world > 1 else ""
    print(f"{PROG}: error{where}: {text}", file=_ERR[0] or sys.stderr)


def cmd_doctor(args):
    from . import doctor

    return doctor.main(backend="emu" if args.emu else None, only=args.only,
                       emu_archs=tuple(args.emu_arch or (80, 90)))


def main(argv=None):
    """The command line; under torchrun, ranks other than 0 print nothing but their error, if any."""
    rank, world = _launched()
    if world <= 1:
        return _run(argv)
    _ERR[0] = sys.stderr
    saved = sys.stdout, sys.stderr
    try:
        if rank != 0:
            sys.stdout = sys.stderr = open(os.devnull, "w")
        return _run(argv)
    finally:
        if rank != 0:
            sys.stdout.close()
            sys.stdout, sys.stderr = saved
        _ERR[0] = None
        parallel = sys.modules.get("mixtral_ext.parallel")
        if parallel is not None:
            parallel.shutdown()


def _run(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a bad command line (2, already reported)
        return exc.code
    if args.command is None:  # a bare `mixtral-ext`: what it can do
        parser.print_help()
        return 0
    for stream in (sys.stdout, sys.stderr):
        # Generated text can hold any character; a terminal that cannot show one gets a replacement, not an error.
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="replace")
    _WARNED.clear()  # warnings are once per run
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # stdout closed early (| head): not worth a message
        try:  # keep the interpreter's final flush of stdout from failing again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass
        return 1
    except Exception as exc:
        _close_progress_bars()
        if os.environ.get("MIXTRAL_EXT_DEBUG"):
            raise
        # Expected failures (a missing or invalid checkpoint, no GPU, a too-long prompt, a model too large) are
        # OSError / ValueError / RuntimeError with a message meant for the user; anything else is our bug.
        expected = isinstance(exc, (OSError, ValueError, RuntimeError, ImportError))
        msg = str(exc) if expected and str(exc) else f"internal error: {type(exc).__name__}: {exc} " \
                                                      f"(MIXTRAL_EXT_DEBUG=1 shows the traceback)"
        _error_line(' '.join(msg.split()))
        return 1


# ---- shared --------------------------------------------------------------------------------------------------------
def _close_progress_bars():
    """Close every open tqdm bar (ours, or a library's) before an error is printed: a bar redrawn afterwards would
    push the error off the last line."""
    tqdm = sys.modules.get("tqdm.std")
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a half-built bar: nothing left to redraw
            pass


def _read_prompt(args):
    """--prompt TEXT, --prompt - (stdin) or --prompt-file PATH (- for stdin); None when neither was given."""
    path = getattr(args, "prompt_file", None)
    if path is None and args.prompt != "-":
        return args.prompt
    if path in (None, "-"):
        if _launched()[0] != 0:
            return None  # under torchrun rank 0 reads stdin and hands the prompt over (cmd_generate)
        text = sys.stdin.read()
    else:
        try:
            with open(path, encoding="utf-8-sig") as f:  # -sig: a byte-order mark is not part of the prompt
                text = f.read()
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--prompt-file {path}: cannot read it ({getattr(exc, 'strerror', None) or exc})") \
                from None
    # The file's (or echo's) final line break is not part of the prompt.
    text = text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text
    if not text:
        raise ValueError(f"the prompt read from {'stdin' if path in (None, '-') else path} is empty")
    return text


_WARNED = set()


def _warn_control_text(tok, text, chat):
    """Say once that text spelling control tokens ("<s>[INST] ... [/INST]", pasted from a model card) is encoded
    as those characters, never as the tokens: the chat format comes from --chat / chat."""
    found = tok.control_strings(text)
    if not found or "control" in _WARNED:
        return
    _WARNED.add("control")
    shown = ", ".join(repr(f) for f in found[:4])
    where = ("the message is encoded as text; the chat format itself is added by " + PROG + ", so leave it out"
             if chat else "the prompt is encoded as plain text, not as control tokens; for an Instruct model pass "
             "the bare question with --chat (or use `" + PROG + " chat`), which adds the chat format")
    print(f"{PROG}: warning: {shown} in {where}", file=sys.stderr)


def _device_dtype(args):
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda: no CUDA GPU is available here (torch.cuda.is_available() is False); "
                           "use --device cpu")
    name = args.dtype or ("bf16" if device == "cuda" else "fp32")
    return device, getattr(torch, _DTYPES[name])


def _load(model_dir, tokenizer_path, device, dtype, progress=None, expert_parallel=False, quantize=None):
    """The tokenizer first (cheap, fails fast), then the model (with a progress bar when stderr is a terminal)."""
    from .model import Mixtral
    from .tokenizer import Tokenizer

    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {model_dir}: no such directory")
    try:
        tok = Tokenizer.from_pretrained(tokenizer_path or model_dir)
    except FileNotFoundError as exc:
        hint = "" if tokenizer_path else " (pass --tokenizer PATH)"
        raise FileNotFoundError(f"{exc}{hint}") from None
    if progress is None:
        progress = sys.stderr.isatty()
    model = Mixtral.from_pretrained(model_dir, device=device, dtype=dtype, progress=progress,
                                    expert_parallel=expert_parallel, quantize=quantize)
    vocab = model.config.vocab_size
    if tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} pieces but the model's vocabulary is {vocab}: they do "
                         f"not belong together")
    return model, tok


def _generation_kwargs(args, seed_has_other_uses=False):
    kw = {"max_new_tokens": args.max_new_tokens, "do_sample": args.temperature > 0}
    if args.repetition_penalty != 1.0:
        kw["repetition_penalty"] = args.repetition_penalty
    if any(not s for s in args.stop):
        raise ValueError("--stop needs a non-empty string")
    seed_for_sampling = args.seed is not None and not seed_has_other_uses
    if not kw["do_sample"] and (args.top_p != 1.0 or args.top_k or seed_for_sampling):
        raise ValueError("--top-p, --top-k and --seed shape sampling, which needs --temperature > 0 (the default, "
                         "0, decodes greedily)")
    if kw["do_sample"]:
        kw.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)  # top_k 0 = off
        if args.seed is not None:
            kw["seed"] = args.seed
    return kw


def stream_generation(model, tok, prompt_ids, gen_kwargs, out, context=(), stops=(), prefix_cache=None):
    """Generate from prompt_ids, writing the text to `out` as it comes; generation ends early where the text
    reaches one of `stops` (which is not written: text that could be the start of a stop string is held back until
    it is not). The caller has checked the context (_check_context, before anything is written). Returns (new ids,
    timing dict, the text written)."""
    import torch

    dec = tok.stream_decoder(context)
    new, t_first, held, written = [], None, "", []
    t0 = time.perf_counter()
    kw = dict(gen_kwargs, prefix_cache=prefix_cache) if prefix_cache is not None else gen_kwargs
    steps = model.generate(torch.tensor([prompt_ids], device=model.device), stream=True, **kw)
    stopped = False
    for (token,) in steps:  # each step: a list of one int per sequence (here one)
        if t_first is None:
            t_first = time.perf_counter()
        new.append(token)
        held += dec.put(token)
        held, stopped = _write_until_stop(held, stops, out, written)
        if stopped:
            steps.close()
            break
    if not stopped:
        _write_until_stop(held + dec.flush(), stops, out, written, final=True)
    prefill = prefix_cache.last_prefill if prefix_cache is not None else len(prompt_ids)
    return new, {"prompt": len(prompt_ids), "prefill": prefill, "new": len(new),
                 "t_first": (t_first or time.perf_counter()) - t0, "total": time.perf_counter() - t0}, "".join(written)


def _write_until_stop(text, stops, out, written, final=False):
    """Write `text` up to the first stop string in it; hold back (return) a tail that may begin one. Returns (held
    text, whether a stop string was reached)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    end, stopped = (min(hits), True) if hits else (len(text), False)
    if not stopped and not final:
        for s in stops:  # the longest tail of text that is a proper prefix of a stop string waits
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    end = min(end, len(text) - k)
                    break
    if end:
        out.write(text[:end])
        out.flush()
        written.append(text[:end])
    return ("" if stopped else text[end:]), stopped


def _stop_ids(model, tok, model_dir=None):
    """The model's EOS ids, plus generation_config.json's (which transformers' generate uses) and the tokenizer's
    when they name others (a fine-tune whose config.json kept </s> while its turns end with <|im_end|>)."""
    import json

    ids = list(model.config.eos_token_ids)
    extra = [tok.eos_id]
    path = os.path.join(model_dir, "generation_config.json") if model_dir else None
    if path and os.path.isfile(path):
        try:
            with open(path) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            eos = None  # not ours to validate: config.json's EOS still applies
        extra += eos if isinstance(eos, list) else [eos]
    for i in extra:
        if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < model.config.vocab_size and i not in ids:
            ids.append(i)
    return ids


def _read_line(model):
    """The next line of stdin ("" at its end). Under torchrun rank 0 reads and every rank gets its line, so all of
    them run the same turn."""
    from . import parallel

    shard = model.shard
    return parallel.broadcast_object(sys.stdin.readline() if shard.rank == 0 else None, shard)


def _check_context(model, n_prompt, max_new_tokens, what="the prompt"):
    limit = model.config.max_position_embeddings
    if n_prompt + max_new_tokens > limit:
        raise ValueError(f"{what} ({n_prompt} tokens) plus --max-new-tokens {max_new_tokens} exceeds the model's "
                         f"context of {limit} tokens")


def _report(stats, err):
    n, total, first = stats["new"], stats["total"], stats["t_first"]
    prompt = f"prompt {stats['prompt']} tokens"
    if stats.get("prefill", stats["prompt"]) != stats["prompt"]:
        prompt += f", {stats['prefill']} prefilled, the rest cached"
    line = f"{n} tokens in {total:.2f} s: {n / total if total > 0 else 0:.1f} tok/s ({prompt}"
    if n > 1 and total > first:
        line += f"; first token after {first:.2f} s, then {(n - 1) / (total - first):.1f} tok/s"
    print(line + ")", file=err)


def _backend(device):
    from . import HAS_CUDA_KERNELS

    if device == "cuda":
        return "CUDA kernels" if HAS_CUDA_KERNELS else "PyTorch reference ops (CUDA extension not built)"
    return "PyTorch CPU path (mixtral_ext/cpu.py)"


# ---- commands ------------------------------------------------------------------------------------------------------
def cmd_generate(args):
    gen_kwargs = _generation_kwargs(args)
    device, dtype = _device_dtype(args)
    if args.system and not args.chat:
        raise ValueError("--system needs --chat")
    prompt = _read_prompt(args)
    model, tok = _load(args.model, args.tokenizer, device, dtype, expert_parallel=args.expert_parallel,
                       quantize=args.quantize)
    if model.shard.world > 1:
        from . import parallel
        prompt = parallel.broadcast_object(prompt, model.shard)
    gen_kwargs["eos_token_id"] = _stop_ids(model, tok, args.model)
    _warn_control_text(tok, prompt, args.chat)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": prompt}]
        ids, context = tok.encode_chat(messages), ()
    else:
        ids = tok.encode(prompt)
        context = ids  # the continuation's first space is kept, as in decode(prompt + continuation)
    _check_context(model, len(ids), args.max_new_tokens)
    if not args.chat:
        sys.stdout.write(prompt)
    _, stats, _ = stream_generation(model, tok, ids, gen_kwargs, sys.stdout, context, args.stop)
    sys.stdout.write("\n")
    _report(stats, sys.stderr)
    return 0


def cmd_chat(args):
    gen_kwargs = _generation_kwargs(args)
    device, dtype = _device_dtype(args)
    model, tok = _load(args.model, args.tokenizer, device, dtype, expert_parallel=args.expert_parallel,
                       quantize=args.quantize)
    from .generate import PrefixCache

    gen_kwargs["eos_token_id"] = _stop_ids(model, tok, args.model)
    cache = PrefixCache()  # the conversation's KV cache: each turn prefills only what the last one did not hold
    interactive = sys.stdin.isatty()
    base = [{"role": "system", "content": args.system}] if args.system else []
    history = list(base)
    if interactive:
        print(f"{PROG} chat: {args.model} on {device} ({_backend(device)}). One line per turn; /reset starts over, "
              f"/exit or Ctrl-D ends.", file=sys.stderr)
    while True:
        if interactive:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = _read_line(model)
        if not line:
            break
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = list(base)
            cache.reset()
            print(f"{PROG}: conversation reset" + (" (the system prompt stays)" if base else ""), file=sys.stderr)
            continue
        _warn_control_text(tok, text, chat=True)
        messages = history + [{"role": "user", "content": text}]
        ids = tok.encode_chat(messages)
        try:
            _check_context(model, len(ids), args.max_new_tokens, "the conversation")
        except ValueError as exc:
            print(f"{PROG}: {exc}; /reset to start over", file=sys.stderr)
            continue
        new, stats, answer = stream_generation(model, tok, ids, gen_kwargs, sys.stdout, stops=args.stop,
                                               prefix_cache=cache)
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report(stats, sys.stderr)
        # The v1 format has no empty answers; an answer that was only EOS leaves the user turn to merge with the next.
        history = messages + ([{"role": "assistant", "content": answer}] if answer else [])
    if interactive:
        sys.stderr.write("\n")
    return 0


def cmd_demo(args):
    from .demo import PROMPT, build_tiny_checkpoint, demo_config

    gen_kwargs = _generation_kwargs(args, seed_has_other_uses=True)  # --seed also seeds the random weights
    device, dtype = _device_dtype(args)
    prompt = _read_prompt(args)
    prompt = prompt if prompt is not None else PROMPT
    with tempfile.TemporaryDirectory(prefix="mixtral_ext_demo_") as tmp:
        if args.model:
            model_dir, random_weights = args.model, False
        else:
            model_dir, random_weights = tmp, True
            # Stored in the dtype it will run in: half the bytes to write and read on a GPU.
            cfg = build_tiny_checkpoint(tmp, demo_config(device, args.quantize),
                                        seed=0 if args.seed is None else args.seed, dtype=dtype)
            print(f"{PROG} demo: no --model given, so this is a tiny Mixtral with RANDOM weights "
                  f"({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts, "
                  f"top-{cfg.num_experts_per_tok}, vocab {cfg.vocab_size}), written to a temporary checkpoint.")
        t0 = time.perf_counter()
        model, tok = _load(model_dir, args.tokenizer, device, dtype, progress=False if random_weights else None,
                           expert_parallel=args.expert_parallel, quantize=args.quantize)
        what = "with the real Mixtral tokenizer and loader" if random_weights else f"from {model_dir}"
        experts = f", {args.quantize} experts" if args.quantize else ""
        print(f"Loaded in {time.perf_counter() - t0:.2f} s on {device} ({str(dtype).replace('torch.', '')}"
              f"{experts}, {_backend(device)}) {what}.")
        if random_weights:
            print("The weights are random, so the generated text is meaningless: this shows the code path, "
                  "not the model. Pass --model DIR for a real checkpoint.")
        print(f"prompt: {prompt!r}")
        print("-" * 60)
        ids = tok.encode(prompt)
        _check_context(model, len(ids), args.max_new_tokens)
        sys.stdout.write(prompt)
        _, stats, _ = stream_generation(model, tok, ids, gen_kwargs, sys.stdout, context=ids, stops=args.stop)
        sys.stdout.write("\n" + "-" * 60 + "\n")
        sys.stdout.flush()
        _report(stats, sys.stderr)
    return 0


def _find_bench_dir():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the source tree (editable install)
    for root in (here, os.getcwd()):
        d = os.path.join(root, "bench")
        if os.path.isfile(os.path.join(d, "bench_kernels.py")):
            return d
    return None


def cmd_bench(args):
    import torch

    if args.model or _launched()[1] > 1:
        return _bench_model(args)
    if not torch.cuda.is_available():
        raise RuntimeError("bench: no CUDA GPU here; the benchmarks time CUDA kernels and need one")
    bench = _find_bench_dir()
    scripts = [os.path.join(bench, name) for name in ("bench_kernels.py", "bench_e2e.py")] if bench else []
    missing = [s for s in scripts if not os.path.isfile(s)]
    if not bench or missing:
        what = ", ".join(os.path.basename(s) for s in missing) if bench else "bench/bench_kernels.py"
        raise FileNotFoundError(f"bench: {what} not found (the benchmarks live in the source checkout: run from "
                                f"the repository or an editable install)")
    status = 0
    for script in scripts:
        print(f"== {os.path.relpath(script)}", flush=True)
        extra = ["--quick"] if args.quick else []
        if args.quantize and script.endswith("bench_e2e.py"):  # bench_kernels.py times every format itself
            extra += ["--quantize", args.quantize]
        rc = subprocess.call([sys.executable, script] + extra)
        if rc:
            print(f"{PROG}: {os.path.basename(script)} exited with status {rc}", file=sys.stderr)
            status = status or rc
    return status


def _bench_model(args):
    """Prefill and decode tokens/s of the checkpoint in --model (one process, or every rank under torchrun), batch 1,
    greedy, a random prompt of --prompt-tokens; one warm-up run first. Rank 0 prints."""
    import torch

    from .model import Mixtral

    if not args.model:
        raise ValueError("bench under torchrun times a checkpoint: pass --model DIR (the kernel benchmarks run on one "
                         "GPU, without torchrun)")
    device, dtype = _device_dtype(args)
    model = Mixtral.from_pretrained(args.model, device=device, dtype=dtype, progress=sys.stderr.isatty(),
                                    expert_parallel=args.expert_parallel, quantize=args.quantize)
    cfg, shard = model.config, model.shard
    _check_context(model, args.prompt_tokens, args.new_tokens)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(0))

    def timed(n):
        model.generate(ids, max_new_tokens=n, eos_token_id=[])
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=n, eos_token_id=[])
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        return time.perf_counter() - t0

    prefill = timed(1)  # the prefill and one sampled token
    total = timed(args.new_tokens)
    decode = (total - prefill) / max(args.new_tokens - 1, 1)
    mode = (f"{shard.world} ranks, {'expert' if shard.expert_parallel else 'tensor'} parallel" if shard.world > 1
            else "1 process")
    print(f"{args.model} on {model.device} ({str(model.dtype).replace('torch.', '')}, {_backend(device)}, {mode}): "
          f"prefill {args.prompt_tokens} tokens in {prefill * 1e3:.1f} ms ({args.prompt_tokens / prefill:.1f} tok/s); "
          f"decode {decode * 1e3:.2f} ms/token ({1 / decode if decode > 0 else 0:.1f} tok/s, batch 1)")
    return 0
