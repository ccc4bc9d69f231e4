"""Every code block of README.md, BENCHMARKS.md and docs/*.md runs here, so the documentation cannot drift from the code.

Each fenced block is one test, named by file and line (``README.md:22``), checked by its language:

- ``python``: runs in a fresh interpreter in a scratch folder laid out like a clone (``workflows/``,
  ``docs/``, ``bench/`` ...); must exit 0. A block of ``>>>`` lines (``pycon``) runs as a doctest.
- ``bash``, ``sh``, ``shell``: every command (a line, ``\\`` continuations joined, ``&&`` chains
  taken step by step) runs with bash in the scratch folder, where ``loraloom``, ``python`` and
  ``python3`` mean this checkout's code and the interpreter running the tests, after the block's
  earlier ``cd``, ``export`` and ``X=1`` commands; each must exit 0.
- ``console``: ``$ `` lines are commands, the lines below one its expected output: stdout, stderr or
  both must match it, ``...`` matching any text (doctest's ELLIPSIS).
- ``json``: parsed; a workflow (API or UI format) must pass validation.
- no language: must carry a marker saying what it is (``synopsis`` or ``tree``); any other language
  (``text``...) needs a ``skip`` marker.

A marker is an HTML comment on the last non-blank line above a fence, invisible on the rendered page:
``<!-- doc-test: KIND, KIND ARG, ... -->``. The kinds:

- ``installs``: the block creates a venv or installs with pip or apt. Those steps do not run: a venv is the
  interpreter running the tests; ``pip install`` arguments must parse as requirements, a pinned
  ``name==V`` must satisfy the project's own range, ``-e .[extras]`` must name this project's extras
  with every requirement they bring installed here (one missing skips the block, naming it: CI
  installs with these very commands), and into a fresh venv torch must be pinned before the project.
- ``ci``: the block's command lines are lines of ``.ci/run`` verbatim (needed for ``pytest``, which
  is this suite itself: CI runs it).
- ``server``: ``loraloom serve`` starts on a free port, must print the address its comment names,
  answer ``GET /system_stats`` and stop on Ctrl-C with exit 0.
- ``exit N``: the block's last command exits N (``invalid`` for a JSON workflow that must fail).
- ``creates PATH``: after the block, PATH exists in the scratch folder.
- ``synopsis``: ``loraloom SUB [OPTION ...]`` lines; their options must be exactly the options
  ``loraloom SUB --help`` shows in its usage line (``-h`` aside).
- ``tree``: ``path/   description`` lines; each path must exist in the repository.
- ``skip: REASON``: not run, shown as skipped with REASON, one of SKIP_REASONS; its ``loraloom`` and
  ``python SCRIPT.py`` commands must still name a real subcommand or script and real options.

A block that needs a marker and lacks it (``pip``, ``pytest``, ``loraloom serve``, ``git clone``,
no language) fails, and so does a marker no step of its block needs: markers stay true.

Inline code in prose is not run: it names features in fragments, often with placeholders
(``loraloom run workflow.json``). It is still checked: an inline ``loraloom SUB --flag`` or
``python SCRIPT.py --flag`` must name a real subcommand or script and its options, an inline
``--flag`` must be an option of one of them, an inline ``loraloom.name.attr``, ``SomethingError``
or ``LORALOOM_VARIABLE`` must exist in the package, and an inline call of ours (``Runtime(x=1)``,
``rt.run(..., on_event=fn)``) must name a real method and keywords. Tables that list code are held to
it (the node table lists every built-in node; a ``Runtime(...)`` column names real keywords and
defaults), and relative links and images must point at files that exist.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import contextlib
import functools
import importlib
import inspect
import io
import json
import os
import re
import select
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

import loraloom
from loraloom.cli import build_parser, main as cli_main

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
CI_SCRIPT = ROOT / ".ci" / "run"

KINDS = {"installs", "ci", "server", "exit", "creates", "invalid", "synopsis", "tree", "skip"}
SKIP_REASONS = {
    "needs ComfyUI": "runs inside a ComfyUI install",
    "needs network": "downloads (git clone, curl)",
    "needs a GPU": "the tests run on CPU",
    "needs a running server": "talks to a `loraloom serve` started elsewhere (the `server` kind checks serve itself)",
    "takes minutes": "training or a full benchmark: longer than the whole suite should take",
    "an excerpt": "text, or code elided with ..., that is not a whole command or program",
}
SHELL_LANGS = {"bash", "sh", "shell", "console"}
PYTHON_LANGS = {"python", "py", "python3", "pycon"}
# A scratch folder gets a copy of the repository's top level but these (and the packages: `loraloom`
# must be the checkout under test, not a copy).
SCRATCH_SKIP = {".git", ".venv", "output", "models", "tests", "__pycache__", ".pytest_cache", ".hypothesis"}
COMMAND_TIMEOUT_S = 300

# Any indent: a fence inside a nested list item is still a block to run.
FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<info>[^`]*)$")
MARKER = re.compile(r"^\s*<!--\s*doc-test:\s*(?P<body>.*?)\s*-->\s*$")
INLINE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


@dataclass
class Block:
    """One fenced code block: where it is, its language, its text and its marker's kinds."""

    path: Path
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    marks: dict[str, str] = field(default_factory=dict)

    @property
    def id(self) -> str:
        name = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path.name
        return f"{name}:{self.line}"


