"""`cfmc lsp` without pygls installed: a diagnostic naming the pip command, exit 1."""
from __future__ import annotations

import subprocess
import sys

BLOCK_PYGLS = ("import sys; sys.modules['pygls'] = None\n"
               "from cfmlang.cli import main\n"
               "sys.exit(main(['lsp']))\n")


def test_missing_pygls_is_a_diagnostic():
    done = subprocess.run([sys.executable, "-c", BLOCK_PYGLS], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr
    assert "error[E217]" in done.stderr and "pip install 'cfmlang[lsp]'" in done.stderr
    assert "Traceback" not in done.stderr
