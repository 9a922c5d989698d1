#!/usr/bin/env bash
# Prints the image figures: ISO size, warm build time, and (with --cold) the cold build time with an
# empty cache; then boots the ISO under TCG and prints the node's boot times as init reports them
# (kernel start to PID 1, PID 1 to `hvnode: ready`, from CLOCK_BOOTTIME).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$(id -u)" = 0 ] || { echo "error: run as root" >&2; exit 1; }
if [ "${1:-}" = "--cold" ]; then
    cold_cache=$(mktemp -d /var/tmp/hvnode-cold.XXXXXX)
    rm -rf build/mkosi.output target/x86_64-unknown-linux-gnu
    t0=$(date +%s)
    HVNODE_CACHE=$cold_cache ./image/build.sh >/dev/null
    echo "image_build_cold_s: $(($(date +%s) - t0))"
    rm -rf "$cold_cache"
fi
t0=$(date +%s)
./image/build.sh >/dev/null
echo "image_build_warm_s: $(($(date +%s) - t0))"
echo "iso_size_mib: $(( $(stat -c %s build/hvnode.iso) / 1048576 ))"
echo "squashfs_size_mib: $(( $(stat -c %s build/iso/live/root.squashfs) / 1048576 ))"
echo "initrd_size_kib: $(( $(stat -c %s build/iso/boot/initrd.img) / 1024 ))"
log=$(mktemp)
timeout 300 qemu-system-x86_64 -machine q35 -accel tcg -cpu qemu64 -m 1024 -nographic -nodefaults \
    -serial stdio -no-reboot \
    -drive if=none,id=boot,media=cdrom,readonly=on,format=raw,file=build/hvnode.iso \
    -device ide-cd,drive=boot,bootindex=0 -netdev user,id=n0 -device virtio-net-pci,netdev=n0 \
    </dev/null >"$log" 2>&1 &
qemu=$!
for _ in $(seq 300); do grep -q "hvnode: boot times" "$log" && break; sleep 1; done
kill "$qemu" 2>/dev/null || true
wait "$qemu" 2>/dev/null || true
line=$(grep -a "hvnode: boot times" "$log" | head -n1 | tr -d '\r')
rm -f "$log"
[ -n "$line" ] || { echo "error: the node did not report its boot times within 300 s" >&2; exit 1; }
echo "$line" | sed 's/.*hvnode: boot times: //' | tr ',' '\n' | sed 's/^ *//; s/ /: /'
