"""Affinity benchmark: how often a session's requests land where its previous one went, and what
that costs in load spread, throughput and time to first token, against least-busy, in one run.

Three replica processes run the ``sim`` engine (profile ``light``: a simulated continuous-batching
engine, 1 ms a step with the GIL released, so the three do not fight over the two cores the way
CTranslate2 replicas would), each named ``r0``..``r2``. Two router processes sit in front of the
same three: ``--policy least-busy`` and ``--policy affinity`` (defaults: load factor 1.25, the
first 256 characters hashed). One is driven at a time.

The workload: ``--sessions`` sessions (40), each sending ``--turns`` requests (6) whose prompts
share the session's own start (a 300-character context, different for each session within its
first 256 characters) and end in the turn's question; max_tokens ``--max-tokens`` (32), streamed.
``--concurrency`` closed-loop workers (8) each own every 8th session and send its turns
interleaved with their other sessions' (turn 0 of each, then turn 1, ...), so a session's next
request meets whatever load the others left. Three arms in every round, the order rotating:

- ``least-busy``: the least-busy router (the session header is sent; it ignores it);
- ``affinity-session``: the affinity router, keyed by ``x-meshllm-session``;
- ``affinity-prefix``: the affinity router, no header: keyed by the prompt's first 256 characters.

Per arm (all rounds pooled): hit rate = the share of a session's requests (after its first in a
round) that the replica of its previous request served (``timing.replica`` of the final chunk);
requests per replica and max/mean of them; completion tokens/s over the arm's wall time; TTFT
p50/p99 at the client (send to the first chunk with tokens); and, for the affinity arms, the
router's own ``meshllm_router_affinity_picks_total`` by outcome (scraped before and after).

What it does not show: the time to first token an engine with a prefix cache (ExLlamaV3) saves
when a session comes back to its replica. The ``sim`` engine has no prefix cache, nor do the
CTranslate2 replicas of this machine; that gain is GPU-only and is not measured here.

Run it from the repository root::

    python benchmarks/affinity.py            # full run, about a minute
    python benchmarks/affinity.py --quick    # smoke run

Figures are printed and written as JSON to ``benchmarks/results/affinity.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # benchmarks._common as a script

from benchmarks._common import (
    exit_on_sigterm,
    machine_info,
    percentile,
    replica_args,
    router_args,
    start_process,
    stop_processes,
    wait_ready,
    write_json,
)
from meshllm.api.v1 import generation_pb2 as gen
from meshllm.api.v1 import generation_pb2_grpc as gen_grpc
from meshllm.client.local import free_port
from meshllm.router.route_key import SESSION_HEADER

DEFAULT_OUT = Path("benchmarks/results/affinity.json")
ARMS = ("least-busy", "affinity-session", "affinity-prefix")
PICKS = "meshllm_router_affinity_picks"
CONTEXT = (
    "Session {s:02d}. You are helping with project {s:02d}: keep every answer short, cite the "
    "file you read, and never invent a figure. The notes so far for project {s:02d} say the "
    "build is green, the tests pass, and the open question is the cache policy of replica "
    "placement. "
)


@dataclass(frozen=True)
class Options:
    sessions: int
    turns: int
    concurrency: int
    max_tokens: int
    rounds: int
    out: Path
    quick: bool


def parse_args(argv: Sequence[str] | None = None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--sessions", type=int, default=40, help="sessions (40)")
    p.add_argument("--turns", type=int, default=None, help="requests per session per round (6)")
    p.add_argument("--concurrency", type=int, default=8, help="closed-loop workers (8)")
    p.add_argument("--max-tokens", type=int, default=32, help="max_tokens per request (32)")
    p.add_argument("--rounds", type=int, default=None, help="rounds of every arm (3)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"JSON file ({DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="smoke run: one round of 3 turns")
    a = p.parse_args(argv)
    return Options(
        sessions=a.sessions,
        turns=a.turns if a.turns is not None else (3 if a.quick else 6),
        concurrency=a.concurrency,
        max_tokens=a.max_tokens,
        rounds=a.rounds if a.rounds is not None else (1 if a.quick else 3),
        out=a.out,
        quick=a.quick,
    )


def context(session: int) -> str:
    return CONTEXT.format(s=session)


@dataclass(frozen=True)
class Sent:
    round: int
    session: int
    turn: int
    replica: str
    ttft_s: float
    tokens: int


async def one(
    stub: gen_grpc.GenerationStub,
    session: int,
    turn: int,
    opts: Options,
    *,
    header: bool,
    round_: int,
) -> Sent:
    prompt = f"{context(session)}Turn {turn}: what is the next step?"
    request = gen.GenerateRequest(model="demo", prompt=prompt, max_tokens=opts.max_tokens)
    metadata = ((SESSION_HEADER, f"session-{session}"),) if header else ()
    start, first, last = time.perf_counter(), None, None
    async for chunk in stub.GenerateStream(request, metadata=metadata):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
        last = chunk
    if last is None or last.finish_reason == gen.FINISH_REASON_UNSPECIFIED:
        raise RuntimeError(f"session {session} turn {turn}: no final chunk")
    ttft = (first or time.perf_counter()) - start
    return Sent(round_, session, turn, last.timing.replica, ttft, last.usage.completion_tokens)


async def drive(
    stub: gen_grpc.GenerationStub, opts: Options, *, header: bool, round_: int = 0
) -> tuple[list[Sent], float]:
    """Every session's turns, ``concurrency`` workers each owning every n-th session."""

    async def worker(w: int) -> list[Sent]:
        mine = range(w, opts.sessions, opts.concurrency)
        return [
            await one(stub, s, t, opts, header=header, round_=round_)
            for t in range(opts.turns)
            for s in mine
        ]

    start = time.perf_counter()
    done = await asyncio.gather(*(worker(w) for w in range(opts.concurrency)))
    return [s for part in done for s in part], time.perf_counter() - start


