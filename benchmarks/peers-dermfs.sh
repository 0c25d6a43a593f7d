#!/usr/bin/env bash
# peers-dermfs.sh -- run the shared peer benchmark (/work/shared/bench/peers.sh)
# with dermfs plugged in, then measure the dermfs daemon's memory while 1 GiB
# is copied into a mount.  The peers table goes to stdout, progress to stderr.
#
# Usage: benchmarks/peers-dermfs.sh [SYSTEM ...]
#   default systems: native bindfs gocryptfs securefs cryfs dermfs
#   The harness knobs (REPEATS, FIO_RUNTIME, SEQ_MIB, PHOTO_N, SMALL_N, SAVE_N, ...)
#   pass through the environment.  MEM_MIB=1024 sets the size copied for the
#   memory measurement; MEM=0 skips it, PEERS=0 skips the peer run.
#   PEERS_SH=/work/shared/bench/peers.sh, DERMFS=<repo>/.venv/bin/dermfs.
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(dirname "$HERE")
: "${PEERS_SH:=/work/shared/bench/peers.sh}"
: "${DERMFS:=$REPO/.venv/bin/dermfs}"
: "${MEM_MIB:=1024}" "${MEM:=1}" "${PEERS:=1}"
(( $# )) || set -- native bindfs gocryptfs securefs cryfs dermfs

log() { printf '[%(%H:%M:%S)T] %s\n' -1 "$*" >&2; }

# A volume with the local key-file provider, written into the system's scratch
# dir; the harness gives an empty {backing}, which becomes the store.
# Default mount options (docs/fuse.md section 3).
export DERMFS_INIT="printf '%s\n' \"store: '\"{backing}\"'\" 'kms:' '  provider: local' \"  keyfile: '\"{dir}/key\"'\" 'audit:' \"  journal: '\"{dir}/audit.journal\"'\" \"  patient_id: '^patients/(?P<patient>[^/]+)/'\" > {dir}/dermfs.yaml && $(printf %q "$DERMFS") init {dir}/dermfs.yaml"
export DERMFS_MOUNT="exec $(printf %q "$DERMFS") mount -f {dir}/dermfs.yaml {mnt}"
export DERMFS_UNMOUNT='fusermount3 -u {mnt}'
export DERMFS_VERSION="$(printf %q "$DERMFS") --version"

if [[ $PEERS == 1 ]]; then
  log "load before: $(uptime)"
  "$PEERS_SH" "$@"
  log "load after: $(uptime)"
fi

[[ $MEM == 1 ]] || exit 0

# ------------------------------------------------------------------ memory
# Peak resident memory of the daemon (dermfs mount -f) while `cp` copies a
# MEM_MIB file of random data from /var/tmp into the mount, sampled from
# /proc/PID/status every 0.1 s; VmHWM is the kernel's own high-water mark.
if [[ $EUID -eq 0 && -z ${DERMFS_MEM_NS:-} ]] && command -v unshare >/dev/null; then
  # private mount namespace, as peers.sh does, so no copy of the mount outlives us
  export DERMFS_MEM_NS=1 PEERS=0
  exec unshare --mount --propagation private -- bash "${BASH_SOURCE[0]}" "$@"
fi
W=$(mktemp -d -p /var/tmp dermfs-mem.XXXXXXXX) || exit 1
PID=
cleanup() {
  if mountpoint -q "$W/mnt" 2>/dev/null; then fusermount3 -u "$W/mnt" || fusermount3 -uz "$W/mnt"; fi
  [[ -n $PID ]] && wait "$PID" 2>/dev/null
  rm -rf --one-file-system -- "$W"
}
trap cleanup EXIT
mkdir -p "$W/store" "$W/mnt"
printf '%s\n' "store: '$W/store'" 'kms:' '  provider: local' "  keyfile: '$W/key'" \
  'audit:' "  journal: '$W/audit.journal'" "  patient_id: '^patients/(?P<patient>[^/]+)/'" > "$W/dermfs.yaml"
"$DERMFS" init "$W/dermfs.yaml" >/dev/null || exit 1
log "memory: writing $MEM_MIB MiB from /dev/urandom"
dd if=/dev/urandom of="$W/src" bs=1M count="$MEM_MIB" status=none || exit 1
"$DERMFS" mount -f "$W/dermfs.yaml" "$W/mnt" 2>"$W/mount.log" &
PID=$!
for _ in $(seq 300); do mountpoint -q "$W/mnt" && break; sleep 0.1; done
mountpoint -q "$W/mnt" || { cat "$W/mount.log" >&2; exit 1; }
kib() { awk -v k="$1:" '$1 == k { print $2 }' "/proc/$PID/status"; }
rss0=$(kib VmRSS)
cp "$W/src" "$W/mnt/patients-copy.bin" &
CP=$!
peak=0
while kill -0 "$CP" 2>/dev/null; do
  r=$(kib VmRSS); (( r > peak )) && peak=$r
  sleep 0.1
done
wait "$CP"; cprc=$?
hwm=$(kib VmHWM); r=$(kib VmRSS)
cmp -s "$W/src" "$W/mnt/patients-copy.bin" && same=identical || same=DIFFERENT
fusermount3 -u "$W/mnt"; wait "$PID"; PID=
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
printf '\n| daemon memory, cp of %d MiB into the mount | KiB | MiB |\n|---|---|---|\n' "$MEM_MIB"
printf '| VmRSS after mount, before cp | %d | %s |\n' "$rss0" "$(mib $rss0)"
printf '| peak VmRSS sampled every 0.1 s during cp | %d | %s |\n' "$peak" "$(mib $peak)"
printf '| VmRSS after cp | %d | %s |\n' "$r" "$(mib $r)"
printf '| VmHWM (kernel high-water mark, whole run) | %d | %s |\n' "$hwm" "$(mib $hwm)"
printf '\ncp exit %d; copy read back %s\n' "$cprc" "$same"
