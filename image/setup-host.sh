#!/usr/bin/env bash
# Installs what building and booting the hvnode image needs on a Debian 12 host (as root).
# Idempotent: installs only what is missing.
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "error: run as root: sudo $0" >&2; exit 1; }

pkgs=(python3 socat procps squashfs-tools cryptsetup-bin grub-common grub-pc-bin grub-efi-amd64-bin xorriso mtools dosfstools
      cpio zstd kmod e2fsprogs ovmf seabios debian-archive-keyring ca-certificates curl gcc g++
      iproute2 jq prometheus etcd-server protobuf-compiler nfs-ganesha nfs-ganesha-vfs rpcbind)
missing=()
for p in "${pkgs[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# QEMU from bookworm-backports: the same QEMU everywhere (and the one Debian 12 machines here carry).
bpo=/etc/apt/sources.list.d/hvnode-bookworm-backports.sources
if ! command -v qemu-system-x86_64 >/dev/null; then
    if ! grep -rqs "bookworm-backports" /etc/apt/sources.list /etc/apt/sources.list.d/; then
        cat > "$bpo" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
    fi
    need_qemu=1
fi
had_prometheus=$(dpkg-query -W -f='${Status}' prometheus 2>/dev/null | grep -c "install ok installed" || true)
had_etcd=$(dpkg-query -W -f='${Status}' etcd-server 2>/dev/null | grep -c "install ok installed" || true)
had_ganesha=$(dpkg-query -W -f='${Status}' nfs-ganesha 2>/dev/null | grep -c "install ok installed" || true)
if [ ${#missing[@]} -gt 0 ] || [ -n "${need_qemu:-}" ]; then
    echo "==> installing Debian packages: ${missing[*]} ${need_qemu:+qemu-system-x86 (bookworm-backports)}"
    apt-get update -qq
    export DEBIAN_FRONTEND=noninteractive
    [ ${#missing[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    [ -z "${need_qemu:-}" ] || apt-get install -y -qq --no-install-recommends -t bookworm-backports \
        qemu-system-x86 qemu-utils >/dev/null
fi
if ! command -v cargo >/dev/null; then
    if [ -x "$HOME/.cargo/bin/cargo" ]; then
        echo "note: cargo is in ~/.cargo/bin; add it to PATH" >&2
    else
        echo "==> installing Rust from Debian (cargo, rustc)"
        apt-get install -y -qq cargo rustc >/dev/null
    fi
fi
# Debian ships promtool (the /metrics tests' parser) only with the Prometheus server: a server this
# script installed is stopped and disabled, the tests need only the tool.
if [ "$had_prometheus" = 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
# etcd (Debian's etcd-server) for the cluster crate's tests and bench, which start their own etcd
# on free loopback ports; the etcd-client crate's build compiles etcd's .proto files with protoc
# (protobuf-compiler). The package starts an etcd service on :2379: one this script installed is
# stopped and disabled.
if [ "$had_etcd" = 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now etcd >/dev/null 2>&1 || true
fi
# nfs-ganesha (with rpcbind) serves the QEMU cluster test's shared storage: the test starts its
# own server on a free loopback port (this host's kernel may have no NFS server). The service
# the package starts is stopped and disabled.
if [ "$had_ganesha" = 0 ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; then
    systemctl disable --now nfs-ganesha >/dev/null 2>&1 || true
fi
# The fuzz targets (scripts/fuzz.sh) run under cargo-fuzz, from crates.io.
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "==> installing cargo-fuzz (crates.io)"
    cargo install --locked cargo-fuzz
fi
# The API contract test (agent/tests/api_contract.rs) runs schemathesis, from PyPI, in a venv of
# Debian's python3 (python3-venv).
st_venv=/var/cache/hvnode/schemathesis-venv
st_version=4.32.5
if ! "$st_venv/bin/st" --version 2>/dev/null | grep -q "version $st_version\$"; then
    echo "==> installing schemathesis $st_version (PyPI) into $st_venv"
    dpkg-query -W -f='${Status}' python3-venv 2>/dev/null | grep -q "install ok installed" || {
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3-venv >/dev/null
    }
    rm -rf "$st_venv"
    mkdir -p "$(dirname "$st_venv")"
    /usr/bin/python3 -m venv "$st_venv"
    "$st_venv/bin/pip" install -q "schemathesis==$st_version"
fi
echo "==> host ready: $(qemu-system-x86_64 --version | head -n1)"
