//! No statement, view or dying worker takes the server down: statements too big or
//! too deep, extreme windows, slow and greedy queries get an error with a SQLSTATE
//! and the server goes on; `dstream serve` starts dead workers again; a view whose
//! tasks kill their workers is stopped while the other views go on.

use std::time::Duration;

use dstream_server::config::WorkerMode;
use dstream_sql_tests::{ServeProcess, TestServer, dstream_binary};
use tokio_postgres::{Client, SimpleQueryMessage};

/// The SQLSTATE of a failed statement, or "ok". The message goes to stderr.
async fn sqlstate(client: &Client, sql: &str) -> String {
    state_of(client.simple_query(sql).await.map(|_| ()), sql)
}

/// The SQLSTATE of a statement prepared and run over the extended protocol.
async fn extended_sqlstate(client: &Client, sql: &str) -> String {
    state_of(client.query(sql, &[]).await.map(|_| ()), sql)
}

fn state_of(result: Result<(), tokio_postgres::Error>, sql: &str) -> String {
    match result {
        Ok(()) => "ok".into(),
        Err(e) => match e.as_db_error() {
            Some(db) => {
                let head: String = sql.chars().take(60).collect();
                eprintln!("{head}...: {} ({})", db.message(), db.code().code());
                db.code().code().to_string()
            }
            None => format!("not a server error: {e}"),
        },
    }
}

/// The first column of every row, as text.
async fn column(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).unwrap_or("NULL").to_string()),
            _ => None,
        })
        .collect()
}

