//! Fuzzing the server from the outside: statements from a SQL grammar, and raw bytes
//! on the Postgres protocol, against an in-process server. Any answer is fine — rows
//! or an error — but a statement that hangs, a panic caught by the server (an
//! internal error saying so), or a server that stops answering fails the run.
//!
//! Bounded in CI by time: `DSTREAM_FUZZ_SECONDS` (default 45 per target) and
//! `DSTREAM_FUZZ_SEED` (default: a new seed each run, printed, so that a failure can
//! be replayed). Run it for hours by hand:
//!
//! ```sh
//! DSTREAM_FUZZ_SECONDS=14400 cargo test -p dstream-sql-tests --test fuzz -- --nocapture
//! ```
//!
//! Every input that ever broke the server is kept in `sql-tests/fuzz/regressions.sql`
//! (one statement per line, `\n` in a statement written as `\\n`) and run first.

use std::time::{Duration, Instant};

use dstream_sql_tests::TestServer;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::Client;

/// How long one statement may take before the run counts it as a hang.
const HANG: Duration = Duration::from_secs(60);

fn budget() -> Duration {
    let seconds = std::env::var("DSTREAM_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(45);
    Duration::from_secs(seconds)
}

fn runner(target: &str) -> TestRunner {
    let seed: u64 = std::env::var("DSTREAM_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("fuzzing {target} with DSTREAM_FUZZ_SEED={seed}");
    let mut bytes = [0u8; 32];
    bytes[..8].copy_from_slice(&seed.to_le_bytes());
    TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &bytes),
    )
}

/// Draws `n` values of the strategy `make` builds, on a thread with a deep stack:
/// drawing from a recursive grammar recurses through proptest's strategies, more
/// deeply than a test thread's stack allows in a debug build.
fn draw<S, F>(runner: TestRunner, make: F, n: usize) -> (TestRunner, Vec<S::Value>)
where
    S: Strategy,
    S::Value: Send + 'static,
    F: FnOnce() -> S + Send + 'static,
{
    let drawing = std::thread::Builder::new()
        .stack_size(256 << 20)
        .spawn(move || {
            let mut runner = runner;
            let strategy = make();
            let values = (0..n)
                .map(|_| {
                    strategy
                        .new_tree(&mut runner)
                        .map(|tree| tree.current())
                        .expect("a value from the grammar")
                })
                .collect();
            (runner, values)
        })
        .expect("a thread to draw on");
    drawing.join().expect("drawing values")
}

// ---- the grammar ----

fn column() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("k".to_string()),
        Just("v".to_string()),
        Just("name".to_string()),
        Just("ts".to_string()),
        Just("_interval".to_string()),
        Just("nope".to_string()),
    ]
}

fn literal() -> impl Strategy<Value = String> {
    prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        (-3i64..3).prop_map(|n| n.to_string()),
        Just("NULL".to_string()),
        Just("0".to_string()),
        Just("1e308".to_string()),
        Just("-9223372036854775808".to_string()),
        Just("99999999999999999999999999".to_string()),
        any::<String>().prop_map(|s| format!("'{}'", s.replace('\'', "''").replace('\0', ""))),
        Just("TIMESTAMP '2026-01-01 00:00:00'".to_string()),
        Just("INTERVAL '1' SECOND".to_string()),
        Just("TRUE".to_string()),
        Just("$1".to_string()),
    ]
}

fn expression() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![column(), literal()];
    leaf.prop_recursive(6, 64, 4, |inner| {
        prop_oneof![
            (
                inner.clone(),
                prop_oneof![
                    Just("+"),
                    Just("-"),
                    Just("*"),
                    Just("/"),
                    Just("%"),
                    Just("="),
                    Just("<>"),
                    Just("<"),
                    Just("AND"),
                    Just("OR"),
                    Just("||"),
                    Just("LIKE"),
                ],
                inner.clone()
            )
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (
                prop_oneof![
                    Just("abs"),
                    Just("length"),
                    Just("upper"),
                    Just("coalesce"),
                    Just("date_bin"),
                    Just("sqrt"),
                    Just("repeat"),
                    Just("substr"),
                    Just("nosuchfunction"),
                ],
                prop::collection::vec(inner.clone(), 0..3)
            )
                .prop_map(|(f, args)| format!("{f}({})", args.join(", "))),
            (
                inner.clone(),
                prop_oneof![
                    Just("BIGINT"),
                    Just("INT"),
                    Just("TEXT"),
                    Just("DOUBLE"),
                    Just("TIMESTAMP"),
                    Just("BOOLEAN"),
                    Just("DECIMAL(38, 10)"),
                ]
            )
                .prop_map(|(e, t)| format!("CAST({e} AS {t})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(c, a, b)| format!("CASE WHEN {c} THEN {a} ELSE {b} END")),
            inner.clone().prop_map(|e| format!("NOT {e}")),
            inner.prop_map(|e| format!("{e} IS NULL")),
            // A long chain: the shape that once overflowed stacks.
            (1usize..3000, prop_oneof![Just("+"), Just("OR"), Just("||")])
                .prop_map(|(n, op)| vec!["1"; n].join(&format!(" {op} "))),
        ]
    })
}

fn aggregate() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            Just("count"),
            Just("sum"),
            Just("avg"),
            Just("min"),
            Just("max"),
            Just("count(DISTINCT"),
        ],
        expression(),
    )
        .prop_map(|(f, e)| {
            if f.ends_with("DISTINCT") {
                format!("{f} {e})")
            } else {
                format!("{f}({e})")
            }
        })
}

