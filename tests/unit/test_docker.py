"""The image's recipe and the lock files, checked without building it: docker/Dockerfile installs what CI installs.

The build itself (tools/build_image.sh, buildah) needs root and minutes; its record is in
docs/benchmarks.md. Here: the CPU and CUDA builds share every pin but the torch build's, the CUDA pins are what
CUDA torch requires, every pip step is constrained by the locks and the result checked against them, the
project's GPU extras are all pinned (so a dependency that does not fit fails here and in the build, not in a
cluster job), the image runs as a non-root user behind docker/entrypoint.sh, and the build context leaves the
environment, data, runs and history out.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GPU_EXTRAS = ("dali", "triton", "export", "deepspeed")
"""The optional dependencies the image carries."""
REQUIREMENTS = ("pinned.txt", "cuda.txt", "deepspeed.txt")
"""The image's locks (requirements/): the shared one, the CUDA build's, DeepSpeed's (it installs after torch)."""
KEPT_OUT = (".git", ".venv", "data", "runs")


def instructions() -> list[tuple[str, str]]:
    """The Dockerfile as (KEYWORD, arguments) pairs: comments dropped, continued lines joined."""
    logical, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        current += line.rstrip().removesuffix("\\") + " " if line.rstrip().endswith("\\") else line
        if not line.rstrip().endswith("\\"):
            logical.append(current)
            current = ""
    assert current == "", "the Dockerfile ends inside a continued line"
    pairs = []
    for text in logical:
        keyword, _, arguments = text.strip().partition(" ")
        pairs.append((keyword.upper(), " ".join(arguments.split())))
    return pairs


def build_args() -> dict[str, str]:
    return dict(arg.split("=", 1) for keyword, arg in instructions() if keyword == "ARG" and "=" in arg)


def runs() -> str:
    return "\n".join(arguments for keyword, arguments in instructions() if keyword == "RUN")


