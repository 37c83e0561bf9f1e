#!/bin/sh
# Build (or reuse) the Debian chroots that give the testbed Postfix 3.10 (trixie)
# and 3.11 (sid).  Debian 12 ships 3.7; the newer suites carry the REQUIRETLS and
# TLS-Required code the plugin must work with, so one test run proves all three.
#
# Usage: sh scripts/build-chroots.sh [SUITE...]        (default: trixie sid)
# Env:   RTLS_TESTBED_CACHE   cache dir (default /var/cache/requiretls-testbed)
#        RTLS_DEBIAN_MIRROR   Debian mirror URL (default: taken from this host's apt sources)
#        RTLS_REBUILD=1       rebuild even if a finished chroot exists
#
# A finished chroot has CACHE/SUITE/.rtls-ready holding its Postfix version.  Builds
# go to a temporary directory first and are renamed into place, so an interrupted
# build never leaves a half chroot that looks finished.  Runs as root without a
# terminal: debconf is non-interactive and a policy-rc.d in the chroot keeps
# package scripts from starting daemons.  The mirror is read from apt's own
# configuration so that no mirror host name is hard-wired into the project.
set -eu

CACHE=${RTLS_TESTBED_CACHE:-/var/cache/requiretls-testbed}
[ "$#" -gt 0 ] || set -- trixie sid

if [ "$(id -u)" != 0 ]; then
    echo "build-chroots: must run as root" >&2
    exit 1
fi
command -v debootstrap >/dev/null || { echo "build-chroots: debootstrap missing (run scripts/install-apt.sh)" >&2; exit 1; }

MIRROR=${RTLS_DEBIAN_MIRROR:-$(sh "$(dirname "$0")/debian-mirror.sh")}
if [ -z "$MIRROR" ]; then
    echo "build-chroots: no Debian mirror found in the apt sources; set RTLS_DEBIAN_MIRROR" >&2
    exit 1
fi

mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9

build_suite() {
    suite=$1
    dest="$CACHE/$suite"
    if [ -f "$dest/.rtls-ready" ] && [ "${RTLS_REBUILD:-0}" != 1 ]; then
        echo "build-chroots: $suite: cached, Postfix $(cat "$dest/.rtls-ready")"
        return 0
    fi
    tmp="$CACHE/.build-$suite"
    rm -rf "$tmp"
    start=$(date +%s)
    # Everything runs in a private mount namespace: the /proc and /dev mounts that
    # the second stage makes vanish with it even if the build is interrupted.
    unshare --mount --propagation private sh -eu -c '
        tmp=$1; suite=$2; mirror=$3
        debootstrap --foreign --variant=minbase --include=postfix,ca-certificates,libsasl2-modules \
            "$suite" "$tmp" "$mirror" >"$tmp.log" 2>&1 || { tail -n 30 "$tmp.log" >&2; exit 1; }
        printf "#!/bin/sh\nexit 101\n" >"$tmp/usr/sbin/policy-rc.d"
        chmod 755 "$tmp/usr/sbin/policy-rc.d"
        DEBIAN_FRONTEND=noninteractive DEBCONF_NONINTERACTIVE_SEEN=true \
            chroot "$tmp" /debootstrap/debootstrap --second-stage >>"$tmp.log" 2>&1 \
            || { tail -n 30 "$tmp.log" >&2; exit 1; }
        # debootstrap removes its own policy-rc.d at the end; keep ours for later apt use.
        printf "#!/bin/sh\nexit 101\n" >"$tmp/usr/sbin/policy-rc.d"
        chmod 755 "$tmp/usr/sbin/policy-rc.d"
        chroot "$tmp" apt-get clean >/dev/null 2>&1 || true
    ' build "$tmp" "$suite" "$MIRROR"
    version=$(chroot "$tmp" /usr/sbin/postconf -d -h mail_version)
    # resolv.conf is bind-mounted over at run time; it must exist as a file.
    rm -f "$tmp/etc/resolv.conf"
    : >"$tmp/etc/resolv.conf"
    echo "$version" >"$tmp/.rtls-ready"
    rm -rf "$dest"
    mv "$tmp" "$dest"
    rm -f "$tmp.log"
    echo "build-chroots: $suite: built Postfix $version in $(( $(date +%s) - start )) s"
}

# The chroot's postfix/postdrop ids must equal the host's: sockets and files that host-side processes
# (milter, delivery agent, tests) create for Postfix are checked by numeric id inside the chroot.
align_ids() {
    root=$1
    h_uid=$(id -u postfix) h_gid=$(getent group postfix | cut -d: -f3) h_pd=$(getent group postdrop | cut -d: -f3)
    want="$h_uid:$h_gid:$h_pd"
    [ "$(cat "$root/.rtls-ids" 2>/dev/null)" = "$want" ] && return 0
    o_uid=$(chroot "$root" id -u postfix) o_gid=$(chroot "$root" getent group postfix | cut -d: -f3)
    o_pd=$(chroot "$root" getent group postdrop | cut -d: -f3)
    if [ "$o_uid:$o_gid:$o_pd" != "$want" ]; then
        for id in "$h_uid"; do
            other=$(chroot "$root" getent passwd "$id" | cut -d: -f1)
            [ -z "$other" ] || [ "$other" = postfix ] || { echo "build-chroots: uid $id taken by $other in $root" >&2; exit 1; }
        done
        for id in "$h_gid" "$h_pd"; do
            other=$(chroot "$root" getent group "$id" | cut -d: -f1)
            case "$other" in ""|postfix|postdrop) ;; *) echo "build-chroots: gid $id taken by $other in $root" >&2; exit 1;; esac
        done
        lists=$(mktemp -d)
        find "$root" -xdev -uid "$o_uid" -print0 >"$lists/u"
        find "$root" -xdev -gid "$o_gid" -print0 >"$lists/g"
        find "$root" -xdev -gid "$o_pd" -print0 >"$lists/p"
        # Move both groups out of the way first: the new id of one may be the old id of the other.
        chroot "$root" groupmod -g 59998 postdrop
        chroot "$root" groupmod -g 59999 postfix
        chroot "$root" groupmod -g "$h_pd" postdrop
        chroot "$root" groupmod -g "$h_gid" postfix
        chroot "$root" usermod -u "$h_uid" -g "$h_gid" postfix 2>/dev/null || true
        xargs -0 -r chown -h "$h_uid" <"$lists/u"
        xargs -0 -r chgrp -h "$h_gid" <"$lists/g"
        xargs -0 -r chgrp -h "$h_pd" <"$lists/p"
        rm -rf "$lists"
        # chgrp cleared the set-gid bits of postdrop/postqueue: let Postfix restore its own modes.
        chroot "$root" /usr/sbin/postfix set-permissions >/dev/null 2>&1 || {
            echo "build-chroots: postfix set-permissions failed in $root" >&2; exit 1; }
        echo "build-chroots: $(basename "$root"): postfix ids $o_uid:$o_gid:$o_pd -> $want"
    fi
    echo "$want" >"$root/.rtls-ids"
    touch "$root/.rtls-ready"  # invalidates the testbed's cached Postfix queue templates
}

for s in "$@"; do
    build_suite "$s"
    # A running test session may be using the chroot: hold the testbed's session lock while changing ids
    # (not needed for a private cache dir, which no bed uses).
    if [ "$CACHE" = /var/cache/requiretls-testbed ]; then
        exec 8>/run/requiretls-testbed.session.lock
        flock 8
    fi
    align_ids "$CACHE/$s"
    [ "$CACHE" != /var/cache/requiretls-testbed ] || flock -u 8
done
