#!/usr/bin/env bash
# Builds build/hvnode.iso: static Rust binaries -> mkosi root tree (mkosi.conf) -> squashfs root and
# its dm-verity hash tree -> initrd with our PID 1 and the root hash -> hybrid BIOS+UEFI ISO. See
# image/README.md for why the last steps happen here rather than in mkosi.
#
# Environment:
#   HVNODE_CACHE   cache directory outside the checkout (default /var/cache/hvnode): mkosi itself,
#                  its package cache and incremental tree survive fresh clones.
#   HVNODE_SQUASHFS_COMP  squashfs compressor options (default "zstd -Xcompression-level 19").
#   HVNODE_COMMIT  the commit named in /etc/hvnode-release (default: HEAD's short hash).
#   SOURCE_DATE_EPOCH     the one timestamp in the image (default: the commit time of HEAD). Two
#                  builds of one commit give the same root image and root hash
#                  (image/check-reproducible.sh checks it; image/README.md says what is pinned).
set -euo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
cache=${HVNODE_CACHE:-/var/cache/hvnode}
build=$top/build
target=x86_64-unknown-linux-gnu
start=$(date +%s)
# Every timestamp that ends up in the root, the initrd and the ISO comes from here, not the clock.
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git -C "$top" log -1 --format=%ct 2>/dev/null || echo 1700000000)}
export SOURCE_DATE_EPOCH
# Locale-independent sorting and messages, and the same umask on every builder.
export LC_ALL=C TZ=UTC
umask 022

