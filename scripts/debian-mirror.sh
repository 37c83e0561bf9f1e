#!/bin/sh
# Print the URL of the main Debian archive this host uses, read from apt's own
# configuration (so that no mirror host name is written into the project): the
# first deb822 stanza or one-line entry whose suite is this host's codename.
# Used by build-chroots.sh and build-testchroot.sh.
set -eu
host_mirror() {
    codename=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        awk -v cn="$codename" '
            function flush() { if (uris != "" && suites ~ ("(^| )" cn "( |$)") && types ~ /(^| )deb( |$)/) { split(uris, u, " "); print u[1]; exit } uris=""; suites=""; types="" }
            /^[ \t]*$/ { flush(); next }
            /^[ \t]*#/ { next }
            tolower($1) == "types:"  { $1=""; types=$0 }
            tolower($1) == "uris:"   { $1=""; sub(/^ +/, ""); uris=$0 }
            tolower($1) == "suites:" { $1=""; suites=$0 }
            END { flush() }' "$f"
    done
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        sed -e 's/\[[^]]*\]//' "$f" | awk -v cn="$codename" '$1 == "deb" && $3 == cn { print $2; exit }'
    done
}

host_mirror | head -n 1
