#!/bin/sh
# Build the Debian package of an earlier commit, for the upgrade test (tests/packaging/test_lifecycle.py):
# CACHE/prev-deb/COMMIT/requiretls_UPSTREAM-0~COMMIT_all.deb, cached.
#
# Usage: sh scripts/build-prev-deb.sh COMMIT
# Env:   RTLS_TESTBED_CACHE   cache dir (default /var/cache/requiretls-testbed)
#
# The commit is checked out into a temporary clone of this repository (objects shared, nothing in this work
# tree changes) and built with that commit's own scripts/build-deb.sh.  Its changelog version gets the Debian
# revision 0~COMMIT, lower than any -1 of the same upstream version, so that installing the current package
# over it is an upgrade for dpkg (the released package and the work tree may carry the same version).
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
commit=${1:?usage: build-prev-deb.sh COMMIT}
cd "$(dirname "$0")/.."
ROOT=$(pwd)
CACHE=${RTLS_TESTBED_CACHE:-/var/cache/requiretls-testbed}
full=$(git rev-parse --verify -q "$commit^{commit}") || {
    echo "build-prev-deb: commit $commit is not in this repository (a shallow clone?)" >&2
    exit 3
}
short=$(git rev-parse --short=12 "$full")
dest="$CACHE/prev-deb/$short"
mkdir -p "$CACHE/prev-deb"
exec 9>"$CACHE/prev-deb/.lock-$short"
flock 9
if ls "$dest"/requiretls_*_all.deb >/dev/null 2>&1; then
    echo "build-prev-deb: $short: cached"
    exit 0
fi
tmp=$(mktemp -d "$CACHE/prev-deb/.build-$short.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
git clone -q --shared --no-checkout "$ROOT" "$tmp/src"
git -C "$tmp/src" -c advice.detachedHead=false checkout -q "$full"
changelog="$tmp/src/packaging/debian/changelog"
version=$(dpkg-parsechangelog -l "$changelog" -S Version)
sed -i "1s/($version)/(${version%-*}-0~$short)/" "$changelog"
RTLS_DEB_OUT="$tmp/out" sh "$tmp/src/scripts/build-deb.sh" >/dev/null
mkdir -p "$tmp/deb"
cp "$tmp/out"/requiretls_*_all.deb "$tmp/deb/"
rm -rf "$dest"
mv "$tmp/deb" "$dest"
echo "build-prev-deb: built $(ls "$dest")"
