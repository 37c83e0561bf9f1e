"""policyd memory and warm lookup time as its caches grow to 100,000 destinations (issue 9).

    .venv/bin/python bench/policyd_memory.py [--n 100000] [--cap default|all] [--kind dane|sts]
    .venv/bin/python bench/policyd_memory.py --peer        # MTA-STS destinations, ours and the peer's

One fresh process per run fills, for N destinations ``dN.example``, policyd's caches exactly as policyd fills them:
the DNS-answer cache (a ``MemoryCache`` holding what its DnsClient stores: for a DANE destination MX, A and AAAA
of the MX host, TLSA of ``_25._tcp`` of it and the ``_mta-sts`` TXT; for an MTA-STS one MX, A and AAAA of the
MX host, the TXT record and A and AAAA of the policy host, plus the policy as ``StsResolver`` keeps it), and the
socketmap answer cache (``PolicyService.reply`` over a resolver that hands back such a ``Destination``).  It
prints RSS (``/proc/self/status``) and the time of a warm lookup (a cached socketmap reply, and a DNS cache hit
with its JSON decoding) at each size.  ``--cap default`` keeps the shipped limits (``[cache] max_entries`` DNS
answers, ``[policyd] answer_cache_size`` ready answers), as ``requiretls policyd`` runs by default; ``--cap all``
raises both so that every destination and every DNS answer stays cached.  ``--peer`` also fills the internal
cache of postfix-mta-sts-resolver (from ``bench/.peer-venv``, made by ``bench/policyd_vs_peer.py``) with what
its responder stores per domain, and prints both side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from requiretls.config import load
from requiretls.dest.cache import MemoryCache, create_cache
from requiretls.dest.dnssec import DnsAnswer, DnsClient, DnssecState, LookupStatus, ResolverSettings
from requiretls.dest.mtasts import StsMode, StsPolicy, StsResolver
from requiretls.policy.table import PolicyTable
from requiretls.policyd.metrics import Metrics
from requiretls.policyd.server import PolicyService, ServiceSettings
from tests.policyd.fakes import dane, sts

STEPS = (0, 1_000, 10_000, 25_000, 50_000, 100_000)
PEER_VENV = Path(__file__).resolve().parent / ".peer-venv"


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def answers(domain: str, kind: str) -> list[DnsAnswer]:
    """The DNS answers policyd's DnsClient caches for one destination of this kind."""
    ok = LookupStatus.ANSWER

    def a(name: str, rdtype: str, rdata: tuple[str, ...], sec: DnssecState = DnssecState.SECURE) -> DnsAnswer:
        return DnsAnswer(qname=name, rdtype=rdtype, status=ok, state=sec, ttl=3600, canonical=name, rdata=rdata,
                         error="", ede=())

    if kind == "dane":
        mx = f"mx1.{domain}"
        return [
            a(domain, "MX", (f"10 {mx}.",)),
            a(mx, "A", ("192.0.2.1",)),
            a(mx, "AAAA", ("2001:db8::1",)),
            a(f"_25._tcp.{mx}", "TLSA", ("3 1 1 " + "ab" * 32,)),
            a(f"_mta-sts.{domain}", "TXT", ()),
        ]
    # MTA-STS enforce, unsigned zone (like the peer benchmark's dN.bench): MX and its addresses, the TXT record,
    # the policy host's addresses (the policy fetch resolves it through the same client)
    ins = DnssecState.INSECURE
    mx, web = f"mx.{domain}", f"mta-sts.{domain}"
    return [
        a(domain, "MX", (f"10 {mx}.",), ins),
        a(mx, "A", ("192.0.2.1",), ins),
        a(mx, "AAAA", ("2001:db8::1",), ins),
        a(f"_mta-sts.{domain}", "TXT", ("v=STSv1; id=1",), ins),
        a(web, "A", ("192.0.2.2",), ins),
        a(web, "AAAA", ("2001:db8::2",), ins),
    ]


class Resolver:
    def __init__(self, kind: str) -> None:
        self.kind = kind

    async def lookup(self, domain: str) -> object:
        return dane(domain) if self.kind == "dane" else sts(domain)


