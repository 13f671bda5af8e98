#!/usr/bin/env bash
# Install what vmfork needs on Debian 12: Debian packages (as root) and the Python package
# in .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static xfsprogs btrfs-progs e2fsprogs cpio musl-tools
      lz4 zstd xz-utils binutils util-linux ca-certificates)

missing=()
for p in "${PKGS[@]}"; do
  status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
  [ "$status" = "install ok installed" ] || missing+=("$p")
done
# The guest kernel is taken from Debian's linux-image-cloud-amd64 (downloaded, not installed):
# apt's package lists must know it.
# (captured first: with pipefail, grep -q closing the pipe early would fail the check)
need_lists=0
policy=$(apt-cache policy linux-image-cloud-amd64 2>/dev/null || true)
[[ "$policy" =~ Candidate:\ [0-9] ]] || need_lists=1

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if [ ${#missing[@]} -gt 0 ] || [ $need_lists -eq 1 ]; then
    command -v sudo >/dev/null || { echo "setup: not root and no sudo; install as root: apt-get install ${missing[*]}" >&2; exit 1; }
    SUDO="sudo"
  fi
fi
if [ ${#missing[@]} -gt 0 ] || [ $need_lists -eq 1 ]; then
  echo "setup: apt-get update"
  $SUDO apt-get update -q >/tmp/vmfork-apt-update.log 2>&1 || { cat /tmp/vmfork-apt-update.log >&2; exit 1; }
fi
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing ${missing[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}" \
    >/tmp/vmfork-apt-install.log 2>&1 || { tail -30 /tmp/vmfork-apt-install.log >&2; exit 1; }
fi

PY=${PYTHON:-python3}
stamp=.venv/.vmfork-installed
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing vmfork and its dependencies into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  echo "$want" > "$stamp"
fi
echo "setup: ok ($(.venv/bin/vmfork --version))"
