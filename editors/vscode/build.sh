#!/usr/bin/env bash
# Builds the VS Code extension from a clean checkout: installs the locked npm packages,
# runs the grammar tests on every example (test/*.brick, see tests/lsp/grammar_annotations.py)
# and packages cfmlang-brick.vsix.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  npm ci --no-audit --no-fund --loglevel=error      # only when the lock file changed
fi
npm run --silent test-grammar
npm run --silent package
