"""The examples of README.md and docs/**/*.md run as tests.

Every fenced code block whose info string starts with a Python word (``python``, ``py``,
``pycon``) or a shell word (``bash``, ``sh``, ``shell``, ``console``) is one test case,
named ``FILE:LINE``.  Blocks in other languages, and unlabelled blocks (sample output),
are not collected.

Marking a block as not run
    Put an HTML comment on the line right before the opening fence (it does not show on
    GitHub)::

        <!-- not-run: builds a virtual environment and trains for 10 minutes -->
        ```bash
        make demo
        ```

    The reason is required and becomes the test's skip reason.  A marker that is not
    directly followed by a python/bash fence is an error, so a marker cannot silently
    mark nothing.  ``<!-- continues -->`` before a python block runs it after the
    python blocks before it in the same file (back to the first one without the
    marker), in one namespace, for examples split by prose.

How blocks run
    The working directory is a new temporary directory.  Placeholders are replaced
    first (``PLACEHOLDERS``): ``path/to/model`` and ``MODEL_DIR`` become a tiny saved
    AdapterHub BERT (adapter "a", a 2-label head, a tokenizer), ``ADAPTER_DIR`` an
    adapter folder (adapter "task"), ``weights.safetensors`` a file with A (6, 20) and B
    (10, 6), ``train.csv`` a small labelled CSV (columns text, label).  A placeholder
    not in the table makes its command fail: add it here, or mark the block.

    Python: the block is executed in a fresh namespace.  ``PYTHON_SIZES`` shrinks a few
    tensor sizes of today's examples (the same calls on smaller inputs).  In a block
    written with ``>>>`` prompts only the prompted code runs; the output lines in the
    block are illustrative (they depend on the machine) and are not compared.

    Shell: ``\\``-continued lines are joined, ``#`` comments dropped; in a block that
    uses ``$ `` prompts only the prompted lines are commands.  ``tropfast ...``
    (also ``python -m tropfast.cli``, ``.venv/bin/tropfast``) runs in-process through
    ``tropfast.cli.main``, and ``python -m benchmarks.quality`` through the benchmark's
    ``main``; each must return 0; the options of ``SMALL`` are appended when
    the command does not set them (small data sizes: the same code path in seconds).
    ``cd DIR`` changes the directory for the next commands; ``NAME=value`` prefixes set
    environment variables.  Any other command, and any line with shell operators
    (pipes, ``&&``, redirections), runs under ``bash`` and must exit 0; a relative path
    into the repository (``benchmarks/report.py``) is served from a copy of that
    top-level folder, so nothing writes into the checkout.

    The built-in example (``tropfast prune`` with no model) trains its MiniLM adapter
    once per test session, at the small sizes, in a temporary ``$TROPFAST_CACHE``.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest
from pruning_fixtures import tiny_model, torch
from tiny_model_dir import save_tiny

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON_LANGS = {"python", "py", "python3", "pycon"}
SHELL_LANGS = {"bash", "sh", "shell", "console", "shell-session", "zsh"}

# Appended to a command unless it sets the option itself: the same code path at small sizes.
SMALL: dict[tuple[str, ...], list[str]] = {
    ("prune",): ["--train-size", "32", "--test-size", "16", "--max-len", "16", "--epochs", "1", "--batch-size", "16",
                 "--no-progress"],
    ("bench", "quality"): ["--smoke", "--train-size", "32", "--test-size", "16", "--quiet", "--no-plots",
                           "--out", "quality-out"],
}
# Smaller tensors for today's solver example (same calls).
PYTHON_SIZES = {
    "torch.randn(24, 64, 768)": "torch.randn(24, 16, 96)",
    "torch.randn(24, 768, 64)": "torch.randn(24, 96, 16)",
}
_MARKER = re.compile(r"^\s*<!--\s*(not-run|continues)\b\s*:?\s*(.*?)\s*-->\s*$")
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([^`\s]*)(.*)$")


@dataclasses.dataclass
class Block:
    file: str  # relative to the repository
    line: int  # of the opening fence, 1-based
    lang: str  # "python" or "bash"
    code: str
    not_run: str | None = None  # the reason
    continues: bool = False

    @property
    def id(self) -> str:
        return f"{self.file}:{self.line}"


def doc_files() -> list[str]:
    docs = sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))
    files = [os.path.join(ROOT, "README.md")] + docs
    return [f for f in files if os.path.isfile(f)]


def parse(path: str) -> tuple[list[Block], list[str]]:
    """(python/bash blocks, problems with markers) of one markdown file."""
    rel = os.path.relpath(path, ROOT)
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    blocks, problems = [], []
    pending: tuple[int, str, str] | None = None  # (line, kind, reason) of a marker awaiting its fence
    i = 0
    while i < len(lines):
        m = _MARKER.match(lines[i])
        if m:
            if pending:
                problems.append(f"{rel}:{pending[0]}: marker not followed by a python/bash fence")
            pending = (i + 1, m.group(1), m.group(2))
            i += 1
            continue
        f = _FENCE.match(lines[i])
        if not f:
            if lines[i].strip() and pending:
                problems.append(f"{rel}:{pending[0]}: marker not followed by a python/bash fence")
                pending = None
            i += 1
            continue
        indent, fence, lang = len(f.group(1)), f.group(2), f.group(3).lower()
        j = i + 1
        body = []
        while j < len(lines) and not lines[j].strip().startswith(fence):
            body.append(lines[j][indent:] if lines[j][:indent].strip() == "" else lines[j].lstrip())
            j += 1
        kind = "python" if lang in PYTHON_LANGS else "bash" if lang in SHELL_LANGS else None
        if kind:
            b = Block(rel, i + 1, kind, "\n".join(body) + "\n")
            if pending and pending[1] == "not-run":
                if not pending[2]:
                    problems.append(f"{rel}:{pending[0]}: not-run marker without a reason")
                b.not_run = pending[2] or "(no reason given)"
            elif pending and pending[1] == "continues":
                if kind != "python":
                    problems.append(f"{rel}:{pending[0]}: 'continues' applies to python blocks only")
                b.continues = True
            blocks.append(b)
        elif pending:
            problems.append(f"{rel}:{pending[0]}: marker before a {lang or 'plain'} block, which is never run")
        pending = None
        i = j + 1
    if pending:
        problems.append(f"{rel}:{pending[0]}: marker at the end of the file")
    return blocks, problems


def all_blocks() -> list[Block]:
    return [b for f in doc_files() for b in parse(f)[0]]


BLOCKS = all_blocks()


# ---------------------------------------------------------------------------------------
# the conventions themselves
# ---------------------------------------------------------------------------------------
def test_markers_are_well_formed():
    problems = [p for f in doc_files() for p in parse(f)[1]]
    assert not problems, "\n".join(problems)


def test_readme_has_examples_that_run():
    readme = [b for b in BLOCKS if b.file == "README.md"]
    assert readme, "README.md has no python/bash block"
    assert any(b.not_run is None for b in readme), "every README block is marked not-run"


def test_parser_on_a_sample(tmp_path):
    md = tmp_path / "x.md"
    md.write_text(
        "text\n\n<!-- not-run: too slow -->\n```bash\nmake demo\n```\n\n```\noutput\n```\n"
        "```python\nx = 1\n```\n<!-- continues -->\n```py\nprint(x)\n```\n"
        "  ~~~sh\n  tropfast backends\n  ~~~\n<!-- not-run -->\n```text\nno\n```\n"
    )
    blocks, problems = parse(str(md))
    assert [(b.line, b.lang, b.code, b.not_run, b.continues) for b in blocks] == [
        (4, "bash", "make demo\n", "too slow", False),
        (11, "python", "x = 1\n", None, False),
        (15, "python", "print(x)\n", None, True),
        (18, "bash", "tropfast backends\n", None, False),
    ]
    assert problems == [f"{os.path.relpath(str(md), ROOT)}:21: marker before a text block, which is never run"]


def test_shell_commands_split():
    code = "$ tropfast prune \\\n    --keep 0.5  # half\nsome output\n$ cd out\n"
    assert shell_commands(code) == ["tropfast prune --keep 0.5", "cd out"]
    assert shell_commands("make demo   # all\n\n# note\nmake test\n") == ["make demo", "make test"]


def test_small_sizes_are_appended_once():
    assert _small(["prune", "--train-size", "100"])[:3] == ["prune", "--train-size", "100"]
    assert _small(["prune", "--train-size", "100"]).count("--train-size") == 1
    assert _small(["prune"]).count("--test-size") == 1
    assert _small(["backends"]) == ["backends"]
    assert _small(["prune", "--help"]) == ["prune", "--help"]
    q = _small(["bench", "quality", "--out", "mine"])
    assert "--smoke" in q and q.count("--out") == 1 and q[q.index("--out") + 1] == "mine"


# ---------------------------------------------------------------------------------------
# running the blocks
# ---------------------------------------------------------------------------------------
@dataclasses.dataclass
class Fixtures:
    model: str
    adapter: str
    weights: str
    csv: str
    cache: str


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("readme")
    model = save_tiny(str(d / "model"))
    tiny_model(seed=1, name="task").save_adapter(str(d / "adapter"), "task")
    g = torch.Generator().manual_seed(0)
    save_file({"A": torch.randn(6, 20, generator=g), "B": torch.randn(10, 6, generator=g)}, str(d / "w.safetensors"))
    rows = ["text,label"] + [f"{'a good movie' if i % 2 else 'a bad film'},{i % 2}" for i in range(32)]
    (d / "train.csv").write_text("\n".join(rows) + "\n")
    return Fixtures(model, str(d / "adapter"), str(d / "w.safetensors"), str(d / "train.csv"), str(d / "cache"))


def placeholders(fx: Fixtures) -> dict[str, str]:
    return {
        "path/to/model": fx.model,
        "MODEL_DIR": fx.model,
        "ADAPTER_DIR": fx.adapter,
        "weights.safetensors": fx.weights,
        "train.csv": fx.csv,
    }


def substitute(code: str, table: dict[str, str]) -> str:
    for key, value in table.items():
        code = re.sub(r"(?<![\w.])" + re.escape(key) + r"(?![\w])", lambda _m, v=value: v, code)
    return code


def python_source(code: str) -> str:
    """The code of a block; for a ``>>>`` session, only the prompted lines."""
    lines = code.splitlines()
    if not any(ln.lstrip().startswith(">>>") for ln in lines):
        return code
    out = []
    for ln in lines:
        s = ln.lstrip()
        if s.startswith((">>> ", "... ")) or s in (">>>", "..."):
            out.append(s[4:])
    return "\n".join(out) + "\n"


def shell_words(line: str) -> tuple[list[str], bool]:
    """(words without the comment, whether the line uses shell operators: pipes, &&, ;, redirections, $( ))."""
    lex = shlex.shlex(line, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    words = list(lex)
    return words, "`" in line or any(w and set(w) <= set("();<>|&") for w in words)


def shell_commands(code: str) -> list[str]:
    """The block's commands: continuations joined, comments dropped; lines with operators as written."""
    lines = code.replace("\\\n", " ").splitlines()
    prompted = any(ln.lstrip().startswith("$ ") for ln in lines)
    out = []
    for ln in lines:
        s = ln.strip()
        if prompted:
            if not s.startswith("$ "):
                continue
            s = s[2:]
        words, ops = shell_words(s)
        if words:
            out.append(s if ops else shlex.join(words))
    return out