def parse_marker(body: str) -> dict[str, str]:
    """``"installs, exit 1, skip: needs network"`` -> ``{"installs": "", "exit": "1", "skip": "needs network"}``."""
    marks = {}
    for item in filter(None, (part.strip() for part in body.split(","))):
        kind, _, arg = item.partition(":") if item.startswith("skip") else item.partition(" ")
        marks[kind.strip()] = arg.strip()
    return marks


def parse_doc(path: Path) -> tuple[list[Block], list[str]]:
    """The fenced blocks of one Markdown file, and problems with its markers (unknown or dangling)."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, problems = [], []
    pending: tuple[int, dict[str, str]] | None = None
    i = 0
    while i < len(lines):
        marker, fence = MARKER.match(lines[i]), FENCE.match(lines[i])
        if marker:
            if pending:
                problems.append(f"{path.name}:{pending[0]}: doc-test marker with no fence below it")
            pending = (i + 1, parse_marker(marker["body"]))
        elif fence:
            indent, close, start = len(fence["indent"]), fence["fence"], i + 1
            body, i = [], i + 1
            while i < len(lines) and not re.match(rf"^ *{close[0]}{{{len(close)},}}\s*$", lines[i]):
                # Content is indented like its fence (in a list item): take that indent off.
                body.append(re.sub(rf"^ {{0,{indent}}}", "", lines[i]))
                i += 1
            info = fence["info"].split()
            marks = pending[1] if pending else {}
            blocks.append(Block(path, start, info[0].lower() if info else "", "\n".join(body) + "\n", marks))
            for kind in marks:
                if kind not in KINDS:
                    problems.append(f"{blocks[-1].id}: unknown doc-test kind {kind!r} (known: {sorted(KINDS)})")
            pending = None
        elif pending and lines[i].strip():
            problems.append(f"{path.name}:{pending[0]}: doc-test marker with no fence below it")
            pending = None
        i += 1
    if pending:
        problems.append(f"{path.name}:{pending[0]}: doc-test marker with no fence below it")
    return blocks, problems


def all_blocks() -> list[Block]:
    return [block for path in DOC_FILES for block in parse_doc(path)[0]]


BLOCKS = all_blocks()


# ---------------------------------------------------------------- the scratch folder and environment


def _import_root() -> str | None:
    """The folder to put on PYTHONPATH so that ``import loraloom`` loads this checkout, when it is
    loaded through such a folder (a ``loraloom`` link or a clone named so); an editable install
    needs none."""
    package = Path(loraloom.__file__).resolve().parent
    parent = Path(loraloom.__file__).parent.parent
    if (parent / "loraloom").resolve() == package:
        return str(parent)
    return None


@pytest.fixture
def scratch(tmp_path):
    """A folder laid out like a clone (everything but the packages, copied) with ``bin/`` of
    ``loraloom``, ``python``, ``python3`` meaning this checkout, and the environment to run in."""
    work = tmp_path / "clone"
    work.mkdir()
    for entry in ROOT.iterdir():
        if entry.name in SCRATCH_SKIP or entry.suffix == ".py" or (entry / "__init__.py").exists():
            continue
        if entry.is_dir():
            shutil.copytree(entry, work / entry.name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(entry, work / entry.name)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for name, args in {"loraloom": "-m loraloom.cli ", "python": "", "python3": ""}.items():
        (bindir / name).write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {args}"$@"\n')
        (bindir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LORALOOM_")}
    env.update(PATH=f"{bindir}{os.pathsep}{env.get('PATH', '')}", LORALOOM_USER_DIR=str(tmp_path / "user"),
               # One thread: on a shared CPU, OpenMP workers spinning against other processes make a
               # tiny model's sampling many times slower.
               OMP_NUM_THREADS="1", TERM="dumb", COLUMNS="100", PYTHONUNBUFFERED="1")
    root = _import_root()
    if root:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    return work, env


# ---------------------------------------------------------------- shell commands


def logical_lines(text: str) -> list[str]:
    """Command lines of a shell block: ``\\`` continuations joined, blank and comment lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def steps(line: str) -> list[tuple[str, list[str], str]]:
    """A command line's ``&&`` steps: (text, argv, comment)."""
    code, comment = line, ""
    # The comment is what follows an unquoted `#` that starts a word.
    for match in re.finditer(r"(?:^|\s)#", line):
        try:
            shlex.split(line[:match.start()])
        except ValueError:
            continue  # inside quotes
        code, comment = line[:match.start()], line[match.end():].strip()
        break
    return [(part.strip(), shlex.split(part), comment) for part in re.split(r"\s&&\s", code)]