fn duration() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("INTERVAL '1' SECOND".to_string()),
        Just("INTERVAL '2' SECOND".to_string()),
        Just("INTERVAL '500' MILLISECOND".to_string()),
        Just("INTERVAL '0' SECOND".to_string()),
        Just("INTERVAL '100000' SECOND".to_string()),
        Just("INTERVAL '1' MICROSECOND".to_string()),
        Just("INTERVAL '-1' SECOND".to_string()),
        (1u64..10_000).prop_map(|ms| format!("INTERVAL '{ms}' MILLISECOND")),
    ]
}

fn relation() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("s".to_string()),
        Just("t".to_string()),
        Just("v0".to_string()),
        Just("dstream_intervals".to_string()),
        (column(), duration()).prop_map(|(c, d)| format!("TUMBLE(s, {c}, {d})")),
        (column(), duration(), duration()).prop_map(|(c, a, b)| format!("HOP(s, {c}, {a}, {b})")),
        Just("s JOIN t ON s.k = t.a".to_string()),
        Just("(SELECT * FROM s) x".to_string()),
    ]
}

fn select() -> impl Strategy<Value = String> {
    (
        prop::collection::vec(prop_oneof![expression(), aggregate()], 1..4),
        relation(),
        prop::option::of(expression()),
        prop::option::of(prop::collection::vec(
            prop_oneof![column(), Just("window_start".to_string())],
            1..3,
        )),
        prop::option::of(0u64..20),
    )
        .prop_map(|(items, from, filter, group, limit)| {
            let items: Vec<String> = items
                .iter()
                .enumerate()
                .map(|(i, e)| format!("{e} AS c{i}"))
                .collect();
            let mut sql = format!("SELECT {} FROM {from}", items.join(", "));
            if let Some(f) = filter {
                sql.push_str(&format!(" WHERE {f}"));
            }
            if let Some(g) = group {
                sql.push_str(&format!(" GROUP BY {}", g.join(", ")));
            }
            if let Some(n) = limit {
                sql.push_str(&format!(" LIMIT {n}"));
            }
            sql
        })
}

/// One fuzz step: a statement, or a short script around a view.
fn statement() -> impl Strategy<Value = Vec<String>> {
    prop_oneof![
        4 => select().prop_map(|s| vec![s]),
        1 => select().prop_map(|s| vec![format!("EXPLAIN {s}")]),
        2 => (select(), any::<bool>()).prop_map(|(s, close)| {
            let emit = if close { " EMIT ON WINDOW CLOSE" } else { "" };
            vec![
                format!("CREATE MATERIALIZED VIEW fuzzed AS {s}{emit}"),
                "ADVANCE 1".to_string(),
                "SELECT * FROM fuzzed LIMIT 5".to_string(),
                "DROP MATERIALIZED VIEW IF EXISTS fuzzed".to_string(),
            ]
        }),
        1 => select().prop_map(|s| vec![format!("EXPLAIN CREATE MATERIALIZED VIEW x AS {s}")]),
        1 => prop::collection::vec(
            prop_oneof![
                Just("SELECT"), Just("FROM"), Just("("), Just(")"), Just(","), Just("'"),
                Just("\""), Just(";"), Just("CREATE"), Just("SOURCE"), Just("WITH"),
                Just("MATERIALIZED"), Just("VIEW"), Just("AS"), Just("1"), Just("s"),
                Just("ADVANCE"), Just("SUBSCRIBE"), Just("DROP"), Just("--"), Just("$$"),
            ],
            0..30,
        )
        .prop_map(|tokens| vec![tokens.join(" ")]),
        1 => (literal(), literal()).prop_map(|(a, b)| {
            vec![format!("INSERT INTO t VALUES (CAST({a} AS INT), CAST({b} AS TEXT))")]
        }),
    ]
}

