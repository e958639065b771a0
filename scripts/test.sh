#!/usr/bin/env bash
# Runs every dstream test: formatting, lints, unit tests, the sqllogictest files
# against a real server over pgwire, the differential test against DataFusion batch
# SQL, smoke tests with psql and the JDBC driver, and checkpoints in a local
# S3-compatible server (moto, installed with pip and started here). Test servers run their two
# workers inside the test process; the sqllogictest files and the differential test
# then run again against servers whose workers are `dstream worker` processes. Installs what the tests need
# (psql, a Java runtime, the JDBC driver, tmux) with apt-get when it is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# Build outside the checkout so repeated runs on one machine build incrementally.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/dstream/target}"
export CARGO_TERM_COLOR=never

need_apt=()
command -v psql >/dev/null 2>&1 || need_apt+=(postgresql-client)
command -v java >/dev/null 2>&1 || need_apt+=(default-jre-headless)
command -v tmux >/dev/null 2>&1 || need_apt+=(tmux)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

# A local S3-compatible server (moto) for the s3:// store tests.
if ! command -v moto_server >/dev/null 2>&1; then
  echo "== installing moto[server]"
  python3 -m pip install --quiet 'moto[server]'
fi
S3_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
moto_server -H 127.0.0.1 -p "$S3_PORT" >"${TMPDIR:-/tmp}/dstream-moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill $MOTO_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
  curl -sf -o /dev/null "http://127.0.0.1:$S3_PORT/" && break
  sleep 0.1
done
curl -sf -X PUT -o /dev/null "http://127.0.0.1:$S3_PORT/dstream"
export DSTREAM_TEST_S3_ENDPOINT="http://127.0.0.1:$S3_PORT" DSTREAM_TEST_S3_BUCKET=dstream
echo "== S3-compatible test server (moto) on port $S3_PORT"

echo "== cargo fmt --check"
cargo fmt --all -- --check

echo "== cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

echo "== cargo test (workers in the test process)"
cargo test --workspace --no-fail-fast

echo "== sqllogictest and differential test (worker processes)"
cargo build --bin dstream --quiet
DSTREAM_TEST_WORKERS=process DSTREAM_BIN="$CARGO_TARGET_DIR/debug/dstream" \
  cargo test -p dstream-sql-tests --test slt --test differential --no-fail-fast
