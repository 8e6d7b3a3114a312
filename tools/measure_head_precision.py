"""Relative error of the SFace head against fp64 for each matmul precision.

    python tools/measure_head_precision.py [--batch 256 --classes 4000 --dim 512 --impl chunked]

Prints one row per (embedding distribution, precision): the norm-wise relative
error of the loss, ∂L/∂x and ∂L/∂W against an fp64 evaluation of the same head.
"""

from __future__ import annotations

import argparse

import torch

from sface_dist.config import Precision, choices
from sface_dist.heads import ShardedSFaceHead
from sface_dist.heads.probe import embeddings_at_cosine


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.double()
    return ((actual.double() - expected).norm() / expected.norm()).item()


def run_head(head: ShardedSFaceHead, embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = embeddings.clone().requires_grad_(True)
    out = head(x, labels)
    out.loss.backward()
    return out.loss.detach(), x.grad, head.weight.grad


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=4000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--impl", default="chunked", choices=["dense", "chunked"])
    args = parser.parse_args()
    distributions = {"random": None, "early (cos+ 0.3)": 0.3, "trained (cos+ 0.7)": 0.7}
    print(f"| embeddings | precision | loss | dL/dx | dL/dW |  (B={args.batch} C={args.classes} D={args.dim})")
    print("|---|---|---|---|---|")
    for name, cos_target in distributions.items():
        if cos_target is None:
            gen = torch.Generator().manual_seed(0)
            embeddings = torch.randn(args.batch, args.dim, generator=gen)
            weight = torch.randn(args.classes, args.dim, generator=gen)
            labels = torch.randint(0, args.classes, (args.batch,), generator=gen)
        else:
            embeddings, weight, labels = embeddings_at_cosine(args.batch, args.classes, args.dim, cos_target)
        reference_head = ShardedSFaceHead(args.classes, args.dim, impl=args.impl).double()
        with torch.no_grad():
            reference_head.weight.copy_(weight)
        reference = run_head(reference_head, embeddings.double(), labels)
        for precision in choices(Precision):
            head = ShardedSFaceHead(args.classes, args.dim, impl=args.impl, precision=precision)
            with torch.no_grad():
                head.weight.copy_(weight)
            errors = [relative_error(a, b) for a, b in zip(run_head(head, embeddings, labels), reference, strict=True)]
            print(f"| {name} | {precision} | " + " | ".join(f"{e:.1e}" for e in errors) + " |")


if __name__ == "__main__":
    main()
