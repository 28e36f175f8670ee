"""Weight sources and readers: HF directories, safetensors, GGUF, packages."""
