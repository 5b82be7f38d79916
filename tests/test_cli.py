"""The `mixtral-ext` command: demo, generate and chat on a tiny random checkpoint (their streamed text must equal
what model.generate + Tokenizer.decode give in-process), and the error cases (exit status, one line on stderr, no
traceback). A few runs go through a real subprocess; the rest call cli.main in-process (same code, no 2 s torch
import each)."""
import io
import os
import shutil
import subprocess
import sys

import pytest
import torch

from mixtral_ext import cli
from mixtral_ext.demo import PROMPT, build_tiny_checkpoint, tiny_config
from mixtral_ext.model import Mixtral
from mixtral_ext.tokenizer import Tokenizer

ENV = {**os.environ, "MIXTRAL_EXT_DEBUG": "", "PYTHONIOENCODING": "utf-8"}


def run(*args, stdin=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "mixtral_ext", *args], input=stdin, capture_output=True,
                          text=True, encoding="utf-8", timeout=timeout, env=ENV)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    build_tiny_checkpoint(path, seed=0)
    return str(path)


@pytest.fixture(scope="module")
def loaded(ckpt):
    model = Mixtral.from_pretrained(ckpt, device="cpu", dtype=torch.float32, progress=False)
    return model, Tokenizer.from_pretrained(ckpt)