# What a step that cannot run as written does -> the marker kind that says how it is checked instead.
SPECIAL_STEPS = {"venv": "installs", "activate": "installs", "pip": "installs", "system": "installs", "pytest": "ci",
                 "serve": "server", "download": "skip"}


def special_step(argv: list[str]) -> str | None:
    """Which of SPECIAL_STEPS a step is, or None for a step that runs as written."""
    if not argv:
        return None
    prog = argv[0] if argv[0] in {".", "source"} else Path(argv[0]).name
    module = argv[2] if len(argv) > 2 and prog.startswith("python") and argv[1] == "-m" else None
    if module == "venv":
        return "venv"
    if prog in {".", "source"} and argv[1:] and argv[1].endswith("bin/activate"):
        return "activate"
    if prog in {"pip", "pip3"} or module == "pip":
        return "pip"
    if prog in {"sudo", "apt-get", "apt", "brew"}:
        return "system"  # a system package: never run by a test
    if prog in {"pytest", "py.test"} or module == "pytest":
        return "pytest"
    if prog == "loraloom" and argv[1:2] == ["serve"]:
        return "serve"
    if prog in {"git", "curl", "wget"}:
        return "download"
    return None


def block_commands(block: Block) -> list[tuple[str, str | None]]:
    """A shell or console block's command lines, each with the output the block shows for it."""
    if block.lang == "console":
        return console_items(block.text)
    return [(line, None) for line in logical_lines(block.text)]


def needed_kinds(block: Block) -> set[str]:
    """The marker kinds a shell block's special steps call for."""
    return {SPECIAL_STEPS[special] for line, _ in block_commands(block)
            for _, argv, _ in steps(line) if (special := special_step(argv))}


def console_items(text: str) -> list[tuple[str, str]]:
    """``$ command`` lines of a console block, each with the output shown below it."""
    items: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            items.append((line[2:], []))
        elif items:
            items[-1][1].append(line)
    return [(command, "\n".join(out).strip()) for command, out in items]


def output_matches(expected: str, actual: str) -> bool:
    """Whether ``actual`` (escapes removed, trailing blanks ignored) is ``expected`` with ``...``
    matching any text, across lines too."""
    def norm(text: str) -> str:
        text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text)
        return "\n".join(line.rstrip() for line in text.strip().splitlines())

    pattern = ".*?".join(re.escape(part) for part in norm(expected).split("..."))
    return re.fullmatch(pattern, norm(actual), re.DOTALL) is not None


def run_shell(step: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", step], cwd=work, env=env, capture_output=True, text=True,
                          timeout=COMMAND_TIMEOUT_S)


def check_pip(argv: list[str], earlier: list[list[str]]) -> None:
    """A ``pip install`` step, not run: its requirements parse, what it pins satisfies the project, the
    project's extras it names exist and all they bring is installed, torch was pinned before it."""
    args = argv[argv.index("install") + 1:]
    assert args, f"{shlex.join(argv)}: installs nothing"
    editable = False
    for arg in args:
        if arg == "-e":
            editable = True
            continue
        if editable or arg.startswith("."):
            editable = False
            path, _, extras = arg.partition("[")
            assert (ROOT / path / "pyproject.toml").resolve() == ROOT / "pyproject.toml", f"{arg}: not this project"
            check_project_installed(tuple(e.strip() for e in extras.rstrip("]").split(",") if e.strip()))
            # Into a fresh venv, pip would pick torch itself, a multi-GB CUDA build on a CPU machine.
            fresh = any(special_step(step) == "venv" for step in earlier)
            pinned = [a for step in earlier for a in step if a.startswith("torch==")]
            assert pinned or not fresh, f"{shlex.join(argv)}: torch must be installed first (pip install torch==...)"
            continue
        assert not arg.startswith("-"), f"{arg}: an option the docs test does not know"
        req = Requirement(arg)
        # What is pinned ahead of the project must satisfy it, or pip replaces it. (That the pinned
        # version works is CI's part: it installs exactly the README's commands, see `ci`.)
        for spec in project_requirements():
            if spec.name == req.name:
                pins = [pin.version for pin in req.specifier if pin.operator == "=="]
                assert all(spec.specifier.contains(pin) for pin in pins), f"{arg}: the project requires {spec}"


def check_installed(req: Requirement) -> None:
    """``req`` (unless its marker leaves it out here) is installed in a version it accepts."""
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        # Not a wrong doc: this environment was installed before the requirement was added. CI
        # installs with the README's own command, so there it is present and checked.
        pytest.skip(f"{req} is not installed here: pip install it (or the block's command again) to check this block")
    assert req.specifier.contains(Version(installed).base_version, prereleases=True), (
        f"{req}: {installed} is installed")


