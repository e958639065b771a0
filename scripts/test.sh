#!/usr/bin/env bash
# Runs every dstream test: formatting, lints, unit tests, the sqllogictest files
# against a real server over pgwire, the differential test against DataFusion batch
# SQL, and smoke tests with psql and the JDBC driver. Test servers run their two
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
[ -f /usr/share/java/postgresql.jar ] || need_apt+=(libpostgresql-jdbc-java)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== installing ${need_apt[*]}"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

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
