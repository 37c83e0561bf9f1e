"""policyd memory and warm lookup time as its caches grow to 100,000 destinations (issue 9).

    .venv/bin/python bench/policyd_memory.py [--n 100000] [--cap default|all]

One fresh process per run fills, for N destinations ``dN.example``: the destination caches exactly as policyd's
DNS client fills them (a ``MemoryCache`` holding the JSON of each answer policyd looks up for a DANE domain: MX,
A and AAAA of the MX host, TLSA of ``_25._tcp`` of it, and the ``_mta-sts`` TXT, 5 keys per domain), plus
policyd's answer cache (``PolicyService.reply`` over a resolver that hands back a DANE ``Destination``).  It prints
RSS (``/proc/self/status``) and the time of a warm lookup (a cached socketmap reply, and a DNS cache hit with
its JSON decoding) at each size.  ``--cap default`` keeps the shipped limits (``[cache] max_entries`` DNS answers,
``[policyd] answer_cache_size`` ready answers), as ``requiretls policyd`` runs by default; ``--cap all`` raises
both so that every destination and every DNS answer stays cached.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from requiretls.config import load
from requiretls.dest.cache import MemoryCache, create_cache
from requiretls.dest.dnssec import DnsAnswer, DnssecState, LookupStatus
from requiretls.policy.table import PolicyTable
from requiretls.policyd.metrics import Metrics
from requiretls.policyd.server import PolicyService, ServiceSettings
from tests.policyd.fakes import dane

STEPS = (0, 1_000, 10_000, 25_000, 50_000, 100_000)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def answers(domain: str) -> list[DnsAnswer]:
    mx = f"mx1.{domain}"
    sec, ok = DnssecState.SECURE, LookupStatus.ANSWER

    def a(name: str, rdtype: str, rdata: tuple[str, ...]) -> DnsAnswer:
        return DnsAnswer(qname=name, rdtype=rdtype, status=ok, state=sec, ttl=3600, canonical=name, rdata=rdata,
                         error="", ede=())

    return [
        a(domain, "MX", (f"10 {mx}.",)),
        a(mx, "A", ("192.0.2.1",)),
        a(mx, "AAAA", ("2001:db8::1",)),
        a(f"_25._tcp.{mx}", "TLSA", ("3 1 1 " + "ab" * 32,)),
        a(f"_mta-sts.{domain}", "TXT", ()),
    ]


class Resolver:
    async def lookup(self, domain: str) -> object:
        return dane(domain)


async def run(n: int, cap: str) -> None:
    defaults = load(None)  # the shipped defaults of [cache] max_entries and [policyd] answer_cache_size
    max_entries = int(defaults.get("cache", "max_entries"))
    answers_max = int(defaults.get("policyd", "answer_cache_size"))
    cache = create_cache("memory", max_entries=max_entries if cap == "default" else 6 * n + 10)
    assert isinstance(cache, MemoryCache)
    ready_max = answers_max if cap == "default" else max(answers_max, n)
    service = PolicyService(PolicyTable.empty(), Resolver(), Metrics(),  # type: ignore[arg-type]
                            ServiceSettings(answer_ttl=86400, answer_cache_size=ready_max))
    gc.collect()
    base = rss_mb()
    rows = []
    filled = 0
    rnd = random.Random(1)
    for step in STEPS:
        if step > n:
            break
        t0 = time.perf_counter()
        for i in range(filled, step):
            d = f"d{i}.example"
            for ans in answers(d):
                await cache.set(f"dns:{ans.qname}:{ans.rdtype}", ans.to_json(), ans.ttl)
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
    print(f"cap={cap}  ([cache] max_entries={cache.max_entries:,}, [policyd] answer_cache_size="
          f"{service.settings.answer_cache_size:,}); baseline RSS after imports {base:.1f} MB")
    print("| destinations | RSS MB | growth MB | DNS cache entries | ready answers | MX still in DNS cache | "
          "socketmap hit µs | DNS cache hit + decode µs | fill s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for step, rss, grow, entries, ready, held, hit, dns_us, fill in rows:
        print(f"| {step:,} | {rss:.1f} | {grow:.1f} | {entries:,} | {ready:,} | {held:.0%} | {hit:.2f} | "
              f"{dns_us:.2f} | {fill:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--cap", choices=("default", "all"), default="all")
    args = ap.parse_args()
    print(f"# policyd memory, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, Python {platform.python_version()}")
    asyncio.run(run(args.n, args.cap))


if __name__ == "__main__":
    main()
