"""Typed configuration tree: dataclasses loaded from YAML with ``--set`` overrides.

Every component receives only its own section (``DataConfig`` to the loader,
``HeadConfig`` to the head, ...). Loading is strict: unknown keys, values of the
wrong type and values outside a field's ``Literal`` choices are errors that name
the file, the key and what was expected. Each choice is declared once, as a
``Literal`` alias here; code elsewhere derives its values with ``choices``.
Every field's docstring is its entry in docs/configuration.md
(``python -m sface_dist.config_reference`` writes it).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from sface_dist.atomic_write import atomic_write_text


class ConfigError(ValueError):
    """A configuration file or override that cannot be used as written."""


MAX_CONFIG_BYTES = 1 << 20
"""A config file larger than this is refused unread (the shipped configs are under 2 KB)."""
MAX_CONFIG_VALUES = 100_000
"""Values a config may hold with its aliases expanded: a few hundred bytes of aliases nested in aliases ("billion
laughs") would otherwise ask for gigabytes."""


class _Loader(yaml.SafeLoader):
    """YAML 1.2 floats: ``5e-4`` is a number (PyYAML's YAML 1.1 rules read it as a string); a key repeated in a
    mapping is an error (PyYAML keeps the last value silently)."""

    where = "config"

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, typing.Hashable) and key in seen:
                raise ConfigError(f"{self.where}: line {key_node.start_mark.line + 1}: duplicate key {key!r} (the "
                                  "later value would silently replace the earlier)")
            if isinstance(key, typing.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


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


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A PyYAML error on one line: where, and what."""
    if isinstance(error, yaml.MarkedYAMLError) and error.problem_mark is not None:
        mark = error.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {error.problem}"
    return str(error).splitlines()[0] if str(error) else type(error).__name__


def _check_size(root: yaml.Node, where: str) -> None:
    """Refuse a document of more than ``MAX_CONFIG_VALUES`` values with its aliases expanded (cycles included),
    counted on the parsed nodes before any value is built."""
    count, stack = 0, [root]
    while stack:
        node = stack.pop()
        count += 1
        if count > MAX_CONFIG_VALUES:
            raise ConfigError(f"{where}: more than {MAX_CONFIG_VALUES} values once its aliases are expanded: refused")
        if isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, yaml.MappingNode):
            stack.extend(item for pair in node.value for item in pair)


def _parse_yaml(text: str, where: str) -> Any:
    """``text`` (from ``where``: a file, or ``--set KEY=VALUE``) as safe YAML with the rules of ``_Loader``, bounded
    by ``MAX_CONFIG_VALUES``; every problem is one ``ConfigError`` line naming ``where``."""
    loader = _Loader(text)
    loader.where = where
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_size(node, where)
        return loader.construct_document(node)
    except RecursionError:
        raise ConfigError(f"{where}: nested too deeply to be a config") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(error)}") from None
    finally:
        loader.dispose()


Backend = Literal["auto", "dali", "torch", "synthetic"]
BadRecordPolicy = Literal["error", "skip"]
MarginHeadType = Literal["arcface", "cosface", "combined", "softmax"]
HeadType = Literal["sface", MarginHeadType]
SFaceImpl = Literal["dense", "chunked", "triton"]
SFaceImplOrAuto = Literal["auto", SFaceImpl]
CleanRule = Literal["outlier", "finder"]
MarginGrad = Literal["cos", "exact"]
Precision = Literal["fp32", "tf32", "bf16", "fp16"]
HeadInit = Literal["xavier", "normal"]
SampleCorrection = Literal["none", "inverse_rate", "inverse_rate_centres", "inverse_rate_embeddings"]
SampleCorrectionOrAuto = Literal["auto", SampleCorrection]
SampleUpdate = Literal["rows", "shard"]
Amp = Literal["none", "bf16", "fp16"]
OptimizerName = Literal["sgd", "adamw"]
LrSchedule = Literal["poly", "cosine", "step"]
MilestoneUnit = Literal["steps", "epochs"]
OnNonFinite = Literal["stop", "skip"]
GradComm = Literal["fp32", "bf16"]
Engine = Literal["ddp", "deepspeed"]


def choices(literal: Any) -> tuple[str, ...]:
    """The values a ``Literal`` alias allows, in declaration order (nested Literals are flattened)."""
    return typing.get_args(literal)


def check_choice(value: object, literal: Any, where: str, error: type[ValueError] = ValueError) -> None:
    """Raise ``error`` naming ``where``, the allowed values and ``value`` unless ``literal`` allows ``value``."""
    allowed = choices(literal)
    if value not in allowed:
        raise error(f"{where}: expected one of {', '.join(allowed)}, got {value!r}")


@dataclass
class DataConfig:
    """``data``: where the training images come from and how they are batched (docs/data.md)."""

    backend: Backend = "auto"
    """``dali`` (DALI decode, on the GPU when training runs on one), ``torch`` (decode in DataLoader workers),
    ``synthetic`` (rendered identities) or ``auto`` (``dali`` with DALI on a GPU, else ``torch``); docs/data.md."""
    root: str = ""
    """Folder holding ``train.rec``, ``train.idx`` and ``property`` (or the ``.rec`` itself); required except for
    ``synthetic``."""
    num_classes: int = 0
    """0: read from the ``property`` file (or the synthetic identity count); a value that disagrees with the data
    is an error."""
    image_size: int = 112
    """Side of the aligned square crop, in pixels."""
    batch_size: int = 128
    """Images per rank per step."""
    num_workers: int = 2
    """DataLoader worker processes per rank (``torch``), or DALI CPU threads (``dali``)."""
    flip: bool = True
    """Random horizontal flip."""
    augment: bool = False
    """The peer's augmentations: random downscale-upscale, blur, hue/saturation jitter, greyscale."""
    on_bad_record: BadRecordPolicy = "error"
    """``error``: stop at a bad record, naming file, key and offset; ``skip``: leave it out of its batch, log and
    count it."""
    synthetic_images_per_class: int = 20
    """Images per identity in an epoch of the ``synthetic`` backend."""


@dataclass
class ModelConfig:
    """``model``: the backbone that turns an aligned face into an embedding."""

    backbone: str = "iresnet50"
    """``iresnet18``, ``iresnet34``, ``iresnet50``, ``iresnet100``, ``iresnet200``, ``mobilefacenet``, ``tiny``, or
    insightface's Vision Transformers ``vit_t``, ``vit_s``, ``vit_b``, ``vit_l`` (docs/design.md, Backbones)."""
    embedding_size: int = 512
    """Length of the embedding."""
    channels_last: bool = False
    """Channels-last memory format (faster convolutions on GPU)."""
    compile: bool = False
    """``torch.compile`` the backbone (inductor) before the DDP wrap: fused kernels, at the price of a compilation of
    a minute or more at the first step."""


@dataclass
class HeadConfig:
    """``head``: the class-sharded classifier and its loss (docs/heads.md)."""

    type: HeadType = "sface"
    """``sface``, or a margin baseline: ``arcface``, ``cosface``, ``combined``, ``softmax`` (docs/heads.md)."""
    s: float = 64.0
    """Scale of the logits: SFace's s (docs/design.md), also the margin heads' scale."""
    k: float = 80.0
    """SFace: steepness of the intra- and inter-class weight sigmoids (docs/design.md)."""
    a: float = 0.80
    """SFace: angle θ (radians) where the intra-class weight r_intra is 1/2 (docs/design.md)."""
    b: float = 1.23
    """SFace: angle θ (radians) where the inter-class weight r_inter is 1/2 (docs/design.md)."""
    margin: list[float] = field(default_factory=list)
    """Margin heads: [m1, m2, m3] of cos(m1·θ + m2) - m3; empty takes the type's default."""
    margin_grad: MarginGrad = "cos"
    """Margin heads: ``cos`` (the target logit's gradient is that of s·cos θ, as arcface_torch applies its margin;
    trains) or ``exact`` (the derivative of the margined logit, which vanishes near θ = π - m2; docs/heads.md)."""
    impl: SFaceImplOrAuto = "auto"
    """SFace: ``dense`` (reference), ``chunked`` (O(B x chunk) memory), ``triton`` (fused GPU kernels) or
    ``auto`` (``triton`` on CUDA with Triton installed, else ``chunked``)."""
    chunk_size: int = 0
    """Classes per chunk for ``chunked``; 0 sizes it from a 64 MiB budget."""
    skip_threshold: float = 0.0
    """``triton``: skip the gradient matmuls of tiles whose inter weights are all <= this; 0: exact
    (docs/kernels.md)."""
    precision: Precision = "fp32"
    """Operand type of the head's matmuls: ``fp32``, ``tf32``, ``bf16`` or ``fp16`` (fp32 accumulation; errors in
    docs/heads.md)."""
    sample_rate: float = 1.0
    """Partial FC: fraction of each shard's classes scored per step (positives always); 0: positives only."""
    sample_correction: SampleCorrectionOrAuto = "auto"
    """Partial FC: weight of a sampled negative, kept with probability q: ``none`` (1, insightface's),
    ``inverse_rate`` (1/q: unbiased loss, learns slowly), ``inverse_rate_centres`` / ``inverse_rate_embeddings``
    (1/q on the class centres' / the embeddings' gradient only), ``auto`` (what learns best with the head type:
    ``inverse_rate_centres`` for SFace, ``none`` for the margin heads; docs/heads.md)."""
    sample_update: SampleUpdate = "rows"
    """Partial FC: the head optimizer updates the sampled ``rows`` only, or the whole ``shard`` (insightface's
    PartialFC_V2: unsampled rows still decay and move with their momentum)."""
    sub_centers: int = 1
    """Centres per class, K: a class's cosine is the largest over its K (sub-center ArcFace is ``type: arcface``
    with 3), so a class's noisy images can gather at a centre of their own (docs/heads.md, Sub-centres). The K
    centres of a class live on the rank that owns it; ``head.impl: auto`` is ``chunked`` with K > 1."""
    sub_center_drop_epoch: int = 0
    """With sub-centres: after this epoch (counted from 1) keep each class's dominant centre (the one most of its
    images are nearest), leave out of later epochs the images farther than ``sub_center_drop_degrees`` from it,
    and train on with one centre a class (sub-center ArcFace's drop step); 0 never drops. Needs ``train.steps``."""
    sub_center_drop_degrees: float = 75.0
    """The drop step's angle: an image farther than this from its class's dominant centre is left out."""
    init: HeadInit = "xavier"
    """``xavier`` (official SFace init: normal, std 2·sqrt(2/num_classes)) or ``normal`` (std 0.01)."""
    check_inputs: bool = False
    """Debug: check labels and embeddings every step (costs a host sync)."""


@dataclass
class OptimConfig:
    """``optim``: the backbone and head optimizers and the learning-rate schedule (docs/training.md, The loop)."""

    name: OptimizerName = "sgd"
    """Optimizer of the backbone and of the head shards: ``sgd`` (with ``momentum``) or ``adamw`` (with ``betas``
    and ``eps``; decoupled weight decay)."""
    lr: float = 0.1
    """Peak learning rate (reached at the end of warmup)."""
    momentum: float = 0.9
    """SGD momentum, in [0, 1)."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """AdamW: [beta1, beta2], each in [0, 1)."""
    eps: float = 1e-8
    """AdamW: term added to the denominator."""
    weight_decay: float = 5e-4
    """Weight decay (SGD: added to the gradient; AdamW: decoupled)."""
    no_decay_bn_bias: bool = False
    """Exclude the backbone's normalisation weights and biases from weight decay (false: decay every
    parameter)."""
    head_lr_scale: float = 1.0
    """The head shards' learning rate is the backbone's times this, through warmup and schedule."""
    warmup_steps: int = 0
    """Steps of linear warmup from 0 to ``lr``; counted in steps of the run's first global batch, like
    ``train.steps``."""
    schedule: LrSchedule = "poly"
    """Decay after warmup: ``poly`` (lr·(1 - progress)^poly_power, 0 at the last step), ``cosine``
    (lr·(1 + cos(π·progress))/2, 0 at the last step) or ``step`` (lr·decay_factor^(milestones passed))."""
    poly_power: float = 2.0
    """``poly``: the exponent of the decay."""
    milestones: list[float] = field(default_factory=list)
    """``step``: where the learning rate is multiplied by ``decay_factor``, increasing, in ``milestone_unit``."""
    milestone_unit: MilestoneUnit = "steps"
    """``step``: ``milestones`` are in ``steps`` (of the run's first global batch, like ``train.steps``) or in
    ``epochs`` (fractions allowed)."""
    decay_factor: float = 0.1
    """``step``: factor applied at each milestone, in (0, 1]."""
    grad_clip: float = 5.0
    """Max L2 norm of the backbone gradient; 0 disables clipping."""
    scale_lr_with_batch: bool = False
    """Multiply ``lr`` by (global batch / 512), so a run keeps its schedule at another world size. The global batch
    is that of an optimizer step (``train.grad_accum`` micro-batches)."""


@dataclass
class TrainConfig:
    """``train``: the run's length, folder, logging and checkpoints (docs/checkpoints.md)."""

    output: str = "runs/default"
    """Run directory (``OUTPUT``): ``checkpoints/``, ``tensorboard/`` and the resolved ``config.yaml``."""
    epochs: int = 20
    """Passes over the data, when ``steps`` is 0."""
    steps: int = 0
    """Total optimizer steps; 0 means ``epochs`` passes over the data. Steps are those of the global batch the
    run started with, so a run resumed on another number of ranks trains on the same number of samples."""
    grad_accum: int = 1
    """Micro-batches per optimizer step: the gradient of one step on a global batch ``grad_accum`` times larger.
    ``steps``, ``log_every``, ``checkpoint_every`` and ``eval.every`` count optimizer steps."""
    on_nonfinite: OnNonFinite = "stop"
    """A non-finite loss or gradient: ``stop`` at the next log step at the latest (no host read per step; the last
    good checkpoint stays the latest), or ``skip`` the step, weights untouched (one host read per step)."""
    max_nonfinite: int = 10
    """``skip``: stop after this many non-finite steps in a row."""
    seed: int = 0
    """Seeds the data order, the flips and the initialisation."""
    amp: Amp = "none"
    """``none``, or ``bf16`` / ``fp16`` autocast for the backbone (``fp16`` with dynamic loss scaling; ``bf16``
    needs none)."""
    grad_comm: GradComm = "fp32"
    """Precision of the backbone gradients' all-reduce across ranks: ``fp32``, or ``bf16`` (half the bytes; each
    rank's bucket is rounded to bf16 before the sum, the sum is cast back to fp32; docs/design.md, Sharding)."""
    engine: Engine = "ddp"
    """What runs the backbone data-parallel: ``ddp`` (PyTorch DDP), or ``deepspeed`` (ZeRO, the ``deepspeed``
    section; docs/multinode.md, DeepSpeed ZeRO). Gradients are summed across ranks with either."""
    log_every: int = 50
    """Console and TensorBoard every N steps."""
    checkpoint_every: int = 2000
    """A checkpoint every N steps, plus one at the end."""
    keep_checkpoints: int = 2
    """Checkpoints kept (>= 1); the one just written and the one ``latest`` names are never deleted."""
    resume: bool = True
    """Continue from ``OUTPUT/checkpoints/latest`` when it exists; false refuses a folder that already holds
    checkpoints."""
    overwrite: bool = False
    """Start over, whatever ``resume`` says: an earlier run's ``checkpoints/``, ``best/``, ``tensorboard/``,
    ``config.yaml`` and ``history.jsonl`` move into ``OUTPUT/replaced-<time>/``."""
    accept_changes: list[str] = field(default_factory=list)
    """Keys that define the run (data, model, loss, seed: docs/checkpoints.md, One run per folder) allowed to
    differ from the checkpoint's config on this resume, e.g. ``[data.root]`` after moving the dataset. Without
    it such a change is refused; every change is printed and recorded in ``OUTPUT/history.jsonl``."""
    init_backbone: str = ""
    """A new run's backbone weights: a checkpoint (any path the evaluation tools take) or insightface's saved
    backbone (``model.pt``, ``backbone.pth``); its architecture and embedding size must be ``model``'s. The head
    starts fresh. A resume takes the weights from its checkpoint instead (docs/training.md, Fine-tuning)."""
    freeze_backbone_steps: int = 0
    """Optimizer steps at the start of the run that train the head alone (the backbone's weights stay; its batch
    norms still track the new data), so that a fresh head warms up on a pretrained backbone. ``train.engine: ddp``
    only."""
    profile: list[int] = field(default_factory=list)
    """``[first, last]``: trace optimizer steps first to last with ``torch.profiler`` (CPU operators, and CUDA
    kernels on a GPU), written per rank to ``OUTPUT/profile/`` for Perfetto or TensorBoard (docs/training.md,
    Profiling); ``[]`` traces nothing."""
    collective_timeout_minutes: float = 10.0
    """How long a rank waits in a collective for a peer before the run stops with one line naming the
    collective (a peer that hung or died). Longer than any pause that keeps ranks apart: an evaluation with
    ``eval.shared: false``, a checkpoint write (docs/reliability.md, Hung peers). Fractions are allowed."""


@dataclass
class DeepSpeedConfig:
    """``deepspeed``: the backbone's ZeRO settings under ``train.engine: deepspeed`` (docs/multinode.md, DeepSpeed
    ZeRO). The head stays outside DeepSpeed, sharded by class with its own optimizer."""

    stage: int = 1
    """ZeRO stage: ``1`` partitions the backbone optimizer's state across ranks, ``2`` its gradients too."""
    bucket_size: int = 50_000_000
    """Elements per reduce and all-gather bucket."""
    overlap_comm: bool = False
    """Overlap the gradient reduction with the backward pass (more memory for the buckets)."""


@dataclass
class EvalConfig:
    """``eval``: verification on held-out packs during training (docs/evaluation.md)."""

    bins: list[str] = field(default_factory=list)
    """Verification packs (insightface ``.bin``); results are named by file stem, which must be unique."""
    every: int = 2000
    """Evaluate every N steps, plus once at the end."""
    batch_size: int = 128
    """Images per forward pass while embedding a pack."""
    flip: bool = True
    """Flip test: embed each image and its mirror and sum the two (insightface's protocol)."""
    shared: bool = True
    """Every rank embeds 1/world_size of each pack (faster); false: rank 0 embeds it alone while the others
    wait."""
    keep_best: bool = True
    """Write the best backbone per pack to ``OUTPUT/best/<pack>/`` (loadable by the eval and export tools)."""


@dataclass
class CleanConfig:
    """``clean``: find the mislabelled images inside the run and train on without them (docs/noise.md)."""

    at_epochs: list[int] = field(default_factory=list)
    """After which epochs (counted from 1) to score every training image (``clean.rule``) and leave the suspects
    out of every later epoch; [] never cleans. Needs ``train.steps`` (cleaning keeps the step
    budget)."""
    rule: CleanRule | list[CleanRule] = "outlier"
    """Which images are suspects: one rule for every cleaning, or one per ``at_epochs`` entry (``[outlier,
    finder]``). ``outlier``: those whose cosine to the mean of their identity's other kept images lies more than
    ``clean.mads`` median absolute deviations below the median over the kept images (holds early in a run).
    ``finder``: ``tools/find_noisy_labels.py``'s rule, meant for a trained model: another class's centre nearer
    than the own one, or an identity cosine below ``clean.threshold``."""
    mads: float = 3.0
    """``outlier``: how many median absolute deviations below the median."""
    threshold: float = 0.5
    """``finder``: the identity-cosine threshold."""
    flip: bool = True
    """Embed each image and its mirror (the finder's default)."""
    batch_size: int = 256
    """Images per forward pass while scoring."""
    corrupted: str = ""
    """A ``corrupted.json`` manifest of the planted noise (``tools/noise_study.py``'s): the console and TensorBoard
    then report the precision and recall of each cleaning."""

    def rule_after(self, epoch: int) -> CleanRule:
        """The rule of the cleaning after ``epoch`` (one of ``at_epochs``)."""
        return self.rule if isinstance(self.rule, str) else self.rule[self.at_epochs.index(epoch)]


@dataclass
class Config:
    """A whole run: one section per component."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    head: HeadConfig = field(default_factory=HeadConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    clean: CleanConfig = field(default_factory=CleanConfig)


MAX_EMBEDDING_SIZE = 65536
"""The largest ``model.embedding_size`` accepted (face models use 128-512): a larger one is a typo whose backbone
would ask for terabytes."""

RUN_DEFINING_KEYS = (
    "data.root", "data.image_size", "data.flip", "data.augment", "data.synthetic_images_per_class",
    "model.backbone", "model.embedding_size",
    "head.type", "head.s", "head.k", "head.a", "head.b", "head.margin", "head.margin_grad", "head.sample_rate",
    "head.sample_correction", "head.sample_update", "head.init", "head.sub_centers", "head.sub_center_drop_epoch",
    "head.sub_center_drop_degrees",
    "optim.name",
    "train.seed", "train.init_backbone", "train.freeze_backbone_steps",
    "clean.at_epochs", "clean.rule", "clean.mads", "clean.threshold", "clean.flip",
)
"""The keys that make a run what it is: its data, model, loss and seed (and the optimizer whose state the
checkpoint holds). A resume that changes one would be another run; it is refused unless ``train.accept_changes``
names the key. So is a change of ``data.backend`` to or from ``synthetic`` (other data)."""

STATE_SHAPING_KEYS = ("model.backbone", "model.embedding_size", "optim.name", "head.sub_centers")
"""Run-defining keys whose change no resume can accept: the checkpoint's tensors would not fit."""

NOT_COMPARED_ON_RESUME = ("data.num_classes", "train.output", "train.resume", "train.overwrite",
                          "train.accept_changes", "train.profile")
"""Keys a resume does not compare: the class count is checked resolved (the head's), the rest say where and how
to start, not what the run is."""


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"section.key": value}`` of a config mapping (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@dataclass(frozen=True)
class ConfigChange:
    """A key whose value differs between a checkpoint's config and this run's."""

    key: str
    saved: Any
    current: Any

    @property
    def defines_the_run(self) -> bool:
        if self.key == "data.backend":
            return "synthetic" in (self.saved, self.current)
        return self.key in RUN_DEFINING_KEYS

    @property
    def acceptable(self) -> bool:
        """Whether ``train.accept_changes`` may accept it (a run-defining key whose state still fits)."""
        return self.key not in STATE_SHAPING_KEYS

    def __str__(self) -> str:
        return f"{self.key}: {self.saved!r} -> {self.current!r}"

    def describe(self) -> str:
        return f"{self.key} is {self.saved!r} in the checkpoint and {self.current!r} in the config"


def config_changes(saved: dict[str, Any], current: dict[str, Any]) -> list[ConfigChange]:
    """The keys whose values differ between a checkpoint's resolved config and this run's, in config order.

    A key the checkpoint's config does not hold (written before the key existed) is not compared.
    """
    before, after = flatten(saved), flatten(current)
    return [
        ConfigChange(key, before[key], value)
        for key, value in after.items()
        if key in before and key not in NOT_COMPARED_ON_RESUME and before[key] != value
    ]


def _type_name(tp: Any) -> str:
    """``tp`` in words: a class's name, a ``Literal``'s choices, a list's items, a union's options."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(choice) for choice in choices(tp))
    if origin is list:
        return f"a list of ({_type_name(typing.get_args(tp)[0])})"
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(option) for option in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``: its type, or its choices for a ``Literal``; ints are
    accepted where floats are expected."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    if origin is Literal:
        kind = type(choices(tp)[0])
        if not isinstance(value, kind):
            raise ConfigError(f"{where}: expected {kind.__name__}, got {type(value).__name__} {value!r}")
        check_choice(value, tp, where, ConfigError)
        return value
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


class Origins:
    """Where each key's value came from, for messages: an override on the command line (named as written), or the
    config file (``source``: its path, or ``defaults``)."""

    def __init__(self, source: str, overrides: Sequence[str] = ()) -> None:
        self.source = source
        self.overrides = {override.split("=", 1)[0].strip(): override for override in overrides}

    def _override(self, dotted: str) -> str | None:
        """The last override that sets ``dotted`` or a key inside it."""
        found = [text for key, text in self.overrides.items() if key == dotted or key.startswith(f"{dotted}.")]
        return found[-1] if found else None

    def place(self, dotted: str) -> str:
        """Where ``dotted`` was written: ``--set KEY=VALUE`` or the file."""
        override = self._override(dotted)
        return self.source if override is None else f"--set {override}"

    def key(self, dotted: str) -> str:
        """The prefix of a message about ``dotted``'s value: ``--set KEY=VALUE`` or ``FILE: KEY``."""
        override = self._override(dotted)
        return f"{self.source}: {dotted}" if override is None else f"--set {override}"


def _build(cls: type, values: Any, origins: Origins, prefix: str) -> Any:
    """Instantiate dataclass ``cls`` from a mapping, rejecting unknown keys."""
    if not isinstance(values, dict):
        where = origins.place(prefix.rstrip(".")) if prefix else origins.source
        raise ConfigError(f"{where}: '{prefix.rstrip('.') or 'top level'}' must be a mapping, got "
                          f"{type(values).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
        dotted = f"{prefix}{key}"
        if key not in known:
            raise ConfigError(f"{origins.place(dotted)}: unknown key '{dotted}' (known: {', '.join(sorted(known))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, origins, f"{dotted}.")
        else:
            kwargs[key] = _coerce(value, tp, origins.key(dotted))
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
    node[parts[-1]] = _parse_yaml(raw, f"--set {override}") if raw.strip() else ""


def validate(cfg: Config, origins: Origins | None = None) -> None:
    """Value checks beyond types and choices: ranges and combinations, each error naming where the key was set."""
    at = (origins or Origins("config")).key
    positive = {
        "data.batch_size": cfg.data.batch_size,
        "data.image_size": cfg.data.image_size,
        "model.embedding_size": cfg.model.embedding_size,
        "train.log_every": cfg.train.log_every,
        "train.checkpoint_every": cfg.train.checkpoint_every,
        "train.keep_checkpoints": cfg.train.keep_checkpoints,
        "train.grad_accum": cfg.train.grad_accum,
        "train.max_nonfinite": cfg.train.max_nonfinite,
        "train.collective_timeout_minutes": cfg.train.collective_timeout_minutes,
        "optim.head_lr_scale": cfg.optim.head_lr_scale,
        "optim.eps": cfg.optim.eps,
        "eval.every": cfg.eval.every,
        "eval.batch_size": cfg.eval.batch_size,
        "optim.lr": cfg.optim.lr,
        "head.s": cfg.head.s,
        "head.k": cfg.head.k,
    }
    for dotted, value in positive.items():
        if not (math.isfinite(value) and value > 0):
            raise ConfigError(f"{at(dotted)}: must be > 0, got {value}")
    if cfg.model.embedding_size > MAX_EMBEDDING_SIZE:
        raise ConfigError(f"{at('model.embedding_size')}: {cfg.model.embedding_size} is beyond any face embedding "
                          f"(at most {MAX_EMBEDDING_SIZE})")
    non_negative = {
        "data.num_classes": cfg.data.num_classes,
        "data.num_workers": cfg.data.num_workers,
        "head.chunk_size": cfg.head.chunk_size,
        "head.skip_threshold": cfg.head.skip_threshold,
        "train.steps": cfg.train.steps,
        "train.freeze_backbone_steps": cfg.train.freeze_backbone_steps,
        "train.epochs": cfg.train.epochs,
        "optim.warmup_steps": cfg.optim.warmup_steps,
        "optim.grad_clip": cfg.optim.grad_clip,
        "optim.weight_decay": cfg.optim.weight_decay,
        "optim.poly_power": cfg.optim.poly_power,
    }
    for dotted, value in non_negative.items():
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{at(dotted)}: must be >= 0, got {value}")
    if not 0.0 <= cfg.optim.momentum < 1.0:
        raise ConfigError(f"{at('optim.momentum')}: must be in [0, 1), got {cfg.optim.momentum}")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= beta < 1.0 for beta in cfg.optim.betas):
        raise ConfigError(f"{at('optim.betas')}: expected [beta1, beta2] in [0, 1), got {cfg.optim.betas}")
    if not 0.0 < cfg.optim.decay_factor <= 1.0:
        raise ConfigError(f"{at('optim.decay_factor')}: must be in (0, 1], got {cfg.optim.decay_factor}")
    milestones = cfg.optim.milestones
    if any(not (math.isfinite(m) and m > 0) for m in milestones) or milestones != sorted(set(milestones)):
        raise ConfigError(f"{at('optim.milestones')}: must be increasing and > 0, got {milestones}")
    if cfg.optim.schedule == "step" and not milestones:
        raise ConfigError(f"{at('optim.milestones')}: required by optim.schedule=step (where to decay), got []")
    for dotted, value in (("head.a", cfg.head.a), ("head.b", cfg.head.b)):
        if not math.isfinite(value):
            raise ConfigError(f"{at(dotted)}: must be finite, got {value}")
    if any(not math.isfinite(m) for m in cfg.head.margin):
        raise ConfigError(f"{at('head.margin')}: must be finite, got {cfg.head.margin}")
    if not 0.0 <= cfg.head.sample_rate <= 1.0:
        raise ConfigError(f"{at('head.sample_rate')}: must be in [0, 1], got {cfg.head.sample_rate}")
    if cfg.clean.at_epochs and cfg.train.steps == 0:
        raise ConfigError(f"{at('clean.at_epochs')}: needs train.steps > 0 (cleaning keeps the run's step budget; "
                          f"with train.epochs the epochs after it would be shorter)")
    if any(epoch < 1 for epoch in cfg.clean.at_epochs):
        raise ConfigError(f"{at('clean.at_epochs')}: epochs are counted from 1, got {cfg.clean.at_epochs}")
    if not -1.0 <= cfg.clean.threshold <= 1.0:
        raise ConfigError(f"{at('clean.threshold')}: a cosine in [-1, 1], got {cfg.clean.threshold}")
    if isinstance(cfg.clean.rule, list) and len(cfg.clean.rule) != len(cfg.clean.at_epochs):
        raise ConfigError(f"{at('clean.rule')}: one rule for every cleaning, or one per clean.at_epochs entry "
                          f"({len(cfg.clean.at_epochs)}), got {len(cfg.clean.rule)}: {cfg.clean.rule}")
    if not (math.isfinite(cfg.clean.mads) and cfg.clean.mads > 0):
        raise ConfigError(f"{at('clean.mads')}: a positive number of median absolute deviations, got {cfg.clean.mads}")
    if cfg.clean.batch_size < 1:
        raise ConfigError(f"{at('clean.batch_size')}: must be at least 1, got {cfg.clean.batch_size}")
    if cfg.head.sub_center_drop_epoch < 0:
        raise ConfigError(f"{at('head.sub_center_drop_epoch')}: an epoch counted from 1, or 0 (never), got "
                          f"{cfg.head.sub_center_drop_epoch}")
    if cfg.head.sub_center_drop_epoch and cfg.head.sub_centers < 2:
        raise ConfigError(f"{at('head.sub_center_drop_epoch')}: drops sub-centres, and head.sub_centers is "
                          f"{cfg.head.sub_centers}")
    if cfg.head.sub_center_drop_epoch and cfg.train.steps == 0:
        raise ConfigError(f"{at('head.sub_center_drop_epoch')}: needs train.steps > 0 (the drop keeps the run's step "
                          f"budget; with train.epochs the epochs after it would be shorter)")
    if not 0.0 < cfg.head.sub_center_drop_degrees <= 180.0:
        raise ConfigError(f"{at('head.sub_center_drop_degrees')}: an angle in (0, 180], got "
                          f"{cfg.head.sub_center_drop_degrees}")
    if cfg.head.sub_centers < 1:
        raise ConfigError(f"{at('head.sub_centers')}: must be at least 1, got {cfg.head.sub_centers}")
    if cfg.head.sub_centers > 1 and cfg.head.type == "sface" and cfg.head.impl == "triton":
        raise ConfigError(f"{at('head.sub_centers')}: {cfg.head.sub_centers} needs head.impl chunked, dense or auto "
                          f"(the fused kernels score one centre a class)")
    if cfg.head.margin and len(cfg.head.margin) != 3:
        raise ConfigError(f"{at('head.margin')}: expected [m1, m2, m3], got {cfg.head.margin}")
    if cfg.train.steps == 0 and cfg.train.epochs == 0:
        raise ConfigError(f"{at('train.steps')}: 0, and train.epochs is 0 too: nothing to train")
    if cfg.data.backend != "synthetic" and not cfg.data.root:
        raise ConfigError(f"{at('data.root')}: required for data.backend={cfg.data.backend}")
    known = set(flatten(to_dict(cfg)))
    for key in cfg.train.accept_changes:
        if key not in known:
            raise ConfigError(f"{at('train.accept_changes')}: unknown key {key!r} (expected section.key)")
        if key in STATE_SHAPING_KEYS:
            raise ConfigError(f"{at('train.accept_changes')}: {key} cannot change on resume (the checkpoint's "
                              "tensors would not fit): start a new run")
    profile = cfg.train.profile
    if profile and (len(profile) != 2 or not all(isinstance(step, int) for step in profile)
                    or not 1 <= profile[0] <= profile[1]):
        raise ConfigError(f"{at('train.profile')}: expected [first, last] optimizer steps, 1 <= first <= last, "
                          f"got {profile}")
    if cfg.train.freeze_backbone_steps and cfg.train.engine != "ddp":
        raise ConfigError(f"{at('train.freeze_backbone_steps')}: needs train.engine=ddp (DeepSpeed steps every "
                          "partition it holds)")
    if cfg.deepspeed.stage not in (1, 2):
        raise ConfigError(f"{at('deepspeed.stage')}: expected 1 or 2, got {cfg.deepspeed.stage}")
    if cfg.deepspeed.bucket_size <= 0:
        raise ConfigError(f"{at('deepspeed.bucket_size')}: must be > 0, got {cfg.deepspeed.bucket_size}")
    if cfg.train.engine == "deepspeed":
        _validate_deepspeed(cfg, at)


def _validate_deepspeed(cfg: Config, at: Callable[[str], str]) -> None:
    """``train.engine: deepspeed`` runs fp32 weights (``train.amp: bf16`` autocasts the forward) and reduces in
    fp32: fp16 needs the loss scaler, which stays with DDP, and ``train.grad_comm: bf16`` is DDP's hook."""
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"{at('train.engine')}: deepspeed is not installed (pip install -r requirements/deepspeed.txt)"
        )
    if cfg.train.amp == "fp16":
        raise ConfigError(f"{at('train.amp')}: fp16 is not supported with train.engine=deepspeed (use bf16)")
    if cfg.train.grad_comm != "fp32":
        raise ConfigError(f"{at('train.grad_comm')}: {cfg.train.grad_comm} is DDP's; train.engine=deepspeed "
                          "reduces in fp32")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a YAML config (or the defaults when ``path`` is None) and apply ``--set`` overrides."""
    source = str(path) if path is not None else "defaults"
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        if path.stat().st_size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {path.stat().st_size} bytes: larger than any config "
                              f"({MAX_CONFIG_BYTES} bytes at most): refused")
        tree = _parse_yaml(path.read_text(errors="replace"), str(path)) or {}
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (data, model, ...), got "
                              f"{type(tree).__name__}")
    for override in overrides:
        _apply_override(tree, override)
    origins = Origins(source, overrides)
    cfg = _build(Config, tree, origins, "")
    validate(cfg, origins)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config as YAML (it loads back to an equal ``Config``): to a file beside ``path``, renamed
    over it, so that a symbolic link at ``path`` is replaced rather than written through."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
