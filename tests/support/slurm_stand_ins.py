"""Stand-ins for SLURM's commands on ``PATH``, which record how they were called, and a bare environment with
SLURM's variables.
"""

from __future__ import annotations

from pathlib import Path

SYSTEM_PATH = "/usr/bin:/bin"

# scontrol: `show hostnames LIST` answers from FAKE_HOSTNAMES and records the call; `requeue ID` records the call.
FAKE_SCONTROL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scontrol.calls"
if [[ $1 == show ]]; then printf '%s\\n' $FAKE_HOSTNAMES; fi
"""
# srun: drops its options, records its pid (the task's, as it execs) and runs the task once, here.
FAKE_SRUN = """#!/bin/bash
echo "$*" > "$FAKE_DIR/srun.args"
while [[ $1 == -* ]]; do shift; done
echo $$ > "$FAKE_DIR/task.pid"
exec "$@"
"""
# scancel --signal=SIG JOB: signals the task, as slurmstepd signals every process of the job's steps.
FAKE_SCANCEL = """#!/bin/bash
echo "$*" >> "$FAKE_DIR/scancel.calls"
kill -s "${1#--signal=}" "$(cat "$FAKE_DIR/task.pid")"
"""


def write_tool(folder: Path, name: str, text: str) -> None:
    path = folder / name
    path.write_text(text)
    path.chmod(0o755)


def slurm_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    """A bare environment with SLURM's variables, the stand-ins of ``tmp_path/bin`` first on PATH."""
    return {"PATH": f"{tmp_path / 'bin'}:{SYSTEM_PATH}", "FAKE_DIR": str(tmp_path), **variables}


def calls(tmp_path: Path, tool: str) -> list[str]:
    path = tmp_path / f"{tool}.calls"
    return path.read_text().splitlines() if path.exists() else []
