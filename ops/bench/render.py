"""``report.md`` and the progress bar: the whole-path bench's figures put into words and tables.

Pure: a report dict (``report.json``'s content) in, Markdown text out; nothing here reads a clock or a
file except :func:`progress_bar`, which writes one line to a terminal.  Cost: linear in the steps.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from distributor.hotpath import HOT_SAMPLE_EVERY
from ops.bench.budget import missed_targets, stage_budget
from ops.bench.profiles import REFERENCE_RATE, SATURATED_CORE, TARGETS

__all__ = ["Progress", "fmt_rate", "fmt_us", "progress_bar", "render_markdown"]

#: ``progress(label, fraction)``: where a run is, called a few times a second
Progress = Callable[[str, float], None]


def fmt_us(v: float | None) -> str:
    """A latency for a table: ``250 µs``, ``1.5 ms``, ``12 ms``; ``-`` for none."""
    if v is None:
        return "-"
    if v >= 10_000:
        return f"{v / 1000:.0f} ms"
    if v >= 1000:
        return f"{v / 1000:.1f} ms"
    return f"{v:.0f} µs"


def fmt_rate(v: float | None) -> str:
    """A rate for a table: ``500``, ``50.0k``; ``-`` for none."""
    if v is None:
        return "-"
    return f"{v / 1000:.1f}k" if v >= 1000 else f"{v:.0f}"


def _status(met: bool | None) -> str:
    return "N/A" if met is None else ("MET" if met else "MISSED")


def _cpu_line(cpu: dict[str, float | None], cores: int) -> str:
    parts = [f"{name} {100 * v:.0f}%" for name, v in cpu.items() if v is not None and name != "machine"]
    machine = cpu.get("machine")
    if machine is not None:
        parts.append(f"whole machine {100 * machine:.0f}% of {100 * cores}%")
    return ", ".join(parts)


def _saturated_processes(cpu: dict[str, float | None], cores: int) -> list[str]:
    out = []
    for name in ("simulator", "ingestor", "redis-server", "bench"):
        v = cpu.get(name)
        if v is not None and v >= SATURATED_CORE:
            out.append(f"{name} at {100 * v:.0f}% of one core (its work runs on one thread: near its ceiling)")
    machine = cpu.get("machine")
    if machine is not None and machine >= SATURATED_CORE * cores:
        out.append(f"the machine at {100 * machine:.0f}% of {100 * cores}%: every process also waits for a CPU")
    return out


def _consumer_inside_redis(commands: dict[str, dict[str, float]]) -> str:
    """The sentence on the consumer's time inside Redis (its reads and acks), or "" when not measured."""
    read, ack = commands.get("xreadgroup"), commands.get("xack")
    if read is None:
        return ""

    def avg(us: float) -> str:  # commandstats' averages run down to a µs or two: keep a decimal there
        return f"{us:.1f} µs" if us < 10 else fmt_us(us)

    busy = read["busy_share"] + (ack["busy_share"] if ack else 0.0)
    acks = (f", and {fmt_rate(ack['calls_per_s'])} XACK a second ({avg(ack['us_per_call'])} on average, one per "
            "stream read)" if ack else "")
    return (f"The consumer's reads and acks inside Redis (`INFO commandstats`; on a shared Redis, other clients' calls "
            f"count too): {fmt_rate(read['calls_per_s'])} XREADGROUP a second over every stream, "
            f"{avg(read['us_per_call'])} on average (while the consumer keeps up, a blocked read and the follow-up "
            "behind it for each burst; a read costs more the more streams it names and entries it hands over)"
            f"{acks}; Redis busy with them {100 * busy:.0f}% of the window. A tick reaches the consumer once the "
            "script that stored it and these reads have run.")


