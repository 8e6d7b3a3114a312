"""Check an environment against the lock files: every installed distribution locked at the version installed.

    python tools/check_lock.py requirements/pinned.txt requirements/cpu.txt requirements/deepspeed.txt
    python tools/check_lock.py requirements/pinned.txt requirements/cuda.txt requirements/deepspeed.txt

Exits 1 with one line per difference (a package installed at another version than locked, a locked package not
installed, an installed one the locks do not name), naming the package; ``make env`` and the image's build run it,
so an environment that drifted from its lock is never used. The project itself and pip are not locked.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.utils import canonicalize_name
from packaging.version import Version

UNLOCKED = {"pip", "sface-dist"}
"""The installer, and the project (installed from the working tree)."""


def read_lock(path: Path) -> dict[str, str]:
    """``{canonical name: version}`` of a lock file's ``name==version`` lines (comments and blank lines skipped)."""
    pins: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, separator, version = line.partition("==")
        if not separator or not name.strip() or not version.strip():
            raise ValueError(f"{path}:{number}: expected 'name==version', got {line!r}")
        pins[canonicalize_name(name.strip())] = version.strip()
    return pins


def differences(locked: dict[str, str], installed: dict[str, str]) -> list[str]:
    """What differs between the lock and the environment, one line each."""
    lines = []
    for name, version in sorted(locked.items()):
        if name not in installed:
            lines.append(f"{name}: locked at {version}, not installed")
        elif Version(installed[name]) != Version(version):
            lines.append(f"{name}: installed {installed[name]}, locked {version}")
    lines += [f"{name}: installed {version}, in no lock file" for name, version in sorted(installed.items())
              if name not in locked]
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("locks", nargs="+", type=Path, help="lock files (name==version lines)")
    args = parser.parse_args(argv)
    locked: dict[str, str] = {}
    for path in args.locks:
        for name, version in read_lock(path).items():
            if name in locked and locked[name] != version:
                print(f"error: {name}: locked at {locked[name]} and at {version} ({path})", file=sys.stderr)
                return 1
            locked[name] = version
    installed = {canonicalize_name(dist.metadata["Name"]): dist.version for dist in metadata.distributions()}
    found = differences(locked, {name: version for name, version in installed.items() if name not in UNLOCKED})
    for line in found:
        print(f"error: {line}", file=sys.stderr)
    if not found:
        print(f"{len(locked)} packages as locked in {', '.join(str(path) for path in args.locks)}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