def project_requirements(extras: tuple[str, ...] = ()) -> list[Requirement]:
    """This project's requirements (pyproject.toml), with those of the named extras, which must exist."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project.get("optional-dependencies", {})
    for extra in extras:
        assert extra in optional, f"extra {extra!r} is not one of {sorted(optional)} in pyproject.toml"
    return [Requirement(spec) for spec in project["dependencies"] + [s for extra in extras for s in optional[extra]]]


def check_project_installed(extras: tuple[str, ...]) -> None:
    """Everything ``pip install -e .[extras]`` brings is installed here in a version it accepts."""
    for req in project_requirements(extras):
        check_installed(req)


def check_serve(argv: list[str], comment: str, work: Path, env: dict) -> None:
    """``loraloom serve ...``: start it on a free port, read the address it prints, ask
    ``/system_stats``, stop it with Ctrl-C."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = list(argv[1:])
    if "--port" in args:
        del args[args.index("--port"):args.index("--port") + 2]
    proc = subprocess.Popen([sys.executable, "-m", "loraloom.cli", *args, "--port", str(port)], cwd=work, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the server printed nothing within 60 s"
        first = proc.stdout.readline()
        for url in re.findall(r"https?://\S+", comment):
            assert re.sub(r":\d+/", f":{port}/", url, count=1) in first, f"the docs say {url}; it printed {first!r}"
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5) as resp:
                    stats = json.load(resp)
                break
            except OSError:
                assert proc.poll() is None, f"the server exited {proc.returncode}: {first}{proc.stdout.read()}"
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.2)
        assert "system" in stats, stats
    finally:
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out


def ci_lines() -> list[str]:
    return [line.strip() for line in CI_SCRIPT.read_text().splitlines()]


def check_shell_block(block: Block, work: Path, env: dict) -> None:
    marks = block.marks
    items = block_commands(block)
    assert items, f"{block.id}: no command in a {block.lang} block"
    want_exit = int(marks.get("exit") or 0)
    state: list[str] = []  # `cd`, `export`, `X=1`: each command runs in a new bash, after these
    for n, (line, expected) in enumerate(items):
        if "ci" in marks:
            assert line in ci_lines(), f"{block.id}: .ci/run does not run {line!r} as the docs show it"
        done: list[list[str]] = []
        chain = steps(line)
        for k, (text, argv, comment) in enumerate(chain):
            special = special_step(argv)
            if special == "pip":
                check_pip(argv, done)
            elif special == "serve":
                check_serve(argv, comment, work, env)
            elif special is None:
                proc = run_shell(" && ".join([*state, text]), work, env)
                code = want_exit if (n, k) == (len(items) - 1, len(chain) - 1) else 0
                assert proc.returncode == code, (
                    f"{block.id}: `{text}` exited {proc.returncode}, the docs say {code}\n"
                    f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}")
                if expected:
                    assert any(output_matches(expected, out) for out in
                               (proc.stdout, proc.stderr, proc.stdout + proc.stderr)), (
                        f"{block.id}: `{text}` printed\n{proc.stdout}{proc.stderr}\nthe docs show\n{expected}")
                if argv[0] in {"cd", "export", "unset", "alias"} or re.fullmatch(r"[A-Za-z_]\w*=\S*", text):
                    state.append(text)
            done.append(argv)


def check_python_block(block: Block, work: Path, env: dict) -> None:
    if block.text.lstrip().startswith(">>>"):
        script = work / "doc_block.txt"
        script.write_text(block.text)
        cmd = [sys.executable, "-m", "doctest", "-o", "ELLIPSIS", "-o", "NORMALIZE_WHITESPACE", str(script)]
    else:
        script = work / "doc_block.py"
        script.write_text(block.text)
        cmd = [sys.executable, str(script)]
    proc = subprocess.run(cmd, cwd=work, env=env, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    want = int(block.marks.get("exit") or 0)
    assert proc.returncode == want, f"{block.id} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}"


def check_json_block(block: Block) -> None:
    from loraloom import Runtime
    from loraloom.graph_runtime import ValidationError

    data = json.loads(block.text)
    is_api = isinstance(data, dict) and data and all(isinstance(v, dict) and "class_type" in v for v in data.values())
    is_ui = isinstance(data, dict) and isinstance(data.get("nodes"), list) and "links" in data
    if not (is_api or is_ui):
        assert "invalid" not in block.marks, f"{block.id}: marked invalid but is not a workflow"
        return
    if "invalid" in block.marks:
        with pytest.raises(ValidationError):
            Runtime(demo_loras=True).validate(data)
    else:
        Runtime(demo_loras=True).validate(data)


# ---------------------------------------------------------------- the command line's own options


def usage_flags(help_text: str) -> set[str]:
    """The options an argparse ``--help`` text shows in its usage paragraph (``-h`` aside)."""
    usage = help_text.split("\n\n")[0]
    return set(re.findall(r"\[(-{1,2}[A-Za-z][\w-]*)", usage)) - {"-h", "--help"}


@functools.cache
def usage_options(sub: str) -> frozenset[str]:
    """The options of ``loraloom SUB``, as its usage line shows them."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
        cli_main([sub, "--help"])
    return frozenset(usage_flags(out.getvalue()))


@functools.cache
def script_options(script: str) -> frozenset[str]:
    """The options a script of the repository (``bench/run.py``) declares with argparse, read from its
    source (running ``--help`` would import torch for some)."""
    source = (ROOT / script).read_text(encoding="utf-8")
    return frozenset(re.findall(r"""["'](-{1,2}[A-Za-z][\w-]*)["']""",
                                "".join(re.findall(r"add_argument\(([^)]*)", source))))


