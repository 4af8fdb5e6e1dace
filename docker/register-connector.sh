#!/bin/sh
# Registers the spec's Debezium connector once Kafka Connect answers (idempotent PUT; no fixed sleep).
set -eu
until curl -fsS "$CONNECT_URL/connectors" >/dev/null; do echo "waiting for Kafka Connect at $CONNECT_URL"; sleep 1; done
curl -fsS -X PUT -H 'Content-Type: application/json' "$CONNECT_URL/connectors/cloud-instances/config" -d '{
  "connector.class": "io.debezium.connector.mysql.MySqlConnector",
  "tasks.max": "1",
  "database.hostname": "mariadb",
  "database.port": "3306",
  "database.user": "debezium",
  "database.password": "dbz",
  "database.server.id": "184054",
  "topic.prefix": "topic",
  "database.include.list": "cloud",
  "schema.history.internal.kafka.bootstrap.servers": "kafka:9092",
  "schema.history.internal.kafka.topic": "schema-changes.cloud",
  "key.converter": "org.apache.kafka.connect.json.JsonConverter",
  "value.converter": "org.apache.kafka.connect.json.JsonConverter"
}'
echo "connector registered"
