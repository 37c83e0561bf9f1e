#!/bin/sh
# Build the Debian package: build/deb/requiretls_VERSION_all.deb (plus the source package and .changes).
#
# Usage: sh scripts/build-deb.sh [--lint | --deps-only]
#   --lint       also run lintian on the .changes; fail on any error (warnings are printed)
#   --deps-only  install the build dependencies (and lintian), build nothing
# Env:   RTLS_DEB_OUT   output directory (default: build/deb)
#
# Runs as root without a terminal and installs its build dependencies with apt.  The source package is
# made from the files git knows (tracked, plus new files not ignored), so local build products (venv,
# caches, egg-info) never end up in it; packaging/debian/ becomes debian/.
set -eu
# Debian's own tools and Python only: a python3 earlier on PATH (pyenv, a venv) is not what the package
# is built for.
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT=${RTLS_DEB_OUT:-$ROOT/build/deb}
LINT=0
DEPS_ONLY=0
case "${1:-}" in
    --lint) LINT=1 ;;
    --deps-only) LINT=1; DEPS_ONLY=1 ;;
    "") ;;
    *) echo "usage: build-deb.sh [--lint | --deps-only]" >&2; exit 2 ;;
esac

BUILD_DEPS="dpkg-dev debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools fakeroot git"
[ "$LINT" = 1 ] && BUILD_DEPS="$BUILD_DEPS lintian"
missing=""
for p in $BUILD_DEPS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "build-deb: need root to install:$missing" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null || true
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing >/dev/null
fi
[ "$DEPS_ONLY" = 1 ] && exit 0

version=$(dpkg-parsechangelog -l packaging/debian/changelog -S Version)
upstream=${version%-*}
code_version=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' requiretls/__init__.py)
if [ "$upstream" != "$code_version" ]; then
    echo "build-deb: packaging/debian/changelog says $upstream, requiretls/__init__.py says $code_version" >&2
    exit 1
fi

start=$(date +%s)
rm -rf "$OUT"
mkdir -p "$OUT"
src="$OUT/requiretls-$upstream"
mkdir -p "$src"
# Every file git knows of in the work tree, minus the Debian directory (it goes in the .debian.tar).
git ls-files -z --cached --others --exclude-standard \
    | tr '\0' '\n' | grep -v '^packaging/debian/' | while IFS= read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done \
    > "$OUT/files"
tar -cf - -T "$OUT/files" | tar -xf - -C "$src"
rm -f "$OUT/files"
# A reproducible orig tarball: sorted names, fixed owner and the changelog's date.
epoch=$(dpkg-parsechangelog -l packaging/debian/changelog -S Timestamp)
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime="@$epoch" -C "$OUT" -czf \
    "$OUT/requiretls_$upstream.orig.tar.gz" "requiretls-$upstream"
cp -a packaging/debian "$src/debian"

( cd "$src" && dpkg-buildpackage -us -uc >"$OUT/build.log" 2>&1 ) || {
    tail -n 40 "$OUT/build.log" >&2
    echo "build-deb: dpkg-buildpackage failed; full log: $OUT/build.log" >&2
    exit 1
}
deb="$OUT/requiretls_${version}_all.deb"
echo "build-deb: built $deb in $(( $(date +%s) - start )) s"

if [ "$LINT" = 1 ]; then
    lstart=$(date +%s)
    lintian --fail-on error "$OUT/requiretls_${version}_"*.changes >"$OUT/lintian.log" 2>&1 || {
        cat "$OUT/lintian.log" >&2
        echo "build-deb: lintian reports errors" >&2
        exit 1
    }
    cat "$OUT/lintian.log"
    echo "build-deb: lintian: no errors ($(( $(date +%s) - lstart )) s)"
fi
