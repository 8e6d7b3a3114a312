"""Write requirements/cuda.txt from PyPI's resolution of CUDA torch (network needed; run it when torch is bumped).

    python tools/lock_cuda.py 2.13.0 > requirements/cuda.txt

Asks pip, in a throwaway virtual environment and ignoring every local pip setting, what ``torch==VERSION`` installs
on Linux for this Python (``pip install --dry-run --report``: metadata only, nothing installed), and prints the lock
of the CUDA build: torch, and every package it pulls in that requirements/pinned.txt does not already pin (the CUDA
libraries and the Triton that torch requires), followed by torch's own requirements, which tests/unit/test_docker.py
checks the pins against.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

from check_lock import read_lock
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# The CUDA build (docker/Dockerfile, the cluster image; `make env` where nvidia-smi exists): what it installs
# besides requirements/pinned.txt, and the only difference from requirements/cpu.txt: PyPI's CUDA wheel of torch,
# the CUDA libraries it pulls in, and the Triton it requires (it refuses another). DALI's CUDA wheel is the same in
# both builds. tools/lock_cuda.py writes this file from PyPI's resolution of the torch pin; tests/unit/test_docker.py
# checks every pin against torch's recorded requirements below."""


def resolve(version: str) -> list[dict]:
    """pip's installation report of ``torch==version`` in a fresh environment."""
    with tempfile.TemporaryDirectory() as folder:
        venv.create(folder, with_pip=True)
        report = Path(folder) / "report.json"
        subprocess.run([str(Path(folder) / "bin" / "pip"), "install", "--isolated", "--quiet", "--dry-run",
                        "--disable-pip-version-check",
                        "--ignore-installed", "--report", str(report), f"torch=={version}"], check=True)
        return json.loads(report.read_text())["install"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("version", help="torch version, as the Makefile's TORCH_VERSION")
    args = parser.parse_args()
    shared = read_lock(ROOT / "requirements" / "pinned.txt")
    packages = [item["metadata"] for item in resolve(args.version)]
    torch = next(package for package in packages if package["name"] == "torch")
    pins = sorted((canonicalize_name(package["name"]), package["version"]) for package in packages
                  if canonicalize_name(package["name"]) not in shared and package["name"] != "torch")
    lines = [HEADER, f"torch=={torch['version']}", *(f"{name}=={version}" for name, version in pins),
             f"# torch {torch['version']} requires (its wheel's Requires-Dist):"]
    lines += [f"#   requires: {requirement}" for requirement in torch["requires_dist"] if "extra ==" not in requirement]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
