#!/usr/bin/env bash
# The reports with a million usage records: fills an SQLite file and a MariaDB database with
# TOKEX_BENCH_RECORDS (default 1,000,000) usage records over 30 days, 20 models, 1,000 buyer keys and
# 1,000 hosted keys, plus their hourly rollups, then times each report and time series against the naive
# GROUP BY over usage_records (bench.rs). The tables go to bench/analytics/results.md (copied by hand into
# docs/reports.md, "Figures").
#
#   bench/analytics/run.sh                        # both databases, 1,000,000 records
#   TOKEX_BENCH_BACKENDS=sqlite TOKEX_BENCH_RECORDS=100000 bench/analytics/run.sh
#
# MariaDB: TOKEX_TEST_MYSQL_URL (default mysql://root@127.0.0.1:3306), as for the tests. Needs ~1 GB of
# disk per database and a few minutes per million records.
set -euo pipefail
cd "$(dirname "$0")/../.."
out="${TOKEX_BENCH_OUT:-$PWD/bench/analytics/results.md}"
{
  echo "# Analytics benchmark ($(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, ${TOKEX_BENCH_RECORDS:-1000000} records)"
  echo
  echo "Median of 5 runs after a warm-up; debug build of token-exchange (the SQL runs in the database)."
} > "$out.head"
TOKEX_BENCH_OUT="$out.body" cargo test --test analytics -- --ignored --nocapture --test-threads=1 one_million_usage_records
cat "$out.head" "$out.body" > "$out"
rm -f "$out.head" "$out.body"
echo "wrote $out"