def expected_continuation(model, tok, ids, n, **kw):
    """The text model.generate produces after `ids`, as it reads after the prompt (leading space kept)."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, **kw)[0].tolist()
    assert out[:len(ids)] == ids
    return tok.decode(out)[len(tok.decode(ids)):]


def expected_answer(model, tok, messages, n, **kw):
    ids = tok.encode_chat(messages)
    return tok.decode(model.generate(torch.tensor([ids]), max_new_tokens=n, **kw)[0, len(ids):].tolist())


def assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mixtral-ext"), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def call(capsys, *argv):
    rc = cli.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ---- subprocess runs -----------------------------------------------------------------------------------------------
def test_demo_subprocess(ckpt, loaded):
    r = run("demo", "--device", "cpu", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert "RANDOM weights" in r.stdout and "meaningless" in r.stdout
    assert "tok/s" in r.stderr
    # The demo's checkpoint (seed 0) is the fixture's: same greedy text.
    model, tok = loaded
    body = r.stdout.split("-" * 60 + "\n")[1]
    assert body == PROMPT + expected_continuation(model, tok, tok.encode(PROMPT), 12) + "\n"


def test_generate_subprocess(ckpt, loaded):
    prompt = "Hello my name is"
    r = run("generate", "--model", ckpt, "--prompt", prompt, "--max-new-tokens", "10", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model, tok = loaded
    assert r.stdout == prompt + expected_continuation(model, tok, tok.encode(prompt), 10) + "\n"
    assert "10 tokens" in r.stderr and "tok/s" in r.stderr


def test_chat_subprocess_piped(ckpt, loaded):
    """Non-interactive: one turn per stdin line, blank lines skipped, /reset clears the history, EOF ends."""
    model, tok = loaded
    r = run("chat", "--model", ckpt, "--max-new-tokens", "6", "--device", "cpu",
            stdin="What is MoE?\n\nAnd top-2?\n/reset\nHi\n")
    assert r.returncode == 0, r.stderr
    a1 = expected_answer(model, tok, [{"role": "user", "content": "What is MoE?"}], 6)
    a2 = expected_answer(model, tok, [{"role": "user", "content": "What is MoE?"},
                                      {"role": "assistant", "content": a1},
                                      {"role": "user", "content": "And top-2?"}], 6)
    a3 = expected_answer(model, tok, [{"role": "user", "content": "Hi"}], 6)
    assert r.stdout == f"{a1}\n{a2}\n{a3}\n"
    lines = r.stderr.splitlines()
    assert [line.count("tok/s") > 0 for line in lines] == [True, True, False, True]
    assert lines[2] == "mixtral-ext: conversation reset"
    assert "prefilled, the rest cached" in lines[1]  # turn 2 prefilled only the new turn


def test_error_subprocess_no_traceback(tmp_path):
    r = run("generate", "--model", str(tmp_path / "missing"), "--prompt", "x", "--device", "cpu")
    assert_one_line_error(r.returncode, r.stderr, "no such directory")
    assert r.stdout == ""


def test_console_script():
    exe = os.path.join(os.path.dirname(sys.executable), "mixtral-ext")
    if not os.path.exists(exe):
        pytest.skip("the mixtral-ext console script is not installed in this environment")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=60, env=ENV)
    assert r.returncode == 0 and all(c in r.stdout for c in ("generate", "chat", "demo", "bench"))


# ---- in-process runs -----------------------------------------------------------------------------------------------
def test_generate_chat_sampling_is_seeded(ckpt, loaded, capsys):
    model, tok = loaded
    argv = ["generate", "--model", ckpt, "--prompt", "Name three planets.", "--chat", "--system", "Be brief.",
            "--max-new-tokens", "8", "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--seed", "7",
            "--device", "cpu"]
    rc, out, err = call(capsys, *argv)
    assert rc == 0, err
    assert call(capsys, *argv)[1] == out
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three planets."}]
    want = expected_answer(model, tok, messages, 8, do_sample=True, temperature=0.8, top_p=0.9, top_k=40, seed=7)
    assert out == want + "\n"


def test_chat_history_and_commands(ckpt, loaded, capsys, monkeypatch):
    model, tok = loaded
    monkeypatch.setattr(sys, "stdin", io.StringIO("one\ntwo\n/exit\nnever read\n"))
    rc, out, err = call(capsys, "chat", "--model", ckpt, "--system", "S", "--max-new-tokens", "4", "--device", "cpu")
    assert rc == 0, err
    m = [{"role": "system", "content": "S"}, {"role": "user", "content": "one"}]
    a1 = expected_answer(model, tok, m, 4)
    a2 = expected_answer(model, tok, m + [{"role": "assistant", "content": a1}, {"role": "user", "content": "two"}],
                         4)
    assert out == f"{a1}\n{a2}\n"


def test_demo_with_model_dir(ckpt, capsys):
    rc, out, err = call(capsys, "demo", "--model", ckpt, "--prompt", "Hi", "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0, err
    assert "RANDOM" not in out and "\nHi" in out and "tok/s" in err


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--model", "M", "--max-new-tokens", "4"], "--prompt --prompt-file is required"),
    (["generate", "--model", "M", "--prompt", "x", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "M", "--prompt", "x", "--top-p", "1.5"], "--top-p"),
    (["generate", "--model", "M", "--prompt", "x", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "M", "--prompt", "x", "--dtype", "int8"], "--dtype"),
    (["chat"], "--model"),
    (["frobnicate"], "invalid choice"),
    (["generate", "--model", "M", "--prompt", "x", "--prompt-file", "f"], "not allowed with argument"),
    (["generate", "--model", "M", "--prompt", "x", "--repetition-penalty", "0"], "--repetition-penalty"),
])
def test_bad_arguments(capsys, argv, needle):
    rc, out, err = call(capsys, *argv)
    assert rc == 2
    assert_one_line_error(rc, err, needle)


def test_runtime_errors(ckpt, tmp_path, capsys):
    """Each: exit status 1 and one line that says what is wrong."""
    cases = []
    # A checkpoint without a tokenizer.
    no_tok = tmp_path / "no_tok"
    shutil.copytree(ckpt, no_tok)
    os.remove(no_tok / "tokenizer.model")
    cases.append((["generate", "--model", str(no_tok), "--prompt", "x"], "--tokenizer"))
    # A checkpoint that fails validation: truncated weights, a tensor of the wrong shape, a wrong model_type.
    bad = tmp_path / "truncated"
    shutil.copytree(ckpt, bad)
    with open(bad / "model.safetensors", "r+b") as f:
        f.truncate(4096)
    cases.append((["generate", "--model", str(bad), "--prompt", "x"], "model.safetensors"))
    shape = tmp_path / "shape"
    build_tiny_checkpoint(shape, cfg=tiny_config(intermediate_size=96))
    shutil.copy(os.path.join(ckpt, "config.json"), shape / "config.json")
    cases.append((["generate", "--model", str(shape), "--prompt", "x"], "shape"))
    wrong = tmp_path / "wrong_type"
    shutil.copytree(ckpt, wrong)
    (wrong / "config.json").write_text((wrong / "config.json").read_text().replace('"mixtral"', '"llama"'))
    cases.append((["generate", "--model", str(wrong), "--prompt", "x"], "mixtral"))
    cases.append((["generate", "--model", ckpt, "--tokenizer", str(tmp_path / "nope.model"), "--prompt", "x"],
                  "nope.model"))
    cases.append((["generate", "--model", ckpt, "--prompt", "x", "--max-new-tokens", "5000"], "context"))
    cases.append((["generate", "--model", ckpt, "--prompt", "x", "--chat", "--max-new-tokens", "5000"], "context"))
    cases.append((["generate", "--model", ckpt, "--prompt", "x", "--system", "S"], "--chat"))
    cases.append((["generate", "--model", ckpt, "--prompt", "x", "--seed", "3"], "--temperature"))
    cases.append((["demo", "--model", str(tmp_path / "missing")], "no such directory"))
    if not torch.cuda.is_available():
        cases.append((["generate", "--model", ckpt, "--prompt", "x", "--device", "cuda"], "no CUDA GPU"))
        cases.append((["bench"], "no CUDA GPU"))
    for argv, needle in cases:
        if "--device" not in argv and argv[0] != "bench":
            argv = argv + ["--device", "cpu"]
        rc, out, err = call(capsys, *argv)
        assert rc == 1, (argv, err)
        assert_one_line_error(rc, err, needle)
        assert out == "", (argv, out)


def test_unexpected_exception_is_one_line(ckpt, capsys, monkeypatch):
    def boom(*a, **k):
        raise TypeError("something broke")

    monkeypatch.setattr(cli, "_load", boom)
    rc, out, err = call(capsys, "generate", "--model", ckpt, "--prompt", "x", "--device", "cpu")
    assert_one_line_error(rc, err, "internal error", "TypeError", "MIXTRAL_EXT_DEBUG")
    monkeypatch.setenv("MIXTRAL_EXT_DEBUG", "1")
    with pytest.raises(TypeError):
        cli.main(["generate", "--model", ckpt, "--prompt", "x", "--device", "cpu"])


def test_bench_runs_both_scripts_or_says_what_is_missing(tmp_path, capfd, monkeypatch):
    """Without a GPU here, pretend there is one and point bench at stand-in scripts (capfd: they are
    subprocesses writing to the inherited file descriptors)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cli, "_find_bench_dir", lambda: None)
    rc, out, err = call(capfd, "bench")
    assert_one_line_error(rc, err, "bench_kernels.py not found")
    monkeypatch.setattr(cli, "_find_bench_dir", lambda: str(tmp_path))
    (tmp_path / "bench_kernels.py").write_text("import sys; print('kernels', sys.argv[1:])")
    rc, out, err = call(capfd, "bench")
    assert_one_line_error(rc, err, "bench_e2e.py not found")
    (tmp_path / "bench_e2e.py").write_text("import sys; print('e2e', sys.argv[1:]); sys.exit(3)")
    rc, out, err = call(capfd, "bench", "--quick")
    assert rc == 3 and "bench_e2e.py exited with status 3" in err
    assert "kernels ['--quick']" in out and "e2e ['--quick']" in out


