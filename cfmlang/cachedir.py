"""Where cfmlang keeps what it computes once: `$CFM_CACHE_DIR`, else the user's cache
folder (`~/.cache/cfmlang`)."""
from __future__ import annotations

import os
from pathlib import Path


def default_cache_dir() -> Path:
    root = os.environ.get("CFM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "cfmlang")
    return Path(root)
