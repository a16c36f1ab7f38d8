#!/usr/bin/env bash
# Put the RELION programs that `scripts/setup.sh --test` unpacks into ./.relion on the venv's
# PATH: one small script per relion_* program in BIN that sets LD_LIBRARY_PATH to RELION's
# unpacked libraries and execs the real binary, so `.venv/bin/relion_stack_create` works, and
# `relion_stack_create` too once the venv is activated (`source .venv/bin/activate`).
#
#   bash scripts/relion_wrappers.sh [RELION_USR [BIN]]    # defaults: .relion/usr .venv/bin
#
# Programs whose libraries are not all there (the _mpi ones without Open MPI) get no wrapper.
# scripts/setup.sh --test runs this unless another RELION is on the PATH already.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
usr=$(cd "${1:-$root/.relion/usr}" && pwd)
bin=${2:-$root/.venv/bin}
mkdir -p "$bin"
libs="$usr/lib/x86_64-linux-gnu:$usr/lib"
quote() { printf "'%s'" "$(printf '%s' "$1" | sed "s/'/'\\\\''/g")"; }   # for /bin/sh
mark="written by cryolatent's scripts/relion_wrappers.sh"
n=0
for exe in "$usr"/bin/relion_*; do
  [ -f "$exe" ] && [ -x "$exe" ] || continue
  if LD_LIBRARY_PATH="$libs" ldd "$exe" 2>/dev/null | grep -q "not found"; then
    continue
  fi
  w="$bin/$(basename "$exe")"
  if [ -e "$w" ] && ! grep -q "$mark" "$w" 2>/dev/null; then
    echo "$w exists and is not a wrapper of this script: left as it is" >&2
    continue
  fi
  {
    echo '#!/bin/sh'
    echo "# $mark: RELION from $usr, with its own libraries"
    echo "LD_LIBRARY_PATH=$(quote "$libs")\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
    echo 'export LD_LIBRARY_PATH'
    echo "exec $(quote "$exe") \"\$@\""
  } > "$w"
  chmod +x "$w"
  n=$((n + 1))
done
echo "RELION: $n programs in $bin (relion_stack_create, relion_star_handler, ...)"
