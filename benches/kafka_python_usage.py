"""The spec's own stack, as its users would write it: a kafka-python consumer computing started / running /
billing per organization in dictionaries (json.loads, datetime parsing). Same semantics as tally on the
benchmark's workload (upsert by key; each price billed for its seconds). Reads N messages from the
earliest offset, then prints {"seconds": elapsed from first poll, "result": {...}} as JSON on stdout.

    python kafka_python_usage.py BROKERS TOPIC N
"""
import json
import sys
import time

from kafka import KafkaConsumer, TopicPartition
from bench_common import epoch_s, peak_rss_mb



def main():
    brokers, topic, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    consumer = KafkaConsumer(
        bootstrap_servers=brokers,
        client_id="localhost",
        group_id=None,
        enable_auto_commit=False,
        key_deserializer=lambda k: json.loads(k) if k is not None else None,
        value_deserializer=lambda v: json.loads(v) if v is not None else None,
        fetch_max_wait_ms=10,
        max_partition_fetch_bytes=8 * 1024 * 1024,
    )
    parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic))]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    live = {}  # key -> [org, price, since, accrued]
    orgs = {}  # org -> [started, running, billing]
    seen = 0
    start = None
    while seen < n:
        batch = consumer.poll(timeout_ms=100, max_records=10000)
        if start is None and batch:
            start = time.monotonic()
        for records in batch.values():
            for m in records:
                seen += 1
                v = m.value
                if v is None:
                    continue
                p = v.get("payload", v) if "schema" in v else v
                key = json.dumps(m.key.get("payload", m.key) if "schema" in m.key else m.key, sort_keys=True)
                ts = p["source"]["ts_ms"] // 1000
                op = p["op"]
                if op in ("c", "r"):
                    a = p["after"]
                    o = orgs.setdefault(a["organization_uuid"], [0, 0, 0])
                    o[0] += 1
                    o[1] += 1
                    live[key] = [a["organization_uuid"], a["price_second"], epoch_s(a["started"]), 0]
                elif op == "u":
                    row = live[key]
                    row[3] += row[1] * (ts - row[2])
                    row[1] = p["after"]["price_second"]
                    row[2] = ts
                elif op == "d":
                    org, price, since, accrued = live.pop(key)
                    o = orgs[org]
                    o[1] -= 1
                    o[2] += accrued + price * (ts - since)
    elapsed = time.monotonic() - (start or time.monotonic())
    result = {org: {"started": s, "running": r, "billing": b} for org, (s, r, b) in sorted(orgs.items())}
    print(json.dumps({"seconds": elapsed, "rss_mb": peak_rss_mb(), "result": result}))


if __name__ == "__main__":
    main()
