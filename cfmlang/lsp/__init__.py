"""`cfmc lsp`: the language server (pygls over stdio)."""