def hits(sent: Sequence[Sent]) -> tuple[int, int]:
    """(requests that went where their session's previous one did, requests with a previous)."""
    last: dict[tuple[int, int], str] = {}
    same = pairs = 0
    for s in sorted(sent, key=lambda s: (s.round, s.session, s.turn)):
        session = (s.round, s.session)
        if session in last:
            pairs += 1
            same += last[session] == s.replica
        last[session] = s.replica
    return same, pairs


def picks(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    return {
        s.labels["outcome"]: s.value
        for family in text_string_to_metric_families(text)
        if family.name == PICKS
        for s in family.samples
        if s.name == f"{PICKS}_total"
    }


@dataclass
class Arm:
    name: str
    sent: list[Sent]
    wall_s: float = 0.0
    picks: Counter[str] | None = None

    def summary(self) -> dict[str, Any]:
        same, pairs = hits(self.sent)
        per_replica = Counter(s.replica for s in self.sent)
        mean = len(self.sent) / max(len(per_replica), 1)
        ttfts = [s.ttft_s * 1e3 for s in self.sent]
        return {
            "arm": self.name,
            "requests": len(self.sent),
            "hit_rate": round(same / pairs, 4) if pairs else 0.0,
            "hit_pairs": [same, pairs],
            "requests_per_replica": dict(sorted(per_replica.items())),
            "spread_max_over_mean": round(max(per_replica.values()) / mean, 3),
            "tokens_per_s": round(sum(s.tokens for s in self.sent) / self.wall_s, 1),
            "ttft_p50_ms": round(percentile(ttfts, 0.5), 2),
            "ttft_p99_ms": round(percentile(ttfts, 0.99), 2),
            "affinity_picks": dict(self.picks) if self.picks is not None else None,
        }


async def measure(opts: Options) -> list[Arm]:
    replica_ports = [free_port() for _ in range(3)]
    lb_port, aff_port, aff_metrics = free_port(), free_port(), free_port()
    sim = ["--engine", "sim", "--option", "profile=light", "--default-coalesce-ms", "0"]
    procs = [
        start_process(replica_args(p, "demo", *sim, "--replica-id", f"r{i}"))
        for i, p in enumerate(replica_ports)
    ]
    procs.append(start_process(router_args(lb_port, replica_ports, "--policy", "least-busy")))
    procs.append(
        start_process(
            router_args(
                aff_port, replica_ports, "--policy", "affinity", "--metrics-port", str(aff_metrics)
            )
        )
    )
    arms = {name: Arm(name, []) for name in ARMS}
    try:
        channels = {p: grpc.aio.insecure_channel(f"127.0.0.1:{p}") for p in (lb_port, aff_port)}
        stubs = {p: gen_grpc.GenerationStub(c) for p, c in channels.items()}
        for stub in stubs.values():
            await wait_ready(stub, procs, "demo", replicas=3)
        warm = Options(**{**asdict(opts), "turns": 1})
        for stub in stubs.values():
            await drive(stub, warm, header=True)
        for round_ in range(opts.rounds):
            order = ARMS[round_ % 3 :] + ARMS[: round_ % 3]
            for name in order:
                port = lb_port if name == "least-busy" else aff_port
                before = picks(aff_metrics)
                sent, wall = await drive(
                    stubs[port], opts, header=name != "affinity-prefix", round_=round_
                )
                after = picks(aff_metrics)
                arm = arms[name]
                arm.sent += sent
                arm.wall_s += wall
                if name != "least-busy":
                    delta = Counter({k: int(after.get(k, 0) - before.get(k, 0)) for k in after})
                    arm.picks = (arm.picks or Counter()) + delta
                print(f"  round {round_ + 1} {name:<17} {len(sent)} requests in {wall:.2f} s")
        for c in channels.values():
            await c.close()
    finally:
        stop_processes(procs)
    return [arms[n] for n in ARMS]


def report(opts: Options, arms: list[Arm]) -> dict[str, Any]:
    rows = [a.summary() for a in arms]
    print(
        f"\n{opts.sessions} sessions x {opts.turns} turns x {opts.rounds} rounds, "
        f"{opts.concurrency} workers, max_tokens {opts.max_tokens}, 3 sim replicas\n"
    )
    print(
        f"{'arm':<17} {'hit rate':>8} {'per replica':>16} {'max/mean':>8} "
        f"{'tok/s':>8} {'TTFT p50':>9} {'p99 ms':>7}  affinity picks"
    )
    for r in rows:
        spread = "/".join(str(n) for n in r["requests_per_replica"].values())
        print(
            f"{r['arm']:<17} {r['hit_rate']:>8.3f} {spread:>16} {r['spread_max_over_mean']:>8.2f} "
            f"{r['tokens_per_s']:>8.0f} {r['ttft_p50_ms']:>9.2f} {r['ttft_p99_ms']:>7.2f}  "
            f"{r['affinity_picks'] or ''}"
        )
    by = {r["arm"]: r for r in rows}
    lb = by["least-busy"]
    ratios = {
        arm: {
            "hit_rate": round(by[arm]["hit_rate"] / lb["hit_rate"], 3) if lb["hit_rate"] else None,
            "spread_max_over_mean": round(
                by[arm]["spread_max_over_mean"] / lb["spread_max_over_mean"], 3
            ),
            "tokens_per_s": round(by[arm]["tokens_per_s"] / lb["tokens_per_s"], 3),
            "ttft_p50": round(by[arm]["ttft_p50_ms"] / lb["ttft_p50_ms"], 3),
            "ttft_p99": round(by[arm]["ttft_p99_ms"] / lb["ttft_p99_ms"], 3),
        }
        for arm in ARMS[1:]
    }
    print("\nratios to least-busy (same run):")
    for arm, r in ratios.items():
        print(f"  {arm}: " + ", ".join(f"{k} {v}" for k, v in r.items()))
    notes = [
        "The sim engine has no prefix cache: the TTFT an engine with one (ExLlamaV3) saves when "
        "a session returns to its replica is GPU-only and not measured here.",
        "A hit rate of about 1/3 under least-busy is chance: three replicas.",
    ]
    return {
        "machine": machine_info(),
        "settings": {**asdict(opts), "out": str(opts.out)},
        "arms": rows,
        "ratios_to_least_busy": ratios,
        "notes": notes,
    }


def main(argv: Sequence[str] | None = None) -> None:
    opts = parse_args(argv)
    exit_on_sigterm()
    started = time.perf_counter()
    arms = asyncio.run(measure(opts))
    out = report(opts, arms)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    write_json(opts.out, out)


if __name__ == "__main__":
    main()
