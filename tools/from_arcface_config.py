"""An insightface arcface_torch config (``recognition/arcface_torch/configs/NAME.py``) as the project's YAML,
read without running it.

    python tools/from_arcface_config.py recognition/arcface_torch/configs/ms1mv3_r50.py \\
        --out ms1mv3_r50.yaml [--world-size 8]

arcface_torch's configs are Python files of ``config.KEY = VALUE`` lines on top of its base.py; this
reads their literals with ``ast`` (nothing in the file runs), applies base.py's defaults to the keys a file leaves
out, maps every key the project has a counterpart for, and writes a comment in the YAML for every key it could
not map (an unknown key, a value that is not a literal, a setting with no counterpart). ``warmup_epoch`` becomes
``optim.warmup_steps`` at ``--world-size`` GPUs, as arcface_torch computes it.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any

import yaml

from sface_dist.backbones.insightface import INSIGHTFACE_NAMES
from sface_dist.cli import run_cli
from sface_dist.config import load_config

BASE_DEFAULTS: dict[str, Any] = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1, "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "dali_aug": False, "gradient_acc": 1, "seed": 2048,
    "num_workers": 2,
}
"""arcface_torch's ``recognition/arcface_torch/configs/base.py``: the values a config file leaves out."""
NO_COUNTERPART = {
    "save_all_states": "the project's checkpoints always hold every state",
    "num_image": "the project counts the images in the dataset's index",
    "dali_aug": "the project's augmentation is data.augment, on every loader",
    "interclass_filtering_threshold": "the project has no inter-class filtering",
}
"""Keys with nothing to map to, and why; anything else unmapped is said to be unknown."""
ARCFACE_SCALE = 64.0
"""The logit scale arcface_torch's ``CombinedMarginLoss`` is built with."""


def read_arcface_config(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The ``config.KEY = literal`` assignments of ``path`` over ``BASE_DEFAULTS``, and a line for each assignment
    whose value is not a literal."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    values, skipped = dict(BASE_DEFAULTS), []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1):
            continue
        target = node.targets[0]
        if not (isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name)
                and target.value.id == "config"):
            continue
        try:
            values[target.attr] = ast.literal_eval(node.value)
        except ValueError:
            skipped.append(f"{target.attr} = {ast.unparse(node.value)}: not a literal, not read")
    return values, skipped


def margin_head(margins: Any) -> tuple[dict[str, Any], list[str]]:
    """The ``head`` section of arcface_torch's ``margin_list`` (m1, m2, m3)."""
    m1, m2, m3 = (float(m) for m in margins)
    head: dict[str, Any] = {"s": ARCFACE_SCALE}
    notes = ["head: arcface_torch's loss, translated as it is; head.type: sface trains the project's SFace"]
    if m3 > 0:
        head.update(type="cosface", margin=[1.0, 0.0, m3])
        if (m1, m2) != (1.0, 0.0):
            notes.append(f"margin_list {margins}: arcface_torch ignores m1 and m2 when m3 > 0, and so does this")
    elif (m1, m2) == (1.0, 0.5):
        head["type"] = "arcface"
    elif (m1, m2) == (1.0, 0.0):
        head["type"] = "softmax"
    else:
        head.update(type="combined", margin=[m1, m2, m3])
    return head, notes


def translate(values: dict[str, Any], name: str, world_size: int) -> tuple[dict[str, Any], list[str]]:
    """The project's config tree for arcface_torch's ``values``, and a comment for each key left unmapped."""
    unmapped = dict(values)
    take = unmapped.pop
    tree: dict[str, dict[str, Any]] = {"data": {}, "model": {}, "head": {}, "optim": {}, "train": {}, "eval": {}}
    comments: list[str] = []
    network = take("network")
    if network in INSIGHTFACE_NAMES:
        tree["model"]["backbone"] = INSIGHTFACE_NAMES[network]
    else:
        comments.append(f"network = {network!r}: no counterpart among {', '.join(INSIGHTFACE_NAMES)}")
    tree["model"]["embedding_size"] = take("embedding_size")
    tree["head"], notes = margin_head(take("margin_list"))
    comments += notes
    tree["head"]["sample_rate"] = float(take("sample_rate"))
    tree["data"]["root"] = take("rec")
    tree["eval"]["bins"] = [f"{tree['data']['root']}/{target}.bin" for target in take("val_targets", [])]
    if "num_classes" in unmapped:
        tree["data"]["num_classes"] = take("num_classes")
    tree["data"]["batch_size"] = take("batch_size")
    tree["data"]["num_workers"] = take("num_workers")
    if take("dali"):
        tree["data"]["backend"] = "dali"
    tree["optim"].update(name=take("optimizer"), lr=take("lr"), weight_decay=take("weight_decay"))
    momentum = take("momentum")
    if tree["optim"]["name"] == "sgd":
        tree["optim"]["momentum"] = momentum
    tree["optim"].update(schedule="poly", poly_power=2.0)
    warmup = take("warmup_epoch", 0)
    if warmup and "num_image" in values:
        steps_per_epoch = values["num_image"] // (tree["data"]["batch_size"] * world_size)
        tree["optim"]["warmup_steps"] = int(warmup * steps_per_epoch)
        comments.append(f"warmup_epoch = {warmup}: {tree['optim']['warmup_steps']} steps at {world_size} GPUs "
                        f"x {tree['data']['batch_size']} (--world-size)")
    elif warmup:
        comments.append(f"warmup_epoch = {warmup}: not mapped without num_image to count an epoch's steps")
    if "num_epoch" in unmapped:
        tree["train"]["epochs"] = take("num_epoch")
    tree["train"].update(output=take("output") or f"runs/{name}", seed=take("seed"),
                         grad_accum=take("gradient_acc"), log_every=take("frequent"), resume=take("resume"))
    if take("fp16"):
        tree["train"]["amp"] = "fp16"
    tree["eval"]["every"] = take("verbose")
    for key, value in unmapped.items():
        reason = NO_COUNTERPART.get(key, "no counterpart in the project")
        comments.append(f"{key} = {value!r}: not mapped: {reason}")
    return {section: keys for section, keys in tree.items() if keys}, comments


def convert(args: argparse.Namespace) -> int:
    values, skipped = read_arcface_config(args.config)
    if not isinstance(values.get("rec"), str):
        raise ValueError(f"{args.config}: no config.rec = '<dataset folder>' (arcface_torch needs one too)")
    tree, comments = translate(values, args.config.stem, args.world_size)
    header = [f"# From insightface arcface_torch's {args.config.name} (tools/from_arcface_config.py), over its "
              "configs/base.py.", *(f"# {line}" for line in skipped + comments)]
    text = "\n".join(header) + "\n" + yaml.safe_dump(tree, sort_keys=False)
    args.out.write_text(text, encoding="utf-8")
    load_config(args.out)  # what was written is a valid config of the project
    print(f"wrote {args.out}: {sum(len(keys) for keys in tree.values())} keys, "
          f"{len(skipped) + len(comments)} comments")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", type=Path, help="an arcface_torch config file (configs/NAME.py)")
    parser.add_argument("--out", type=Path, required=True, help="the YAML to write")
    parser.add_argument("--world-size", type=int, default=8,
                        help="GPUs the recipe trains on, to count warmup steps (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.world_size < 1:
        parser.error("--world-size must be positive")
    return run_cli(lambda: convert(args), also=(SyntaxError,))


if __name__ == "__main__":
    sys.exit(main())
