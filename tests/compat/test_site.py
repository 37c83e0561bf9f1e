"""Coexistence on a real admin's site (issue 15): the real Debian amavisd-new, opendkim and Dovecot LMTP, with
postscreen, ``non_smtpd_milters = $smtpd_milters`` and a SASL relayhost, configured BEFORE ``requiretls
postfix-config --apply``; then every message class is sent once through the site, on each Postfix version.

One site per version (the set-ups do not interfere, so they share one instance): see docs/operations.md,
"Living with other software", for what each set-up needs from the admin.  Every check is recorded in the
matrix (docs/compatibility.md, rewritten at the end of the session) and the test fails if any failed.
"""

from __future__ import annotations

import importlib.metadata
import re
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from typing import Any

import dkim
import pytest

from tests.compat.daemons import Amavis, Dovecot, MtaStsResolver, OpenDkim, package_version
from tests.compat.matrix import MATRIX
from tests.e2e.plugin import Plugin
from tests.testbed.bed import Bed
from tests.testbed.hosts import MX_BY_KEY
from tests.testbed.postfix import Postfix
from tests.testbed.relay_server import RelayOptions, RelayServer

pytestmark = [pytest.mark.compat, pytest.mark.e2e, pytest.mark.testbed]

DOMAIN = "sender.test"
LOCAL_USER = "mailuser"
RELAY_NAME = "mx.dane.test"
AMAVIS_MARK = re.compile(rb"^Received: .*\n(?:[ \t].*\n)*?[ \t].*\(amavis, port \d+\)", re.M)


def _header_block(raw: bytes) -> bytes:
    raw = raw.replace(b"\r\n", b"\n")
    return raw.split(b"\n\n", 1)[0] + b"\n"


def amavis_passes(raw: bytes) -> int:
    """How many times the message went through amavisd-new: its own Received field, ``(amavis, port N)``."""
    return len(re.findall(rb"\(amavis, port \d+\)", _header_block(raw)))


def dkim_ok(raw: bytes, dk: OpenDkim) -> bool:
    """dkimpy's verifier; the key comes from dnsfunc (the key opendkim signs with), not from DNS."""
    data = raw if b"\r\n" in raw else raw.replace(b"\n", b"\r\n")
    return bool(dkim.verify(data, dnsfunc=dk.dnsfunc))


def _milter_list(text: str) -> list[str]:
    """A milter list as Postfix reads it: items separated by commas or space, ``{ ... }`` one item."""
    return re.findall(r"\{[^}]*\}|[^\s,{}]+", text)


def _message(sender: str, rcpt: str, subject: str, **headers: str) -> EmailMessage:
    m = EmailMessage()
    m["From"] = sender
    m["To"] = rcpt
    m["Subject"] = subject
    m["Date"] = "Sun, 29 Nov 2026 04:00:00 +0000"
    m["Message-ID"] = f"<{time.time_ns()}.{rcpt}@{DOMAIN}>"
    for k, v in headers.items():
        m[k.replace("_", "-")] = v
    m.set_content(f"{subject}\nline two\n")
    return m


class Site:
    """The admin's site on one Postfix instance, and the host daemons serving it."""

    def __init__(self, bed: Bed, pf: Postfix) -> None:
        self.bed, self.pf = bed, pf
        base = bed.state / "compat" / pf.version
        base.mkdir(parents=True, exist_ok=True)
        for p in (bed.state / "compat", base):
            p.chmod(0o755)
        x = pf.ports.extra
        # extra[0] and extra[9]: the plugin's re-injection ports; extra[7]: the SASL relay
        self.amavis = Amavis(base / "amavis", port=x[1], forward_port=x[2])
        self.dkim = OpenDkim(base / "opendkim", port=x[3])
        self.dovecot = Dovecot(base / "dovecot", port=x[4])
        self.sts = MtaStsResolver(base / "mta-sts", port=x[5], resolv_conf=bed.state / "dns" / "resolv.conf",
                                  cafile=bed.pki.ca_cert)
        self.sts_map = f"socketmap:inet:127.0.0.1:{x[5]}:postfix"
        self.plugin = Plugin(bed, pf, apply_args=("--policyd",))
        self.relay: RelayServer | None = None
        # Postfix's smtp needs libsasl2-modules (PLAIN/LOGIN) in its root; chroots built before it was added to
        # scripts/build-chroots.sh lack it (the matrix then says n/a)
        root = pf.pv.root or Path("/")
        self.sasl = any((root / d / "sasl2" / "libplain.so.2").exists()
                        for d in ("usr/lib/x86_64-linux-gnu", "usr/lib/aarch64-linux-gnu", "usr/lib"))

    def start(self) -> None:
        self.amavis.start()
        self.dkim.start()
        self.dovecot.start()
        self.sts.start()
        if self.sasl:
            files = self.bed.pki.mx("dane")
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(files.cert), str(files.key))
            self.relay = RelayServer(ctx, MX_BY_KEY["dane"].ip, self.pf.ports.extra[7],
                                     RelayOptions(users={"site": "s3cret"}), RELAY_NAME)
            self.relay.__enter__()

    def stop(self) -> None:
        self.plugin.stop()
        if self.relay is not None:
            self.relay.__exit__(None, None, None)
        for d in (self.amavis, self.dkim, self.dovecot, self.sts):
            d.stop()

    def configure_admin_site(self) -> None:
        """What the admin had before requiretls: Debian's amavis recipe, opendkim, Dovecot, postscreen, SASL."""
        pf, x = self.pf, self.pf.ports.extra
        pf.set(
            content_filter=f"amavis:[127.0.0.1]:{x[1]}",
            smtpd_milters=f"inet:127.0.0.1:{x[3]}",
            non_smtpd_milters="$smtpd_milters",
            milter_default_action="accept",
            mailbox_transport=f"lmtp:inet:127.0.0.1:{x[4]}",
            smtp_tls_policy_maps=self.sts_map,
        )
        # amavisd-new's README.Postfix (Debian): the filter transport and the return smtpd
        pf.add_service("amavis", "unix", "unix - - n - 2 smtp -o smtp_data_done_timeout=1200 "
                       "-o smtp_send_xforward_command=yes -o disable_dns_lookups=yes -o max_use=20")
        pf.add_service(f"127.0.0.1:{x[2]}", "inet",
                       "inet n - n - - smtpd -o content_filter= -o local_recipient_maps= "
                       "-o relay_recipient_maps= -o smtpd_restriction_classes= -o smtpd_delay_reject=no "
                       "-o smtpd_client_restrictions=permit_mynetworks,reject -o smtpd_helo_restrictions= "
                       "-o smtpd_sender_restrictions= -o smtpd_recipient_restrictions=permit_mynetworks,reject "
                       "-o smtpd_data_restrictions=reject_unauth_pipelining -o smtpd_end_of_data_restrictions= "
                       "-o mynetworks=127.0.0.0/8 -o smtpd_error_sleep_time=0 -o smtpd_soft_error_limit=1001 "
                       "-o smtpd_hard_error_limit=1000 -o smtpd_client_connection_count_limit=0 "
                       "-o smtpd_client_connection_rate_limit=0 "
                       "-o receive_override_options=no_header_body_checks,no_unknown_recipient_checks,no_milters")
        # postscreen on the smtp port, smtpd behind it
        smtp = f"127.0.0.1:{pf.ports.smtp}"
        pf.add_service(smtp, "inet", "inet n - n - 1 postscreen")
        pf.add_service("smtpd", "pass", "pass - - n - - smtpd")
        pf.add_service("dnsblog", "unix", "unix - - n - 0 dnsblog")
        pf.add_service("tlsproxy", "unix", "unix - - n - 0 tlsproxy")
        if self.sasl:
            assert self.relay is not None
            hop = f"[{RELAY_NAME}]:{self.pf.ports.extra[7]}"
            (pf.config_dir / "sasl_passwd").write_text(f"{hop} site:s3cret\n")
            (pf.config_dir / "sender_relay").write_text(f"relayuser@{DOMAIN} {hop}\n")
            pf.set(smtp_sasl_auth_enable="yes", smtp_sasl_security_options="noanonymous",
                   smtp_sasl_password_maps=f"texthash:{pf.config_dir}/sasl_passwd",
                   sender_dependent_relayhost_maps=f"texthash:{pf.config_dir}/sender_relay")

    def plugin_undo(self) -> subprocess.CompletedProcess[str]:
        p = self.plugin
        return subprocess.run(
            [sys.executable, "-m", "requiretls", "postfix-config", "--config", str(p.config), "-c",
             str(self.pf.config_dir), "--postfix-version", self.pf.version, "--apply", "--undo"],
            capture_output=True, text=True, timeout=60)

    def wire_requiretls(self) -> None:
        # The relayhost needs an authenticated TLS level for REQUIRETLS mail on 3.11 (Postfix's own smtp refuses
        # `enforce` at `may`); an admin who relays with SASL pins its certificate name anyway.  On 3.7/3.10 the
        # agent verifies it with PKIX by itself.
        relay_line = f"[{RELAY_NAME}]:{self.pf.ports.extra[7]} secure\n" if self.sasl else ""
        self.plugin.table = "dane.test requiretls=yes\n" + relay_line
        self.plugin.apply()
        for d in ("milter", "relay", "policyd"):
            self.plugin.start_daemon(d)
        self.pf.start()


@pytest.fixture
def site(bed: Bed, postfix: Postfix) -> Iterator[Site]:
    s = Site(bed, postfix)
    try:
        s.start()
        yield s
    finally:
        s.stop()


def _wait(pred: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while True:
        v = pred()
        if v or time.monotonic() > end:
            return v
        time.sleep(0.3)


def test_real_site_every_class(site: Site) -> None:
    pf, plugin, v = site.pf, site.plugin, site.pf.version
    MATRIX.postfix[v] = pf.pv.full_version
    MATRIX.components.update({
        "amavisd-new": package_version("amavisd-new"), "opendkim": package_version("opendkim"),
        "dovecot-lmtpd": package_version("dovecot-lmtpd"),
        "dkimpy (verifier, PyPI)": importlib.metadata.version("dkimpy"),
    })

    def rec(key: str, desc: str, ok: bool | None, detail: str = "") -> None:
        MATRIX.record(v, key, desc, ok, detail)

    site.configure_admin_site()
    amavis_before = pf.postconf("-M", "amavis/unix")
    site.wire_requiretls()
    amavis_after = pf.postconf("-M", "amavis/unix")
    hop = "smtp_requiretls_policy=opportunistic" in amavis_after
    rec("filter-hop", "the hop to amavis: `-o smtp_requiretls_policy=opportunistic` only on 3.11 (ours enforces)",
        hop == (v == "3.11"), f"set={hop}")
    conf = pf.postconf("-n")
    milters = _milter_list(pf.postconf("-xh", "smtpd_milters"))
    rec("milter-order", "`--apply` puts our milter before opendkim (smtpd_milters, expanded)",
        len(milters) == 2 and "requiretls" in milters[0], " ".join(milters))
    nonsmtpd = _milter_list(pf.postconf("-xh", "non_smtpd_milters"))
    rec("non-smtpd-ref", "`non_smtpd_milters = $smtpd_milters` kept; our milter once after expansion",
        "non_smtpd_milters = $smtpd_milters" in conf and sum("requiretls" in m for m in nonsmtpd) == 1,
        " ".join(nonsmtpd))

    maps = pf.postconf("-h", "smtp_tls_policy_maps").replace(",", " ").split()
    rec("sts-chain", "existing `smtp_tls_policy_maps` (postfix-mta-sts-resolver) kept after ours",
        len(maps) == 2 and "requiretls" in maps[0] and maps[1] == site.sts_map, " ".join(maps))
    # A. ordinary mail, through postscreen on the smtp port
    pf.submit(f"alice@{DOMAIN}", ["ann@insecure.test"], _message(f"alice@{DOMAIN}", "ann@insecure.test",
              "ordinary"), port="smtp")
    # I. ordinary mail to an MTA-STS "testing" domain: our policy service leaves it alone (NOTFOUND), the
    # admin's resolver (strict_testing) answers "secure": verified TLS proves the chain reaches it
    pf.submit(f"alice@{DOMAIN}", ["ivy@sts-testing.test"],
              _message(f"alice@{DOMAIN}", "ivy@sts-testing.test", "mta-sts testing"))
    # B. opt-out: TLS-Required: No from a trusted client, to a DANE domain whose MX has no STARTTLS
    pf.submit(f"alice@{DOMAIN}", ["bob@dane-nostarttls.test"],
              _message(f"alice@{DOMAIN}", "bob@dane-nostarttls.test", "opt-out", TLS_Required="No"))
    # C. REQUIRETLS by a destination rule
    pf.submit(f"alice@{DOMAIN}", ["carol@dane.test"], _message(f"alice@{DOMAIN}", "carol@dane.test", "by rule"))
    # D. REQUIRETLS by the Subject cookie (removed by our milter before opendkim signs)
    pf.submit(f"alice@{DOMAIN}", ["dave@dane.test"],
              _message(f"alice@{DOMAIN}", "dave@dane.test", "[requiretls] quarterly figures"))
    # E. REQUIRETLS (cookie) to a local mailbox: Dovecot LMTP
    local_rcpt = f"{LOCAL_USER}@{pf.postconf('-h', 'myhostname').strip()}"
    pf.submit(f"alice@{DOMAIN}", [local_rcpt],
              _message(f"alice@{DOMAIN}", local_rcpt, "[requiretls] for the mailbox"))
    # F. local submission (sendmail, pickup): non_smtpd_milters
    msg_f = _message(f"pickup@{DOMAIN}", "erin@insecure.test", "from sendmail")
    pf.run(["sendmail", "-f", f"pickup@{DOMAIN}", "erin@insecure.test"], input=msg_f.as_string())
    expected = 7
    # G. 3.11: native MAIL FROM ... REQUIRETLS
    if v == "3.11":
        pf.submit(f"alice@{DOMAIN}", ["hal@dane.test"], _message(f"alice@{DOMAIN}", "hal@dane.test", "native"),
                  mail_options=["REQUIRETLS"], starttls=True)
        expected += 1
    # H. SASL relayhost (sender-dependent): ordinary mail through Postfix's smtp, REQUIRETLS by cookie
    if site.sasl:
        pf.submit(f"relayuser@{DOMAIN}", ["gina@insecure.test"],
                  _message(f"relayuser@{DOMAIN}", "gina@insecure.test", "via the relayhost"))
        pf.submit(f"relayuser@{DOMAIN}", ["hugo@insecure.test"],
                  _message(f"relayuser@{DOMAIN}", "hugo@insecure.test", "[requiretls] via the relayhost"))
        expected += 2

    bed = site.bed
    n_dane = 3 if v == "3.11" else 2
    dane = _wait(lambda: len(bed.mx("dane").deliveries()) >= n_dane and bed.mx("dane").deliveries(), 90) or []
    ins = _wait(lambda: len(bed.mx("insecure").deliveries()) >= 2 and bed.mx("insecure").deliveries(), 30) or []
    nost = _wait(lambda: bed.mx("dane-nostarttls").deliveries(), 30) or []
    stst = _wait(lambda: bed.mx("sts-testing").deliveries(), 30) or []
    box = _wait(lambda: site.dovecot.mailbox(LOCAL_USER), 30) or []
    relayed = _wait(lambda: site.relay is not None and len(site.relay.deliveries) >= 2 and site.relay.deliveries,
                    30) if site.sasl else []
    lmtp_sent = rf"to=<{LOCAL_USER}@[^>]*>.*relay=127\.0\.0\.1\[127\.0\.0\.1\]:{pf.ports.extra[4]}.*status=sent"
    # Postfix's lmtp client logs its status=sent after Dovecot has filed the message
    _wait(lambda: box and re.search(lmtp_sent, pf.log()), 30)
    time.sleep(2)  # anything delivered twice or unfiltered would show up now
    dane, ins = bed.mx("dane").deliveries(), bed.mx("insecure").deliveries()
    nost, box = bed.mx("dane-nostarttls").deliveries(), site.dovecot.mailbox(LOCAL_USER)
    stst = bed.mx("sts-testing").deliveries()
    relayed = list(site.relay.deliveries) if site.relay is not None else []
    by_rcpt = {d.rcpt_tos[0]: d for d in [*dane, *ins, *nost, *stst]}
    log = pf.log()

    def delivered(key: str, desc: str, rcpt: str) -> Any:
        d = by_rcpt.get(rcpt)
        if d is None:
            rec(key, desc, False, f"not delivered to {rcpt}")
        return d

    # A
    d = delivered("ordinary", "ordinary mail: through postscreen, amavis once, TLS, no REQUIRETLS, DKIM verifies",
                  "ann@insecure.test")
    if d is not None:
        rec("ordinary", "ordinary mail: through postscreen, amavis once, TLS, no REQUIRETLS, DKIM verifies",
            amavis_passes(d.raw) == 1 and d.tls and not d.requiretls and dkim_ok(d.raw, site.dkim)
            and "postfix/postscreen" in log,
            f"amavis={amavis_passes(d.raw)} tls={d.tls} requiretls={d.requiretls} dkim={dkim_ok(d.raw, site.dkim)}")
    # B
    desc = "`TLS-Required: No` opt-out: amavis once, keeps its class (delivered without STARTTLS to a DANE MX)"
    d = delivered("optout", desc, "bob@dane-nostarttls.test")
    if d is not None:
        rec("optout", desc, amavis_passes(d.raw) == 1 and not d.tls and d.header("TLS-Required") == ["No"]
            and dkim_ok(d.raw, site.dkim),
            f"amavis={amavis_passes(d.raw)} tls={d.tls} TLS-Required={d.header('TLS-Required')}")
    # C
    desc = "REQUIRETLS by rule: amavis once, MAIL FROM REQUIRETLS over TLS at the MX, DKIM verifies"
    d = delivered("rule", desc, "carol@dane.test")
    if d is not None:
        rec("rule", desc, amavis_passes(d.raw) == 1 and d.tls and d.requiretls and dkim_ok(d.raw, site.dkim),
            f"amavis={amavis_passes(d.raw)} tls={d.tls} requiretls={d.requiretls}")
    # D
    desc = "REQUIRETLS by Subject cookie: cookie removed before opendkim signs; the signature verifies (dkimpy)"
    d = delivered("cookie-dkim", desc, "dave@dane.test")
    if d is not None:
        subj = d.header("Subject")
        # the verifier is not vacuous: the same message with the cookie put back fails
        tampered = d.raw.replace(b"Subject: quarterly figures", b"Subject: [requiretls] quarterly figures", 1)
        rec("cookie-dkim", desc, amavis_passes(d.raw) == 1 and d.requiretls and subj == ["quarterly figures"]
            and bool(d.header("DKIM-Signature")) and dkim_ok(d.raw, site.dkim)
            and tampered != d.raw and not dkim_ok(tampered, site.dkim),
            f"amavis={amavis_passes(d.raw)} requiretls={d.requiretls} subject={subj} "
            f"signed={bool(d.header('DKIM-Signature'))} dkim={dkim_ok(d.raw, site.dkim)} "
            f"with-cookie-back={dkim_ok(tampered, site.dkim)}")
    # E
    desc = "REQUIRETLS to a local mailbox: delivered by Dovecot LMTP (mailbox_transport), amavis once, DKIM verifies"
    if len(box) != 1:
        rec("local-lmtp", desc, False, f"{len(box)} messages in the mailbox")
    else:
        m = BytesParser(policy=default_policy).parsebytes(box[0])
        lm = re.search(lmtp_sent, log)
        rec("local-lmtp", desc, amavis_passes(box[0]) == 1 and str(m["Subject"]) == "for the mailbox"
            and lm is not None and dkim_ok(box[0], site.dkim),
            f"amavis={amavis_passes(box[0])} subject={m['Subject']} lmtp-log={lm is not None} "
            f"dkim={dkim_ok(box[0], site.dkim)}")
    # F
    desc = "local submission (sendmail): our milter via `$smtpd_milters`, amavis once, DKIM verifies"
    d = delivered("sendmail", desc, "erin@insecure.test")
    if d is not None:
        seen = f"from=<pickup@{DOMAIN}>" in plugin.log("milter")
        rec("sendmail", desc, amavis_passes(d.raw) == 1 and seen and dkim_ok(d.raw, site.dkim),
            f"amavis={amavis_passes(d.raw)} milter-saw-it={seen} dkim={dkim_ok(d.raw, site.dkim)}")
    # G
    desc = "native `MAIL FROM ... REQUIRETLS` (3.11): through amavis once, REQUIRETLS at the MX"
    if v != "3.11":
        rec("native", desc, None, "3.11 only")
    else:
        d = delivered("native", desc, "hal@dane.test")
        if d is not None:
            rec("native", desc, amavis_passes(d.raw) == 1 and d.tls and d.requiretls,
                f"amavis={amavis_passes(d.raw)} tls={d.tls} requiretls={d.requiretls}")
    # H
    desc = "sender-dependent relayhost with SASL: ordinary and REQUIRETLS mail authenticated, amavis once"
    if not site.sasl:
        rec("sasl-relay", desc, None, "no libsasl2-modules in this Postfix's root")
    else:
        got = {r.rcpt_tos[0]: r for r in (relayed or [])}
        g, h = got.get("gina@insecure.test"), got.get("hugo@insecure.test")
        rec("sasl-relay", desc, g is not None and h is not None and g.auth_user == "site" and h.auth_user == "site"
            and h.requiretls and not g.requiretls and amavis_passes(g.raw) == 1 and amavis_passes(h.raw) == 1,
            f"got={sorted(got)} auth={[r.auth_user for r in got.values()]}")

    # I
    desc = "existing postfix-mta-sts-resolver map still consulted (MTA-STS `testing` domain: verified TLS), amavis once"
    d = delivered("sts-chain-mail", desc, "ivy@sts-testing.test")
    if d is not None:
        verified = re.search(r"Verified TLS connection established to mx\.sts-testing\.test", log) is not None
        asked = "sts-testing.test" in site.sts.log()
        rec("sts-chain-mail", desc, amavis_passes(d.raw) == 1 and d.tls and verified and asked,
            f"amavis={amavis_passes(d.raw)} tls={d.tls} verified-in-log={verified} resolver-asked={asked}")

    # nothing unfiltered, nothing twice: amavis saw each message once, and nothing else was delivered
    # amavis logs two lines per message; the one with the client's address names the Message-ID
    ids = re.findall(r"Passed CLEAN \{[^}]*\}, \[127\.0\.0\.1\](?::\d+)? .*?Message-ID: <([^>]*)>", site.amavis.log())
    passed = len(ids) if len(set(ids)) == len(ids) else -len(ids)
    total = len(dane) + len(ins) + len(nost) + len(stst) + len(box) + len(relayed or [])
    rec("filter-count", "amavis passed every message exactly once; nothing delivered unfiltered or twice",
        passed == expected and total == expected,
        f"sent={expected} amavis-passed={passed} (negative: a message twice) delivered={total}")
    assert not any("X-RequireTLS" in d.raw.decode(errors="replace") for d in [*dane, *ins, *nost, *stst])

    # --undo gives the admin's policy map back as it was
    r = site.plugin_undo()
    maps = pf.postconf("-h", "smtp_tls_policy_maps").strip()
    rec("sts-undo", "`--undo` leaves the admin's `smtp_tls_policy_maps` exactly as before",
        r.returncode == 0 and maps == site.sts_map, f"exit={r.returncode} maps={maps}")
    rec("filter-undo", "`--undo` gives back the admin's amavis transport and return smtpd",
        r.returncode == 0 and pf.postconf("-M", "amavis/unix") == amavis_before
        and "requiretls" not in pf.postconf("-M", f"127.0.0.1:{pf.ports.extra[2]}/inet"),
        f"exit={r.returncode}")

    failures = MATRIX.failures(v)
    assert not failures, "\n".join(failures) + "\n--- maillog tail:\n" + log[-4000:]