def _small(argv: list[str]) -> list[str]:
    if "--help" in argv or "-h" in argv:
        return argv
    for prefix, extra in SMALL.items():
        if tuple(argv[: len(prefix)]) == prefix:
            argv = list(argv)
            k = 0
            while k < len(extra):
                opt = extra[k]
                has_value = k + 1 < len(extra) and not extra[k + 1].startswith("--")
                if not any(a == opt or a.startswith(opt + "=") for a in argv):
                    argv += extra[k : k + 1 + has_value]
                k += 1 + has_value
    return argv


def _tropfast_argv(words: list[str]) -> list[str] | None:
    prog = os.path.basename(words[0])
    if prog == "tropfast":
        return words[1:]
    if re.fullmatch(r"python[0-9.]*", prog) and len(words) >= 3 and words[1] == "-m":
        if words[2] in ("tropfast", "tropfast.cli"):
            return words[3:]
        if words[2] in ("benchmarks.quality", "benchmarks.quality.run"):
            return ["bench", "quality"] + words[3:]
    return None


def _serve_repo_paths(words: list[str], cwd: str) -> None:
    """Copy the top-level repository folders (or files) that relative paths point into."""
    for w in words:
        for part in w.split("="):
            if not part or os.path.isabs(part) or part.startswith("-"):
                continue
            top = part.split("/")[0]
            src, dst = os.path.join(ROOT, top), os.path.join(cwd, top)
            if top in ("", ".", "..", ".git", ".venv") or os.path.exists(dst) or not os.path.exists(src):
                continue
            if os.path.isdir(src):
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.so", ".pytest_cache"))
            else:
                shutil.copy2(src, dst)


