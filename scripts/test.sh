#!/usr/bin/env bash
# Sets everything up and runs every test: unit tests, host KVM integration tests (under CI=true a
# test that cannot run its subject fails), every fuzz target briefly, then builds the node image
# and the guest payload and runs the QEMU boot tests (six boots: UEFI/BIOS x CD/USB stick; console,
# screen and keyboards, registration, a reboot; a Linux guest run by our VMM nested inside the
# node; a modified root that dm-verity refuses; installing to disk under UEFI and BIOS, updating
# the installed node and falling back from a broken update; two nodes live-migrating a guest; two nodes forming
# a cluster on the host's etcd and NFS export, draining a node for maintenance, fencing a node cut
# from etcd with its watchdog and restarting its HA guest on the other, and again when a node dies).
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
[ "$(id -u)" = 0 ] || { echo "error: run as root (it installs packages, builds the image, uses /dev/kvm): sudo $0" >&2; exit 1; }
start=$(date +%s)
step() { printf '\n==> [%4ss] %s\n' "$(($(date +%s) - start))" "$*"; }

step "host setup"
./image/setup-host.sh

step "unit and host KVM integration tests, the API contract (schemathesis) among them"
# The VMM and agent binaries first: the agent's VMM tests and its contract test
# (agent/tests/api_contract.rs) run them.
cargo build --workspace --bins
cargo test --workspace --exclude hvnode-tests

step "fuzz targets, briefly (scripts/fuzz.sh)"
./scripts/fuzz.sh "${HVNODE_FUZZ_SECS:-10}"

step "node image of the next release, for the update test (build/update-next.hvb)"
# The same tree as the release below but a newer version, so the boot test can update an
# installed node to it and see the version change. Built first: the image build below replaces
# build/ except this bundle.
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
next_version="${version%.*}.$((${version##*.} + 1))"
rm -f build/update-next.hvb
HVNODE_VERSION=$next_version ./image/build.sh
mv build/hvnode.hvb build/update-next.hvb

step "node image"
./image/build.sh

step "guest payload for the nested test"
./tests/guest/build.sh

step "QEMU boot tests"
# Two single-node QEMUs at a time; the two-node tests (two QEMUs each) one at a time after them,
# so that no more than two TCG machines share the cores (the nested guest starves with more).
HVNODE_ISO=$top/build/hvnode.iso HVNODECTL=$top/target/debug/hvnodectl \
    cargo test -p hvnode-tests -- --test-threads=2 --nocapture --skip two_nodes
step "QEMU two-node tests (migration; cluster, maintenance, HA)"
HVNODE_ISO=$top/build/hvnode.iso HVNODECTL=$top/target/debug/hvnodectl \
    cargo test -p hvnode-tests -- --test-threads=1 --nocapture two_nodes

step "all tests passed"
