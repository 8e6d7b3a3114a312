"""Fused implementations of the SFace block math: Triton kernels and the tools to size their sparsity.

Triton is optional: ``fused`` imports it only when a kernel runs (docs/kernels.md).
"""
