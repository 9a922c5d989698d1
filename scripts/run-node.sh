#!/usr/bin/env bash
# Sets everything up, builds the node image and boots it in QEMU with the node's serial console
# (boot menu, kernel, init, console TUI) on this terminal and its API on https://localhost:8443.
# A persistent data disk lives in build/run/data.raw: pick "create the data partition" (key d) in
# the boot menu on the first run. Quit QEMU with Ctrl-a x; power off cleanly from the console's
# Power screen.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$(id -u)" = 0 ] || { echo "error: run as root (it installs packages and builds the image): sudo $0" >&2; exit 1; }
./image/setup-host.sh
./image/build.sh
mkdir -p build/run
[ -f build/run/data.raw ] || truncate -s 8G build/run/data.raw
[ -f build/run/OVMF_VARS.fd ] || cp /usr/share/OVMF/OVMF_VARS_4M.fd build/run/OVMF_VARS.fd
port=${HVNODE_API_PORT:-8443}
echo "==> booting build/hvnode.iso (UEFI, TCG); agent API forwarded to https://localhost:$port; Ctrl-a x quits"
exec qemu-system-x86_64 -machine q35 -accel tcg -cpu qemu64,+svm,+npt -m 2048 -smp 2 \
    -nographic -serial mon:stdio -vga std \
    -drive if=pflash,format=raw,unit=0,readonly=on,file=/usr/share/OVMF/OVMF_CODE_4M.fd \
    -drive if=pflash,format=raw,unit=1,file=build/run/OVMF_VARS.fd \
    -drive if=none,id=boot,media=cdrom,readonly=on,format=raw,file=build/hvnode.iso \
    -device ide-cd,drive=boot,bootindex=0 \
    -drive if=none,id=data,format=raw,file=build/run/data.raw -device virtio-blk-pci,drive=data \
    -netdev "user,id=n0,hostfwd=tcp:127.0.0.1:$port-:8443" -device virtio-net-pci,netdev=n0
