"""The rates API as the spec's original Flask app serves it, for the side-by-side benchmark.

The spec ships only the app's observable behaviour (its README example and the facts measured here); this is
that behaviour written the way the original is written: Flask 3 + psycopg2, one module-level connection, one
SQL query per request computing AVG in PostgreSQL. jsonify prints compact JSON with sorted keys and a
trailing newline; psycopg2 hands AVG's numeric text over as a Decimal and the app makes it a float.

Run: DATABASE_URL=postgres://... gunicorn -w 2 -b 127.0.0.1:3000 rates:app
"""
import os

import psycopg2
from flask import Flask, jsonify, request

app = Flask(__name__)
conn = psycopg2.connect(os.environ.get("DATABASE_URL", "postgres://postgres@127.0.0.1:5432/rates"))

QUERY = """
SELECT d::date AS day, p.count, p.price
FROM generate_series(%(date_from)s::date, %(date_to)s::date, interval '1 day') d
LEFT JOIN (
    SELECT day, COUNT(*) AS count, CASE WHEN COUNT(*) >= 3 THEN AVG(price) END AS price
    FROM prices
    WHERE orig_code = %(orig_code)s AND dest_code = %(dest_code)s
      AND day BETWEEN %(date_from)s AND %(date_to)s
    GROUP BY day
) p ON p.day = d::date
ORDER BY day DESC
"""


@app.route("/rates")
def rates():
    args = {k: request.args.get(k) for k in ("date_from", "date_to", "orig_code", "dest_code")}
    with conn.cursor() as cur:
        cur.execute(QUERY, args)
        rows = cur.fetchall()
    conn.commit()
    return jsonify(
        rates=[
            {"day": str(day), "count": count, "price": float(price) if price is not None else None}
            for day, count, price in rows
        ]
    )
