#!/usr/bin/env bash
# Builds the image twice from this checkout and checks that both builds give the same root image
# (build/iso/live/root.squashfs), hash tree and root hash. Each build's results are kept under
# build/repro/1 and build/repro/2; if the roots differ, the file listings of both squashfs images
# (unsquashfs -lls) are compared, so the report names the files that differ.
#
# The second build reuses cargo's and mkosi's caches (Incremental=yes), so it checks everything
# after package installation: mkosi's final steps, the extra trees, mksquashfs, veritysetup, the
# initrd. HVNODE_REPRO_FRESH=1 makes the second build compile our four binaries again and drop
# mkosi's cached tree first (mkosi -f clean), which also checks compilation and package
# installation, as long as the mirror serves the same package versions.
set -euo pipefail
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
out=$top/build/repro
SOURCE_DATE_EPOCH=${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || echo 1700000000)}
# Both builds name the same commit, even if HEAD moves while they run.
HVNODE_COMMIT=${HVNODE_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
export SOURCE_DATE_EPOCH HVNODE_COMMIT
[ -z "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] ||
    echo "warning: the checkout has uncommitted changes; do not edit it while the two builds run" >&2

keep() { # the results of one build into $out/$1
    local d=$out/$1
    rm -rf "$d"
    install -d "$d"
    cp build/iso/live/root.squashfs build/iso/live/root.verity build/iso/boot/initrd.img \
        build/iso/boot/vmlinuz build/hvnode.iso build/root-hash "$d/"
    (cd "$d" && sha256sum root.squashfs root.verity initrd.img vmlinuz hvnode.iso > SHA256SUMS)
}

rm -rf "$out"
echo "==> build 1 of 2 (SOURCE_DATE_EPOCH=$SOURCE_DATE_EPOCH)"
"$top/image/build.sh"
keep 1
echo "==> build 2 of 2"
if [ -n "${HVNODE_REPRO_FRESH:-}" ]; then
    # Our four crates are compiled again (their dependencies stay cached)...
    cargo clean --release --target x86_64-unknown-linux-gnu \
        -p hvnode-init -p hvnode-agent -p hvnode-vmm -p hvnode-console
    # ...and mkosi's clean with one -f drops the cached package tree, not the downloaded packages.
    "$top/image/mkosi.sh" --cache-directory="${HVNODE_CACHE:-/var/cache/hvnode}/mkosi-cache" -f clean
fi
"$top/image/build.sh"
keep 2

status=0
echo "==> comparing"
for f in root-hash root.squashfs root.verity initrd.img vmlinuz hvnode.iso; do
    if cmp -s "$out/1/$f" "$out/2/$f"; then
        printf '  same      %s\n' "$f"
    else
        printf '  DIFFERENT %s\n' "$f"
        status=1
    fi
done
printf '  root hash %s\n' "$(cat "$out/1/root-hash")"
if ! cmp -s "$out/1/root.squashfs" "$out/2/root.squashfs"; then
    echo "==> files that differ between the two roots (unsquashfs -lls; <: build 1, >: build 2)"
    for n in 1 2; do
        unsquashfs -lls -d '' "$out/$n/root.squashfs" | LC_ALL=C sort -k6 > "$out/$n/listing"
    done
    diff "$out/1/listing" "$out/2/listing" | head -n 200 || true
    echo "(same listing means same names, modes, owners, sizes and times: the contents differ;"
    echo " unpack both with unsquashfs -d DIR and compare with diff -r or diffoscope)"
fi
exit $status
