"""The way the availability specs write results: a kafka-python consumer that parses each message and
runs one INSERT and one commit per message through psycopg2 (spec -b's consumer, without its Kubernetes
secrets). It stops after --count messages and prints how long it took.

    python consumer.py --brokers HOST:PORT --topic T --dsn DSN --count N
"""
import argparse
import json
import time

import psycopg2
from kafka import KafkaConsumer, TopicPartition

COLUMNS = (
    "url", "scheduled_at", "site_id", "shard", "interval_ms", "outcome", "error_class", "error_phase",
    "error", "http_status", "regex_matched", "final_url", "redirects", "dns_us", "connect_us", "tls_us",
    "ttfb_us", "transfer_us", "total_us", "cert_not_after",
)
INSERT = (
    "INSERT INTO check_result (" + ", ".join(COLUMNS) + ") VALUES ("
    + ", ".join(["to_timestamp(%s / 1000.0)" if c in ("scheduled_at", "cert_not_after") else "%s" for c in COLUMNS])
    + ") ON CONFLICT (url, scheduled_at) DO NOTHING"
)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--dsn", required=True)
    p.add_argument("--count", type=int, required=True)
    a = p.parse_args()
    conn = psycopg2.connect(a.dsn)
    cur = conn.cursor()
    consumer = KafkaConsumer(
        bootstrap_servers=a.brokers, client_id="localhost", group_id=None, enable_auto_commit=False,
        fetch_max_wait_ms=10,
    )
    parts = [TopicPartition(a.topic, p) for p in sorted(consumer.partitions_for_topic(a.topic))]
    consumer.assign(parts)
    consumer.seek_to_beginning(*parts)
    started = time.monotonic()
    n = 0
    for message in consumer:
        r = json.loads(message.value)
        cur.execute(INSERT, (
            r["url"], r["scheduled_at_ms"], r["site_id"], r.get("shard", ""), r.get("interval_ms"),
            r["outcome"], r.get("error_class"), r.get("error_phase"), r.get("error"), r.get("http_status"),
            r.get("regex_matched"), r.get("final_url"), r.get("redirects", 0), r.get("dns_us", 0),
            r.get("connect_us", 0), r.get("tls_us", 0), r.get("ttfb_us", 0), r.get("transfer_us", 0),
            r.get("total_us", 0), r.get("cert_not_after_ms"),
        ))
        conn.commit()
        n += 1
        if n >= a.count:
            break
    elapsed = time.monotonic() - started
    print(json.dumps({"rows": n, "seconds": elapsed}))


if __name__ == "__main__":
    main()
