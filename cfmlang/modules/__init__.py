"""Torch modules that compiled artifacts need beyond what transformers provides."""
