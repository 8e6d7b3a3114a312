"""Typed configuration tree: dataclasses loaded from YAML with ``--set`` overrides.

Every component receives only its own section (``DataConfig`` to the loader,
``HeadConfig`` to the head, ...). Loading is strict: unknown keys and values of
the wrong type are errors that name the file, the key and the expected type.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import yaml


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``5e-4`` is a number (PyYAML's YAML 1.1 rules read it as a string)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _parse_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


@dataclass
class DataConfig:
    backend: str = "auto"
    """``dali`` (DALI decode, on the GPU when training runs on one), ``torch`` (decode in DataLoader workers),
    ``synthetic`` (rendered identities) or ``auto`` (``dali`` with DALI on a GPU, else ``torch``)."""
    root: str = ""
    """Directory holding ``train.rec``, ``train.idx`` and ``property``."""
    num_classes: int = 0
    """0: read from the ``property`` file (or the synthetic identity count)."""
    image_size: int = 112
    batch_size: int = 128
    """Images per rank per step."""
    num_workers: int = 2
    """DataLoader worker processes (``torch``), or DALI CPU threads (``dali``)."""
    flip: bool = True
    augment: bool = False
    """The peer's augmentations: random downscale-upscale, blur, hue/saturation jitter, greyscale."""
    on_bad_record: str = "error"
    """``error``: stop at a bad record; ``skip``: leave it out of its batch, log and count it."""
    synthetic_images_per_class: int = 20


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = 512
    channels_last: bool = False


@dataclass
class HeadConfig:
    type: str = "sface"
    """``sface``, or a margin baseline: ``arcface``, ``cosface``, ``combined``, ``softmax``."""
    s: float = 64.0
    k: float = 80.0
    a: float = 0.80
    b: float = 1.23
    margin: list[float] = field(default_factory=list)
    """Margin heads: (m1, m2, m3) of cos(m1·θ + m2) - m3; empty takes the type's default."""
    margin_grad: str = "cos"
    """Margin heads: ``cos`` (the target logit's gradient is that of s·cos θ, as insightface applies its margin;
    trains) or ``exact`` (the derivative of the margined logit, which vanishes near θ = π - m2)."""
    impl: str = "auto"
    """SFace: ``dense`` (reference), ``chunked`` (O(B x chunk) memory), ``triton`` (fused GPU kernels) or
    ``auto`` (``triton`` on CUDA with Triton installed, else ``chunked``)."""
    chunk_size: int = 0
    """Classes per chunk for ``chunked``; 0 picks one from a memory budget."""
    skip_threshold: float = 0.0
    """``triton``: skip the gradient matmuls of tiles whose inter weights are all <= this; 0: exact."""
    precision: str = "fp32"
    """Operand type of the head's matmuls: ``fp32``, ``tf32``, ``bf16`` or ``fp16`` (fp32 accumulation)."""
    sample_rate: float = 1.0
    """Partial FC: fraction of each shard's classes scored per step (positives always); 0: positives only."""
    sample_correction: str = "auto"
    """Partial FC: weight of a sampled negative, kept with probability q: ``none`` (1), ``inverse_rate`` (1/q: unbiased
    loss), ``inverse_rate_centres`` / ``inverse_rate_embeddings`` (1/q on that side's gradient only), ``auto`` (what
    learns best with the head type: ``inverse_rate_centres`` for SFace, ``none`` for the margin heads)."""
    sample_update: str = "rows"
    """Partial FC: the head optimizer updates the sampled ``rows`` only, or the whole ``shard`` (insightface's
    PartialFC_V2: unsampled rows still decay and move with their momentum)."""
    init: str = "xavier"
    """``xavier`` (official SFace: xavier normal, gain 2, fan-out) or ``normal`` (std 0.01)."""
    check_inputs: bool = False
    """Debug: check labels and embeddings every step (costs a host sync)."""


@dataclass
class OptimConfig:
    lr: float = 0.1
    """Peak learning rate (reached at the end of warmup)."""
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_steps: int = 0
    poly_power: float = 2.0
    """Decay after warmup: lr * (1 - progress) ** poly_power."""
    grad_clip: float = 5.0
    """Max L2 norm of the backbone gradient; 0 disables clipping."""
    scale_lr_with_batch: bool = False
    """Multiply ``lr`` by (global batch / 512), so a run keeps its schedule at another world size."""


@dataclass
class TrainConfig:
    output: str = "runs/default"
    epochs: int = 20
    steps: int = 0
    """Total optimizer steps; 0 means ``epochs`` passes over the data."""
    seed: int = 0
    amp: str = "none"
    """``none``, ``bf16`` or ``fp16`` autocast for the backbone."""
    log_every: int = 50
    checkpoint_every: int = 2000
    keep_checkpoints: int = 2
    """Checkpoints kept (>= 1); the one just written and the one ``latest`` names are never deleted."""
    resume: bool = True
    """Continue from ``OUTPUT/checkpoints/latest``; false refuses a folder that already holds checkpoints."""
    overwrite: bool = False
    """Start over, whatever ``resume`` says: an earlier run's checkpoints move into ``OUTPUT/replaced-<time>/``."""


