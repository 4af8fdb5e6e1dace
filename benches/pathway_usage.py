"""Pathway (PyPI `pathway`, built on timely/differential dataflow) computing started / running / billing
per organization, written the relational way Pathway is meant to be used. Its JSON Kafka reader parses
each change event into columns (static mode: everything in the topic at start, then pw.run returns).

Billing telescopes: a row billed price p0 from t0, p1 from t1, ..., destroyed at td costs
p0 (t1 - t0) + ... + pk (td - tk) = -p0 t0 + sum_i (p_{i-1} - p_i) t_i + pk td, so every event carries one
term (create: -after.price * started; update: (before.price - after.price) * ts; delete: before.price * ts),
a row's bill is the sum of its terms, and only destroyed rows count. Same numbers as tally on the
benchmark's workload (unique keys, no re-deliveries). Prints {"seconds": run time of pw.run, "result": ...}.

    python pathway_usage.py BROKERS TOPIC SCHEMAS(on|off) [THREADS]
"""
import json
import os
import sys
import time

import pathway as pw
from bench_common import peak_rss_mb



class Change(pw.Schema):
    op: str
    ts_ms: int
    before: pw.Json | None
    after: pw.Json | None


def main():
    brokers, topic, schemas = sys.argv[1], sys.argv[2], sys.argv[3] == "on"
    p = "/payload" if schemas else ""
    paths = {"op": f"{p}/op", "ts_ms": f"{p}/source/ts_ms", "before": f"{p}/before", "after": f"{p}/after"}
    settings = {
        "bootstrap.servers": brokers,
        "group.id": f"pathway-bench-{os.getpid()}",
        "auto.offset.reset": "earliest",
        "enable.auto.commit": "false",
        "fetch.wait.max.ms": "10",
        "max.partition.fetch.bytes": str(8 * 1024 * 1024),
    }
    ev = pw.io.kafka.read(settings, topic, schema=Change, format="json", json_field_paths=paths, mode="static")
    created = (pw.this.op == "c") | (pw.this.op == "r")
    before, after = pw.coalesce(pw.this.before, pw.Json({})), pw.coalesce(pw.this.after, pw.Json({}))
    ev = ev.select(
        row_id=pw.coalesce(after.get("id").as_int(), before.get("id").as_int()),
        org=pw.coalesce(after.get("organization_uuid").as_str(), before.get("organization_uuid").as_str()),
        created=pw.if_else(created, 1, 0),
        deleted=pw.if_else(pw.this.op == "d", 1, 0),
        started_s=pw.cast(
            int,
            pw.coalesce(after.get("started").as_str(), "1970-01-01T00:00:00Z").dt.strptime("%Y-%m-%dT%H:%M:%SZ").dt.timestamp(unit="s"),
        ),
        ts=pw.this.ts_ms // 1000,
        a_price=pw.coalesce(after.get("price_second").as_int(), 0),
        b_price=pw.coalesce(before.get("price_second").as_int(), 0),
    )
    ev = ev.select(
        pw.this.row_id,
        pw.this.org,
        pw.this.created,
        pw.this.deleted,
        term=pw.if_else(
            pw.this.created == 1,
            -pw.this.a_price * pw.this.started_s,
            pw.if_else(
                pw.this.deleted == 1,
                pw.this.b_price * pw.this.ts,
                (pw.this.b_price - pw.this.a_price) * pw.this.ts,
            ),
        ),
    )
    rows = ev.groupby(pw.this.row_id).reduce(
        org=pw.reducers.any(pw.this.org),
        created=pw.reducers.sum(pw.this.created),
        deleted=pw.reducers.sum(pw.this.deleted),
        bill=pw.reducers.sum(pw.this.term),
    )
    usage = rows.groupby(pw.this.org).reduce(
        pw.this.org,
        started=pw.reducers.sum(pw.this.created),
        running=pw.reducers.sum(pw.this.created - pw.this.deleted),
        billing=pw.reducers.sum(pw.this.bill * pw.this.deleted),
    )
    latest = {}  # Pathway row key -> row; a retraction removes only the value it names

    def on_change(key, row, time, is_addition):
        if is_addition:
            latest[key] = row
        elif latest.get(key) == row:
            del latest[key]

    pw.io.subscribe(usage, on_change=on_change)
    start = time.monotonic()
    pw.run(monitoring_level=pw.MonitoringLevel.NONE)
    elapsed = time.monotonic() - start
    result = {r["org"]: {"started": r["started"], "running": r["running"], "billing": r["billing"]} for r in latest.values()}
    print(json.dumps({"seconds": elapsed, "rss_mb": peak_rss_mb(), "result": dict(sorted(result.items()))}))


if __name__ == "__main__":
    main()