@functools.cache
def subcommands() -> frozenset[str]:
    (sub,) = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return frozenset(sub.choices)


def synopsis_lines(text: str) -> list[str]:
    """Usage lines: a line that starts with ``loraloom`` and the indented lines that continue it."""
    lines: list[str] = []
    for line in text.splitlines():
        if line[:1].isspace() and lines:
            lines[-1] += " " + line.strip()
        elif line.strip():
            lines.append(line.strip())
    return lines


def check_synopsis(block: Block) -> None:
    for line in synopsis_lines(block.text):
        words = line.split()
        assert words[0] == "loraloom" and len(words) > 1, f"{block.id}: {line!r} is not a loraloom usage line"
        shown = set(re.findall(r"(?<![\w-])(-{1,2}[A-Za-z][\w-]*)", line))
        real = usage_options(words[1])
        assert shown == real, (f"{block.id}: `loraloom {words[1]}` synopsis: missing {sorted(real - shown)}, "
                               f"not options {sorted(shown - real)}")


def check_tree(block: Block) -> None:
    for line in block.text.splitlines():
        if not line.strip() or line[:1].isspace():
            continue
        name = line.split()[0]
        path = ROOT / name
        assert path.is_dir() if name.endswith("/") else path.is_file(), f"{block.id}: {name} does not exist"


# ---------------------------------------------------------------- the tests


@pytest.mark.parametrize("block", BLOCKS, ids=[b.id for b in BLOCKS])
def test_doc_block_runs(block: Block, scratch):
    """Every fenced block does what the docs say, or its marker says why and how it is checked instead."""
    marks = block.marks
    needed = needed_kinds(block) if block.lang in SHELL_LANGS else set()
    if "skip" in marks:
        assert marks["skip"] in SKIP_REASONS, f"{block.id}: skip reason {marks['skip']!r} not one of {sorted(SKIP_REASONS)}"
        # Not run, but what it runs must still exist.
        problems = [f"{block.id}: `{line}`: {why}" for line, _ in
                    (block_commands(block) if block.lang in SHELL_LANGS else [])
                    for _, argv, _ in steps(line) for why in command_problems(argv)]
        assert not problems, "\n".join(problems)
        pytest.skip(f"{block.id}: {marks['skip']} (doc-test marker)")
    for kind in needed:
        example = "skip: needs network" if kind == "skip" else kind
        assert kind in marks, (f"{block.id}: a {block.lang} block that needs a `<!-- doc-test: {example} -->` "
                               f"marker above it (see tests/test_docs.py)")
    # These excuse steps from running as written, so they must be needed (`ci` is a check of its own).
    for kind in {"installs", "server"} & set(marks):
        assert kind in needed, f"{block.id}: marked {kind!r} but no step needs it"
    work, env = scratch
    if block.lang in SHELL_LANGS:
        check_shell_block(block, work, env)
    elif block.lang in PYTHON_LANGS:
        check_python_block(block, work, env)
    elif block.lang == "json":
        check_json_block(block)
    elif not block.lang:
        assert {"synopsis", "tree"} & set(marks), (
            f"{block.id}: a fence without a language needs `<!-- doc-test: synopsis -->` or `tree`, or a language")
        if "synopsis" in marks:
            check_synopsis(block)
        if "tree" in marks:
            check_tree(block)
    else:
        pytest.fail(f"{block.id}: no check for language {block.lang!r}: show a command with its output as `console`, "
                    f"or mark it `<!-- doc-test: skip: an excerpt -->` (see tests/test_docs.py)")
    for name in filter(None, [marks.get("creates")]):
        assert (work / name).exists(), f"{block.id}: the docs say it creates {name}; it did not"


def test_markers_are_well_formed():
    """No marker of an unknown kind, and none left without a fence below it."""
    problems = [problem for path in DOC_FILES for problem in parse_doc(path)[1]]
    assert not problems, "\n".join(problems)


def test_ci_runs_the_readme_quick_start():
    """.ci/run runs the quick start's two commands as the README shows them: the main job on the
    built-in default, then the tests."""
    readme = [b for b in BLOCKS if b.path.name == "README.md" and "ci" in b.marks]
    lines = [line for b in readme for line in logical_lines(b.text)]
    assert any(" pytest" in line or line.endswith("&& pytest") for line in lines), "the README shows no test command"
    assert any("loraloom run " in line for line in lines), "the README's quick start runs no workflow"
    for line in lines:
        assert line in ci_lines(), f".ci/run does not run the README's {line!r}"


