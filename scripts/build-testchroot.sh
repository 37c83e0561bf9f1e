#!/bin/sh
# Build (or reuse) a Debian chroot for the packaging and Sendmail tests, cached like the testbed's
# Postfix chroots (scripts/build-chroots.sh).
#
# Usage: sh scripts/build-testchroot.sh NAME
#   bookworm-base       clean Debian 12 with Postfix, systemd and man-db (systemd-analyze verify reads
#                       the units' Documentation= pages); the requiretls package's dependencies
#                       are downloaded into its apt cache (not installed), so that installing the .deb
#                       into a copy works from the cache
#   bookworm-sendmail   Debian 12 with Debian's sendmail (sendmail-bin, sendmail-cf, m4); like the base,
#                       the package's dependencies are in its apt cache (the package tests install the .deb
#                       on this Sendmail host)
# Env:   RTLS_TESTBED_CACHE   cache dir (default /var/cache/requiretls-testbed)
#        RTLS_DEBIAN_MIRROR   Debian mirror URL (default: taken from this host's apt sources)
#        RTLS_REBUILD=1       rebuild even if a finished chroot exists
#
# A finished chroot has CACHE/NAME/.rtls-ready; builds go to a temporary directory and are renamed into
# place, so an interrupted build never leaves a half chroot that looks finished.  Runs as root without a
# terminal: debconf is non-interactive and a policy-rc.d keeps package scripts from starting daemons.
# The mirror is read from apt's own configuration so that no mirror host name is hard-wired here.
set -eu
PATH=/usr/sbin:/usr/bin:/sbin:/bin
export PATH
CACHE=${RTLS_TESTBED_CACHE:-/var/cache/requiretls-testbed}
name=${1:?usage: build-testchroot.sh NAME}
suite=bookworm
# What the requiretls package needs from Debian (packaging/debian/control), fetched into the base's cache.
PKG_DEPS="adduser procps python3 python3-aiosmtpd python3-cryptography python3-dnspython python3-milter
python3-prometheus-client python3-uvloop"
# recipe: written into .rtls-ready; a cached chroot built by an older recipe (no such line) is rebuilt.
case "$name" in
    bookworm-base) include=postfix,systemd,man-db,ca-certificates; recipe="" ;;
    bookworm-sendmail) include=sendmail-bin,sendmail-cf,m4,ca-certificates; recipe="recipe=deps-1" ;;
    *) echo "build-testchroot: unknown chroot $name" >&2; exit 2 ;;
esac

if [ "$(id -u)" != 0 ]; then
    echo "build-testchroot: must run as root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "build-testchroot: debootstrap missing" >&2; exit 1; }

MIRROR=${RTLS_DEBIAN_MIRROR:-$(sh "$(dirname "$0")/debian-mirror.sh")}
if [ -z "$MIRROR" ]; then
    echo "build-testchroot: no Debian mirror found in the apt sources; set RTLS_DEBIAN_MIRROR" >&2
    exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock-$name"
flock 9

dest="$CACHE/$name"
if [ -f "$dest/.rtls-ready" ] && [ "${RTLS_REBUILD:-0}" != 1 ] \
        && { [ -z "$recipe" ] || grep -qx "$recipe" "$dest/.rtls-ready"; }; then
    echo "build-testchroot: $name: cached"
    exit 0
fi
tmp="$CACHE/.build-$name"
rm -rf "$tmp"
start=$(date +%s)
# A private mount namespace: the /proc and /dev mounts of the second stage vanish with it.
unshare --mount --propagation private sh -eu -c '
    tmp=$1; suite=$2; mirror=$3; include=$4; name=$5; deps=$6
    debootstrap --foreign --variant=minbase --include="$include" "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 \
        || { tail -n 30 "$tmp.log" >&2; exit 1; }
    printf "#!/bin/sh\nexit 101\n" >"$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
        chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$tmp.log" 2>&1 \
        || { tail -n 30 "$tmp.log" >&2; exit 1; }
    printf "#!/bin/sh\nexit 101\n" >"$tmp/usr/sbin/policy-rc.d"
    chmod 755 "$tmp/usr/sbin/policy-rc.d"
    mount -t proc proc "$tmp/proc"
    cp /etc/resolv.conf "$tmp/etc/resolv.conf" 2>/dev/null || true
    chroot "$tmp" apt-get update -q >>"$tmp.log" 2>&1 || { tail -n 30 "$tmp.log" >&2; exit 1; }
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive chroot "$tmp" apt-get install -y -q --download-only $deps \
        >>"$tmp.log" 2>&1 || { tail -n 30 "$tmp.log" >&2; exit 1; }
    umount "$tmp/proc"
' build "$tmp" "$suite" "$MIRROR" "$include" "$name" "$PKG_DEPS"
# resolv.conf: the tests need none (no DNS is used); an empty file keeps lookups from leaving the host.
rm -f "$tmp/etc/resolv.conf"
: >"$tmp/etc/resolv.conf"
{ date -u +%Y-%m-%dT%H:%M:%SZ; [ -z "$recipe" ] || echo "$recipe"; } >"$tmp/.rtls-ready"
rm -rf "$dest"
mv "$tmp" "$dest"
rm -f "$tmp.log"
echo "build-testchroot: $name: built in $(( $(date +%s) - start )) s"