def _where_time_goes(step: dict[str, Any], cores: int, subscribers: int) -> list[str]:
    """Sentences that explain a step: stage by stage, then who used the CPU."""
    lat = step["latency"]
    lines = [
        f"At {fmt_rate(step['rate'])}/s offered: ingest (frame -> ingress) p50 {fmt_us(lat['ingest']['p50_us'])} / "
        f"p99 {fmt_us(lat['ingest']['p99_us'])}; frame -> Redis acknowledged p50 {fmt_us(lat['redis']['p50_us'])} / "
        f"p99 {fmt_us(lat['redis']['p99_us'])}; frame -> SDK consumer callback p50 "
        f"{fmt_us(lat['redis_e2e']['p50_us'])} / p99 {fmt_us(lat['redis_e2e']['p99_us'])}; hot path (publish -> "
        f"callback, {subscribers} subscribers) p50 {fmt_us(lat['hotpath']['p50_us'])} / "
        f"p99 {fmt_us(lat['hotpath']['p99_us'])}.",
        f"CPU in the window (share of one core): {_cpu_line(step['cpu'], cores)}.",
    ]
    wr = step.get("writer") or {}
    if wr.get("ticks_per_flush"):
        inside = ""
        script = (step.get("redis_commands") or {}).get("evalsha")
        if script is not None and script["us_per_call"]:
            inside = (f" Inside Redis one script call took {fmt_us(script['us_per_call'])} on average "
                      f"({script['us_per_call'] / wr['ticks_per_flush']:.1f} µs a tick: the XADD, the duplicate "
                      "check and the record parsing in Lua), Redis busy with them "
                      f"{100 * script['busy_share']:.0f}% of the window.")
        lines.append(
            f"The writer made {wr['flushes_per_s']:.0f} round trips to Redis a second, {wr['ticks_per_flush']:.0f} "
            "ticks each on average, up to 4 in flight on the writer's one connection (Redis runs a connection's "
            "commands in order, which keeps each stream's ticks in order), so a tick waits for Redis to run the "
            f"calls sent before its own, then its own.{inside} Before that, a tick waits for the rest of its "
            "socket read to be parsed and "
            "for the hot path's subscribers woken by the same batch: the simulator sends every 5 ms, so each "
            "burst goes through the ingestor's one event loop as a whole."
        )
    consumer = _consumer_inside_redis(step.get("redis_commands") or {})
    if consumer:
        lines.append(consumer)
    hot = _saturated_processes(step["cpu"], cores)
    if hot:
        lines.append("Out of CPU: " + "; ".join(hot) + ".")
    else:
        lines.append("No process was near a full core and the machine had CPU to spare: the time goes to waiting "
                     "(the venue's 5 ms send batches, the writer's round trip to Redis, the consumer's read cycle, "
                     "tasks queued behind each other on the ingestor's one event loop), not to computing.")
    if step["saturation"]:
        lines.append("Saturation signs: " + "; ".join(step["saturation"]) + ".")
    others = step["cpu"].get("others")
    if others is not None and others >= 0.25:
        lines.append(
            f"Other work on this shared machine used {100 * others:.0f}% of a core during the window."
        )
    return lines


def _saturated_why(step: dict[str, Any], cap: dict[str, Any] | None, cores: int) -> str:
    """Why a saturated step's stages are queues: the CPU its rate needs, projected from the cost per tick of
    the highest step that was not saturated (:func:`~ops.bench.analysis.capacity`), against the machine's."""
    what = "This step saturated"
    signs = step.get("saturation") or []
    if signs:
        what += f" ({signs[0]})"
    if cap:
        need = sum(cap["cores_per_1k_per_s"].values()) * float(step["rate"]) / 1000
        what += (f": at the cost per tick measured at {fmt_rate(cap['from_rate'])}/s, the processes sharing the "
                 f"machine need {100 * need:.0f}% of one core at this rate, and it has {100 * cores}%")
    used = (step.get("cpu") or {}).get("machine")
    if used is not None:
        what += f"; it ran at {100 * used:.0f}% in the window"
    return what + ". Each stage below is mostly time spent queued behind the CPU, not work of its own"


