"""The documentation is self-contained, true and runnable.

Self-contained: every repository path (and every ``.py`` path, written from the root) that
README.md, docs/ or a docstring or comment of sface_dist/, tools/ or tests/ names exists, every
relative markdown link resolves, every section cited by name is a heading of its document, and
no text cites an outside design document or its section numbers.

Runnable: a fenced shell block in README.md or docs/*.md whose line before the fence is
``<!-- runnable -->`` is executed, blocks of one file in order, each by ``bash -euo pipefail``
from the repository root with ``TOUR`` set to a fresh temporary folder (the documented place
for the blocks' outputs) and the running interpreter's ``python`` first on ``PATH``. The
README's tour runs as written: no command is substituted.
"""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
import tokenize
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNNABLE_MARKER = "<!-- runnable -->"
BLOCK_TIMEOUT_S = 300
STDERR_TAIL_CHARS = 2000

CHECKED_DIRECTORIES = (".ci", "configs", "docker", "docs", "requirements", "scripts", "sface_dist", "tests", "tools")
"""A path token starting with one of these names a file of the repository. Run-time folders
(``OUTPUT/``, ``runs/``, ``data/``, ``study/``, ...) are never checked."""

OUTSIDE_SOURCE_PREFIXES = ("recognition/", "arcface_torch/")
"""Python paths inside insightface's repository, cited as the origin of ported code."""

