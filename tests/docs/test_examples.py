"""Every example in the docs is run, or says why not.

Fenced blocks in ``README.md``, ``BENCHMARKS.md``, ``deploy/README.md`` and ``docs/**/*.md`` are extracted
and checked by language: ``json`` parsed, ``python`` compiled with its imports resolved,
``javascript`` through ``node --check``; ``bash`` and ``python`` blocks that call the API
(``http://127.0.0.1:8000``, ``make run``'s address) are run against a live stack with its URL substituted,
and must not answer a problem unless marked ``expects-problem``. A block that cannot run here carries
``<!-- example: not-run (reason) -->`` on the line before it; any other unmarked block fails, and the
not-run ones are counted, so nothing is skipped silently. Untagged and ``text`` blocks are drawings or
output, not examples.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.stack import ROOT, Stack, api_stack

DOC_FILES = [
    ROOT / "README.md",
    ROOT / "BENCHMARKS.md",
    ROOT / "deploy" / "README.md",
    *sorted((ROOT / "docs").rglob("*.md")),
]
API_URL = "http://127.0.0.1:8000"
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w+-]*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*example:\s*(?P<spec>.+?)\s*-->\s*$")
NOT_EXAMPLES = {"", "text", "console"}
#: Blocks another test runs (the README's quick start, a slow test that clones the repo and runs it).
RUN_ELSEWHERE = {"run"}


@dataclass(frozen=True)
class Example:
    path: Path
    line: int
    lang: str
    code: str
    marker: str | None

    @property
    def where(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"

    @property
    def not_run(self) -> str | None:
        """The reason given, for a block marked not-run."""
        if self.marker and self.marker.startswith("not-run"):
            return self.marker.removeprefix("not-run").strip(" ()") or "no reason given"
        return None

    @property
    def name(self) -> str | None:
        return self.marker.split(",")[0].strip() if self.marker and not self.not_run else None

    @property
    def offline(self) -> bool:
        return bool(self.marker) and "offline" in [flag.strip() for flag in str(self.marker).split(",")[1:]]

    @property
    def calls_the_api(self) -> bool:
        return API_URL in self.code


def extract(path: Path) -> list[Example]:
    lines = path.read_text(encoding="utf-8").splitlines()
    found, index = [], 0
    while index < len(lines):
        match = FENCE.match(lines[index])
        if not match:
            index += 1
            continue
        start, indent = index, len(match["indent"])
        end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "```")
        code = textwrap.dedent("\n".join(line[indent:] for line in lines[start + 1 : end])) + "\n"
        before = next((lines[i] for i in range(start - 1, -1, -1) if lines[i].strip()), "")
        marker = MARKER.match(before)
        found.append(Example(path, start + 1, match["lang"], code, marker["spec"] if marker else None))
        index = end + 1
    return found


EXAMPLES = [example for path in DOC_FILES for example in extract(path)]
CHECKED = [example for example in EXAMPLES if example.lang not in NOT_EXAMPLES]
LIVE = [e for e in CHECKED if e.calls_the_api and not e.not_run and e.lang in ("bash", "python")]
#: Blocks that run without the API (``<!-- example: NAME, offline -->``), from the repository root.
OFFLINE = [e for e in CHECKED if e.offline and not e.calls_the_api]
STATIC = [e for e in CHECKED if e not in LIVE and e not in OFFLINE]


def test_every_example_runs_or_says_why_not() -> None:
    unmarked = [
        example.where
        for example in STATIC
        if example.lang in ("bash", "sh", "shell")
        and not example.not_run
        and example.name not in RUN_ELSEWHERE
    ]
    assert not unmarked, (
        "these shell blocks neither call the API (run against a test stack) nor carry "
        f"<!-- example: not-run (reason) -->: {unmarked}"
    )
    counts = Counter(
        "not-run" if e.not_run else "live" if e in LIVE else "offline" if e in OFFLINE else e.lang
        for e in CHECKED
    )
    print(f"docs examples: {dict(counts)}")  # the tally, with -s
    assert counts["live"] >= 5  # the quick start, generations, batches, models, OpenAI


def test_the_readme_quick_start_blocks_are_marked() -> None:
    readme = {e.name: e for e in extract(ROOT / "README.md") if e.name}
    assert readme["run"].code.strip() == "make run"
    request = " ".join(readme["cpu-request"].code.replace("\\\n", " ").split())
    assert request == (
        "curl -s -X POST http://127.0.0.1:8000/v1/generations -H 'Content-Type: application/json' "
        '-H \'Prefer: wait=60\' -d \'{"prompt": "a red fox in the snow", "width": 512, "height": 512, '
        '"num_inference_steps": 4, "seed": 42}\''
    )


def unresolved_imports(code: str) -> list[str]:
    missing = []
    for node in ast.walk(ast.parse(code)):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [node.module]
        for name in names:
            try:
                found = importlib.util.find_spec(name) is not None
            except ModuleNotFoundError:
                found = False
            if not found:
                missing.append(name)
    return missing


@pytest.mark.parametrize("example", STATIC, ids=lambda e: e.where)
def test_static_example(example: Example) -> None:
    if example.not_run and example.lang != "python":
        return  # counted in test_every_example_runs_or_says_why_not; its reason is in the docs
    if example.lang == "json":
        json.loads(example.code)
    elif example.lang == "python":
        compile(example.code, example.where, "exec")
        if not example.not_run:  # a not-run block may import what only its reader has
            missing = unresolved_imports(example.code)
            assert not missing, f"{example.where}: nothing installed provides {missing}"
    elif example.lang in ("javascript", "js"):
        node = shutil.which("node")
        if node is None:
            pytest.skip("node is not installed: JavaScript examples are syntax-checked with node --check")
        script = Path(os.environ.get("TMPDIR", "/tmp")) / f"darkroom-doc-example-{os.getpid()}.mjs"
        script.write_text(example.code, encoding="utf-8")
        try:
            result = subprocess.run([node, "--check", str(script)], capture_output=True, text=True)
        finally:
            script.unlink()
        assert result.returncode == 0, f"{example.where}: {result.stderr}"
    elif example.lang in ("bash", "sh", "shell"):
        assert example.not_run or example.name in RUN_ELSEWHERE  # counted above
    else:
        assert example.not_run, f"{example.where}: a ```{example.lang} block this test cannot check"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, shared_backend: Stack) -> Iterator[Stack]:
    yield from api_stack(shared_backend, tmp_path_factory.mktemp("stack-docs"))


def run(example: Example, base_url: str | None, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run a bash or python block, ``make run``'s URL replaced by ``base_url`` and ``.venv/bin/`` by this
    interpreter's folder."""
    bin_dir = Path(sys.executable).parent
    code = example.code.replace(".venv/bin/", f"{bin_dir}/")
    if base_url is not None:
        code = code.replace(API_URL, base_url)
    if example.lang == "bash":
        command = ["bash", "-euo", "pipefail", "-c", code]
    else:
        command = [sys.executable, "-c", code]
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}"}
    return subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=cwd, env=env)


@pytest.mark.parametrize("example", OFFLINE, ids=lambda e: e.where)
def test_offline_example(example: Example) -> None:
    result = run(example, None, ROOT)
    assert result.returncode == 0 and result.stdout.strip(), f"{example.where}:\n{result.stderr}"


@pytest.mark.parametrize("example", LIVE, ids=lambda e: e.where)
def test_live_example(example: Example, stack: Stack, tmp_path: Path) -> None:
    if example.lang == "bash" and "jq " in example.code and shutil.which("jq") is None:
        pytest.skip("jq is not installed: this example pipes the API's answers through jq")
    result = run(example, stack.api_url, tmp_path)
    assert result.returncode == 0, f"{example.where}:\n{result.stdout}\n{result.stderr}"
    problem = "urn:darkroom:problem:" in result.stdout or '"job_already_finished"' in result.stdout
    expects = "expects-problem" in (example.marker or "")
    assert problem == expects, f"{example.where}: {'no' if expects else 'a'} problem in\n{result.stdout}"
    assert result.stdout.strip(), f"{example.where} printed nothing"
