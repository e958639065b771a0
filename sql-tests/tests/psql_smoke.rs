//! Smoke tests with the real `psql` client: a script of dstream statements, a clear
//! error with its SQLSTATE, and a live `SUBSCRIBE`.

use std::process::Stdio;
use std::time::Duration;

use dstream_sql_tests::TestServer;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

fn psql(server: &TestServer) -> Command {
    let mut cmd = Command::new("psql");
    cmd.args([
        "-X",
        "-h",
        &server.addr.ip().to_string(),
        "-p",
        &server.addr.port().to_string(),
        "-U",
        "smoke",
        "-d",
        "dstream",
        "-v",
        "ON_ERROR_STOP=1",
    ]);
    cmd
}

fn which(program: &str) -> String {
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|dir| dir.join(program))
                .find(|p| p.is_file())
        })
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| panic!("{program} is not on PATH"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_runs_dstream_statements() {
    let server = TestServer::start().await.expect("start server");
    let script = "\
CREATE SOURCE clicks (user_id BIGINT, url TEXT, ts TIMESTAMP) \
  WITH (connector = 'generator', rows_per_second = 10, key_cardinality = 2, seed = 1);
CREATE MATERIALIZED VIEW per_url AS SELECT url, count(*) AS n FROM clicks GROUP BY url;
ADVANCE 2;
SELECT url, n FROM per_url ORDER BY url;
SHOW MATERIALIZED VIEWS;
";
    let output = psql(&server)
        .args(["-c", script])
        .output()
        .await
        .expect("psql must be installed (scripts/test.sh installs postgresql-client)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "psql failed: {stderr}\n{stdout}");
    // 20 rows over two keys, as the generator with seed 1 produces them.
    assert!(stdout.contains("k0  |"), "{stdout}");
    assert!(stdout.contains("k1  |"), "{stdout}");
    assert!(stdout.contains("(2 rows)"), "{stdout}");
    assert!(stdout.contains("per_url | clicks | on update"), "{stdout}");

    let output = psql(&server)
        .args(["-c", "SELECT * FROM nowhere"])
        .env("PGOPTIONS", "")
        .output()
        .await
        .expect("psql");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success());
    assert!(
        stderr.contains("relation \"nowhere\" does not exist"),
        "{stderr}"
    );

    let output = psql(&server)
        .args([
            "-v",
            "VERBOSITY=verbose",
            "-c",
            "\\set VERBOSITY verbose",
            "-c",
            "SELEC 1",
        ])
        .output()
        .await
        .expect("psql");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("42601"),
        "syntax errors carry SQLSTATE 42601: {stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_shows_subscribe_live() {
    let server = TestServer::start().await.expect("start server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE clicks (url TEXT) WITH (connector = 'generator', rows_per_second = 3, \
               key_cardinality = 1); \
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM clicks; \
             ADVANCE 1",
        )
        .await
        .expect("setup");
    // psql block-buffers COPY output into a pipe; stdbuf makes it line-buffered, as it
    // is on a terminal.
    let psql_path = which("psql");
    let mut child = Command::new("stdbuf")
        .arg("-oL")
        .arg(psql_path)
        .args(psql(&server).as_std().get_args())
        .args(["-c", "SUBSCRIBE TO total"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("psql");
    let stdout = child.stdout.take().expect("stdout");
    let mut lines = BufReader::new(stdout).lines();
    // The snapshot first: 3 rows after one interval.
    let first = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
        .await
        .expect("snapshot in time")
        .expect("read")
        .expect("a line");
    assert!(first.ends_with("\tinsert\t3"), "{first}");
    // Then each interval's change, as it is committed.
    client.batch_execute("ADVANCE 1").await.expect("advance");
    let mut changes = Vec::new();
    while changes.len() < 2 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("change in time")
            .expect("read")
            .expect("a line");
        changes.push(line);
    }
    assert!(changes[0].ends_with("\tdelete\t3"), "{changes:?}");
    assert!(changes[1].ends_with("\tinsert\t6"), "{changes:?}");
    assert!(changes[0].starts_with("2026-01-01 00:00:01"), "{changes:?}");
    // Ctrl-C: psql sends a cancel request, the server ends the SUBSCRIBE with an
    // error, and psql exits.
    let pid = child.id().expect("psql pid").to_string();
    let status = Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .await
        .expect("kill");
    assert!(status.success());
    let output = tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("psql stops after Ctrl-C")
        .expect("psql output");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("canceling statement due to user request"),
        "{stderr}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_subscribe_leaves_the_connection_usable() {
    use futures::StreamExt;
    let server = TestServer::start().await.expect("start server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT) WITH (connector = 'generator', rows_per_second = 2); \
             CREATE MATERIALIZED VIEW c AS SELECT count(*) AS n FROM s; ADVANCE 1",
        )
        .await
        .expect("setup");
    let stream = client.copy_out("SUBSCRIBE TO c").await.expect("subscribe");
    futures::pin_mut!(stream);
    let first = stream.next().await.expect("snapshot").expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("insert\t2"));
    client
        .cancel_token()
        .cancel_query(tokio_postgres::NoTls)
        .await
        .expect("cancel");
    let end = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("the stream ends");
    let err = end
        .expect("an item")
        .expect_err("ends with the cancel error");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err:?}");
    let rows = client
        .simple_query("SELECT 1")
        .await
        .expect("connection still usable");
    assert!(!rows.is_empty());
    server.stop().await;
}