def test_bench_script_location():
    """The real bench/bench_kernels.py of this checkout is what bench finds."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert cli._find_bench_dir() == os.path.join(here, "bench")


def test_every_kernel_benchmark_has_its_module():
    """bench_kernels.py imports bench/kbench/<name>.py for each name of BENCHES and calls its run(): each must
    exist and define run, and no module may be left out of the list (read as source: they need a GPU to import)."""
    import ast

    bench = cli._find_bench_dir()
    with open(os.path.join(bench, "bench_kernels.py")) as f:
        body = ast.parse(f.read()).body
    benches = ast.literal_eval(next(
        node.value for node in body
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "BENCHES"))
    modules = {f[:-3] for f in os.listdir(os.path.join(bench, "kbench")) if f.endswith(".py") and f != "__init__.py"}
    assert set(benches) == modules, (benches, modules)
    for name in benches:
        with open(os.path.join(bench, "kbench", f"{name}.py")) as f:
            body = ast.parse(f.read()).body
        assert any(isinstance(n, ast.FunctionDef) and n.name == "run" for n in body), name


@pytest.mark.cuda
def test_demo_on_gpu(kernels, tmp_path):
    """The embedded demo on a GPU: the kernel-shaped tiny config (head_dim 128), bf16, CUDA kernels, and the text
    it streams equals model.generate's on the same checkpoint and device."""
    r = run("demo", "--device", "cuda", "--max-new-tokens", "16", timeout=300)
    assert r.returncode == 0, r.stderr
    assert "RANDOM weights" in r.stdout and "CUDA kernels" in r.stdout and "tok/s" in r.stderr
    from mixtral_ext.demo import demo_config
    build_tiny_checkpoint(tmp_path, demo_config("cuda"), seed=0, dtype=torch.bfloat16)
    model = Mixtral.from_pretrained(str(tmp_path), device="cuda", dtype=torch.bfloat16, progress=False)
    tok = Tokenizer.from_pretrained(str(tmp_path))
    body = r.stdout.split("-" * 60 + "\n")[1]
    assert body == PROMPT + expected_continuation(model, tok, tok.encode(PROMPT), 16) + "\n"


# ---- what users of other tools reach for ---------------------------------------------------------------------------
def test_bare_command_prints_help_and_version(capsys):
    rc, out, err = call(capsys)
    assert rc == 0 and out.startswith("usage: mixtral-ext") and all(c in out for c in ("generate", "chat", "demo"))
    import mixtral_ext
    rc, out, err = call(capsys, "--version")
    assert rc == 0 and out == f"mixtral-ext {mixtral_ext.__version__}\n"


