"""The image's recipe, checked without building it: docker/Dockerfile installs what CI installs.

The build itself (tools/build_image.sh, buildah) needs root and minutes; its record is in
docs/benchmarks.md. Here: the torch pin agrees with the Makefile's, the rest comes from
requirements/pinned.txt and requirements/deepspeed.txt, the project's GPU extras are all pinned there
(so a dependency that does not fit fails here and in the build, not in a cluster job), the image runs as a non-root user
behind docker/entrypoint.sh, and the build context leaves the environment, data, runs and
history out.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
GPU_EXTRAS = ("dali", "triton", "export", "deepspeed")
"""The optional dependencies the image carries."""
REQUIREMENTS = ("pinned.txt", "deepspeed.txt")
"""The pinned files ``make`` installs (requirements/), DeepSpeed's apart because it installs after torch."""
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


def pinned() -> dict[str, str]:
    """The ``REQUIREMENTS`` files as {canonical name: version}; every line must be an exact pin."""
    pins = {}
    for name in REQUIREMENTS:
        for line in (ROOT / "requirements" / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                requirement = Requirement(line)
                (spec,) = requirement.specifier
                assert spec.operator == "==", f"requirements/{name}: {line!r} is not an exact pin"
                pins[canonicalize_name(requirement.name)] = spec.version
    return pins


def test_base_is_a_build_argument_with_a_public_default() -> None:
    keywords = [keyword for keyword, _ in instructions()]
    assert keywords[:2] == ["ARG", "FROM"] and keywords.count("FROM") == 1
    assert instructions()[1][1] == "${BASE}"
    assert re.fullmatch(r"docker\.io/library/python:3\.11-slim-\w+", build_args()["BASE"])


def test_torch_pin_is_the_makefiles() -> None:
    (makefile_pin,) = re.findall(r"^TORCH_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert build_args()["TORCH_VERSION"] == makefile_pin
    assert build_args()["TORCH_SPEC"] == "torch==${TORCH_VERSION}"
    assert 'pip install ${TORCH_PIP_ARGS} "${TORCH_SPEC}"' in runs()


def test_the_rest_comes_from_the_pinned_requirements() -> None:
    assert ("COPY", "requirements/ requirements/") in instructions()
    assert "pip install -r requirements/pinned.txt" in runs()
    assert "DS_BUILD_OPS=0 pip install --no-build-isolation -r requirements/deepspeed.txt" in runs()
    constraints = " ".join(f"-c requirements/{name}" for name in REQUIREMENTS)
    assert f"pip install {constraints} -e \".[" + ",".join(GPU_EXTRAS) + "]\"" in runs()
    assert "pip check" in runs()
    assert "torch" not in pinned(), "torch is pinned once, by the Makefile"


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

