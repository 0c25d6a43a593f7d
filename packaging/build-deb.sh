#!/usr/bin/env bash
# Build the dermfs .deb from this tree: copy the tree (tracked and untracked files that
# git does not ignore) into a temporary directory, put packaging/debian at its top, and
# run dpkg-buildpackage there. The .deb and the build's other output land in OUTDIR
# (default: debian-build/ at the top of the tree).
#
#   bash packaging/build-deb.sh [OUTDIR]
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$REPO/debian-build}" && cd "${1:-$REPO/debian-build}" && pwd)"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT

VERSION="$(dpkg-parsechangelog -l "$REPO/packaging/debian/changelog" -S Version)"
SRC="$WORK/dermfs-$VERSION"
mkdir -p "$SRC"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
    while IFS= read -r -d '' f; do [[ -e "$f" ]] && printf '%s\0' "$f"; done |
    rsync -a --from0 --files-from=- ./ "$SRC/")
cp -a "$SRC/packaging/debian" "$SRC/debian"

# Debian's own python3 builds the package: a python3 earlier on PATH (pyenv, a
# virtualenv) is not the interpreter the package runs with.
(cd "$SRC" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b)
cp "$WORK"/dermfs_"$VERSION"_*.deb "$WORK"/dermfs_"$VERSION"_*.buildinfo \
    "$WORK"/dermfs_"$VERSION"_*.changes "$OUT/"
ls "$OUT"/dermfs_"$VERSION"_*.deb
