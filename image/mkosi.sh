#!/usr/bin/env bash
# Runs mkosi 25 (Debian trixie's package) on this Debian 12 host without installing it: the .deb is
# fetched once with apt from trixie into the cache and unpacked there. Bookworm's mkosi 14 cannot
# build this image (see image/README.md).
set -euo pipefail
cache=${HVNODE_CACHE:-/var/cache/hvnode}
want=25.3
dir=$cache/mkosi-$want
if [ ! -f "$dir/usr/lib/python3/dist-packages/mkosi/__main__.py" ]; then
    echo "fetching mkosi $want (Debian trixie) into $dir" >&2
    apt_dir=$cache/trixie-apt
    mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$dir"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian trixie main" \
        > "$apt_dir/sources.list"
    opts=(-o "Dir::Etc::sourcelist=$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
          -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache::archives=$apt_dir/archives" -o APT::Sandbox::User=root)
    apt-get -qq "${opts[@]}" update
    (cd "$apt_dir" && apt-get -qq "${opts[@]}" download "mkosi=$want*")
    deb=$(ls "$apt_dir"/mkosi_"$want"*_all.deb | head -n1)
    dpkg-deb -x "$deb" "$dir"
fi
top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"
PYTHONPATH=$dir/usr/lib/python3/dist-packages exec python3 -m mkosi "$@"