def lock(name: str) -> dict[str, str]:
    """requirements/``name`` as {canonical name: version}; every line must be an exact pin."""
    pins = {}
    for line in (ROOT / "requirements" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"requirements/{name}: {line!r} is not an exact pin"
            pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def pinned() -> dict[str, str]:
    """The ``REQUIREMENTS`` files as one {canonical name: version}."""
    return {name: version for file in REQUIREMENTS for name, version in lock(file).items()}


def test_base_is_a_build_argument_with_a_public_default() -> None:
    keywords = [keyword for keyword, _ in instructions()]
    assert keywords[:2] == ["ARG", "FROM"] and keywords.count("FROM") == 1
    assert instructions()[1][1] == "${BASE}"
    assert re.fullmatch(r"docker\.io/library/python:3\.11-slim-\w+", build_args()["BASE"])


def test_the_builds_share_every_pin_but_the_torch_builds() -> None:
    """requirements/pinned.txt is shared; requirements/cpu.txt and requirements/cuda.txt differ from it and each other
    only in the torch build (same version), its Triton and the CUDA libraries; DeepSpeed's lock is apart."""
    shared, cpu, cuda, deepspeed = (lock(name) for name in ("pinned.txt", "cpu.txt", "cuda.txt", "deepspeed.txt"))
    for name, build in (("cpu.txt", cpu), ("cuda.txt", cuda), ("deepspeed.txt", deepspeed)):
        assert not set(build) & set(shared), f"requirements/{name} pins what requirements/pinned.txt pins"
    assert not set(deepspeed) & (set(cpu) | set(cuda))
    assert Version(cpu["torch"]).public == Version(cuda["torch"]).public and Version(cpu["torch"]).local == "cpu"
    assert set(cpu) == {"torch", "triton"}
    assert set(cuda) - {"torch", "triton"} <= {name for name in cuda if name.startswith(("nvidia-", "cuda-"))}


def torch_requirements() -> tuple[str, list[Requirement]]:
    """The torch version requirements/cuda.txt recorded the requirements of, and those requirements."""
    text = (ROOT / "requirements" / "cuda.txt").read_text()
    (version,) = re.findall(r"^# torch (\S+) requires \(its wheel's Requires-Dist\):$", text, re.MULTILINE)
    return version, [Requirement(line) for line in re.findall(r"^#   requires: (.+)$", text, re.MULTILINE)]


def test_the_cuda_pins_are_what_the_cuda_torch_requires() -> None:
    """Every requirement CUDA torch's wheel states (Linux, this Python) holds for the locked versions: bumping torch
    without relocking (tools/lock_cuda.py) fails here, not in the image's resolver, which moved torch to 2.15."""
    recorded, requirements = torch_requirements()
    pins = pinned()
    assert recorded == pins["torch"], "requirements/cuda.txt records another torch's requirements: relock it"
    environment = {"platform_system": "Linux", "sys_platform": "linux", "python_version": "3.11", "extra": ""}
    assert any(canonicalize_name(r.name) == "triton" for r in requirements)
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        name = canonicalize_name(requirement.name)
        assert name in pins, f"torch requires {requirement}, which no lock pins"
        assert requirement.specifier.contains(pins[name], prereleases=True), f"torch requires {requirement}, " \
            f"the locks pin {pins[name]}"


def test_every_pip_step_is_constrained_and_the_result_checked() -> None:
    """In the image as in ``make env``: the torch build's lock first, every later step constrained by the locks (so
    nothing moves torch), the project without resolving anything, and the environment checked against the locks."""
    assert build_args()["BUILD_LOCK"] == "requirements/cuda.txt"
    assert ("COPY", "requirements/ requirements/") in instructions()
    steps = runs()
    assert 'pip install ${TORCH_PIP_ARGS} -r "${BUILD_LOCK}"' in steps
    assert 'pip install -r requirements/pinned.txt -c "${BUILD_LOCK}"' in steps
    assert ('DS_BUILD_OPS=0 pip install --no-build-isolation -r requirements/deepspeed.txt -c "${BUILD_LOCK}" '
            "-c requirements/pinned.txt") in steps
    assert "pip install --no-deps --no-build-isolation -e ." in steps and "pip check" in steps
    assert 'python tools/check_lock.py requirements/pinned.txt "${BUILD_LOCK}" requirements/deepspeed.txt' in steps
    makefile = (ROOT / "Makefile").read_text()
    assert "$(BIN)/pip install -q -r requirements/pinned.txt -c $(BUILD_LOCK)" in makefile
    assert "$(BIN)/python tools/check_lock.py $(LOCKS)" in makefile


def test_check_lock_names_each_package_that_differs(tmp_path: Path) -> None:
    """Against this very environment (its torch build's lock: CI's CPU one, or the image's CUDA one): a lock at
    another version of numpy, and one naming a package not installed."""
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("numpy==0.0.1\nno-such-package==1.0\n")
    build = next(name for name in ("cpu.txt", "cuda.txt") if Version(lock(name)["torch"]) == Version(version("torch")))
    rest = [ROOT / "requirements" / name for name in ("pinned.txt", build, "deepspeed.txt")]
    other = [path for path in rest if "numpy" not in lock(path.name)]
    result = subprocess.run([sys.executable, "tools/check_lock.py", str(wrong), *map(str, other)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.splitlines()[:2] == [
        "error: no-such-package: locked at 1.0, not installed",
        f"error: numpy: installed {version('numpy')}, locked 0.0.1",
    ]
    ok = subprocess.run([sys.executable, "tools/check_lock.py", *map(str, rest)], cwd=ROOT, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_every_gpu_extra_is_pinned_to_a_version_it_accepts() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = pinned()
    requirements = [Requirement(text) for extra in GPU_EXTRAS for text in project["optional-dependencies"][extra]]
    requirements += [Requirement(text) for text in project["dependencies"] if not text.startswith("torch")]
    assert "nvidia-dali-cuda130" in {canonicalize_name(r.name) for r in requirements}
    for requirement in requirements:
        name = canonicalize_name(requirement.name)
        assert name in pins, f"{requirement} is not pinned in requirements/"
        assert requirement.specifier.contains(pins[name]), f"requirements/ pins {name}=={pins[name]}"


def test_runs_as_a_non_root_user_behind_the_entrypoint() -> None:
    steps = instructions()
    users = [arguments for keyword, arguments in steps if keyword == "USER"]
    assert users and users[-1] not in ("root", "0", "0:0")
    assert f"useradd --uid \"${{UID}}\" --create-home --home-dir /home/sface --shell /bin/bash {users[-1]}" in runs()
    (entrypoint,) = [json.loads(arguments) for keyword, arguments in steps if keyword == "ENTRYPOINT"]
    assert entrypoint == ["/workspace/docker/entrypoint.sh"]
    assert ("WORKDIR", "/workspace") in steps
    assert ("COPY", "docker/entrypoint.sh docker/entrypoint.sh") in steps
    assert os.access(ROOT / "docker" / "entrypoint.sh", os.X_OK)


def test_no_pip_cache_in_the_image() -> None:
    env = " ".join(arguments for keyword, arguments in instructions() if keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in env


def test_build_context_keeps_environment_data_runs_and_history_out() -> None:
    patterns = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()]
    patterns = [p for p in patterns if p and not p.startswith("#")]
    for path in KEPT_OUT:
        assert path in patterns, f".dockerignore does not exclude {path}"
    assert not [p for p in patterns if p.startswith("!")], ".dockerignore re-includes a path"
    for keyword, arguments in instructions():
        if keyword == "COPY":
            *sources, _ = arguments.split()
            for source in sources:
                assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}, which does not exist"
                assert source.rstrip("/").split("/")[0] not in KEPT_OUT