def _inline_spans(path: Path) -> list[tuple[int, str]]:
    """Inline code spans outside fenced blocks, with their line numbers."""
    spans, fence = [], None
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        match = FENCE.match(line)
        if match and (fence is None or match["fence"].startswith(fence)):
            fence = None if fence else match["fence"]
            continue
        if fence is None:
            spans += [(n, span.strip()) for span in INLINE.findall(line)]
    return spans


def lookup(dotted: str):
    """What ``loraloom.a.b`` (a module, then attributes) names; AttributeError saying what is missing."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        with contextlib.suppress(ImportError):
            obj = importlib.import_module(".".join(parts[:i]))
            break
    for j, attr in enumerate(parts[i:], i):
        if not hasattr(obj, attr):
            raise AttributeError(f"{'.'.join(parts[:j])} has no {attr!r}")
        obj = getattr(obj, attr)
    return obj


def _missing_name(dotted: str) -> str | None:
    """Why ``loraloom.a.b`` does not resolve, or None."""
    try:
        lookup(dotted)
    except AttributeError as exc:
        return str(exc)
    return None


def _resolve(func: ast.expr):
    """The loraloom object a call in the docs calls, or None for one that is not ours (``fn(x)``):
    a loraloom name, ``loraloom.a.b``, or a method of a Runtime (``rt.run``, ``Runtime().run``)."""
    if isinstance(func, ast.Name):
        return getattr(loraloom, func.id, None)
    if isinstance(func, ast.Attribute):
        owner = func.value
        if isinstance(owner, ast.Name) and owner.id == "rt" or (
                isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name) and owner.func.id == "Runtime"):
            return getattr(loraloom.Runtime, func.attr, AttributeError(f"a Runtime has no {func.attr!r}"))
        dotted = ast.unparse(func)
        if dotted.startswith("loraloom."):
            try:
                return lookup(dotted)
            except AttributeError as exc:
                return exc
    return None


def accepted_keywords(obj) -> dict[str, inspect.Parameter] | None:
    """The keyword arguments ``obj(...)`` accepts (a class: through ``**kwargs`` passed up its MRO),
    or None when it takes any."""
    names: dict[str, inspect.Parameter] = {}
    for init in ([klass.__init__ for klass in obj.__mro__ if "__init__" in vars(klass)] if isinstance(obj, type)
                 else [obj]):
        params = inspect.signature(init).parameters.values()
        names.update({p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
                      and p.name != "self" and p.name not in names})
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return names
    return None


def call_problems(code: str) -> list[str]:
    """What in a Python fragment calls a loraloom name, method or keyword that does not exist."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "loraloom":
            problems += [f"loraloom has no {a.name!r}" for a in node.names if not hasattr(loraloom, a.name)]
        if not isinstance(node, ast.Call):
            continue
        target = _resolve(node.func)
        if isinstance(target, AttributeError):
            problems.append(str(target))
        elif target is not None and (accepted := accepted_keywords(target)) is not None:
            problems += [f"{ast.unparse(node.func)}() takes no keyword {k.arg!r}"
                         for k in node.keywords if k.arg and k.arg not in accepted]
    return problems


def command_problems(words: list[str]) -> list[str]:
    """What is wrong with a ``loraloom SUB[|SUB] --flag ...`` or ``python SCRIPT.py --flag ...`` command
    (its words, comment aside): a subcommand, script or option that does not exist."""
    if words[:3] == ["python", "-m", "loraloom.cli"]:
        words = ["loraloom", *words[3:]]
    flags = {word.split("=")[0] for word in words if word.startswith("-")}
    if words[:1] == ["loraloom"] and len(words) > 1:
        problems = []
        for sub in words[1].split("|"):
            if sub not in subcommands():
                problems.append(f"no subcommand {sub!r}")
            else:
                problems += [f"`loraloom {sub}` has no option {flag}" for flag in sorted(flags - usage_options(sub))]
        return problems
    if words[:1] in (["python"], ["python3"]) and len(words) > 1 and words[1].endswith(".py"):
        if not (ROOT / words[1]).is_file():
            return [f"no script {words[1]}"]
        return [f"`python {words[1]}` has no option {flag}" for flag in sorted(flags - script_options(words[1]))]
    return []


def inline_problems(path: Path) -> list[str]:
    """What is wrong with the inline commands, options and names of one Markdown file."""
    spans, problems = _inline_spans(path), []
    # The scripts a file names, run (`python bench/run.py`) or not (a heading's `bench/bench_fuse.py`).
    scripts = {word for _, span in spans for word in span.split()[:2]
               if word.endswith(".py") and (ROOT / word).is_file()}
    every_option = set().union(*map(usage_options, subcommands()), *map(script_options, scripts))
    for n, span in spans:
        words = span.split()
        where = f"{path.name}:{n}: `{span}`"
        problems += [f"{where}: {why}" for why in command_problems(words)]
        if span.startswith("--") and words[0] not in every_option:
            problems.append(f"{where}: no such option in any loraloom command or script shown")
        elif re.fullmatch(r"loraloom(\.\w+)+(\(.*\))?", span):
            problems += [f"{where}: {why}" for why in [_missing_name(span.split("(")[0])] if why]
        elif re.fullmatch(r"[A-Z]\w*(Error|Warning)", span) and not hasattr(builtins, span):
            problems += [] if hasattr(loraloom, span) else [f"{where}: loraloom has no {span!r}"]
        problems += [f"{where}: {why}" for why in call_problems(span)]
        # A variable may be the test suite's own (where a real ComfyUI is, for the tests that need one).
        problems += [f"{where}: {var} is read nowhere in the package or its tests"
                     for var in re.findall(r"LORALOOM_\w+", span) if var not in project_source()]
    return list(dict.fromkeys(problems))  # a span checked twice (a name, then a call) says it once