fn chain(terms: usize, term: &str, op: &str) -> String {
    vec![term; terms].join(&format!(" {op} "))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_too_deep_or_too_long_are_refused_and_the_server_goes_on() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', \
             rows_per_second = 200, key_cardinality = 10)",
        )
        .await
        .expect("source");
    let too_complex = [
        format!("SELECT {}", chain(2000, "1", "+")),
        format!("SELECT {}", chain(3000, "k = 1", "OR")),
        format!("SELECT {}", chain(2000, "'x'", "||")),
        chain(2000, "SELECT 1", "UNION ALL"),
        format!("SELECT {}1{}", "(".repeat(300), ")".repeat(300)),
        format!(
            "CREATE MATERIALIZED VIEW deep AS SELECT k, sum({}) AS x FROM s GROUP BY k",
            chain(2000, "v", "+")
        ),
        format!(
            "EXPLAIN CREATE MATERIALIZED VIEW deep AS SELECT k, {} AS x FROM s",
            chain(2000, "v", "*")
        ),
        // 1 MiB and a byte.
        format!("SELECT '{}'", "x".repeat(1024 * 1024 - 8)),
    ];
    for sql in &too_complex {
        assert_eq!(sqlstate(&client, sql).await, "54001", "{}", &sql[..60]);
        assert_eq!(
            extended_sqlstate(&client, sql).await,
            "54001",
            "{}",
            &sql[..60]
        );
    }
    // Just within the limits, the same shapes run: ad hoc and as a view.
    assert_eq!(
        column(&client, &format!("SELECT {}", chain(990, "1", "+"))).await,
        vec!["990"]
    );
    assert_eq!(
        column(&client, &format!("SELECT {}", chain(990, "'x'", "||"))).await,
        vec!["x".repeat(990)]
    );
    client
        .batch_execute(&format!(
            "CREATE MATERIALIZED VIEW deep AS SELECT k, sum({}) AS x FROM s GROUP BY k",
            chain(990, "v", "+")
        ))
        .await
        .expect("a view 990 terms deep");
    client.batch_execute("ADVANCE 2").await.expect("advance");
    assert_eq!(
        column(
            &client,
            "SELECT count(*) FROM (SELECT k, sum(v) * 990 AS x FROM s GROUP BY k) b \
             FULL JOIN deep USING (k) WHERE b.x IS DISTINCT FROM deep.x"
        )
        .await,
        vec!["0"],
        "the deep view equals the batch query"
    );
    // A `$0` placeholder is refused, not a crash.
    assert_ne!(extended_sqlstate(&client, "SELECT $0").await, "ok");
    assert_eq!(column(&client, "SELECT 1").await, vec!["1"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windows_that_multiply_rows_are_refused() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, ts TIMESTAMP, \
               WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) \
             WITH (connector = 'generator', rows_per_second = 100, key_cardinality = 5)",
        )
        .await
        .expect("source");
    let hop = |slide: &str, size: &str| {
        format!(
            "CREATE MATERIALIZED VIEW w AS SELECT window_start, window_end, k, count(*) AS n \
             FROM HOP(s, ts, INTERVAL '{slide}', INTERVAL '{size}') \
             GROUP BY window_start, window_end, k"
        )
    };
    // Every row in 100,000 windows; 2,000 windows ending in every interval.
    assert_eq!(
        sqlstate(&client, &hop("1 second", "100000 seconds")).await,
        "54000"
    );
    assert_eq!(
        sqlstate(
            &client,
            "CREATE MATERIALIZED VIEW w AS SELECT window_start, count(*) AS n \
             FROM TUMBLE(s, ts, INTERVAL '500 microseconds') GROUP BY window_start"
        )
        .await,
        "54000"
    );
    // At the limit, a row is in 1,000 windows, planned as one join however many.
    client
        .batch_execute(&hop("1 second", "1000 seconds"))
        .await
        .expect("1000 windows per row");
    client.batch_execute("ADVANCE 3").await.expect("advance");
    // The oracle puts each row in its 1000 windows by arithmetic on epoch seconds.
    assert_eq!(
        column(
            &client,
            "SELECT count(*) FROM \
               (SELECT CAST(date_part('epoch', window_start) AS BIGINT) AS ws, k, n FROM w) v \
             FULL JOIN \
               (SELECT ws, k, count(*) AS n FROM \
                  (SELECT k, CAST(floor(date_part('epoch', ts)) AS BIGINT) - i AS ws \
                   FROM s CROSS JOIN (SELECT value AS i FROM generate_series(0, 999)) o \
                   WHERE ts IS NOT NULL) r \
                GROUP BY ws, k) b \
             USING (ws, k) WHERE v.n IS DISTINCT FROM b.n"
        )
        .await,
        vec!["0"],
        "every window counts the rows in it"
    );
    let windows = column(&client, "SELECT count(DISTINCT window_start) FROM w").await;
    let windows: u64 = windows[0].parse().expect("a count");
    assert!(windows >= 1000, "{windows} windows");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_greedy_queries_are_cancelled() {
    let server = TestServer::start_with(|c| {
        c.statement_timeout = Some(Duration::from_secs(2));
        c.query_memory = 4 << 20;
        c.max_result_bytes = 1 << 20;
    })
    .await
    .expect("server");
    let client = server.client().await.expect("connect");
    let started = std::time::Instant::now();
    assert_eq!(
        sqlstate(
            &client,
            "SELECT count(*) FROM generate_series(1, 100000000000) a"
        )
        .await,
        "57014"
    );
    assert!(started.elapsed() < Duration::from_secs(10));
    // Busy queries on every core do not hold up definitions, SHOW or ADVANCE.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let client = server.client().await.expect("connect");
        #[allow(clippy::disallowed_methods)] // awaited below
        busy.push(tokio::spawn(async move {
            sqlstate(
                &client,
                "SELECT count(*) FROM generate_series(1, 100000000000) a",
            )
            .await
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    client
        .batch_execute("CREATE TABLE during (a INT); ADVANCE 1; SHOW TABLES;")
        .await
        .expect("control statements while queries are busy");
    assert!(
        busy.iter().all(|q| !q.is_finished()),
        "the statements ran while the busy queries still ran"
    );
    for query in busy {
        assert_eq!(query.await.expect("a query"), "57014");
    }
    // A hash join's build side cannot spill: 4 MiB is not enough.
    assert_eq!(
        sqlstate(
            &client,
            "SELECT count(*) FROM generate_series(1, 300000) a \
             JOIN generate_series(1, 300000) b ON a.value = b.value"
        )
        .await,
        "53200"
    );
    assert_eq!(
        sqlstate(&client, "SELECT * FROM generate_series(1, 1000000)").await,
        "53200"
    );
    // Within the limits, queries run.
    assert_eq!(
        column(&client, "SELECT count(*) FROM generate_series(1, 1000000)").await,
        vec!["1000000"]
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_worker_is_started_again_and_takes_work() {
    let server = TestServer::start_with(|c| {
        c.worker_mode = WorkerMode::Process(Some(dstream_binary()));
    })
    .await
    .expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', \
               rows_per_second = 500, key_cardinality = 20);
             CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n FROM s GROUP BY k;
             ADVANCE 2;",
        )
        .await
        .expect("setup");
    let engine = server.engine.clone().expect("engine");
    let pids = engine.local_worker_pids().await;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pids[0].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());
    // The supervisor starts it again; the new process joins and takes partitions.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let restarted = loop {
        let rows = column(
            &client,
            "SELECT supervisor FROM dstream_workers WHERE status = 'alive' \
             AND supervisor LIKE '%restarts: 1, last exit: killed by signal 9'",
        )
        .await;
        if !rows.is_empty() {
            break rows;
        }
        assert!(std::time::Instant::now() < deadline, "no worker restarted");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(restarted.len(), 1);
    client.batch_execute("ADVANCE 2").await.expect("advance");
    assert_eq!(
        column(
            &client,
            "SELECT count(*) FROM dstream_workers WHERE status = 'alive' AND state_partitions > 0"
        )
        .await,
        vec!["2"],
        "the restarted worker took partitions"
    );
    assert_eq!(
        column(
            &client,
            "SELECT count(*) FROM (SELECT k, count(*) AS n FROM s GROUP BY k) b \
             FULL JOIN per_key USING (k) WHERE b.n IS DISTINCT FROM per_key.n"
        )
        .await,
        vec!["0"]
    );
    assert_ne!(engine.local_worker_pids().await, pids);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_view_whose_tasks_kill_workers_is_stopped_and_the_others_go_on() {
    let dir = tempfile::tempdir().expect("a directory");
    // Every task of view `poison` aborts its worker process.
    let server = ServeProcess::start(
        dir.path(),
        &["--block-rows", "64"],
        &[("DSTREAM_FAULT_ABORT_VIEW", "poison")],
    )
    .await;
    let client = &server.client;
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', \
               rows_per_second = 300, key_cardinality = 10);
             CREATE MATERIALIZED VIEW good AS SELECT k, sum(v) AS total FROM s GROUP BY k;
             CREATE MATERIALIZED VIEW poison AS SELECT k, count(*) AS n FROM s GROUP BY k;",
        )
        .await
        .expect("setup");
    let advanced =
        tokio::time::timeout(Duration::from_secs(120), client.batch_execute("ADVANCE 2"))
            .await
            .expect("ADVANCE does not hang");
    advanced.expect("ADVANCE");
    let status = |name: &str| {
        let name = name.to_string();
        async move {
            let rows = client
                .simple_query("SHOW MATERIALIZED VIEWS")
                .await
                .expect("show");
            rows.into_iter()
                .find_map(|m| match m {
                    SimpleQueryMessage::Row(r) if r.get("name") == Some(name.as_str()) => {
                        r.get("status").map(str::to_string)
                    }
                    _ => None,
                })
                .unwrap_or_default()
        }
    };
    let poison = status("poison").await;
    assert!(
        poison.starts_with("failed") && poison.contains("not run again"),
        "{poison}"
    );
    assert_eq!(status("good").await, "running");
    assert_eq!(
        column(
            client,
            "SELECT count(*) FROM (SELECT k, sum(v) AS total FROM s GROUP BY k) b \
             FULL JOIN good USING (k) WHERE b.total IS DISTINCT FROM good.total"
        )
        .await,
        vec!["0"],
        "the other view has every interval"
    );
    assert_eq!(column(client, "SELECT count(*) FROM s").await, vec!["600"]);
    // Its workers were started again after each death.
    let restarted = column(
        client,
        "SELECT count(*) FROM dstream_workers WHERE status = 'alive' AND supervisor LIKE '%restarts%'",
    )
    .await;
    assert_ne!(restarted, vec!["0"]);
    server.kill().await;
}

/// A raw connection that has finished the startup phase (no password is asked).
async fn raw_session(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut startup = Vec::new();
    startup.extend_from_slice(&196_608i32.to_be_bytes());
    startup.extend_from_slice(b"user\0test\0database\0dstream\0\0");
    let mut message = ((startup.len() + 4) as i32).to_be_bytes().to_vec();
    message.extend_from_slice(&startup);
    socket.write_all(&message).await.expect("startup");
    // Read until ReadyForQuery ('Z').
    let mut seen = Vec::new();
    let mut buffer = [0u8; 4096];
    while !seen.windows(6).any(|w| w == b"Z\0\0\0\x05I") {
        let n = socket.read(&mut buffer).await.expect("read");
        assert!(n > 0, "the server closed during startup: {seen:?}");
        seen.extend_from_slice(&buffer[..n]);
    }
    socket
}

/// Everything the server sends until it closes the connection, as text.
async fn until_closed(socket: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), socket.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_protocol_messages_end_only_their_connection() {
    use tokio::io::AsyncWriteExt;
    let server = TestServer::start().await.expect("server");
    let frame = |kind: u8, body: &[u8]| {
        let mut m = vec![kind];
        m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        m.extend_from_slice(body);
        m
    };
    let mut parse_lying = b"\0SELECT $1\0".to_vec();
    parse_lying.extend_from_slice(&1000u16.to_be_bytes());
    let mut bind_1gb = b"\0\0".to_vec();
    bind_1gb.extend_from_slice(&0u16.to_be_bytes());
    bind_1gb.extend_from_slice(&1u16.to_be_bytes());
    bind_1gb.extend_from_slice(&(1i32 << 30).to_be_bytes());
    bind_1gb.extend_from_slice(b"x");
    let mut huge_length = vec![b'Q'];
    huge_length.extend_from_slice(&i32::MAX.to_be_bytes());
    let mut negative_length = vec![b'Q'];
    negative_length.extend_from_slice(&(-20i32).to_be_bytes());
    let garbage: Vec<(&str, Vec<u8>)> = vec![
        ("a Parse of garbage", frame(b'P', b"\xff\xfe\xfd")),
        (
            "a Parse claiming more types than it sends",
            frame(b'P', &parse_lying),
        ),
        ("a parameter claiming 1 GB", frame(b'B', &bind_1gb)),
        ("a message of 2 GB", huge_length),
        ("a negative length", negative_length),
        ("an unknown message", frame(b'F', b"\0\0")),
    ];
    for (what, bytes) in &garbage {
        let mut socket = raw_session(server.addr).await;
        socket.write_all(bytes).await.expect("send");
        let answer = until_closed(&mut socket).await;
        assert!(
            answer.contains("C08P01") || answer.contains("C54000"),
            "{what}: {answer:?}"
        );
    }
    // An Execute with a negative row limit returns every row.
    let mut socket = raw_session(server.addr).await;
    let mut parse = b"\0SELECT 41 + 1\0".to_vec();
    parse.extend_from_slice(&0u16.to_be_bytes());
    let mut bind = b"\0\0".to_vec();
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    let mut execute = b"\0".to_vec();
    execute.extend_from_slice(&(-1i32).to_be_bytes());
    for message in [
        frame(b'P', &parse),
        frame(b'B', &bind),
        frame(b'E', &execute),
        frame(b'S', b""),
        frame(b'X', b""),
    ] {
        socket.write_all(&message).await.expect("send");
    }
    let answer = until_closed(&mut socket).await;
    assert!(answer.contains("42"), "{answer:?}");
    // The server goes on.
    let client = server.client().await.expect("connect");
    assert_eq!(column(&client, "SELECT 1").await, vec!["1"]);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_beyond_the_limits_are_told_and_disconnected() {
    let server = TestServer::start_with(|c| {
        c.max_connections = 2;
        c.idle_timeout = Some(Duration::from_secs(2));
        c.startup_timeout = Duration::from_secs(1);
    })
    .await
    .expect("server");
    let first = server.client().await.expect("connect");
    let second = server.client().await.expect("connect");
    let conninfo = format!(
        "host={} port={} user=test dbname=dstream",
        server.addr.ip(),
        server.addr.port()
    );
    let third = tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await;
    let error = third.err().expect("a third connection is refused");
    assert_eq!(
        error.as_db_error().map(|e| e.code().code()),
        Some("53300"),
        "{error}"
    );
    drop(second);
    // A place is free again once the second connection is gone.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let third = loop {
        match tokio_postgres::connect(&conninfo, tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                #[allow(clippy::disallowed_methods)] // ends with the client
                tokio::spawn(connection);
                break client;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no place freed: {e}"),
        }
    };
    assert_eq!(column(&third, "SELECT 2").await, vec!["2"]);
    drop(third);
    // A connection that never says hello is closed with an error.
    let mut silent = tokio::net::TcpStream::connect(server.addr)
        .await
        .expect("connect");
    let answer = until_closed(&mut silent).await;
    assert!(answer.contains("startup"), "{answer:?}");
    // An idle session is closed after the idle timeout.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle = first.simple_query("SELECT 1").await;
    assert!(idle.is_err(), "the idle connection was closed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_reads_none_of_its_results_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = TestServer::start_with(|c| c.send_timeout = Duration::from_secs(2))
        .await
        .expect("server");
    let mut socket = raw_session(server.addr).await;
    // About 60 MB of rows, far more than the socket buffers hold.
    let sql = b"SELECT repeat('x', 100) FROM generate_series(1, 500000)\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((sql.len() + 4) as i32).to_be_bytes());
    query.extend_from_slice(sql);
    socket.write_all(&query).await.expect("query");
    // The client reads nothing for a while; the server gives up on it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut seen = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(30), socket.read_to_end(&mut seen)).await;
    assert!(read.is_ok(), "the server did not close the connection");
    assert!(
        seen.len() < 30_000_000,
        "the connection was closed before its results were sent ({} bytes came)",
        seen.len()
    );
    // Everyone else is served as before.
    let client = server.client().await.expect("connect");
    assert_eq!(column(&client, "SELECT 3").await, vec!["3"]);
    server.stop().await;
}
