"""Bytewax (PyPI `bytewax`) computing started / running / billing per organization, as its docs would have
it: KafkaSource from the earliest offset (tail=False: the flow ends at the end offsets seen at start),
json.loads per message, a stateful_map keyed by the row's key holding the upsert state (organization, price,
in force since, accrued) and emitting per-organization deltas, and a fold_final summing them per
organization. Same semantics as tally on the benchmark's workload. One worker, in process (run_main).
Prints {"seconds": run time of the flow, "result": {...}} as JSON on stdout.

    python bytewax_usage.py BROKERS TOPIC
"""
import json
import sys
import time

import bytewax.operators as op
from bytewax.connectors.kafka import KafkaSource
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, run_main
from bench_common import epoch_s, peak_rss_mb



def parse(msg):
    """(row key, change) or None for a tombstone."""
    if msg.value is None:
        return None
    v = json.loads(msg.value)
    k = json.loads(msg.key)
    p = v["payload"] if "schema" in v else v
    key = json.dumps(k["payload"] if "schema" in k else k, sort_keys=True)
    return key, (p["op"], p["source"]["ts_ms"] // 1000, p["after"])


def upsert(row, change):
    """State per row key: [org, price, since, accrued]. Emits (org, (started, running, billing)) deltas."""
    op_, ts, after = change
    if op_ in ("c", "r"):
        org = after["organization_uuid"]
        return [org, after["price_second"], epoch_s(after["started"]), 0], [(org, (1, 1, 0))]
    if op_ == "u":
        row[3] += row[1] * (ts - row[2])
        row[1] = after["price_second"]
        row[2] = ts
        return row, []
    if op_ == "d":
        org, price, since, accrued = row
        return None, [(org, (0, -1, accrued + price * (ts - since)))]
    return row, []


def add(acc, d):
    return (acc[0] + d[0], acc[1] + d[1], acc[2] + d[2])


def main():
    brokers, topic = sys.argv[1], sys.argv[2]
    config = {"fetch.wait.max.ms": "10", "max.partition.fetch.bytes": str(8 * 1024 * 1024)}
    flow = Dataflow("usage")
    msgs = op.input("kafka", flow, KafkaSource([brokers], [topic], tail=False, add_config=config, batch_size=10_000))
    changes = op.filter_map("parse", msgs, parse)
    deltas = op.flat_map("deltas", op.stateful_map("upsert", changes, upsert), lambda kv: kv[1])
    totals = op.fold_final("per-org", deltas, lambda: (0, 0, 0), add)
    out = []
    op.output("out", totals, TestingSink(out))
    start = time.monotonic()
    run_main(flow)
    elapsed = time.monotonic() - start
    result = {org: {"started": s, "running": r, "billing": b} for org, (s, r, b) in sorted(out)}
    print(json.dumps({"seconds": elapsed, "rss_mb": peak_rss_mb(), "result": result}))


if __name__ == "__main__":
    main()
