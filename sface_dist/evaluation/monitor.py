"""Verification during training: score the packs, log them, keep the best backbone per pack.

``VerificationMonitor.run(backbone, step)`` is called on every rank. With ``shared``
(the default) each rank decodes and embeds a contiguous ``1/world_size`` of every
pack and the view embeddings are all-gathered; otherwise rank 0 embeds everything
while the other ranks wait. Sharing halves each rank's work on two ranks and was
1.75x faster on two CPU ranks with a core each (``docs/evaluation.md``), and it
holds only a ``1/world_size`` share of the decoded images per rank. Rank 0 computes
the metrics and broadcasts them, so every rank returns the same report, including
which packs improved on their best accuracy.

The best backbone per pack is written (rank 0) to ``best_dir/<pack>/`` as
``checkpoint.save_best_backbone`` (weights, step, scores, the run's config): loadable by
``load_backbone``, ``tools/export_onnx.py`` and ``tools/eval_verification.py``.
A restarted run reads the previous bests from there, so resuming never forgets them.
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.tensorboard import SummaryWriter

from sface_dist.checkpoint import read_best_score, save_best_backbone
from sface_dist.console import say
from sface_dist.data.bin_pack import VerificationPack, read_bin
from sface_dist.evaluation.embedder import TorchEmbedder, embed_views
from sface_dist.evaluation.verification import VerificationResult, require_folds, verification_accuracy
from sface_dist.parallel.collectives import gather_rows
from sface_dist.parallel.launch import DistEnv
from sface_dist.parallel.partition import even_split_sizes


@dataclass(frozen=True)
class BestScore:
    accuracy: float
    step: int


@dataclass(frozen=True)
class EvalReport:
    """One evaluation: results per pack, the packs whose accuracy beat their best, the bests after it."""

    step: int
    results: dict[str, VerificationResult]
    improved: list[str]
    best: dict[str, BestScore]
    seconds: float


class VerificationMonitor:
    """Scores verification packs on a schedule the trainer owns; see the module docstring.

    Built on every rank with the same arguments. ``bins``: pack paths (names = file
    stems, unique); ``batch_size``: images per forward; ``flip``: the flip test;
    ``shared``: split the work across ranks; ``writer``: TensorBoard (rank 0, or None);
    ``best_dir``: where the best backbone per pack goes (None: not kept), which needs
    ``run_config``, the resolved config dict that makes those backbones loadable.
    Rank 0 prints one line per pack and one for the whole evaluation (``console.say``).
    """

    def __init__(
        self,
        bins: list[str],
        env: DistEnv,
        *,
        image_size: int = 112,
        batch_size: int = 128,
        flip: bool = True,
        shared: bool = True,
        writer: SummaryWriter | None = None,
        best_dir: str | Path | None = None,
        run_config: dict[str, Any] | None = None,
    ) -> None:
        if best_dir is not None and run_config is None:
            raise ValueError("keeping the best backbones needs the run's config (run_config)")
        names = [Path(path).stem for path in bins]
        duplicates = sorted(name for name, count in collections.Counter(names).items() if count > 1)
        if duplicates:
            raise ValueError(f"eval.bins: packs share the name(s) {', '.join(duplicates)}; rename one of the files")
        self.env = env
        self.batch_size, self.flip = batch_size, flip
        self.shared = shared and env.world_size > 1 and dist.is_initialized()
        self.writer = writer
        self.best_dir = Path(best_dir) if best_dir is not None else None
        self.run_config = run_config
        self.names = names
        self.packs: list[VerificationPack] = []
        if self.shared:
            self.packs = [read_bin(path, image_size, shard=(env.rank, env.world_size)) for path in bins]
        elif env.is_main:
            self.packs = [read_bin(path, image_size) for path in bins]
        for path, pack in zip(bins, self.packs):
            require_folds(path, len(pack.issame))
            if self.shared and 2 * len(pack.issame) < env.world_size:
                raise ValueError(f"{path}: {2 * len(pack.issame)} images cannot be shared by {env.world_size} ranks")
        self.best: dict[str, BestScore] = self._broadcast(self._read_bests() if env.is_main else None)

    def run(self, backbone: nn.Module, step: int) -> EvalReport:
        """Score every pack with ``backbone`` (the bare module, not the DDP wrapper); collective."""
        started = time.perf_counter()
        if not self.names:
            return EvalReport(step, {}, [], dict(self.best), 0.0)
        if self.shared:
            self._sync_buffers(backbone)
        embed = TorchEmbedder(backbone, self.env.device)
        views = {pack.name: self._pack_views(embed, pack) for pack in self.packs}
        results = None
        if self.env.is_main:
            results = {pack.name: verification_accuracy(views[pack.name], pack.issame) for pack in self.packs}
        results = self._broadcast(results)
        improved = [name for name in self.names if self._is_better(name, results[name])]
        for name in improved:
            self.best[name] = BestScore(results[name].accuracy, step)
        report = EvalReport(step, results, improved, dict(self.best), time.perf_counter() - started)
        if self.env.is_main:
            self._publish(report, backbone)
        return report

    def _pack_views(self, embed: TorchEmbedder, pack: VerificationPack) -> torch.Tensor:
        """``[V, 2N, D]`` view embeddings of the whole pack (on rank 0 at least)."""
        local = embed_views(embed, pack.images, self.batch_size, self.flip)
        if not self.shared:
            return local
        sizes = even_split_sizes(2 * len(pack.issame), self.env.world_size)
        rows = local.transpose(0, 1).contiguous().to(self.env.device)
        return gather_rows(rows, sizes, None).cpu().transpose(0, 1)

    def _sync_buffers(self, backbone: nn.Module) -> None:
        """Give every rank rank 0's BatchNorm statistics (each rank's last training forward moved its own)."""
        for buffer in backbone.buffers():
            dist.broadcast(buffer.data, src=0)

    def _broadcast(self, value: Any) -> Any:
        """``value`` from rank 0 on every rank."""
        if self.env.world_size == 1 or not dist.is_initialized():
            return value
        holder = [value]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]

    def _is_better(self, name: str, result: VerificationResult) -> bool:
        best = self.best.get(name)
        return best is None or result.accuracy > best.accuracy

    def _read_bests(self) -> dict[str, BestScore]:
        """Bests recorded by an earlier run in ``best_dir``."""
        bests: dict[str, BestScore] = {}
        if self.best_dir is None:
            return bests
        for name in self.names:
            recorded = read_best_score(self.best_dir / name)
            if recorded is not None:
                bests[name] = BestScore(*recorded)
        return bests

    def _publish(self, report: EvalReport, backbone: nn.Module) -> None:
        """Console lines, TensorBoard scalars and the improved backbones (rank 0)."""
        for name, result in report.results.items():
            best = report.best[name]
            tars = " ".join(f"{far:.0e} {tar:.4f}" for far, tar in result.tar_at_far.items())
            say(
                f"[eval step {report.step}] {name}: accuracy {result.accuracy:.4f} ± {result.std:.4f} "
                f"(best {best.accuracy:.4f} at step {best.step}), threshold {result.threshold:.2f} "
                f"(cosine {result.cosine_threshold:.3f}), TAR@FAR {tars}, xnorm {result.xnorm:.2f}"
            )
            if self.writer is not None:
                scalars = {key: getattr(result, key) for key in ("accuracy", "std", "threshold", "xnorm")}
                scalars["best_accuracy"] = best.accuracy
                scalars.update({f"tar_at_far_{far:.0e}": tar for far, tar in result.tar_at_far.items()})
                for key, value in scalars.items():
                    self.writer.add_scalar(f"eval/{name}/{key}", value, report.step)
        mode = f"shared by {self.env.world_size} ranks" if self.shared else "on rank 0"
        say(f"[eval step {report.step}] {len(report.results)} pack(s) in {report.seconds:.1f} s ({mode})")
        if self.writer is not None:
            self.writer.add_scalar("eval/seconds", report.seconds, report.step)
        if self.best_dir is not None:
            for name in report.improved:
                save_best_backbone(self.best_dir / name, backbone, step=report.step, pack=name,
                                   result=report.results[name].to_dict(), config=self.run_config)

