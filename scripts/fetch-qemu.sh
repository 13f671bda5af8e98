#!/usr/bin/env bash
# QEMU 10.0.2 from Debian's bookworm-backports, unpacked (dpkg -x: no system change) into the
# project's git-ignored .tools/qemu/ (vmfork runs .tools/qemu/usr/bin/qemu-system-x86_64 with
# -L .tools/qemu/usr/share/qemu). Every .deb is checked against its pinned sha256, taken from
# the suite's Packages index (whose own hash is in the InRelease file signed by Debian's
# archive key, checked when the pins were taken). Its libraries are those of Debian's QEMU 7.2,
# which setup installs: nothing more is needed (checked with ldd below).
# Idempotent: a second run only checks the stamp.
set -euo pipefail
cd "$(dirname "$0")/.."

QEMU_VERSION="1:10.0.2+ds-2+deb13u1~bpo12+1"
FILE_VERSION="10.0.2+ds-2+deb13u1~bpo12+1"
DEBS=(
  "qemu-system-x86_${FILE_VERSION}_amd64.deb:4a6b1856c8b0d7df4ff8e70249e12c473ccf8d516aadb4ae14d3d938faed0c65"
  "qemu-system-common_${FILE_VERSION}_amd64.deb:23a4672a138832d7173855e981aa8282c73ef5e04e080fa7ada9f82c6b34f507"
  "qemu-system-data_${FILE_VERSION}_all.deb:2d831088187087013b3fcbd19bdfb955b182a2d5a08f6dafa0ad1c6d2007fb4e"
)
# deb.debian.org drops a backport from its pool when a newer one lands; snapshot.debian.org keeps it.
MIRRORS=(
  "http://deb.debian.org/debian/pool/main/q/qemu"
  "https://snapshot.debian.org/archive/debian/20261128T000000Z/pool/main/q/qemu"
)
DEST=.tools/qemu
stamp=$DEST/.vmfork-qemu
want=$(printf '%s\n' "${DEBS[@]}" | sha256sum | cut -d' ' -f1)

[ "$(uname -m)" = x86_64 ] || { echo "setup: QEMU 10 from backports: x86_64 only, skipped"; exit 0; }
if [ "$(cat "$stamp" 2>/dev/null)" = "$want" ] && [ -x $DEST/usr/bin/qemu-system-x86_64 ]; then
  exit 0
fi
echo "setup: fetching QEMU $QEMU_VERSION (Debian bookworm-backports) into $DEST"
dl=$(mktemp -d)
trap 'rm -rf "$dl"' EXIT
for entry in "${DEBS[@]}"; do
  deb=${entry%%:*} sha=${entry#*:}
  got=""
  for m in "${MIRRORS[@]}"; do
    if curl -fsSL --retry 2 -o "$dl/$deb" "$m/${deb//+/%2B}" 2>"$dl/curl.log"; then got=$m; break; fi
  done
  [ -n "$got" ] || { echo "setup: cannot fetch $deb from ${MIRRORS[*]}: $(tail -1 "$dl/curl.log")" >&2; exit 1; }
  have=$(sha256sum "$dl/$deb" | cut -d' ' -f1)
  [ "$have" = "$sha" ] || { echo "setup: $deb (from $got): sha256 $have is not the pinned $sha" >&2; exit 1; }
done
tmp=$DEST.tmp
rm -rf "$tmp"
mkdir -p "$tmp"
for entry in "${DEBS[@]}"; do
  dpkg-deb -x "$dl/${entry%%:*}" "$tmp"
done
missing=$(ldd "$tmp/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
[ -z "$missing" ] || { echo "setup: QEMU 10 lacks libraries: $missing" >&2; rm -rf "$tmp"; exit 1; }
"$tmp/usr/bin/qemu-system-x86_64" -L "$tmp/usr/share/qemu" --version >/dev/null
echo "$want" > "$tmp/.vmfork-qemu"
rm -rf "$DEST"
mv "$tmp" "$DEST"
echo "setup: $("$DEST/usr/bin/qemu-system-x86_64" --version | head -1)"