@functools.cache
def project_source() -> str:
    """The project's Python source, tests included: hidden folders (a venv in the clone), outputs and
    build output aside."""
    skip = SCRATCH_SKIP - {"tests"} | {"build", "dist"}
    texts = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in skip]
        texts += [(Path(folder) / name).read_text(encoding="utf-8") for name in files if name.endswith(".py")]
    return "\n".join(texts)


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_inline_commands_options_and_names_exist(path: Path):
    """Inline ``loraloom SUB --flag`` and ``python SCRIPT --flag`` name real commands and options, an
    inline ``--flag`` is an option of one of them, an inline ``loraloom.x.y`` imports."""
    problems = inline_problems(path)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_tables_match_the_code(path: Path):
    """Tables that list code: a table of nodes lists exactly the built-in nodes; in a column headed by
    a call (``Runtime(...)``, ``Runtime(limits=Limits(...))``) each ``name=`` cell is a keyword the
    call's ``...`` takes, and a ``default`` cell shows the default when the code's is a number."""
    from loraloom.nodes import BUILTIN

    problems = []
    for line, header, rows in parse_tables(path):
        where = f"{path.name}:{line}"
        if header[0] == "node":
            listed = {name for row in rows for name in INLINE.findall(row[0])}
            builtin = {cls.SCHEMA.id for cls in BUILTIN}
            problems += [f"{where}: the node table misses {sorted(builtin - listed)}"] * bool(builtin - listed)
            problems += [f"{where}: the node table lists {sorted(listed - builtin)}"] * bool(listed - builtin)
        for col, cell in enumerate(header):
            call = INLINE.fullmatch(cell)
            target = call and _ellipsis_target(call[1])
            if target is None:
                continue
            problems += [f"{where}: header `{call[1]}`: {why}" for why in call_problems(call[1])]
            params = accepted_keywords(target) or {}
            for row in rows:
                name = re.fullmatch(r"`(\w+)=[^`]*`", row[col])
                if not name:
                    continue
                if name[1] not in params:
                    problems.append(f"{where}: {row[col]}: {call[1]} takes no {name[1]!r}")
                elif "default" in header and isinstance(params[name[1]].default, int):
                    shown = re.match(r"[\d,]+", row[header.index("default")])
                    if not shown or int(shown[0].replace(",", "")) != params[name[1]].default:
                        problems.append(f"{where}: {name[1]} defaults to {params[name[1]].default}, the table "
                                        f"says {row[header.index('default')]!r}")
    assert not problems, "\n".join(problems)


def parse_tables(path: Path) -> list[tuple[int, list[str], list[list[str]]]]:
    """Markdown tables outside fences: (line of the header, header cells, rows of cells)."""
    tables, fence = [], None
    lines = path.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines):
        match = FENCE.match(line)
        if match and (fence is None or match["fence"].startswith(fence)):
            fence = None if fence else match["fence"]
        elif fence is None and line.startswith("|") and n + 1 < len(lines) and re.fullmatch(r"\|(\s*:?-+:?\s*\|)+",
                                                                                           lines[n + 1].strip()):
            rows = []
            for row in lines[n + 2:]:
                if not row.startswith("|"):
                    break
                rows.append(_cells(row))
            tables.append((n + 1, _cells(line), rows))
    return tables


def _cells(row: str) -> list[str]:
    return [cell.strip() for cell in row.strip().strip("|").split("|")]


def _ellipsis_target(code: str):
    """The loraloom callable a header such as ``Runtime(limits=Limits(...))`` describes: the call whose
    argument is ``...``; None if there is none."""
    with contextlib.suppress(SyntaxError):
        for node in ast.walk(ast.parse(code, mode="eval")):
            if isinstance(node, ast.Call) and any(isinstance(a, ast.Constant) and a.value is Ellipsis for a in node.args):
                target = _resolve(node.func)
                return None if isinstance(target, AttributeError) else target
    return None


@pytest.mark.parametrize("path", DOC_FILES, ids=[str(p.relative_to(ROOT)) for p in DOC_FILES])
def test_relative_links_and_images_exist(path: Path):
    """A link or image to a file of the repository (``[x](docs/nodes.md)``, ``![x](docs/a.png)``) points
    at one that exists."""
    problems = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:|#", target):
                continue  # a URL or an anchor
            if not (path.parent / target.split("#")[0]).exists():
                problems.append(f"{path.name}:{n}: {target} does not exist")
    assert not problems, "\n".join(problems)