step() { printf '==> [%4ss] %s\n' "$(($(date +%s) - start))" "$*"; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "the image build needs root (mkosi unpacks packages as root); run: sudo $0"
for tool in python3 mksquashfs veritysetup grub-mkrescue grub-mkimage xorriso mformat cpio zstd modprobe cargo; do
    command -v "$tool" >/dev/null || die "$tool is missing: run image/setup-host.sh first"
done

step "building static binaries (cargo, release, $target, crt-static)"
# The paths of the checkout and of the cargo registry end up in panic messages and debug info;
# remapping them makes the binaries independent of where the tree was checked out.
cargo_home=${CARGO_HOME:-$HOME/.cargo}
RUSTFLAGS="-C target-feature=+crt-static --remap-path-prefix=$top=/hvnode --remap-path-prefix=$cargo_home=/cargo" cargo build --release --target "$target" \
    -p hvnode-init -p hvnode-agent -p hvnode-vmm -p hvnode-console --bins
bindir=${CARGO_TARGET_DIR:-$top/target}/$target/release

extra=$build/rootfs-extra
rm -rf "$extra"
install -d "$extra/usr/bin" "$extra/etc" "$extra/var/lib/hvnode"
for b in hvnode-init hvnode-agent hvnode-vmm hvnode-console; do
    install -m 0755 "$bindir/$b" "$extra/usr/bin/$b"
done
cp -a "$top/image/rootfs/." "$extra/"
# /etc is read-only on the node: runtime files live on /run.
ln -sfn ../run/hvnode/resolv.conf "$extra/etc/resolv.conf"
# The release's version: the workspace's, or HVNODE_VERSION (a test builds a newer release to
# update to). The agent reports it from /etc/hvnode-release and refuses older bundles.
version=${HVNODE_VERSION:-$(sed -n 's/^version = "\(.*\)"/\1/p' "$top/Cargo.toml" | head -n1)}
printf 'HVNODE_VERSION=%s\nHVNODE_BUILD=%s\n' "$version" "${HVNODE_COMMIT:-$(git -C "$top" rev-parse --short HEAD 2>/dev/null || echo unknown)}" \
    > "$extra/etc/hvnode-release"

step "GRUB for installed disks (x86_64-efi, i386-pc) in /usr/lib/hvnode/boot"
# The installer (hvnode-update's install module) writes these to the disk: BOOTX64.EFI to the
# ESP, core.img into the BIOS boot partition, boot.img's code into the MBR. Each carries
# image/grub-early.cfg, which finds the ESP and loads its grub.cfg (image/grub-disk.cfg). All
# modules the disk's menu needs are built in: GRUB reads no module files from the ESP.
bootdir=$extra/usr/lib/hvnode/boot
install -d "$bootdir"
grub_common="part_gpt fat search search_label search_fs_file normal linux boot echo test loadenv configfile serial terminal gzio"
grub-mkimage -O x86_64-efi -p /boot/grub -c "$top/image/grub-early.cfg" -o "$bootdir/BOOTX64.EFI" \
    $grub_common all_video efi_gop efi_uga || die "grub-mkimage x86_64-efi failed"
grub-mkimage -O i386-pc -p '(,gpt2)/boot/grub' -c "$top/image/grub-early.cfg" -o "$bootdir/core.img" \
    $grub_common biosdisk || die "grub-mkimage i386-pc failed"
install -m 0644 /usr/lib/grub/i386-pc/boot.img "$bootdir/boot.img"
touch -d "@$SOURCE_DATE_EPOCH" "$bootdir"/*

step "release key: bundles of this build are signed with it, the root trusts its public key"
# HVNODE_RELEASE_KEY names the private key (hvnode-bundle keygen); without it a development key
# kept in the cache directory is used (made on first use): a node built here trusts only
# bundles built here. docs/update.md says how to keep a real one.
cargo build --release -p hvnode-update --bin hvnode-bundle
bundle_tool=${CARGO_TARGET_DIR:-$top/target}/release/hvnode-bundle
release_key=${HVNODE_RELEASE_KEY:-$cache/release-dev.key}
if [ ! -e "$release_key" ]; then
    [ -z "${HVNODE_RELEASE_KEY:-}" ] || die "HVNODE_RELEASE_KEY=$release_key does not exist"
    install -d -m 0700 "$cache"
    "$bundle_tool" keygen --out "$release_key" >/dev/null
    echo "made a development release key: $release_key"
fi
[ -r "$release_key.pub" ] || die "the release key's public half $release_key.pub is missing"
install -D -m 0644 "$release_key.pub" "$extra/usr/lib/hvnode/release-keys/release.pub"

step "root tree (mkosi $("$top/image/mkosi.sh" --version 2>/dev/null | awk '{print $2}'), Debian bookworm)"
# --source-date-epoch clamps the mtimes mkosi leaves in the tree and is handed to the package
# scripts (mkosi.conf's Seed= fixes the rest mkosi would pick at random).
"$top/image/mkosi.sh" --cache-directory="$cache/mkosi-cache" --package-cache-dir="$cache/mkosi-pkgs" \
    --source-date-epoch="$SOURCE_DATE_EPOCH" -f build
root=$build/mkosi.output/hvnode-root
[ -d "$root/usr/lib/modules" ] || die "mkosi produced no root tree at $root"
kver=$(ls "$root/usr/lib/modules" | head -n1)
[ -n "$kver" ] || die "no kernel in the root tree"

step "checking the root: no shell, no interpreter"
bad=$(cd "$root" && find . -xdev \( -type f -o -type l \) \( -name sh -o -name bash -o -name dash \
    -o -name rbash -o -name 'sh.shared' -o -name busybox -o -name perl -o -name 'perl5*' -o -name 'python3*' \
    -o -name '*awk' \) -not -path './usr/share/*' 2>/dev/null || true)
[ -z "$bad" ] || die "the root still holds a shell or interpreter: $bad"

iso=$build/iso
rm -rf "$iso"
install -d "$iso/boot/grub" "$iso/live"
install -m 0644 "$root/usr/lib/modules/$kver/vmlinuz" "$iso/boot/vmlinuz"

step "squashfs root ($(du -sh "$root" | cut -f1) tree)"
comp=${HVNODE_SQUASHFS_COMP:-zstd -Xcompression-level 19}
# The kernel and its initrd live on the ISO; the root keeps the kernel as the guest kernel.
# -reproducible orders fragments the same whatever the thread timing; every inode and the
# superblock get SOURCE_DATE_EPOCH instead of the tree's mtimes (which record when a package
# was unpacked).
# mksquashfs refuses SOURCE_DATE_EPOCH in its environment together with the explicit times (which
# are stricter: the variable only clamps times after it).
# shellcheck disable=SC2086
env -u SOURCE_DATE_EPOCH mksquashfs "$root" "$iso/live/root.squashfs" -noappend -quiet -no-progress -comp $comp \
    -reproducible -mkfs-time "$SOURCE_DATE_EPOCH" -all-time "$SOURCE_DATE_EPOCH" \
    -e boot efi initrd.img initrd.img.old vmlinuz vmlinuz.old >/dev/null

step "dm-verity hash tree of the root (veritysetup format)"
# mksquashfs pads to 4 KiB, so every byte of the image is in a data block the tree covers.
[ $(($(stat -c %s "$iso/live/root.squashfs") % 4096)) = 0 ] || die "the squashfs is not a multiple of 4 KiB"
# The superblock veritysetup writes at the start of the tree lets an admin check a medium with
# `veritysetup verify`; the kernel table skips it (hash start block 1).
# veritysetup picks a random salt and superblock UUID; both are derived from the squashfs instead,
# so one root image always gets one root hash, and two different images never share a salt.
image_sum=$(sha256sum "$iso/live/root.squashfs" | cut -d' ' -f1)
verity_salt=$(printf 'hvnode verity salt %s' "$image_sum" | sha256sum | cut -d' ' -f1)
u=$(printf 'hvnode verity uuid %s' "$image_sum" | sha256sum | cut -c1-32)
verity_uuid="${u:0:8}-${u:8:4}-4${u:13:3}-8${u:17:3}-${u:20:12}"
verity_out=$(veritysetup format --hash=sha256 --data-block-size=4096 --hash-block-size=4096 \
    --salt="$verity_salt" --uuid="$verity_uuid" "$iso/live/root.squashfs" "$iso/live/root.verity")
field() { printf '%s\n' "$verity_out" | sed -n "s/^$1:[[:space:]]*//p" | head -n1; }
root_hash=$(field "Root hash"); salt=$(field "Salt"); data_blocks=$(field "Data blocks")
[ -n "$root_hash" ] && [ -n "$salt" ] && [ -n "$data_blocks" ] ||
    die "cannot read the root hash, salt and data blocks from veritysetup format:
$verity_out"
[ "$(field "Hash type")" = 1 ] && [ "$(field "Hash algorithm")" = sha256 ] &&
    [ "$(field "Data block size")" = 4096 ] && [ "$(field "Hash block size")" = 4096 ] ||
    die "veritysetup format made another tree than asked:
$verity_out"
verity_params="# dm-verity parameters of /live/root.squashfs on the ISO, read by hvnode-init's early stage.
hash_type=1
data_block_size=4096
hash_block_size=4096
data_blocks=$data_blocks
hash_start_block=1
hash_algorithm=sha256
root_hash=$root_hash
salt=$salt"
# Check the tree against exactly what the initrd will tell the kernel, superblock ignored.
veritysetup verify --no-superblock --format=1 --hash=sha256 --data-block-size=4096 \
    --hash-block-size=4096 --data-blocks="$data_blocks" --hash-offset=4096 --salt="$salt" \
    "$iso/live/root.squashfs" "$iso/live/root.verity" "$root_hash" ||
    die "veritysetup verify rejects the tree it just made"
chmod 0644 "$iso/live/root.verity"

step "initrd: our PID 1 as /init, the root hash and the modules that find and verify the root"
initrd=$build/initrd
rm -rf "$initrd"
install -d "$initrd/dev" "$initrd/proc" "$initrd/sys" "$initrd/run" "$initrd/newroot" "$initrd/etc" \
    "$initrd/usr/lib/modules/$kver"
install -m 0755 "$bindir/hvnode-init" "$initrd/init"
# The kernel opens /dev/console for PID 1 before anything is mounted.
mknod -m 0600 "$initrd/dev/console" c 5 1
mknod -m 0666 "$initrd/dev/null" c 1 3
: > "$initrd/etc/hvnode-initrd"
printf '%s\n' "$verity_params" > "$initrd/etc/hvnode-root.verity"
# dm_verity pulls in dm-mod, dm-bufio and reed_solomon; sha256_ssse3 is the fast SHA-256 the
# verity target picks when the CPU has SSSE3/AVX2/SHA-NI (it fails harmlessly without).
initrd_modules="loop squashfs isofs sr_mod sd_mod ata_piix ata_generic ahci virtio_pci virtio_blk virtio_scsi
    xhci_pci ehci_pci uhci_hcd ohci_pci usb_storage uas nvme sha256_ssse3 dm_verity"
: > "$initrd/etc/hvnode-initrd-modules"
for m in $initrd_modules; do
    modprobe -d "$root" -S "$kver" --show-depends "$m" 2>/dev/null | awk '$1 == "insmod" {print $2}' |
        while read -r path; do
            rel=${path#*/usr/lib/modules/$kver/}
            rel=${rel#*/lib/modules/$kver/}
            grep -qxF "$rel" "$initrd/etc/hvnode-initrd-modules" && continue
            install -D -m 0644 "$root/usr/lib/modules/$kver/$rel" "$initrd/usr/lib/modules/$kver/$rel"
            echo "$rel" >> "$initrd/etc/hvnode-initrd-modules"
        done
done
[ -s "$initrd/etc/hvnode-initrd-modules" ] || die "no initrd modules resolved (modprobe --show-depends)"
grep -q '/dm-verity\.ko' "$initrd/etc/hvnode-initrd-modules" ||
    die "dm-verity is not among the initrd modules: the node could not verify its root"
# Sorted names, one mtime, cpio's --reproducible (no inode or device numbers from the build
# host): the same tree gives the same archive.
find "$initrd" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
(cd "$initrd" && find . -mindepth 1 | LC_ALL=C sort | cpio --quiet -o -H newc -R 0:0 --reproducible) |
    zstd -q -19 -T0 > "$iso/boot/initrd.img"

step "hybrid BIOS+UEFI ISO (grub-mkrescue)"
install -m 0644 "$top/image/grub.cfg" "$iso/boot/grub/grub.cfg"
# Reproducible ISO: every date xorriso writes (volume dates, its UUID, every file's) is
# SOURCE_DATE_EPOCH, and the FAT image of the UEFI boot gets a fixed volume serial: grub-mkrescue
# runs mformat without -N, which picks a random one, so a wrapper earlier in PATH adds it.
tools=$build/tools
install -d "$tools"
printf '#!/bin/sh\nexec %s -N 48564e44 "$@"\n' "$(command -v mformat)" > "$tools/mformat"
chmod 0755 "$tools/mformat"
iso_date=$(date -u -d "@$SOURCE_DATE_EPOCH" +%Y%m%d%H%M%S00)
PATH=$tools:$PATH grub-mkrescue -o "$build/hvnode.iso.tmp" "$iso" -- -volid HVNODE \
    -volume_date uuid "$iso_date" -volume_date all_file_dates "=$SOURCE_DATE_EPOCH" \
    -volume_date c "=$SOURCE_DATE_EPOCH" -volume_date m "=$SOURCE_DATE_EPOCH" >"$build/grub-mkrescue.log" 2>&1 ||
    { cat "$build/grub-mkrescue.log" >&2; die "grub-mkrescue failed"; }
mv "$build/hvnode.iso.tmp" "$build/hvnode.iso"

printf '%s\n' "$root_hash" > "$build/root-hash"

step "update bundle: build/hvnode.hvb (hvnode $version, signed with $release_key)"
"$bundle_tool" create --key "$release_key" --version "$version" \
    --root "$iso/live/root.squashfs" --verity "$iso/live/root.verity" --root-hash "$root_hash" \
    --kernel "$iso/boot/vmlinuz" --initrd "$iso/boot/initrd.img" --out "$build/hvnode.hvb" >/dev/null
"$bundle_tool" verify --pubkey "$release_key.pub" "$build/hvnode.hvb" >/dev/null ||
    die "the bundle just made does not verify"

size=$(stat -c %s "$build/hvnode.iso")
step "done: build/hvnode.iso, $((size / 1048576)) MiB (kernel $kver, root hash $root_hash)"