/// Runs `sql`: fails on a hang, on a caught panic, or if the server stops answering.
async fn survive(client: &Client, sql: &str) -> Result<(), String> {
    let head: String = sql.chars().take(300).collect();
    match tokio::time::timeout(HANG, client.simple_query(sql)).await {
        Err(_) => return Err(format!("hung for {HANG:?}: {head}")),
        Ok(Err(e)) => {
            let message = e
                .as_db_error()
                .map(|d| d.message().to_string())
                .unwrap_or_else(|| e.to_string());
            if e.as_db_error().is_none() || message.contains("panicked") {
                return Err(format!("{message}: {head}"));
            }
        }
        Ok(Ok(_)) => {}
    }
    match tokio::time::timeout(HANG, client.simple_query("SELECT 1")).await {
        Ok(Ok(_)) => Ok(()),
        other => Err(format!(
            "the server stopped answering after {head}: {other:?}"
        )),
    }
}

const SETUP: &str = "CREATE SOURCE s (k BIGINT, v BIGINT, name TEXT, ts TIMESTAMP, \
       WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
     WITH (connector = 'generator', rows_per_second = 50, key_cardinality = 5);
     CREATE TABLE t (a INT, b TEXT); INSERT INTO t VALUES (1, 'x'), (NULL, NULL);
     CREATE MATERIALIZED VIEW v0 AS SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k;
     ADVANCE 2;";

fn regressions() -> Vec<String> {
    include_str!("../fuzz/regressions.sql")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with("--"))
        .map(|l| l.replace("\\n", "\n"))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_from_the_grammar_never_break_the_server() {
    // Every view script advances an interval: a long run goes past the default
    // retention, and the batch query at the end must see all of the input.
    let server = TestServer::start_with(|c| c.source_retention = Duration::from_secs(86_400))
        .await
        .expect("server");
    let client = server.client().await.expect("connect");
    client.batch_execute(SETUP).await.expect("setup");
    for sql in regressions() {
        if let Err(e) = survive(&client, &sql).await {
            panic!("regression: {e}");
        }
    }
    let mut runner = runner("statements");
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    while Instant::now() < deadline {
        let (next, scripts) = draw(runner, statement, 10);
        runner = next;
        for script in scripts {
            for sql in script {
                if let Err(e) = survive(&client, &sql).await {
                    panic!(
                        "case {cases}: {e}\nkeep it in sql-tests/fuzz/regressions.sql once fixed"
                    );
                }
            }
            cases += 1;
        }
    }
    eprintln!("{cases} generated statements, none broke the server");
    // Views still run, and still equal the batch query.
    client.batch_execute("ADVANCE 1").await.expect("advance");
    let diff = client
        .simple_query(
            "SELECT count(*) FROM (SELECT k, count(*) AS n FROM s GROUP BY k) b \
             FULL JOIN v0 USING (k) WHERE b.n IS DISTINCT FROM v0.n",
        )
        .await
        .expect("compare");
    let rows: Vec<String> = diff
        .into_iter()
        .filter_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        })
        .collect();
    assert_eq!(rows, vec!["0"]);
    server.stop().await;
}

/// A Postgres message: a type byte, a length that may lie, a body of noise or of
/// fragments of real messages.
fn protocol_message() -> impl Strategy<Value = Vec<u8>> {
    (
        prop_oneof![
            Just(b'Q'),
            Just(b'P'),
            Just(b'B'),
            Just(b'E'),
            Just(b'D'),
            Just(b'C'),
            Just(b'S'),
            Just(b'H'),
            any::<u8>(),
        ],
        prop::collection::vec(any::<u8>(), 0..64),
        prop_oneof![
            3 => Just(None),
            1 => any::<i32>().prop_map(Some),
        ],
    )
        .prop_map(|(kind, body, lie)| {
            let mut m = vec![kind];
            let len = lie.unwrap_or(body.len() as i32 + 4);
            m.extend_from_slice(&len.to_be_bytes());
            m.extend_from_slice(&body);
            m
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raw_protocol_bytes_never_break_the_server() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    let mut runner = runner("protocol");
    let deadline = Instant::now() + budget();
    let mut cases = 0u64;
    let mut pending: Vec<Vec<Vec<u8>>> = Vec::new();
    while Instant::now() < deadline {
        if pending.is_empty() {
            let (next, drawn) = draw(
                runner,
                || prop::collection::vec(protocol_message(), 1..6),
                20,
            );
            runner = next;
            pending = drawn;
        }
        let Some(messages) = pending.pop() else {
            continue;
        };
        let mut socket = tokio::net::TcpStream::connect(server.addr)
            .await
            .expect("connect");
        let mut startup = 196_608i32.to_be_bytes().to_vec();
        startup.extend_from_slice(b"user\0fuzz\0\0");
        let mut hello = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
        hello.extend_from_slice(&startup);
        let _ = socket.write_all(&hello).await;
        for m in &messages {
            let _ = socket.write_all(m).await;
        }
        let _ = socket.shutdown().await;
        let mut answer = Vec::new();
        let read = tokio::time::timeout(HANG, socket.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the server hung on {messages:?}");
        if let Err(e) = survive(&client, "SELECT 1").await {
            panic!("after {messages:?}: {e}");
        }
        cases += 1;
    }
    eprintln!("{cases} connections of noise, none broke the server");
    server.stop().await;
}
