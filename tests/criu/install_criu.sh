#!/usr/bin/env bash
# Install Debian trixie's CRIU (4.1.1) into a private root and print the path of a wrapper that
# runs it. Bookworm's criu 3.17 cannot start on kernels >= 6.13 ([vvar_vclock], CRIU #2532), and
# trixie's needs trixie's libc: so the packages are unpacked (dpkg -x) into ROOT, never
# installed, and the wrapper runs them with ROOT's own dynamic loader. The system's sources,
# libc and package database are left alone.
#
# Idempotent and cached: a second run only checks that ROOT/ok exists (milliseconds).
# Usage: install_criu.sh [ROOT]   (default: $UFFD_CRIU_ROOT or /var/cache/userfaultfd-criu)
set -euo pipefail
root=${1:-${UFFD_CRIU_ROOT:-/var/cache/userfaultfd-criu}}
wrapper="$root/criu"
if [[ -f "$root/ok" && -x "$wrapper" ]]; then
    echo "$wrapper"
    exit 0
fi
mkdir -p "$root"
exec 9>"$root/.lock"
flock 9  # one installer at a time (parallel test runs)
if [[ -f "$root/ok" && -x "$wrapper" ]]; then
    echo "$wrapper"
    exit 0
fi
# The Debian mirror the system already uses.
mirror=$(grep -rhoE 'https?://[^ ]*/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
    | head -n1 | tr -d ' ' || true)
if [[ -z "$mirror" ]]; then
    echo "install_criu.sh: no Debian mirror in /etc/apt/sources.list*" >&2
    exit 1
fi
apt_dir="$root/apt"
rm -rf "$apt_dir" "$root/debs" "$root/fs"
mkdir -p "$apt_dir/lists/partial" "$apt_dir/archives/partial" "$apt_dir/etc/preferences.d" \
    "$apt_dir/etc/apt.conf.d" "$root/debs" "$root/fs"
: >"$apt_dir/status"
echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror trixie main" \
    >"$apt_dir/etc/sources.list"
opts=(
    -o "Dir::Etc::sourcelist=$apt_dir/etc/sources.list"
    -o "Dir::Etc::sourceparts=-"
    -o "Dir::Etc::preferencesparts=$apt_dir/etc/preferences.d"
    -o "Dir::Etc::parts=$apt_dir/etc/apt.conf.d"
    -o "Dir::State=$apt_dir"
    -o "Dir::State::lists=$apt_dir/lists"
    -o "Dir::State::status=$apt_dir/status"
    -o "Dir::Cache=$apt_dir"
    -o "Dir::Cache::archives=$apt_dir/archives"
    -o "APT::Architecture=amd64"
    -o "Debug::NoLocking=1"
    -o "Acquire::Languages=none"
    -o "APT::Sandbox::User=root"
)
apt-get "${opts[@]}" -qq update >&2
# criu and its library closure (no recommends); virtual packages (<name>) have no .deb.
mapfile -t packages < <(apt-cache "${opts[@]}" depends --recurse --no-recommends --no-suggests \
    --no-conflicts --no-breaks --no-replaces --no-enhances criu libcompel1 \
    | grep -E '^[a-z0-9]' | sort -u)
(cd "$root/debs" && apt-get "${opts[@]}" -qq download "${packages[@]}" >&2)
for deb in "$root"/debs/*.deb; do
    dpkg -x "$deb" "$root/fs"
done
lib="$root/fs/usr/lib/x86_64-linux-gnu"
cat >"$wrapper.tmp" <<WRAP
#!/bin/sh
# CRIU from Debian trixie, run from the private root $root (see tests/criu/install_criu.sh).
exec "$lib/ld-linux-x86-64.so.2" --library-path "$lib:$root/fs/lib/x86_64-linux-gnu" \
    "$root/fs/usr/sbin/criu" "\$@"
WRAP
chmod +x "$wrapper.tmp"
mv "$wrapper.tmp" "$wrapper"
"$wrapper" --version >&2
rm -rf "$root/debs" "$apt_dir/archives" "$apt_dir/lists"
touch "$root/ok"
echo "$wrapper"