@dataclass
class EvalConfig:
    bins: list[str] = field(default_factory=list)
    """Verification packs (insightface ``.bin``); results are named by file stem, which must be unique."""
    every: int = 2000
    batch_size: int = 128
    flip: bool = True
    """Flip test: embed each image and its mirror and sum the two (insightface's protocol)."""
    shared: bool = True
    """Every rank embeds 1/world_size of each pack; false: rank 0 embeds it alone while the others wait."""
    keep_best: bool = True
    """Write the best backbone per pack to ``OUTPUT/best/<pack>/`` (loadable by the eval and export tools)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


_CHOICES: dict[str, tuple[str, ...]] = {
    "data.backend": ("auto", "dali", "torch", "synthetic"),
    "data.on_bad_record": ("error", "skip"),
    "head.type": ("sface", "arcface", "cosface", "combined", "softmax"),
    "head.impl": ("auto", "dense", "chunked", "triton"),
    "head.margin_grad": ("cos", "exact"),
    "head.precision": ("fp32", "tf32", "bf16", "fp16"),
    "head.init": ("xavier", "normal"),
    "head.sample_correction": ("auto", "none", "inverse_rate", "inverse_rate_centres", "inverse_rate_embeddings"),
    "head.sample_update": ("rows", "shard"),
    "train.amp": ("none", "bf16", "fp16"),
}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {tp}, got {type(value).__name__} {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        return [_coerce(item, item_type, f"{where}[{i}]") for i, item in enumerate(value)]
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where}: expected null, got {value!r}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{where}: expected int, got bool {value!r}")
    if not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, values: Any, source: str, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"{source}: '{prefix or 'top level'}' must be a mapping, got {type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{dotted}' (known: {', '.join(sorted(known))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, source, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, f"{source}: {dotted}")
    return cls(**kwargs)


def _apply_override(tree: dict[str, Any], override: str) -> None:
    """Apply one ``section.key=value`` override to the raw mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"--set {override!r}: expected section.key=value")
    dotted, raw = override.split("=", 1)
    parts = dotted.strip().split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {override!r}: '{part}' is not a section")
    node[parts[-1]] = _parse_yaml(raw) if raw.strip() else ""


def validate(cfg: Config, source: str = "config") -> None:
    """Value checks beyond types: choices and ranges."""
    for dotted, choices in _CHOICES.items():
        section, key = dotted.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(f"{source}: {dotted}: expected one of {', '.join(choices)}, got {value!r}")
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.image_size": cfg.data.image_size,
        "model.embedding_size": cfg.model.embedding_size,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "eval.every": cfg.eval.every,
        "eval.batch_size": cfg.eval.batch_size,
        "optim.lr": cfg.optim.lr,
        "head.s": cfg.head.s,
        "head.k": cfg.head.k,
    }
    for dotted, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{source}: {dotted}: must be > 0, got {value}")
    non_negative = {
        "data.num_classes": cfg.data.num_classes,
        "data.num_workers": cfg.data.num_workers,
        "head.chunk_size": cfg.head.chunk_size,
        "head.skip_threshold": cfg.head.skip_threshold,
        "train.steps": cfg.train.steps,
        "train.epochs": cfg.train.epochs,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.poly_power": cfg.optim.poly_power,
    }
    for dotted, value in non_negative.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{source}: {dotted}: must be >= 0, got {value}")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"{source}: optim.momentum: must be in [0, 1), got {cfg.optim.momentum}")
    for dotted, value in (("head.a", cfg.head.a), ("head.b", cfg.head.b)):
        if not math.isfinite(value):
            raise ConfigError(f"{source}: {dotted}: must be finite, got {value}")
    if any(not math.isfinite(m) for m in cfg.head.margin):
        raise ConfigError(f"{source}: head.margin: must be finite, got {cfg.head.margin}")
    if not 0.0 <= cfg.head.sample_rate <= 1.0:
        raise ConfigError(f"{source}: head.sample_rate: must be in [0, 1], got {cfg.head.sample_rate}")
    if cfg.head.margin and len(cfg.head.margin) != 3:
        raise ConfigError(f"{source}: head.margin: expected [m1, m2, m3], got {cfg.head.margin}")
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError(f"{source}: train.steps and train.epochs are both 0: nothing to train")
    if cfg.data.backend != "synthetic" and not cfg.data.root:
        raise ConfigError(f"{source}: data.root: required for data.backend={cfg.data.backend}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    source = str(path) if path is not None else "defaults"
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            tree = _parse_yaml(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
    for override in overrides:
        _apply_override(tree, override)
    cfg = _build(Config, tree, source, "")
    validate(cfg, source)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal ``Config``)."""
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
