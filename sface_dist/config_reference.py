"""docs/configuration.md, generated from the config dataclasses and their field docstrings.

    python -m sface_dist.config_reference [OUT]    # default: docs/configuration.md

Each section of ``Config`` becomes one table: key, type (or a ``Literal``'s choices), default
and the field's docstring, the string literal written right after the field.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
import typing
from pathlib import Path
from typing import Any, Literal

from sface_dist.config import Config, choices
from sface_dist.console import say

REGENERATE = "python -m sface_dist.config_reference"

INTRO = f"""# Configuration

A config is a YAML file with up to six sections; every key has a default, so a
file names only what differs. Unknown keys, wrong types and values outside a
key's choices are errors that name the file, the key and what was expected.
Override anything from the command line:

```bash
python -m sface_dist.train configs/ms1m.yaml --set train.steps=1000 --set head.a=0.87 --set eval.bins=[a.bin,b.bin]
```

Values after `=` are parsed as YAML 1.2 (`3` is an int, `0.5` and `5e-4` are
floats, `[a, b]` a list); an int is accepted where a float is expected. Values out
of range (`optim.lr` ≤ 0, `optim.momentum` ≥ 1, a negative weight decay,
`train.keep_checkpoints` < 1, NaN anywhere) are errors naming the key.

This file is generated from the dataclasses of `sface_dist/config.py` and their
field docstrings: edit those, then run `{REGENERATE}`
(tests/unit/test_config.py fails while this file is out of date).
"""


class ConfigReferenceError(ValueError):
    """A config dataclass that cannot be documented as written."""


def field_docs(cls: type) -> dict[str, str]:
    """Each field of dataclass ``cls`` -> its attribute docstring, whitespace collapsed to single spaces."""
    source_file = inspect.getsourcefile(cls)
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    class_def = next(node for node in tree.body if isinstance(node, ast.ClassDef))
    docs: dict[str, str] = {}
    for node, following in zip(class_def.body, class_def.body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(following, ast.Expr)
            and isinstance(following.value, ast.Constant)
            and isinstance(following.value.value, str)
        ):
            docs[node.target.id] = " ".join(following.value.value.split())
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
    if missing:
        raise ConfigReferenceError(
            f"{source_file}: {cls.__name__}: no docstring after field(s) {', '.join(missing)}"
        )
    return docs


def _markdown(text: str) -> str:
    """Docstring text as one Markdown table cell: ``x`` becomes `x`, pipes are escaped."""
    return text.replace("``", "`").replace("|", "\\|")


def type_cell(tp: Any) -> str:
    """A field's type, or its choices for a ``Literal``."""
    if typing.get_origin(tp) is Literal:
        return " / ".join(f"`{value}`" for value in choices(tp))
    if typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        return f"list[{item.__name__}]"
    return tp.__name__


def default_cell(value: Any) -> str:
    """A default as it would be written in YAML."""
    if isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list):
        text = "[" + ", ".join(str(item) for item in value) + "]"
    elif value == "":
        text = '""'
    else:
        text = str(value)
    return f"`{text}`"


def section_table(name: str, cls: type) -> str:
    """The Markdown of one section: heading, the class docstring and one row per field."""
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines = [f"## `{name}`", "", _markdown(inspect.cleandoc(cls.__doc__ or "")), ""]
    lines += ["| key | type | default | meaning |", "|---|---|---|---|"]
    defaults = cls()
    for f in dataclasses.fields(cls):
        default = default_cell(getattr(defaults, f.name))
        lines.append(f"| `{name}.{f.name}` | {type_cell(hints[f.name])} | {default} | {_markdown(docs[f.name])} |")
    return "\n".join(lines) + "\n"


def render() -> str:
    """The whole of docs/configuration.md."""
    hints = typing.get_type_hints(Config)
    sections = [section_table(f.name, hints[f.name]) for f in dataclasses.fields(Config)]
    return "\n".join([INTRO, *sections])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", type=Path, default=Path("docs/configuration.md"))
    args = parser.parse_args(argv)
    args.out.write_text(render())
    say(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
