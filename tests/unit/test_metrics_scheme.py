"""The metrics of the three daemons on one scheme (docs/monitoring.md), checked by Prometheus's own promtool:
the exposition lints clean, the alert rules pass their unit tests, and every expression of the rules and of the
Grafana dashboard names a metric the daemons really export."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest

from requiretls import metrics as common
from requiretls.dest.errors import MtaStsTimeoutError
from requiretls.front.metrics import Counts, FrontCollector, SharedCounts
from requiretls.milter.metrics import MilterMetrics
from requiretls.policy import Envelope, LocalPolicy, MessageFacts, OptoutFrom, PolicyTable, Session
from requiretls.policy.decide import decide
from requiretls.policy.model import Decision, MessageClass, Rejection
from requiretls.policyd.metrics import Metrics, count_sts_fetches, fetch_result
from requiretls.policyd.server import PolicyService, ServiceSettings
from requiretls.relay.deliver import DeliveryStatus, Outcome
from requiretls.relay.metrics import AgentMetrics
from tests.policyd.fakes import FakeResolver, dane, sts

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "contrib" / "prometheus" / "requiretls-rules.yml"
RULE_TESTS = ROOT / "contrib" / "prometheus" / "requiretls-rules.test.yml"
DASHBOARD = ROOT / "contrib" / "grafana" / "requiretls-dashboard.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool missing (Debian package prometheus: "
                                    "scripts/install-apt.sh)")

TRUSTED = Session(sasl_user="alice")


def _facts(headers: tuple[tuple[str, str], ...], params: tuple[str, ...] = ()) -> MessageFacts:
    return MessageFacts(Envelope("a@s.example", ("b@d.example",), params), TRUSTED, headers)


def _policyd() -> str:
    metrics = Metrics()
    service = PolicyService(PolicyTable.parse("news.example may\n", "policy"),
                            FakeResolver({"dane.example": dane("dane.example"), "sts.example": sts("sts.example")}),
                            metrics, ServiceSettings(answer_ttl=60))  # type: ignore[arg-type]

    class Sts:
        async def fetch(self, domain: str, record_id: str) -> str:
            if domain == "bad.example":
                raise MtaStsTimeoutError("timed out")
            return "policy"

    fetcher = Sts()
    count_sts_fetches(fetcher, metrics)

    async def main() -> None:
        for req in (b"default dane.example", b"default dane.example", b"default+tlsrpt sts.example",
                    b"relaxed news.example", b"default bad..key", b"nosuch x"):
            await service.reply(req)
        await fetcher.fetch("sts.example", "1")
        with pytest.raises(MtaStsTimeoutError):
            await fetcher.fetch("bad.example", "1")

    asyncio.run(main())
    return generate_latest(metrics.registry).decode()


def _milter() -> tuple[MilterMetrics, str]:
    m = MilterMetrics()
    policy = LocalPolicy(optout_from=OptoutFrom.ANY)
    m.record(decide(_facts((("TLS-Required", "No"),)), policy))  # honoured
    m.record(decide(_facts((("TLS-Required", "No"),), ("REQUIRETLS",)), policy))  # refused: REQUIRETLS wins
    m.record(decide(_facts((("TLS-Required", "No"),)), LocalPolicy(optout_from=OptoutFrom.NONE)))  # disabled
    m.record(decide(_facts((("X-Requiretls-Route", "relay"),)), policy))  # a forged private field
    m.record(Decision(MessageClass.REQUIRETLS, (), (), Rejection(550, "5.7.30", "no destination"), ()))
    return m, generate_latest(m.registry).decode()


def _relay() -> str:
    m = AgentMetrics()
    m.outcome("relay", Outcome(DeliveryStatus.SENT, 250, "2.0.0", "ok", "mx", "TLSv1.3", "dane", True))
    m.outcome("relay", Outcome(DeliveryStatus.BOUNCED, 550, "5.7.30", "no REQUIRETLS"))
    m.outcome("relay-optout", Outcome(DeliveryStatus.DEFERRED, 451, "4.7.5", "certificate"))
    m.outcome("relay", Outcome(DeliveryStatus.DEFERRED, 451, "4.4.3", "dns"))
    return generate_latest(m.registry).decode()


def _front() -> str:
    """Two workers' rows, as the front's parent adds them up; the second worker was restarted (its session
    gauge cleared)."""
    shared = SharedCounts(2)
    shared.store(0, Counts(connections=5, active=2, tls=4, plain=2, requiretls=1, requiretls_refused=1))
    shared.store(1, Counts(connections=2, active=1, plain=1, carrier_removed=2, injection=1, backend_down=1))
    shared.worker_gone(1)
    reg = common.registry("front")
    reg.register(FrontCollector(shared))
    return generate_latest(reg).decode()


@pytest.fixture(scope="module")
def expositions() -> dict[str, str]:
    common.resolver_validating(False)
    try:
        return {"policyd": _policyd(), "milter": _milter()[1], "relay": _relay(), "front": _front()}
    finally:
        common.resolver_validating(None)


def _names(text: str) -> set[str]:
    return {re.split(r"[{ ]", line, maxsplit=1)[0] for line in text.splitlines() if line and line[0] != "#"}


@needs_promtool
@pytest.mark.parametrize("daemon", ["policyd", "milter", "relay", "front"])
def test_promtool_finds_nothing_to_lint(expositions: dict[str, str], daemon: str) -> None:
    r = subprocess.run([str(PROMTOOL), "check", "metrics"], input=expositions[daemon], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), (r.stdout, r.stderr)


def test_every_daemon_exports_the_common_families(expositions: dict[str, str]) -> None:
    for daemon, text in expositions.items():
        assert f'requiretls_build_info{{daemon="{daemon}",' in text
        assert "requiretls_resolver_validating 0.0" in text
        assert "process_resident_memory_bytes" in _names(text) or not Path("/proc/self/stat").exists()
        own = {n for n in _names(text) if n.startswith("requiretls_")} - {"requiretls_build_info",
                                                                          "requiretls_resolver_validating"}
        assert own and all(n.startswith(f"requiretls_{daemon}_") for n in own), own


def test_what_the_counts_say(expositions: dict[str, str]) -> None:
    p, m, r = expositions["policyd"], expositions["milter"], expositions["relay"]
    assert 'requiretls_policyd_requests_total{answer="OK",level="dane-only",zone="default"} 2.0' in p
    assert 'requiretls_policyd_requests_total{answer="OK",level="secure",zone="default"} 1.0' in p
    assert 'requiretls_policyd_mta_sts_fetches_total{result="ok"} 1.0' in p
    assert 'requiretls_policyd_mta_sts_fetches_total{result="sts-policy-fetch-error"} 1.0' in p
    assert "requiretls_policyd_cache_entries 3.0" in p
    assert 'requiretls_milter_optouts_total{reason="",result="honoured"} 1.0' in m
    assert 'requiretls_milter_optouts_total{reason="requiretls",result="refused"} 1.0' in m
    assert 'requiretls_milter_optouts_total{reason="disabled",result="refused"} 1.0' in m
    assert 'requiretls_milter_forged_headers_removed_total{field="x-requiretls-route"} 1.0' in m
    assert 'requiretls_milter_rejections_total{dsn="5.7.30"} 1.0' in m
    assert 'requiretls_milter_messages_total{class="optout"} 1.0' in m
    assert 'requiretls_relay_deliveries_total{dsn="5.7.30",route="relay",status="bounced"} 1.0' in r
    assert 'requiretls_relay_deferrals_total{reason="tls"} 1.0' in r
    assert 'requiretls_relay_deferrals_total{reason="dns"} 1.0' in r
    assert 'requiretls_relay_tls_deliveries_total{tls_version="TLSv1.3",verify="dane"} 1.0' in r
    f = expositions["front"]
    assert "requiretls_front_connections_total 7.0" in f
    assert "requiretls_front_sessions 2.0" in f  # the restarted worker's session went with it
    assert 'requiretls_front_messages_total{requiretls="yes"} 1.0' in f
    assert 'requiretls_front_messages_total{requiretls="no"} 3.0' in f
    assert "requiretls_front_tls_sessions_total 4.0" in f
    assert "requiretls_front_requiretls_refused_total 1.0" in f
    assert "requiretls_front_carrier_fields_removed_total 2.0" in f
    assert "requiretls_front_starttls_injections_total 1.0" in f
    assert "requiretls_front_smtpd_unreachable_total 1.0" in f


def test_fetch_failures_are_rfc8460_result_types() -> None:
    from requiretls.dest.errors import MtaStsPolicyError, MtaStsTlsError

    assert fetch_result(MtaStsTlsError("x")) == "sts-webpki-invalid"
    assert fetch_result(MtaStsPolicyError("x")) == "sts-policy-invalid"
    assert fetch_result(OSError("x")) == "sts-policy-fetch-error"


def _expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load(RULES.read_text())
    out = [(f"rule {r['alert']}", r["expr"]) for g in rules["groups"] for r in g["rules"]]
    dash = json.loads(DASHBOARD.read_text())
    out += [(f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p["targets"]]
    return out


def test_every_expression_names_a_metric_the_daemons_export(expositions: dict[str, str]) -> None:
    exported = set().union(*(_names(t) for t in expositions.values())) | {"up"}  # up: Prometheus's own
    exprs = _expressions()
    assert len(exprs) >= 20
    bad = []
    for where, expr in exprs:
        # metric names: identifiers not followed by "(" (functions) and outside label matchers and strings
        bare = re.sub(r"\{[^}]*\}|\"[^\"]*\"|\[[^\]]*\]", " ", expr)
        names = {n for n in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*(?!\s*\()", bare)
                 if n.startswith(("requiretls_", "process_")) or n == "up"}
        if not names or names - exported:
            bad.append((where, expr, sorted(names - exported)))
    assert not bad, bad


@needs_promtool
def test_alert_rules_pass_promtool_and_their_unit_tests() -> None:
    r = subprocess.run([str(PROMTOOL), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    r = subprocess.run([str(PROMTOOL), "test", "rules", RULE_TESTS.name], cwd=RULE_TESTS.parent,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
