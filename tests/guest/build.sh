#!/usr/bin/env bash
# Builds the boot test's guest payload into build/guest/: the node's own kernel (vmlinuz), an
# initramfs whose /init is hvnode-guest-init plus the virtio modules it needs, and a raw disk whose
# first bytes are the pattern the guest checks. Needs the image's root tree (image/build.sh).
set -euo pipefail
top=$(cd "$(dirname "$0")/../.." && pwd)
cd "$top"
root=$top/build/mkosi.output/hvnode-root
out=$top/build/guest
[ -d "$root/usr/lib/modules" ] || { echo "error: build the image first (image/build.sh)" >&2; exit 1; }
kver=$(ls "$root/usr/lib/modules" | head -n1)
target=x86_64-unknown-linux-gnu

echo "==> guest payload: hvnode-guest-init (static)"
RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target "$target" -p hvnode-guest-init
rm -rf "$out" && mkdir -p "$out"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
install -d "$stage/dev" "$stage/proc" "$stage/sys" "$stage/run" "$stage/etc" "$stage/usr/lib/modules/$kver"
install -m 0755 "${CARGO_TARGET_DIR:-$top/target}/$target/release/hvnode-guest-init" "$stage/init"
: > "$stage/etc/guest-modules"
for m in virtio_mmio virtio_blk virtio_net virtio_rng; do
    modprobe -d "$root" -S "$kver" --show-depends "$m" | awk '$1 == "insmod" {print $2}' | while read -r path; do
        rel=${path#*/lib/modules/$kver/}
        dest=/usr/lib/modules/$kver/$rel
        grep -qxF "$dest" "$stage/etc/guest-modules" && continue
        install -D -m 0644 "$root/usr/lib/modules/$kver/$rel" "$stage$dest"
        echo "$dest" >> "$stage/etc/guest-modules"
    done
done
(cd "$stage" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0) | gzip -9 > "$out/initramfs.img"
install -m 0644 "$root/usr/lib/modules/$kver/vmlinuz" "$out/vmlinuz"
truncate -s 1M "$out/disk.raw"
printf 'HVNODE-TEST-DISK-PATTERN-0123456789' | dd of="$out/disk.raw" conv=notrunc status=none
echo "==> build/guest: $(ls -s --block-size=K "$out" | tr '\n' ' ')"
