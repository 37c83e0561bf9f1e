#!/bin/sh
# Install the Debian packages the project needs (build, tests, demo, testbed).
# Runs as root without a terminal. Services that Debian would start on install
# (postfix, nsd, unbound, redis, amavis, opendkim, dovecot) are kept stopped: the testbed runs its own
# private instances on loopback, and a system daemon on :25 or :53 would be in
# the way.  Safe to run again: it installs only what is missing.
set -eu
PKGS="python3-venv python3-dev libmilter-dev build-essential
postfix nsd unbound ldnsutils debootstrap redis-server openssl iproute2 util-linux
procps psmisc swaks bsdutils debian-archive-keyring miltertest prometheus
amavisd-new opendkim opendkim-tools dovecot-core dovecot-lmtpd libsasl2-modules"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing="$missing $p"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-apt: need root to install:$missing" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
# Keep package scripts from starting daemons (policy-rc.d: 101 = action forbidden).
prc=/usr/sbin/policy-rc.d
had_prc=0
[ -e "$prc" ] && had_prc=1
if [ "$had_prc" = 0 ]; then
    printf '#!/bin/sh\nexit 101\n' > "$prc"
    chmod 755 "$prc"
    trap 'rm -f "$prc"' EXIT
fi
apt-get update -q || true
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing
