"""The milter.  One instance per SMTP connection (libmilter's threads); the decision is
:func:`requiretls.policy.classify` (the same pipeline as ``requiretls explain``), everything here is
collecting facts, supplying pre-flight readiness and applying edits.

Callbacks negotiated: connect, envfrom, envrcpt and header without replies (they only collect facts and
always continue, so the MTA need not wait for us), and eom, the one step that answers; helo, eoh, body, data
and unknown are switched off so that Postfix does not send them.  The facts come from macros: ``v`` (MTA
version, connect), ``{auth_authen}`` (envfrom), ``{tls_version}`` (read at envfrom; libmilter keeps the helo
macros), ``{rcpt_mailer}`` / ``{rcpt_host}`` (envrcpt), ``i`` (eom) -- all in Postfix's default macro lists.
We do not narrow those lists with ``smfi_setsymlist``: on Postfix 3.7 that measured slower, not faster
(docs/benchmarks.md, "Milter overhead on real Postfix 3.7").

SIGHUP re-reads the configuration and the tables: :attr:`RequireTLSMilter.policy_source` returns the new local
policy from the next end-of-message on, on connections already open too.  libmilter would take SIGHUP as
*stop*; :func:`requiretls.daemon.run_blocking_server` keeps it for the reload.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import Milter
import milter

from requiretls.daemon import (
    Reloader,
    UnixSocket,
    block_stop_signals,
    prepare_unix_socket,
    run_blocking_server,
    socket_umask,
    table_sizes,
)
from requiretls.log import kv
from requiretls.milter import metrics as milter_metrics
from requiretls.milter import setaside
from requiretls.milter.preflight import Preflight
from requiretls.policy import (
    Decision,
    Envelope,
    LocalPolicy,
    MessageFacts,
    PostfixFeatures,
    PreflightMode,
    RcptRoute,
    Session,
    classify,
)
from requiretls.policy.headers import REQUIRE_TLS_ESMTP, writable

#: ``milter_macro_daemon_name`` of the smtpd behind the SMTP front (``postfix-config --front`` sets it).
FRONT_DAEMON_NAME = "requiretls-front"

log = logging.getLogger("requiretls")
CONTINUE: int = Milter.CONTINUE
ACCEPT: int = Milter.ACCEPT
REJECT: int = Milter.REJECT
TEMPFAIL: int = Milter.TEMPFAIL

#: Supplies the local policy for each message, so that a reload (SIGHUP) takes effect without a restart.
PolicySource = Callable[[], LocalPolicy]


def _strip_brackets(addr: str) -> str:
    a = addr.strip()
    return a[1:-1] if a.startswith("<") and a.endswith(">") else a


class RequireTLSMilter(Milter.Base):  # type: ignore[misc]
    """Tags messages and steers their delivery; see the module docstring."""

    policy_source: PolicySource = LocalPolicy
    #: Overrides the ``v`` macro (``postfix_version`` setting); None: trust the macro.
    postfix_override: PostfixFeatures | None = None
    #: Postfix's relayhost as the agent sees it (``relay.relayhost``): recipients routed there are not handed back.
    relayhost: str = ""
    #: ``relay.local_transports``: more transports that deliver on this host (hand-back).
    local_transports: frozenset[str] = frozenset()
    #: Destination pre-flight (``policy.preflight`` warn/reject); None when off.
    preflight: Preflight | None = None

    def __init__(self) -> None:
        self.client_ip: str | None = None
        #: The session came through the SMTP front's smtpd (``{daemon_name}``, set by master.cf, which no client
        #: can change): its ``Require-TLS-ESMTP: yes`` stands for ``MAIL FROM ... REQUIRETLS``.
        self.from_front = False
        self.postfix = PostfixFeatures()
        #: A connect callback that failed: every message of the connection is in doubt.
        self.connect_doubt: str | None = None
        self._reset()

    def _reset(self) -> None:
        #: Why this message cannot be classified with confidence (a callback failed); eom then tempfails.
        self.doubt: str | None = None
        self.sender = ""
        self.params: tuple[str, ...] = ()
        self.rcpts: list[RcptRoute] = []
        self.headers: list[tuple[str, str]] = []
        self.sasl_user: str | None = None
        self.tls_version: str | None = None

    def _symval(self, name: str) -> str | None:
        """A macro's value; one that is not UTF-8 (pymilter cannot decode it) reads as absent, which never adds
        trust (a SASL name that cannot be read is no authentication)."""
        try:
            value: str | None = self.getsymval(name)
        except UnicodeError:
            log.warning("%s", kv(macro=name, problem="value is not UTF-8: ignored"))
            return None
        return value

    def _doubt(self, where: str, e: BaseException) -> None:
        # The first failure is the one worth telling; eom tempfails the message with it.
        if self.doubt is None:
            self.doubt = f"{where} callback failed: {type(e).__name__}: {e}"
        log.exception("requiretls: %s callback failed", where)

    @Milter.noreply  # type: ignore[untyped-decorator]
    def connect(self, hostname: str, family: int, hostaddr: Any) -> int:
        try:
            if family in (socket.AF_INET, socket.AF_INET6) and hostaddr:
                # libmilter gives (address, port[, ...]); some harnesses give the bare address.
                self.client_ip = str(hostaddr[0] if isinstance(hostaddr, tuple) else hostaddr)
            self.postfix = self.postfix_override or PostfixFeatures.from_macro(self._symval("v"))
            self.from_front = self._symval("{daemon_name}") == FRONT_DAEMON_NAME
        except Exception as e:
            self.connect_doubt = f"connect callback failed: {type(e).__name__}: {e}"
            log.exception("requiretls: connect callback failed")
        return CONTINUE

    @Milter.nocallback  # type: ignore[untyped-decorator]
    def hello(self, hostname: str) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envfrom(self, mailfrom: str, *params: str) -> int:
        self._reset()
        try:
            self.sender = _strip_brackets(mailfrom)
            self.params = tuple(params)
            self.sasl_user = self._symval("{auth_authen}") or None
            self.tls_version = self._symval("{tls_version}") or None
        except Exception as e:
            self._doubt("envfrom", e)
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def envrcpt(self, to: str, *params: str) -> int:
        try:
            mailer = self._symval("{rcpt_mailer}")
            host = self._symval("{rcpt_host}")
            self.rcpts.append(RcptRoute(_strip_brackets(to), mailer or None, host or None))
        except Exception as e:
            self._doubt("envrcpt", e)
        return CONTINUE

    @Milter.nocallback  # type: ignore[untyped-decorator]
    def data(self) -> int:
        return CONTINUE

    @Milter.noreply  # type: ignore[untyped-decorator]
    def header(self, name: str, value: str) -> int:
        self.headers.append((name, value))
        return CONTINUE

    @Milter.nocallback  # type: ignore[untyped-decorator]
    def eoh(self) -> int:
        return CONTINUE

    @Milter.nocallback  # type: ignore[untyped-decorator]
    def body(self, chunk: bytes) -> int:
        return CONTINUE

    @Milter.nocallback  # type: ignore[untyped-decorator]
    def unknown(self, cmd: str) -> int:
        return CONTINUE

    def eom(self) -> int:
        """The one answer: accept with edits, reject, or -- on real internal doubt only -- tempfail, logged.

        Every exception is caught here: the MTA always gets a reply at end-of-message."""
        queue_id = "NOQUEUE"
        try:
            queue_id = self._symval("i") or "NOQUEUE"
            doubt = self.connect_doubt or self.doubt
            if doubt is not None:
                return self._tempfail(queue_id, doubt)
            return self._eom(queue_id)
        except Exception as e:
            log.exception("%s: requiretls: end-of-message failed", queue_id)
            return self._tempfail(queue_id, f"internal error: {type(e).__name__}: {e}")

    def _tempfail(self, queue_id: str, reason: str) -> int:
        log.error("%s: requiretls: %s", queue_id, kv(action="tempfail", reason=reason))
        milter_metrics.tempfail()
        try:
            self.setreply("451", "4.3.0", "requiretls: internal error, try again later")
        except Exception:
            log.exception("%s: requiretls: setreply failed", queue_id)
        return TEMPFAIL

    def _eom(self, queue_id: str) -> int:
        routes = tuple(self.rcpts)
        params, headers, carriers = self.params, tuple(self.headers), 0
        if self.from_front:
            # The front removed every carrier the client wrote and put its own first only for a client that
            # gave the parameter over TLS: read it as the parameter, and take it out of the message.
            carriers = sum(1 for n, _ in headers if n.lower() == REQUIRE_TLS_ESMTP.lower())
            if carriers:
                params = (*params, "REQUIRETLS")
                headers = tuple(h for h in headers if h[0].lower() != REQUIRE_TLS_ESMTP.lower())
        facts = MessageFacts(
            Envelope(self.sender, tuple(r.address for r in routes), params),
            Session(self.sasl_user, self.client_ip, self.tls_version),
            headers,
        )
        # The pipeline asks for pre-flight readiness itself, only when it matters (REQUIRETLS, not refused).
        result = classify(facts, self.policy_source(), self.postfix, routes, self.relayhost,
                          self.preflight.readiness if self.preflight is not None else None, self.local_transports)
        decision = result.decision
        self._log(queue_id, decision, result.route)
        milter_metrics.record(decision)
        setaside.message(queue_id, decision, routes, self.relayhost, self.local_transports)
        if decision.reject is not None:
            r = decision.reject
            self.setreply(str(r.code), r.dsn, r.text)
            return REJECT
        unwritable = [e.name for e in decision.header_edits if not writable(e.value)]
        if decision.envelope_params and self.sender and not writable(self.sender):
            unwritable.append("MAIL FROM")
        if unwritable:
            # Only an envelope address can get here (the decision keeps header text writable): one that is not
            # UTF-8 cannot be written into the routing fields, and no retry would change that.
            text = "address is not valid UTF-8: cannot route this message"
            log.warning("%s: requiretls: %s", queue_id, kv(action="reject", fields=",".join(unwritable), reason=text))
            self.setreply("550", "5.6.7", text)
            return REJECT
        for _ in range(carriers):
            self.chgheader(REQUIRE_TLS_ESMTP, 1, "")
        self._apply(decision)
        return ACCEPT

    def _apply(self, d: Decision) -> None:
        # The decision never writes a value that is not UTF-8 (pymilter encodes text as UTF-8, strictly):
        # see requiretls.policy.headers.writable.
        for e in d.header_edits:
            if e.action == "add":
                self.addheader(e.name, e.value)
            else:
                self.chgheader(e.name, e.index, e.value if e.action == "change" else "")
        if d.envelope_params and self.sender:
            # Postfix honours only RET= and ENVID= here (cleanup_milter.c); the client's ENVID survives.
            self.chgfrom(f"<{self.sender}>", " ".join(d.envelope_params))

    def _log(self, queue_id: str, d: Decision, route: object) -> None:
        log.info(
            "%s: requiretls: %s",
            queue_id,
            kv(
                **{
                    "class": str(d.msg_class),
                    "route": str(route) if route else "postfix",
                    "from": f"<{self.sender}>",
                    "nrcpt": len(self.rcpts),
                    "client": self.client_ip or "unknown",
                    "sasl_username": self.sasl_user,
                    "tls": self.tls_version,
                    "reason": "; ".join(d.reasons),
                    "reject": f"{d.reject.code} {d.reject.dsn} {d.reject.text}" if d.reject else None,
                }
            ),
        )
        for r in d.recipients:
            if r.msg_class is not d.msg_class:
                log.info("%s: requiretls: %s", queue_id, kv(to=f"<{r.recipient}>", **{"class": str(r.msg_class)},
                                                          reason="; ".join(r.reasons)))


#: What libmilter accepts in one request once raised (its default is 65,535 bytes: a single header over about
#: 65,528 bytes made it drop the connection, and the MTA tempfail the message on every retry).  Postfix's own
#: header_size_limit is 102,400; 1 MiB covers it and Sendmail's limits with room to spare.
LIBMILTER_MAX_DATA = 1 << 20


def raise_libmilter_limit(size: int = LIBMILTER_MAX_DATA) -> int | None:
    """Raise libmilter's request size limit (``smfi_setmaxdatasize``, which pymilter does not wrap) in the
    libmilter that pymilter loaded; returns the old limit, or None when it could not be done (logged: the
    milter still runs, with libmilter's default)."""
    import ctypes
    import ctypes.util

    try:
        lib = ctypes.CDLL(ctypes.util.find_library("milter") or "libmilter.so.1.0.1")
        fn = lib.smfi_setmaxdatasize
    except (OSError, AttributeError) as e:
        log.warning("%s", kv(libmilter_max_data="unchanged", reason=f"{type(e).__name__}: {e}"))
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_size_t
    return int(fn(size))


def stop_libmilter(socket_spec: str) -> None:
    """Stop libmilter at once.  Its stop (smfi_stop, what its own SIGTERM handling calls) sets the stop flag and
    then waits for the listener, which holds a lock across a 5-second poll of the listening socket: every stop
    and restart of the milter took up to 5 s.  So the stop runs in a thread of its own, and connections to the
    milter's own socket wake the poll until the stop is through."""
    stopper = threading.Thread(target=milter.stop, name="libmilter-stop", daemon=True)
    stopper.start()
    end = time.monotonic() + 10
    while stopper.is_alive() and time.monotonic() < end:
        _wake(socket_spec)
        stopper.join(0.05)


def _wake(socket_spec: str) -> None:
    """One connection to the milter's listening socket (closed at once; libmilter sees an empty session)."""
    kind, _, where = socket_spec.partition(":")
    with contextlib.suppress(OSError, ValueError):
        if kind in ("unix", "local"):
            with socket.socket(socket.AF_UNIX) as s:
                s.settimeout(0.5)
                s.connect(where)
        elif kind in ("inet", "inet6"):
            port, _, host = where.partition("@")
            family = socket.AF_INET6 if kind == "inet6" else socket.AF_INET
            if host in ("", "0.0.0.0", "::", "*", "INADDR_ANY"):
                host = "::1" if kind == "inet6" else "127.0.0.1"
            with socket.socket(family) as s:
                s.settimeout(0.5)
                s.connect((host, int(port)))


def serve(socket_spec: str, policy_source: PolicySource, timeout: int = 30,
          postfix_version: str = "", relayhost: str = "", socket_group: str = "postfix",
          socket_mode: int = 0o660, mta: str = "auto", preflight: Preflight | None = None,
          reload: Callable[[], object] | None = None, local_transports: frozenset[str] = frozenset()) -> None:
    """Run the milter until SIGTERM/SIGINT; SIGHUP calls ``reload``, which swaps what ``policy_source`` returns.

    An exception in a callback is logged and makes the MTA tempfail the message (at end-of-message).
    libmilter takes SIGHUP as *stop*: :func:`requiretls.daemon.run_blocking_server` keeps it for ``reload``
    (and explains how).
    """
    RequireTLSMilter.policy_source = staticmethod(policy_source)
    if mta == "sendmail":
        RequireTLSMilter.postfix_override = PostfixFeatures((0, 0), postfix=False)
    elif postfix_version:
        RequireTLSMilter.postfix_override = PostfixFeatures.from_macro(f"Postfix {postfix_version}")
    else:
        RequireTLSMilter.postfix_override = None
    RequireTLSMilter.relayhost = relayhost
    RequireTLSMilter.local_transports = local_transports
    RequireTLSMilter.preflight = preflight
    Milter.factory = RequireTLSMilter
    # Every callback catches its own exceptions (eom tempfails on real doubt, logged with its reason), so this
    # policy only meets what pymilter fails at before our code runs: a header *name* that is not UTF-8.  With
    # TEMPFAIL there, libmilter would drop the rest of the message without a reply at end-of-message (the MTA
    # waits until its timeout, on every retry); CONTINUE skips that one field, which no rule reads (every field
    # the decision reads has an ASCII name).
    Milter.set_exception_policy(Milter.CONTINUE)
    Milter.set_flags(Milter.ADDHDRS | Milter.CHGHDRS | Milter.CHGFROM)
    raise_libmilter_limit()
    kind, _, path = socket_spec.partition(":")
    if kind in ("unix", "local"):
        prepare_unix_socket(UnixSocket(path, socket_mode, socket_group))
        socket_umask(socket_mode)  # libmilter creates the socket: the umask gives it socket_mode
    log.info("milter listening on %s", socket_spec)
    run_blocking_server(lambda: Milter.runmilter("requiretls", socket_spec, timeout), reload, "libmilter",
                        stop=lambda: stop_libmilter(socket_spec))
    log.info("milter stopped")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="config file (default: built-in defaults)")
    p.add_argument("--socket", metavar="SPEC", help="override milter.socket (unix:/path or inet:port@127.0.0.1)")


