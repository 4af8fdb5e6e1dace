#!/bin/sh
# The spec's simulator against MariaDB: every INTERVAL seconds deploy (probability 2/3: one of five
# organizations, a new instance uuid, price 1..100) or destroy the oldest instance.
set -eu
ORGS="95f8a5e2-0807-448b-b2cd-102d78203c88 ffb0ca88-123b-42f6-a2d2-b13f51dea292 74b23560-55b5-4e9e-9b51-a98097b817f6 37edc843-926f-47ca-9a08-bcc0a54dffd8 0969af61-3d3b-4896-bd13-673f1a840170"
SQL="mariadb -h mariadb -uroot -p$MARIADB_ROOT_PASSWORD cloud"
until $SQL -e 'SELECT 1' >/dev/null 2>&1; do sleep 1; done
while true; do
  if [ "$(shuf -i 0-2 -n 1)" -lt 2 ]; then
    org=$(echo $ORGS | tr ' ' '\n' | shuf -n 1)
    $SQL -e "INSERT INTO instances (organization_uuid, instance_uuid, price_second) VALUES ('$org', UUID(), $(shuf -i 1-100 -n 1))"
  else
    $SQL -e "DELETE FROM instances WHERE id=(SELECT MIN(id) FROM (SELECT id FROM instances) AS t)"
  fi
  sleep "${INTERVAL:-0.5}"
done
