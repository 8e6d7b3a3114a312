"""Face backbones (IResNet, MobileFaceNet, ViT, a tiny CPU net) behind one registry."""

from sface_dist.backbones.registry import BACKBONES, build_backbone, compile_backbone

__all__ = ["BACKBONES", "build_backbone", "compile_backbone"]