def run(args: argparse.Namespace) -> int:
    from requiretls.addresses import ListenAddress
    from requiretls.config import Settings, load
    from requiretls.log import setup

    settings = load(args.config)
    m = settings.milter
    setup("milter", settings.log.target, settings.log.level)
    spec = (ListenAddress.parse(args.socket) if args.socket else m.socket).libmilter()
    # Before the pre-flight's thread starts: SIGTERM must reach libmilter's signal thread, not that one.
    block_stop_signals()
    preflight = None
    if settings.local_policy.preflight is not PreflightMode.OFF:
        from requiretls.dest import Prober, ProbeSettings
        from requiretls.runtime import destination_resolver, trust_resolver

        prober = None
        if m.preflight_probe:
            prober = Prober(ProbeSettings(cafile=m.probe_cafile, helo_name=m.probe_helo_name or None))
        preflight = Preflight(destination_resolver(settings.dns, settings.mta_sts, settings.cache), prober,
                              m.preflight_timeout)
        preflight.call(trust_resolver(preflight.resolver, settings.dns, settings.filename))
    if m.optout_audit:
        audit = preflight
        if audit is None:
            from requiretls.runtime import destination_resolver

            # Its own loop thread, never used for the pre-flight; no resolver check: a resolver that does not
            # validate only hides DANE destinations from this log.
            audit = Preflight(destination_resolver(settings.dns, settings.mta_sts, settings.cache), None,
                              m.preflight_timeout)
        setaside.AUDIT = setaside.SetAside(audit.resolver, audit.loop)
    policy = settings.local_policy

    def current_policy() -> LocalPolicy:
        return policy

    def apply(fresh: Settings) -> dict[str, object]:
        # One assignment: a message already in eom keeps the policy it read; the next one gets the new one.
        nonlocal policy
        policy = fresh.local_policy
        return table_sizes(fresh)

    if m.metrics is not None:
        milter_metrics.start(str(m.metrics))
    serve(spec, current_policy, m.timeout, m.postfix_version, str(m.relayhost) if m.relayhost else "",
          m.socket_group, m.socket_mode, m.mta, preflight, Reloader(args.config, apply), m.local_transports)
    return 0
