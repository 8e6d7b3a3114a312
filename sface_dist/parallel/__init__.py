"""Where ranks meet: launch, class partitioning, the head's autograd collectives, host-side agreement and the
backbone's data-parallel wrapper (one module each, on Megatron's split)."""