def test_prompt_from_stdin_and_file(ckpt, loaded, capsys, monkeypatch, tmp_path):
    model, tok = loaded
    prompt = "Hello my name is\nand the second line"
    want = prompt + expected_continuation(model, tok, tok.encode(prompt), 5) + "\n"
    base = ["generate", "--model", ckpt, "--max-new-tokens", "5", "--device", "cpu"]
    monkeypatch.setattr(sys, "stdin", io.StringIO(prompt + "\n"))
    assert call(capsys, *base, "--prompt", "-")[1] == want
    (tmp_path / "p.txt").write_text(prompt + "\n", encoding="utf-8")
    assert call(capsys, *base, "--prompt-file", str(tmp_path / "p.txt"))[1] == want
    (tmp_path / "w.txt").write_bytes(b"\xef\xbb\xbf" + prompt.encode() + b"\r\n")  # Notepad: a BOM and CRLF
    assert call(capsys, *base, "--prompt-file", str(tmp_path / "w.txt"))[1] == want
    rc, out, err = call(capsys, *base, "--prompt-file", str(tmp_path / "missing.txt"))
    assert_one_line_error(rc, err, "--prompt-file", "missing.txt")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    rc, out, err = call(capsys, *base, "--prompt", "-")
    assert_one_line_error(rc, err, "prompt read from stdin is empty")


def test_repetition_penalty(ckpt, loaded, capsys):
    model, tok = loaded
    ids = tok.encode("the the the the")
    want = expected_continuation(model, tok, ids, 12, repetition_penalty=1.8)
    assert want != expected_continuation(model, tok, ids, 12)
    rc, out, err = call(capsys, "generate", "--model", ckpt, "--prompt", "the the the the", "--max-new-tokens", "12",
                        "--repetition-penalty", "1.8", "--device", "cpu")
    assert rc == 0 and out == "the the the the" + want + "\n", err


def test_stop_strings_end_generation_and_are_not_printed(ckpt, loaded, capsys):
    model, tok = loaded
    prompt = "Hello my name is"
    full = expected_continuation(model, tok, tok.encode(prompt), 16)
    words = full.split()
    stop = words[len(words) // 2][:3]  # part of a word: the stop string spans the middle of a token, maybe two
    cut = full.index(stop)
    base = ["generate", "--model", ckpt, "--prompt", prompt, "--max-new-tokens", "16", "--device", "cpu"]
    rc, out, err = call(capsys, *base, "--stop", "never appears", "--stop", stop)
    assert rc == 0 and out == prompt + full[:cut] + "\n", (out, full, stop)
    n_stopped = int(err.split(" tokens")[0])
    assert n_stopped < 16  # generation itself ended there
    rc, out, err = call(capsys, *base, "--stop", "never appears")
    assert out == prompt + full + "\n"


def test_control_tokens_typed_as_text_are_literal_with_one_warning(ckpt, loaded, capsys, monkeypatch):
    model, tok = loaded
    prompt = "<s>[INST] What is 2+2? [/INST]"
    rc, out, err = call(capsys, "generate", "--model", ckpt, "--prompt", prompt, "--max-new-tokens", "4",
                        "--device", "cpu")
    assert rc == 0
    ids = tok.encode(prompt)
    assert ids[:2] == [1, tok.sp.piece_to_id("\u2581<")]  # one BOS, then the characters "<s>"
    assert out == prompt + expected_continuation(model, tok, ids, 4) + "\n"
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "'<s>', '[/INST]', '[INST]'" in warnings[0] and "--chat" in warnings[0], err
    monkeypatch.setattr(sys, "stdin", io.StringIO("[INST] one [/INST]\n[INST] two\n"))
    rc, out, err = call(capsys, "chat", "--model", ckpt, "--max-new-tokens", "3", "--device", "cpu")
    assert rc == 0 and sum("warning" in line for line in err.splitlines()) == 1, err  # once, not once per turn


def test_error_during_a_progress_bar_is_the_last_line(ckpt, capfd, monkeypatch):
    """A shard that fails while the loading bar is drawn: the bar is closed first, the error is the last line."""
    import mixtral_ext.weights as weights
    real_open, calls = weights._open, []

    class Failing:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            self.inner = self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def get_tensor(self, name):
            calls.append(name)
            if len(calls) == 10:
                raise OSError(5, "Input/output error")
            return self.inner.get_tensor(name)

    monkeypatch.setattr(weights, "_open", lambda *a: Failing(real_open(*a)))
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True, raising=False)
    rc = cli.main(["generate", "--model", ckpt, "--prompt", "x", "--device", "cpu"])
    err = capfd.readouterr().err
    assert rc == 1 and "loading" in err, err
    last = err.rstrip("\n").split("\n")[-1]
    assert last.startswith("mixtral-ext: error: ") and "model.safetensors: tensor" in last and \
        "Input/output error" in last, repr(err)
    assert err.rfind("loading") < err.rfind("mixtral-ext: error")