Row = tuple[int, float, float, int, int, float, float, float, float]


async def run(n: int, cap: str, kind: str) -> tuple[float, list[Row], str]:
    defaults = load(None)  # the shipped defaults of [cache] max_entries and [policyd] answer_cache_size
    max_entries = defaults.cache.max_entries
    answers_max = defaults.policyd.answer_cache_size
    cache = create_cache("memory", max_entries=max_entries if cap == "default" else 8 * n + 10)
    assert isinstance(cache, MemoryCache)
    ready_max = answers_max if cap == "default" else max(answers_max, n)
    service = PolicyService(PolicyTable.empty(), Resolver(kind), Metrics(),  # type: ignore[arg-type]
                            ServiceSettings(answer_ttl=86400, answer_cache_size=ready_max))
    sts_resolver = StsResolver(DnsClient(ResolverSettings(address="127.0.0.1"), cache=cache), cache=cache)
    gc.collect()
    base = rss_mb()
    rows: list[Row] = []
    filled = 0
    rnd = random.Random(1)
    for step in STEPS:
        if step > n:
            break
        t0 = time.perf_counter()
        for i in range(filled, step):
            d = f"d{i}.example"
            for ans in answers(d, kind):
                await cache.set(f"dns:{ans.qname}:{ans.rdtype}", ans.to_json(), ans.ttl)
            if kind == "sts":  # what a successful fetch stores: the cache entry and the in-memory copy
                await sts_resolver.store.put(d, StsPolicy(StsMode.ENFORCE, 604800, (f"mx.{d}",), "1", time.time()))
            await service.reply(f"default {d}".encode())
        fill = time.perf_counter() - t0
        filled = step
        gc.collect()
        rss = rss_mb()
        hit_us = dns_us = float("nan")
        if step:
            keys = [f"default d{rnd.randrange(step)}.example".encode() for _ in range(20_000)]
            t0 = time.perf_counter()
            for k in keys:
                service.cached(k)
            hit_us = (time.perf_counter() - t0) / len(keys) * 1e6
            names = [f"dns:d{rnd.randrange(step)}.example:MX" for _ in range(20_000)]
            t0 = time.perf_counter()
            found = 0
            for k in names:
                raw = await cache.get(k)
                if raw is not None:
                    DnsAnswer.from_json(raw)
                    found += 1
            dns_us = (time.perf_counter() - t0) / len(names) * 1e6
            held = found / len(names)
        else:
            held = 1.0
        rows.append((step, rss, rss - base, len(cache), len(service._cache), held, hit_us, dns_us, fill))
    label = (f"kind={kind} cap={cap}  ([cache] max_entries={cache.max_entries:,}, [policyd] answer_cache_size="
             f"{service.settings.answer_cache_size:,})")
    return base, rows, label