REPO_PATH = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(re.escape(d) for d in CHECKED_DIRECTORIES)})/[\w./*<>{{}}-]*)")
PYTHON_PATH = re.compile(r"(?<![\w/.$<{-])((?:[\w.-]+/)+[\w-]+\.py)\b")
TOP_LEVEL_DOC = re.compile(r"(?<![\w/.-])([A-Z][A-Z_]*\.md)\b")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
SECTION_REFERENCE = re.compile(r"(docs/[\w/-]+\.md)(?:, | \()([A-Z][^()`,\n]*?)\)")
"""``(docs/design.md, Sharding)`` or ``docs/design.md (Gradients and Sharding)``: sections cited by name."""
SECTION_SIGN = re.compile("§")
"""The section sign (U+00A7) numbers the sections of documents outside the repository; an outside document's own name is
a top-level ``.md`` that does not exist, which ``missing_references`` reports."""
PLACEHOLDER = re.compile(r"<[^>/]*>|\{[^}/]*\}")
FENCE = re.compile(r"^```(\w*)\s*$")


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def python_prose(source: str) -> str:
    """The docstrings (string statements) and comments of a Python source, one per line."""
    parts = [
        node.value.value
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
    ]
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    parts += [tok.string for tok in tokens if tok.type == tokenize.COMMENT]
    return "\n".join(parts)


def shell_comments(source: str) -> str:
    return "\n".join(line for line in source.splitlines() if line.lstrip().startswith("#"))


def documented_texts() -> dict[Path, str]:
    """Every text the repository shows a reader, by file: markdown whole, code by its prose."""
    texts = {path: path.read_text(encoding="utf-8") for path in markdown_files()}
    for directory in ("sface_dist", "tools", "tests"):
        for path in sorted((ROOT / directory).rglob("*.py")):
            texts[path] = python_prose(path.read_text(encoding="utf-8"))
        for path in sorted((ROOT / directory).rglob("*.sh")):
            texts[path] = shell_comments(path.read_text(encoding="utf-8"))
    return texts


def exists_in_repo(path: str, base: Path = ROOT) -> bool:
    """Whether ``path`` (relative to ``base``; ``<...>``/``{...}`` placeholders and ``*`` match any name) exists."""
    pattern = PLACEHOLDER.sub("*", path.split("::")[0].split("#")[0]).rstrip("/")
    if not pattern:
        return True
    if "*" in pattern:
        return any(base.glob(pattern))
    return (base / pattern).exists()


def missing_references(text: str, base: Path = ROOT) -> list[str]:
    """Repository paths, top-level documents and relative markdown links in ``text`` that do not exist.

    Links resolve against ``base`` (the folder of the markdown file), every other path against the root.
    """
    missing = []
    for match in REPO_PATH.finditer(text):
        path = match.group(1).rstrip(".")
        if not exists_in_repo(path):
            missing.append(path)
    for match in PYTHON_PATH.finditer(text):
        path = match.group(1)
        if not path.startswith(OUTSIDE_SOURCE_PREFIXES) and not exists_in_repo(path):
            missing.append(path)
    for match in TOP_LEVEL_DOC.finditer(text):
        if not exists_in_repo(match.group(1)):
            missing.append(match.group(1))
    for match in MARKDOWN_LINK.finditer(text):
        target = match.group(1)
        if "://" in target or target.startswith(("#", "mailto:")):
            continue
        if not exists_in_repo(target, base):
            missing.append(target)
    return sorted(set(missing))


def headings(path: Path) -> set[str]:
    """The heading texts of a markdown file, outside fenced blocks."""
    found, fenced = set(), False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and line.startswith("#"):
            found.add(line.lstrip("#").strip())
    return found


def missing_sections(text: str) -> list[str]:
    """Section citations in ``text``, such as ``(docs/design.md, Sharding)``, whose document lacks the heading."""
    missing = []
    for match in SECTION_REFERENCE.finditer(text):
        path = ROOT / match.group(1)
        if not path.is_file():
            continue
        for section in match.group(2).split(" and "):
            if section not in headings(path):
                missing.append(f"{match.group(1)}, {section}")
    return missing


def outside_citations(text: str) -> list[str]:
    """The lines of ``text`` that cite a numbered section (a section sign)."""
    return [line.strip() for line in text.splitlines() if SECTION_SIGN.search(line)]


def test_scanner_finds_planted_references() -> None:
    planted = (
        "See `docs/nowhere.md`, sface_dist/heads/ghost.py, heads/sface.py, tools/missing_tool.py and\n"
        "configs/absent.yaml; [the notes](notes/missing.md), CONTRIBUTING.md.\n"
        "Real: docs/design.md, `sface_dist/heads/sface.py`, tests/unit/test_*.py, configs/, [design](docs/design.md),\n"
        "run-time: runs/demo/config.yaml, OUTPUT/checkpoints/latest, data/demo/train.rec,\n"
        "outside: recognition/arcface_torch/losses.py, [paper](https://arxiv.org/abs/1), docs/<name>.md.\n"
    )
    assert missing_references(planted) == [
        "CONTRIBUTING.md",
        "configs/absent.yaml",
        "docs/nowhere.md",
        "heads/sface.py",
        "notes/missing.md",
        "sface_dist/heads/ghost.py",
        "tools/missing_tool.py",
    ]
    assert missing_sections("(docs/design.md, Sharding and No such part) docs/design.md (Gradients)") == [
        "docs/design.md, No such part"
    ]
    assert outside_citations("see §4.2 of the spec\nclean line") == ["see §4.2 of the spec"]


def test_every_named_repository_path_exists() -> None:
    problems = []
    for path, text in documented_texts().items():
        base = path.parent if path.suffix == ".md" else ROOT
        problems += [f"{path.relative_to(ROOT)}: {ref}" for ref in missing_references(text, base)]
        problems += [f"{path.relative_to(ROOT)}: {ref}" for ref in missing_sections(text)]
    assert not problems, "names a file or section that is not in the repository:\n" + "\n".join(problems)


def test_no_text_cites_an_outside_design_document() -> None:
    problems = [
        f"{path.relative_to(ROOT)}: {line}"
        for path, text in documented_texts().items()
        for line in outside_citations(text)
    ]
    assert not problems, "cites an outside document:\n" + "\n".join(problems)


@dataclass(frozen=True)
class RunnableBlock:
    """A fenced shell block marked runnable: its file, the line of its fence, and its commands."""

    source: Path
    line: int
    commands: str


def runnable_blocks(path: Path) -> list[RunnableBlock]:
    """The marked blocks of a markdown file, in order; a marker not followed by a shell fence is an error."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks = []
    for index, line in enumerate(lines):
        if line.strip() != RUNNABLE_MARKER:
            continue
        fence = FENCE.match(lines[index + 1]) if index + 1 < len(lines) else None
        if fence is None or fence.group(1) not in ("bash", "sh", "shell"):
            raise ValueError(f"{path}:{index + 1}: {RUNNABLE_MARKER} must be followed by a ```bash fence")
        end = next((i for i in range(index + 2, len(lines)) if lines[i].strip() == "```"), None)
        if end is None:
            raise ValueError(f"{path}:{index + 2}: runnable block is never closed")
        blocks.append(RunnableBlock(path, index + 2, "\n".join(lines[index + 2 : end])))
    return blocks


def block_environment(tour: Path) -> dict[str, str]:
    env = dict(os.environ, TOUR=str(tour))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def run_block(block: RunnableBlock, env: dict[str, str]) -> None:
    """Run one block from the repository root; a failure names the block, its commands and its stderr tail."""
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.commands],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT_S,
        check=False,
    )
    if result.returncode != 0:
        source = block.source.relative_to(ROOT) if block.source.is_relative_to(ROOT) else block.source
        raise AssertionError(
            f"{source}:{block.line}: exit status {result.returncode}\n$ {block.commands}\n"
            f"--- stderr (tail) ---\n{result.stderr[-STDERR_TAIL_CHARS:]}"
        )


def test_runner_reports_a_broken_command(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        f"text\n{RUNNABLE_MARKER}\n```bash\necho fine\n```\n\n{RUNNABLE_MARKER}\n```bash\n"
        'python tools/export_onnx.py --checkpoint "$TOUR/run" --output "$TOUR/model.onnx"\n```\n'
        "```bash\nnot marked, never run\n```\n",
        encoding="utf-8",
    )
    first, renamed_flag = runnable_blocks(doc)
    run_block(first, block_environment(tmp_path))
    with pytest.raises(AssertionError) as failure:
        run_block(renamed_flag, block_environment(tmp_path))
    message = str(failure.value)
    assert "doc.md:8: exit status 2" in message
    assert "python tools/export_onnx.py --checkpoint" in message
    assert "unrecognized arguments: --output" in message or "required: --out" in message


def test_a_marker_without_a_shell_fence_is_an_error(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(f"{RUNNABLE_MARKER}\n\n```bash\necho orphan\n```\n", encoding="utf-8")
    with pytest.raises(ValueError, match="must be followed by a ```bash fence"):
        runnable_blocks(doc)


def test_readme_tour_covers_every_stage() -> None:
    """Data, training, resuming (a second training run), evaluation, export and embedding are all run."""
    blocks = [block.commands for block in runnable_blocks(ROOT / "README.md")]
    stages = ("tools/make_demo_data.py", "-m sface_dist.train", "tools/eval_verification.py", "tools/export_onnx.py",
              "tools/embed.py")
    assert all(any(stage in block for block in blocks) for stage in stages), blocks
    assert sum("-m sface_dist.train" in block for block in blocks) >= 2, "the tour must resume a run"


@pytest.mark.parametrize(
    "doc", [path.relative_to(ROOT).as_posix() for path in markdown_files() if runnable_blocks(path)]
)
def test_runnable_blocks_run(doc: str, tmp_path: Path) -> None:
    env = block_environment(tmp_path)
    for block in runnable_blocks(ROOT / doc):
        run_block(block, env)