def _remaining_by_stage(w: Callable[[str], None], ran: list[dict[str, Any]], lim: dict[str, Any],
                        hot_alone_p99_us: float | None, cap: dict[str, Any] | None = None,
                        cores: int = 1) -> None:
    """The limits measured in this run, and for every step that missed a latency target of its rate
    (:data:`~ops.bench.budget.STEP_TARGETS`), its time stage by stage above them; a saturated step's with
    the CPU its rate needs against the machine's (:func:`_saturated_why`)."""
    w("")
    w(f"Limits measured in this run (idle connections, {lim['loop']} loop, p50 / p99): a bare PING "
      f"{fmt_us(lim['ping']['p50_us'])} / {fmt_us(lim['ping']['p99_us'])}; a bare XADD "
      f"{fmt_us(lim['xadd']['p50_us'])} / {fmt_us(lim['xadd']['p99_us'])}; a bare XREADGROUP finding one entry "
      f"{fmt_us(lim['xreadgroup']['p50_us'])} / {fmt_us(lim['xreadgroup']['p99_us'])}; an XADD waking a blocked "
      f"XREADGROUP on another connection {fmt_us(lim['wake']['p50_us'])} / {fmt_us(lim['wake']['p99_us'])}; the "
      f"same through the SDK consumer (XADD sent -> handler) {fmt_us(lim['consumer']['p50_us'])} / "
      f"{fmt_us(lim['consumer']['p99_us'])}.")
    for step in ran:
        misses = [f"{stage} {p} {fmt_us(value)} > {fmt_us(bar)}" for stage, p, value, bar in missed_targets(step)]
        if not misses:
            continue
        why = f" {_saturated_why(step, cap, cores)}." if step.get("saturated") else ""
        w("")
        w(f"At {fmt_rate(step['rate'])}/s, missed: {'; '.join(misses)}.{why} The time stage by stage against "
          "those limits. The stages' means add up to the path's; a stage's p50 and p99 are the differences of the "
          "spans' percentiles, which are bucket bounds: an estimate, which can even put a stage's p50 above its p99 "
          "(the ingest's, the path's and the hot path's are their own). The writer's round trip runs beside Redis "
          "and the consumer, not before them: the consumer's read is woken when the script has run, whether or not "
          "the writer has read the reply.")
        w("")
        w("| stage | mean | p50 | p99 | limit measured in this run | above the limit (mean / p99) |")
        w("| --- | --- | --- | --- | --- | --- |")
        for row in stage_budget(step, lim, hot_alone_p99_us):
            if row["limit_us"] is None:
                limit = above = "-"
            else:
                limit = f"{fmt_us(row['limit_us'])} ({row['limit']})"
                above = f"{fmt_us(row['mean_above_limit_us'])} / {fmt_us(row['p99_above_limit_us'])}"
            w(f"| {row['stage']} | {fmt_us(row['mean_us'])} | {fmt_us(row['p50_us'])} | {fmt_us(row['p99_us'])} "
              f"| {limit} | {above} |")


