"""Torch modules of routed and adapted models, generation, benchmarks."""