def _run_in_process(argv: list[str], capsys) -> tuple[int, str]:
    """``tropfast ...`` through tropfast.cli.main; the quality benchmark (argv ``bench quality
    ...``, the checkout's ``python -m benchmarks.quality``) through its own main."""
    from tropfast.cli import main

    if argv[:2] == ["bench", "quality"]:
        from benchmarks.quality.run import main as quality_main

        argv = argv[2:]
        main = quality_main
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int) and e.code is not None:
            print(e.code, file=sys.stderr)
    cap = capsys.readouterr()
    return int(rc or 0), cap.out + cap.err


def run_shell(code: str, cwd: str, capsys, monkeypatch) -> None:
    env = dict(os.environ)
    bindir = os.path.dirname(sys.executable)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    for cmd in shell_commands(code):
        words, ops = shell_words(cmd)
        if ops:
            _serve_repo_paths(words, cwd)
            p = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"
            continue
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):
            k, v = words.pop(0).split("=", 1)
            monkeypatch.setenv(k, v)
            env[k] = v
        if not words:
            continue
        if words[0] == "cd":
            if len(words) > 1:
                _serve_repo_paths(words[1:2], cwd)
                cwd = os.path.join(cwd, words[1])
            continue
        words = [sys.executable if w in (".venv/bin/python", "python", "python3") else w for w in words]
        words = ["tropfast" if words[0] == ".venv/bin/tropfast" else words[0]] + words[1:]
        _serve_repo_paths(words[1:], cwd)
        argv = _tropfast_argv(words)
        if argv is not None:
            monkeypatch.chdir(cwd)
            argv = _small(argv)
            rc, text = _run_in_process(argv, capsys)
            assert rc == 0, f"`{cmd}` (run as tropfast {' '.join(argv)}) returned {rc}:\n{text[-3000:]}"
            assert text.strip(), f"`{cmd}` printed nothing"
        else:
            p = subprocess.run(words, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
            assert p.returncode == 0, f"`{cmd}` exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}"


def _chain(block: Block) -> list[Block]:
    same = [b for b in BLOCKS if b.file == block.file and b.lang == "python" and b.line <= block.line]
    chain = [same[-1]]
    for b in reversed(same[:-1]):
        if not chain[0].continues:
            break
        chain.insert(0, b)
    return chain


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_block(block: Block, fx, tmp_path, monkeypatch, capsys):
    if block.not_run is not None:
        pytest.skip(f"not run: {block.not_run}")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TROPFAST_CACHE", fx.cache)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    table = placeholders(fx)
    if block.lang == "bash":
        run_shell(substitute(block.code, table), str(tmp_path), capsys, monkeypatch)
        return
    ns: dict = {"__name__": "__readme__"}
    for b in _chain(block):
        src = substitute(substitute(python_source(b.code), table), PYTHON_SIZES)
        exec(compile(src, f"{b.file}:{b.line}", "exec"), ns)