def print_rows(base: float, rows: list[Row], label: str) -> None:
    print(f"{label}; baseline RSS after imports {base:.1f} MB")
    print("| destinations | RSS MB | growth MB | DNS cache entries | ready answers | MX still in DNS cache | "
          "socketmap hit µs | DNS cache hit + decode µs | fill s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step, rss, grow, entries, ready, held, hit, dns_us, fill in rows:
        print(f"| {step:,} | {rss:.1f} | {grow:.1f} | {entries:,} | {ready:,} | {held:.0%} | {hit:.2f} | "
              f"{dns_us:.2f} | {fill:.1f} |")


# The peer, postfix-mta-sts-resolver, run in its own venv (made by bench/policyd_vs_peer.py): its daemon's
# modules imported (its baseline), its internal LRU cache filled with what its responder stores per domain
# (CacheEntry(ts, policy id, policy parsed by its own parser)), RSS and a cache lookup timed at the same steps.
PEER_SCRIPT = r"""
import asyncio, gc, json, random, sys, time
import postfix_mta_sts_resolver.daemon  # noqa: F401  (what mta-sts-daemon imports)
from postfix_mta_sts_resolver.base_cache import CacheEntry
from postfix_mta_sts_resolver.internal_cache import InternalLRUCache
from postfix_mta_sts_resolver.utils import parse_mta_sts_policy

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024

async def main(n, steps, size):
    cache = InternalLRUCache(cache_size=size)
    gc.collect()
    base, filled, rows, rnd = rss(), 0, [], random.Random(1)
    for step in steps:
        if step > n:
            break
        t0 = time.perf_counter()
        for i in range(filled, step):
            d = f"d{i}.example"
            text = f"version: STSv1\nmode: enforce\nmx: mx.{d}\nmax_age: 604800\n"
            await cache.set(d, CacheEntry(time.time(), "1", parse_mta_sts_policy(text)))
        fill = time.perf_counter() - t0
        filled = step
        gc.collect()
        hit = float("nan")
        if step:
            keys = [f"d{rnd.randrange(step)}.example" for _ in range(20000)]
            t0 = time.perf_counter()
            for k in keys:
                await cache.get(k)
            hit = (time.perf_counter() - t0) / len(keys) * 1e6
        rows.append([step, rss(), rss() - base, len(cache._cache), hit, fill])
    print(json.dumps({"base": base, "rows": rows}))

asyncio.run(main(int(sys.argv[1]), json.loads(sys.argv[2]), int(sys.argv[3])))
"""


def run_peer(n: int, size: int) -> tuple[float, list[list[float]], str]:
    py = PEER_VENV / "bin" / "python"
    if not py.exists():
        sys.exit(f"{py} is missing: run bench/policyd_vs_peer.py once (it installs the peer there)")
    out = subprocess.run([str(py), "-c", PEER_SCRIPT, str(n), json.dumps(STEPS), str(size)], check=True,
                         capture_output=True, text=True, timeout=600).stdout
    version = subprocess.run([str(py), "-c", "import importlib.metadata as m; "
                              "print(m.version('postfix-mta-sts-resolver'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    data = json.loads(out)
    return float(data["base"]), data["rows"], version


def compare(n: int) -> None:
    """MTA-STS destinations, the only kind the peer caches: ours and the peer's RSS side by side."""
    ours_default = subprocess.run([sys.executable, __file__, "--n", str(n), "--kind", "sts", "--cap", "default",
                                   "--json"], capture_output=True, text=True, check=True).stdout
    ours_all = subprocess.run([sys.executable, __file__, "--n", str(n), "--kind", "sts", "--cap", "all", "--json"],
                              capture_output=True, text=True, check=True).stdout
    d, a = json.loads(ours_default), json.loads(ours_all)
    peer_base, peer_rows, version = run_peer(n, max(n, 10_000))
    print(f"MTA-STS enforce destinations; peer: postfix-mta-sts-resolver {version}, its internal cache with "
          f"cache_size={max(n, 10_000):,} (its default is 10,000)")
    print("| destinations | policyd RSS MB (shipped limits) | policyd RSS MB (all kept) | peer RSS MB | "
          "policyd / peer (shipped) | policyd hit µs | peer cache hit µs |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for rd, ra, rp in zip(d["rows"], a["rows"], peer_rows, strict=False):
        print(f"| {rd[0]:,} | {rd[1]:.1f} | {ra[1]:.1f} | {rp[1]:.1f} | {rd[1] / rp[1]:.2f}x | {rd[6]:.2f} | "
              f"{rp[4]:.2f} |")
    print(f"baselines after imports: policyd {d['base']:.1f} MB, peer {peer_base:.1f} MB")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--cap", choices=("default", "all"), default="all")
    ap.add_argument("--kind", choices=("dane", "sts"), default="dane",
                    help="DANE destinations (5 DNS answers each) or MTA-STS ones (6 answers and a policy)")
    ap.add_argument("--peer", action="store_true",
                    help="MTA-STS destinations, ours (both caps) and postfix-mta-sts-resolver side by side")
    ap.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.peer:
        print(f"# policyd vs peer memory, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
              f"Python {platform.python_version()}")
        compare(args.n)
        return
    base, rows, label = asyncio.run(run(args.n, args.cap, args.kind))
    if args.json:
        print(json.dumps({"base": base, "rows": rows}))
        return
    print(f"# policyd memory, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()}")
    print_rows(base, rows, label)


if __name__ == "__main__":
    main()