def render_markdown(report: dict[str, Any]) -> str:
    """The human-readable report."""
    m, cfg, summary = report["machine"], report["configuration"], report["summary"]
    steps = report["steps"]
    ran = [s for s in steps if s.get("status") != "not run"]
    cores = int(m.get("cores") or 1)
    out: list[str] = []
    w = out.append
    w(f"# Load test: simulator -> ingestor -> Redis Streams -> consumer ({report['mode']})")
    w("")
    w(f"Run {report['started']} to {report['ended']} ({report['duration_s']:.0f} s), seed {report['seed']}, "
      f"commit `{(report['git'].get('commit') or 'unknown')[:12]}`"
      f"{' (with uncommitted changes)' if report['git'].get('dirty') else ''}.")
    w("")
    w("## Reproduce")
    w("")
    w("```sh")
    w(report["command"])
    w("```")
    w("")
    w("## Machine")
    w("")
    w(f"- CPU: {m.get('cpu_model')}, {m.get('cores')} cores ({m.get('cpus_usable')} usable by this process); "
      f"memory {m.get('memory_gib')} GiB; Linux {m.get('kernel')}")
    w(f"- Load average at start {m.get('loadavg_start')}, at end {m.get('loadavg_end')}.")
    w("- This machine is shared: other test suites and benchmarks ran on its cores during this run. The `others` "
      "column in the CPU table is what they used during each window. Figures are what this load test got on a "
      "busy 2-core machine, not what a dedicated one would reach.")
    v = report["versions"]
    w("- Versions: " + ", ".join(f"{k} {val}" for k, val in v.items() if val) + ".")
    w("")
    w("## Configuration")
    w("")
    where = (f"found by port: pid {cfg['redis_pid']}" if cfg.get("redis_pid")
             else "not found by port, its CPU is not measured")
    w(f"- {len(cfg['symbols'])} symbols x {len(cfg['channels'])} channels ({', '.join(cfg['channels'])}) = "
      f"{len(cfg['symbols']) * len(cfg['channels'])} streams; one simulator process, one ingestor process "
      f"({cfg['subscribers']} co-located `{cfg['subscriber']}` subscribers), one SDK consumer (a consumer group "
      "over every stream) in the bench process; Redis at "
      f"`{cfg['redis_url']}` ({where}).")
    w(f"- Rates offered: {', '.join(fmt_rate(r) for r in cfg['schedule'])} ticks/s; each step: "
      f"{cfg['warmup_s']:.0f} s warm-up, {cfg['window_s']:.0f} s measured, then rate 0 until drained. "
      f"Queues sampled every {cfg['sample_s']} s.")
    w(f"- Ingress queue `{cfg['queue_policy']}`, capacity {cfg['queue_capacity']}; streams capped at "
      f"`MAXLEN ~ {cfg['retention_maxlen']}` (kept small so the bench leaves a shared Redis little to hold).")
    loops = cfg.get("event_loop")
    if loops:
        w(f"- Event loop: {loops['bench']} in the bench process (the SDK consumer), {loops['children']} in the "
          "simulator and the ingestor (`MARKET_LOOP`; uvloop is the `market[fast]` extra).")
    w("")
    w("## Summary against the targets")
    w("")
    w("| target | measured | verdict |")
    w("| --- | --- | --- |")
    t = summary["targets"]
    w(f"| hot path p99 {t['hotpath_p99_us']['target']} | {fmt_us(t['hotpath_p99_us']['value'])} in the pipeline "
      f"(standalone hot-path bench: {fmt_us(summary.get('hotpath_standalone_p99_us'))}) | "
      f"**{_status(t['hotpath_p99_us']['met'])}** |")
    w(f"| Redis path e2e p99 {t['redis_e2e_p99_us']['target']} | {fmt_us(t['redis_e2e_p99_us']['value'])} | "
      f"**{_status(t['redis_e2e_p99_us']['met'])}** |")
    w(f"| {t['no_queue_growth']['target']} | {t['no_queue_growth']['value']} | "
      f"**{_status(t['no_queue_growth']['met'])}** |")
    peak_rate = summary.get("peak_rate")
    pi = report.get("peak_ingest")
    how = ""
    if pi:
        how = ("ingest-only phase, no subscriber and no consumer: the highest step that did not saturate, "
               f"{fmt_rate(pi['peak_rate'])}/s offered" if pi.get("peak_rate")
               else "ingest-only phase: every step saturated")
        if pi.get("limit_rate"):
            how += f"; at {fmt_rate(pi['limit_rate'])}/s: {'; '.join(pi['limit'])}"
        elif pi.get("peak_rate"):
            how += "; no higher step was offered"
        how += ". In the full pipeline: "
    w(f"| peak ingest {t['peak_ingest_per_s']['target']} | {fmt_rate(t['peak_ingest_per_s']['value'])}/s "
      f"({how}highest step with no saturation and the e2e p99 within 2 ms: "
      f"{fmt_rate(peak_rate) + '/s offered' if peak_rate else 'none'}; highest step with no saturation, whatever "
      f"the latency: {fmt_rate(summary['sustained_ingest_per_s'])}/s published; most published in any step: "
      f"{fmt_rate(summary['max_published_per_s'])}/s) | **{_status(t['peak_ingest_per_s']['met'])}** |")
    ic = t.get("instrumentation_cost_pct")
    if ic is not None:
        value = "-" if ic["value"] is None else f"{ic['value']:.1f}%"
        w(f"| latency instrumentation {ic['target']} | {value} (see below) | **{_status(ic['met'])}** |")
    w(f"| writer vs naive per-tick XADD | {summary.get('baseline_ratio')}x "
      f"({summary.get('writer_ticks_per_s')} vs {summary.get('baseline_writer_ticks_per_s')} ticks/s) | - |")
    w("")
    if summary.get("reference_rate") != REFERENCE_RATE:
        w(f"The schedule has no {REFERENCE_RATE:.0f}/s step: latency figures are from the "
          f"{fmt_rate(summary.get('reference_rate'))}/s step and the latency targets are not judged.")
        w("")
    w("## Where the time goes")
    w("")
    ref = next((s for s in ran if s["rate"] == summary.get("reference_rate")), None)
    missed = [k for k, val in t.items() if val["met"] is False]
    if ref is not None:
        for line in _where_time_goes(ref, cores, cfg["subscribers"]):
            w(f"- {line}")
    first_bad = next((s for s in ran if s["saturated"]), None)
    if first_bad is not None and first_bad is not ref:
        w("")
        w(f"First saturated step, {fmt_rate(first_bad['rate'])}/s:")
        w("")
        for line in _where_time_goes(first_bad, cores, cfg["subscribers"]):
            w(f"- {line}")
    cap = summary.get("capacity")
    if cap:
        w("")
        w(f"Cost per 1000 ticks/s, from the {fmt_rate(cap['from_rate'])}/s step (share of one core): " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in cap["cores_per_1k_per_s"].items()) + ". Projected linearly, each "
          "process alone would fill its core at: " + ", ".join(
            f"{k} {fmt_rate(v)}/s" for k, v in cap["one_core_at_per_s"].items())
          + f"; all of them together would fill the {cores} cores of this machine at "
          f"{fmt_rate(cap['machine_full_at_per_s'])}/s, before anything else running on it. (Batching makes the cost "
          "per tick fall as the rate rises, so these are floors, not ceilings.)")
    fl = report.get("writer_flush")
    if fl:
        w("")
        w("The Redis stage, measured alone after the run: one writer flush (one round trip, one append-script "
          "call for every stream it touches; the writer knows each stream's newest ID from its call before, so "
          "the script reads none) takes " + ", ".join(
              f"{fmt_us(v)} for {k} stream{'s' if k != '1' else ''}" for k, v in fl["flush_p50_us"].items())
          + f" (p50; a bare PING: {fmt_us(fl['ping_p50_us'])}). A tick waits for the calls sent before its own, "
          f"then its own, and with {len(cfg['symbols']) * len(cfg['channels'])} streams busy a flush touches most of "
          "them: that is the floor of frame -> Redis acknowledged, before any CPU contention.")
    lim = report.get("limits")
    if lim:
        _remaining_by_stage(w, ran, lim, summary.get("hotpath_standalone_p99_us"), cap, cores)
    if not missed:
        w("")
        w("Every target judged was met.")
    w("")
    w("## Steps")
    w("")
    w("Throughput (per second over the window) and queues:")
    w("")
    w("| offered | generated | sent | received | published | consumed | ingress max | socket backlog "
      "(end) | consumer lag (end) | drops | reconnects | verdict |")
    w("| " + " | ".join(["---"] * 12) + " |")
    for s in steps:
        if s.get("status") == "not run":
            w(f"| {fmt_rate(s['rate'])} | not run: {s.get('reason', '')} |" + " |" * 10)
            continue
        th, q = s["throughput"], s["queue"]
        verdict = "saturated" if s["saturated"] else "ok"
        if not s["saturated"] and s["latency"]["redis_e2e"]["p99_us"] > TARGETS["redis_e2e_p99_us"][0]:
            verdict = "ok, over the e2e target"
        w(f"| {fmt_rate(s['rate'])} | {fmt_rate(th['generated_per_s'])} | {fmt_rate(th['sent_per_s'])} | "
          f"{fmt_rate(th['received_per_s'])} | {fmt_rate(th['published_per_s'])} | "
          f"{fmt_rate(th['consumed_per_s'])} | {q['ingress_max']:.0f} | {q['backlog_end']:.0f} | "
          f"{q['consumer_lag_end']:.0f} | {s['drops']['ingress'] + s['drops']['hotpath']:.0f} | "
          f"{s['reconnects']:.0f} | {verdict} |")
    w("")
    w("Latency per stage, p50 / p95 / p99 / p99.9 / max:")
    w("")
    w("| offered | ingest (frame -> ingress) | hot path (publish -> callback) | Redis (frame -> ack) | "
      "Redis path e2e (frame -> consumer) |")
    w("| --- | --- | --- | --- | --- |")
    for s in ran:
        cells = []
        for stage in ("ingest", "hotpath", "redis", "redis_e2e"):
            st = s["latency"][stage]
            cells.append(" / ".join(fmt_us(st[k]) for k in ("p50_us", "p95_us", "p99_us", "p999_us", "max_us")))
        w(f"| {fmt_rate(s['rate'])} | " + " | ".join(cells) + " |")
    w("")
    w("CPU (share of one core over the window; `others` is the rest of the machine) and peak memory:")
    w("")
    w("| offered | simulator | ingestor | redis-server | bench (consumer) | others | machine |")
    w("| --- | --- | --- | --- | --- | --- | --- |")
    for s in ran:
        c = s["cpu"]
        cells = [f"{100 * c[k]:.0f}%" if c.get(k) is not None else "-"
                 for k in ("simulator", "ingestor", "redis-server", "bench", "others", "machine")]
        w(f"| {fmt_rate(s['rate'])} | " + " | ".join(cells) + " |")
    w("")
    rss = report.get("memory", {})
    if rss:
        w("Peak resident memory (VmHWM): " + ", ".join(
            f"{k} {val / 1024:.0f} MiB" for k, val in rss.items() if isinstance(val, int | float)) + ".")
        w("")
    w("## Tallies")
    w("")
    w("Per window (counts read at the window's edges; they may disagree by what is in flight, up to 0.1 s of "
      "ticks; the consumer can even be a batch ahead of `published`, reading entries before the writer has "
      "counted their acknowledgement):")
    w("")
    w("| offered | sent by simulator | received by ingestor | in flight (end) | accepted | published | dropped | "
      "queue change | unaccounted | consumed | adds up |")
    w("| " + " | ".join(["---"] * 11) + " |")
    for s in ran:
        tl = s["tallies"]
        w(f"| {fmt_rate(s['rate'])} | {tl['sent']} | {tl['received']} | {tl['in_flight_end']} | {tl['accepted']} | "
          f"{tl['published']} | {tl['dropped']} | {tl['queued_change']} | {tl['unaccounted']} | {tl['consumed']} | "
          f"{'yes' if tl['adds_up'] else 'no'} |")
    w("")
    f = report["tallies"]
    w(f"Whole run, after the rate was held at 0 and everything drained (drained: {'yes' if f['drained'] else 'no'}):")
    w("")
    w(f"- frames sent by the simulator {f['sent']} = frames received by the ingestor {f['received']}: "
      f"**{'exact' if f['sent_equals_received'] else 'NOT equal'}**")
    w(f"- of which ticks accepted {f['accepted']}; other frames {f['other_frames']} (subscription replies "
      f"{f['replies']}, malformed {f['malformed']}, unsupported {f['unsupported']}, duplicates {f['duplicates']}, "
      f"out of order {f['out_of_order']})")
    w(f"- accepted {f['accepted']} = published {f['published']} + dropped {f['dropped']} + still queued "
      f"{f['queued']}: **{'exact' if f['accepted_equals_outcomes'] else 'NOT equal'}**")
    if not f["accepted_equals_outcomes"] and f["reconnects"]:
        w(f"  - the difference, {f['published_not_accepted']}, follows the {f['reconnects']} reconnect(s) at "
          f"saturation: the ingestor repaired {f['gaps']} gap(s) over REST and published the ticks it fetched (and "
          "gap markers for what it could not), which its venue connections never counted as accepted; the ingestor "
          "exports no "
          "counter of repaired ticks, so this tally cannot close exactly after a reconnect.")
    w(f"- consumed by the SDK consumer {f['consumed']} = published {f['published']}: "
      f"**{'exact' if f['consumed_equals_published'] else 'NOT equal'}** (duplicates {f['consumer_duplicates']}, "
      f"gaps {f['consumer_gaps']}, trimmed {f['consumer_trimmed']})")
    w("")
    if pi:
        w("## Peak ingest: one ingestor, nothing else")
        w("")
        w("After the sweep a new ingestor starts without subscribers, under a key prefix and a spill log of its own "
          "(as a new deployment would), and the consumer is stopped: simulator -> WebSocket -> normalize -> Redis "
          "only, the rate stepped up until a step saturates.")
        w("")
        w("| offered | generated | received | published | ingress max | socket backlog (end) | CPU simulator | "
          "CPU ingestor | CPU redis-server | machine | verdict |")
        w("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        for step in pi["steps"]:
            if step.get("status") == "not run":
                w(f"| {fmt_rate(step['rate'])} | not run: {step['reason']} | | | | | | | | | |")
                continue
            th, q, c = step["throughput"], step["queue"], step["cpu"]

            def pct(v: float | None) -> str:
                return "-" if v is None else f"{100 * v:.0f}%"

            w(f"| {fmt_rate(step['rate'])} | {fmt_rate(th['generated_per_s'])} | {fmt_rate(th['received_per_s'])} | "
              f"{fmt_rate(th['published_per_s'])} | {q['ingress_max']:.0f} | {q['backlog_end']} | "
              f"{pct(c.get('simulator'))} | {pct(c.get('ingestor'))} | {pct(c.get('redis-server'))} | "
              f"{pct(c.get('machine'))} | {'; '.join(step['saturation']) or 'ok'} |")
        w("")
    w("## Stand-alone benchmarks (run after the pipeline, alone)")
    w("")
    hp = report.get("hotpath_standalone") or {}
    if hp:
        w(f"- Hot path, {hp.get('rate', 0):.0f} ticks/s, {hp.get('subscribers')} subscribers "
          f"({hp.get('slow_subscribers')} deliberately slow), {hp.get('duration')} s: p50 {fmt_us(hp.get('p50_us'))}, "
          f"p99 {fmt_us(hp.get('p99_us'))}, p99.9 {fmt_us(hp.get('p999_us'))}, max {fmt_us(hp.get('max_us'))} "
          f"(ingress -> callback, fast subscribers); publish -> callback p99 over all subscribers "
          f"{fmt_us(hp.get('all_subscribers_p99_us'))}; accounted: {hp.get('accounted')}; one asyncio.Queue per "
          f"subscriber instead: p99 {fmt_us(hp.get('baseline_p99_us'))}.")
    ins = report.get("instrumentation") or {}
    if ins:
        modes = ins["modes"]
        w(f"- Latency instrumentation, what it costs: the ingestor's path without the socket (frames -> parse -> "
          f"ingress -> {ins['subscribers']} no-op subscribers and Redis), {ins['ticks']} frames over "
          f"{ins['streams']} streams per round, {ins['rounds']} rounds of each mode, alternating (`market bench "
          f"ingest`):")
        w("")
        w("  | mode | per-tick stages timed | ticks/s (median, min-max) | CPU per tick | throughput cost | "
          "CPU cost |")
        w("  | --- | --- | --- | --- | --- | --- |")
        what = {"off": "none", "sampled": f"1 in {modes.get('sampled', {}).get('sample_every')}, hot path 1 chunk "
                f"in {HOT_SAMPLE_EVERY}", "every": "every tick, every chunk"}
        for name, mm in modes.items():
            w(f"  | {name} | {what.get(name, '')} | {mm['ticks_per_s']:.0f} ({mm['ticks_per_s_min']:.0f}-"
              f"{mm['ticks_per_s_max']:.0f}) | {mm['cpu_us_per_tick']:.2f} µs | {mm['throughput_cost_pct']:+.1f}% | "
              f"{mm['cpu_cost_pct']:+.1f}% |")
        w("")
        w("  The default is `sampled`. The socket and the WebSocket framing, left out here, cost the same whatever "
          "is measured, so in a live ingestor the share is smaller still.")
    wr = report.get("writer_baseline") or {}
    if wr:
        w(f"- Redis writer, {wr.get('ticks')} ticks over {wr.get('streams')} streams: {wr.get('ticks_per_s')} ticks/s; "
          f"the naive pipeline of one XADD per tick: {wr.get('baseline_ticks_per_s')} ticks/s; ratio "
          f"**{wr.get('ratio')}x**.")
    w("")
    w("## Plots")
    w("")
    if report.get("plots"):
        for name in report["plots"]:
            w(f"![{name}]({name})")
            w("")
    else:
        w(f"No plots: {report.get('plots_note') or 'none were drawn'}.")
        w("")
    w("## How it is measured")
    w("")
    w("- Latencies come from the ingestor's own histograms (four buckets per power of two: a percentile is the "
      "upper bound of its bucket, within 25% of the truth), read from `/metrics` at both edges of the window and "
      "subtracted; the Redis path e2e is measured in the bench process as `now - ts_recv`, on the same clock.")
    w("- A step is saturated when the simulator generates less than 95% of the offered rate (starved of CPU), "
      "frames pile up between the simulator and the ingestor, the ingress queue grows, anything is dropped, the "
      "connection is lost, or the consumer falls behind. The peak is the highest step that is not saturated and "
      "keeps the Redis path p99 within 2 ms.")
    w("- CPU: utime + stime from `/proc/<pid>/stat` over the window; `machine` from `/proc/stat`. The "
      "Redis server is shared with other users of this machine: its CPU includes their commands.")
    for note in report.get("notes", []):
        w(f"- {note}")
    w("")
    return "\n".join(out)


def progress_bar(stream: TextIO | None = None, width: int = 30) -> Progress:
    """A one-line progress bar: ``[#####.....] step 3/6 50000/s 12s``; a newline once it reaches 1."""
    out = stream if stream is not None else sys.stderr
    started = time.monotonic()
    done = False

    def show(label: str, fraction: float) -> None:
        nonlocal done
        if done:
            return
        f = min(max(fraction, 0.0), 1.0)
        n = round(f * width)
        line = f"[{'#' * n}{'.' * (width - n)}] {label} {time.monotonic() - started:.0f}s"
        print(f"\r{line:<78}", end="", file=out, flush=True)
        if f >= 1.0:
            print(file=out, flush=True)
            done = True

    return show