def test_the_harness_reads_markdown_as_documented(tmp_path):
    """The parsing the doc tests stand on: fences at any indent, markers and their kinds, dangling
    and unknown markers, console transcripts, comments and ``&&`` steps, the steps that need a marker."""
    doc = tmp_path / "doc.md"
    doc.write_text("text\n<!-- doc-test: installs, exit 2, skip: needs network -->\n\n```bash\npip install x\n```\n"
                   "- item\n\n  ```console\n  $ loraloom nodes\n  LoadBase\n  ...\n  ```\n"
                   "<!-- doc-test: bogus -->\n```\nx\n```\n<!-- doc-test: tree -->\nprose\n")
    blocks, problems = parse_doc(doc)
    assert [(b.line, b.lang, b.marks) for b in blocks] == [
        (4, "bash", {"installs": "", "exit": "2", "skip": "needs network"}), (9, "console", {}), (15, "", {"bogus": ""})]
    assert console_items(blocks[1].text) == [("loraloom nodes", "LoadBase\n...")]
    assert problems == ["doc.md:15: unknown doc-test kind 'bogus' (known: %s)" % sorted(KINDS),
                        "doc.md:18: doc-test marker with no fence below it"]
    assert steps("a 'b # c' && d e  # f && g") == [("a 'b # c'", ["a", "b # c"], "f && g"), ("d e", ["d", "e"], "f && g")]
    assert [special_step(shlex.split(c)) for c in ("python3 -m venv .venv", ". .venv/bin/activate", "pip install -e .",
                                                   "pytest -q", "loraloom serve --port 1", "git clone u",
                                                   "sudo apt-get install -y chromium",
                                                   "loraloom run w.json", "python -m loraloom.cli nodes")] == [
        "venv", "activate", "pip", "pytest", "serve", "download", "system", None, None]
    assert needed_kinds(blocks[0]) == {"installs"}
    assert command_problems(["python", "bench/run.py", "--quik"]) == ["`python bench/run.py` has no option --quik"]
    assert command_problems(["loraloom", "run|runn", "--no-progress"]) == ["no subcommand 'runn'"]
    assert command_problems(["loraloom", "nodes", "--markdown"]) == []
    venv = [["python3", "-m", "venv", ".venv"]]
    check_pip(["pip", "install", "-e", ".[editor]"], [])
    with pytest.raises(AssertionError, match="torch must be installed first"):
        check_pip(["pip", "install", "-e", "."], venv)
    with pytest.raises(AssertionError, match="the project requires torch"):
        check_pip(["pip", "install", "torch==2.3.0"], venv)
    with pytest.raises(AssertionError, match="extra 'nope' is not one of"):
        check_pip(["pip", "install", "-e", ".[nope]"], [*venv, ["pip", "install", "torch==2.13.0"]])


def test_the_harness_runs_blocks_as_documented(scratch, tmp_path):
    """What runs a block fails when the block does not do what it shows: a doctest's output, a console
    transcript's output, an exit code."""
    work, env = scratch

    def block(lang: str, text: str, **marks) -> Block:
        return Block(tmp_path / "doc.md", 1, lang, text, {k: str(v) for k, v in marks.items()})

    check_python_block(block("pycon", ">>> print(1 + 1)\n2\n"), work, env)
    with pytest.raises(AssertionError, match="exited 1"):
        check_python_block(block("pycon", ">>> print(1 + 1)\n3\n"), work, env)
    check_python_block(block("python", "raise SystemExit(3)\n", exit=3), work, env)
    check_shell_block(block("console", "$ echo one; echo two >&2\none\n$ loraloom nodes\n...LoadBase...\n"), work, env)
    with pytest.raises(AssertionError, match="the docs show"):
        check_shell_block(block("console", "$ echo one\ntwo\n"), work, env)
    check_shell_block(block("sh", "true && exit 2\n", exit=2), work, env)
    check_shell_block(block("bash", "mkdir sub && cd sub\nexport X=1\nY=2\ntest \"$(basename \"$PWD\"):$X:$Y\" = sub:1:2\n"),
                      work, env)
    with pytest.raises(AssertionError, match="exited 2, the docs say 0"):
        check_shell_block(block("sh", "exit 2\ntrue\n", exit=2), work, env)


def test_doctest_helpers_match_as_documented():
    """The output comparison the console blocks rely on: ``...`` matches any text, escapes and
    trailing blanks do not count, anything else must be equal."""
    assert output_matches("wrote .../output/a_00001_.png", "wrote /tmp/x/output/a_00001_.png  \n")
    assert output_matches("Done: 6 executed...", "\x1b[2KDone: 6 executed, 0 cached\n  node 6: {}")
    assert not output_matches("Done: 6 executed", "Done: 5 executed")
    assert not output_matches("a", "a\nb")
