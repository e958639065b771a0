//! Worker processes: the cluster as users see it in `dstream_workers` and
//! `dstream_intervals`, intervals mapped ahead when the server is behind, a worker
//! that joins late, a worker that dies, and a worker that leaves cleanly and hands
//! its work over.

use std::time::{Duration, Instant};

use dstream_server::config::WorkerMode;
use dstream_sql_tests::{TestServer, dstream_binary, simple_rows};
use tokio_util::sync::CancellationToken;

async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<String>> {
    simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Asserts that `view` holds exactly the rows of the batch query `batch`.
async fn assert_equals_batch(client: &tokio_postgres::Client, view: &str, batch: &str) {
    let diff = rows(
        client,
        &format!(
            "SELECT count(*) FROM ((SELECT * FROM {view} EXCEPT ALL {batch}) UNION ALL ({batch} EXCEPT ALL SELECT * FROM {view}))"
        ),
    )
    .await;
    assert_eq!(diff, vec![vec!["0"]], "view {view} differs from batch");
}

/// Starts a worker in this process that joins `engine`'s cluster, with one task
/// slot, each task first waiting `task_delay`; it runs until `stop`. Returns once the
/// coordinator counts it alive; the caller awaits the handle.
async fn join_worker(
    engine: &dstream_server::Engine,
    task_delay: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<dstream_executor::Result<()>> {
    let joined = engine.cluster().alive().len() + 1;
    let config = dstream_executor::worker::WorkerConfig {
        coordinator: engine.coordinator_url().to_string(),
        advertise: None,
        cores: 1,
        s3_credentials: Default::default(),
        task_delay,
        abort_view: None,
    };
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.set_nonblocking(true).expect("nonblocking");
    let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
    #[allow(clippy::disallowed_methods)] // the caller awaits it
    let worker = tokio::spawn(dstream_executor::worker::run(config, listener, stop));
    engine
        .cluster()
        .wait_for_workers(joined, Duration::from_secs(10))
        .await
        .expect("the worker joins");
    worker
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_worker_is_reported_and_its_work_recovered() {
    let server = TestServer::start_with(|config| {
        config.worker_mode = WorkerMode::Process(Some(dstream_binary()));
        // Recovery on the survivor, without a replacement (hardening.rs covers those).
        config.worker_restarts.enabled = false;
    })
    .await
    .expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 500, key_cardinality = 20);
             CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n FROM s GROUP BY k;
             CREATE TABLE t (a INT); INSERT INTO t VALUES (1), (2);
             ADVANCE 3;",
        )
        .await
        .expect("setup");
    assert_eq!(
        rows(
            &client,
            "SELECT status, count(*) FROM dstream_workers GROUP BY status"
        )
        .await,
        vec![vec!["alive", "2"]]
    );
    // Every interval ran map tasks (500 rows / 64-row blocks) and 4 reduce tasks.
    let stats = rows(
        &client,
        "SELECT interval_id, input_rows, map_tasks, reduce_tasks, workers FROM dstream_intervals ORDER BY interval_id",
    )
    .await;
    assert_eq!(stats.len(), 3, "{stats:?}");
    for row in &stats {
        assert_eq!(row[1], "500", "{stats:?}");
        assert_eq!(row[2], "8", "{stats:?}");
        assert_eq!(row[3], "4", "{stats:?}");
        assert_eq!(row[4], "2", "{stats:?}");
    }
    assert_eq!(
        rows(&client, "SELECT sum(n) FROM per_key").await,
        vec![vec!["1500"]]
    );

    // Kill one worker without warning.
    let engine = server.engine.clone().expect("engine");
    let pids = engine.local_worker_pids().await;
    assert_eq!(pids.len(), 2);
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &pids[1].to_string()])
        .status()
        .expect("kill");
    assert!(killed.success());

    // The coordinator notices within seconds and says so.
    let noticed = Instant::now();
    loop {
        let status = rows(&client, "SELECT status FROM dstream_workers ORDER BY id").await;
        if status.iter().any(|r| r[0].starts_with("dead")) {
            break;
        }
        assert!(
            noticed.elapsed() < Duration::from_secs(10),
            "dead worker not noticed: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(noticed.elapsed() < Duration::from_secs(6));

    // Intervals go on; the view, which had state partitions on the dead worker, has
    // them rebuilt on the other one (tests/recovery.rs checks that in depth).
    let advanced = tokio::time::timeout(Duration::from_secs(20), client.batch_execute("ADVANCE 1"))
        .await
        .expect("ADVANCE does not hang");
    advanced.expect("ADVANCE");
    assert_eq!(
        rows(&client, "SELECT sum(n) FROM per_key").await,
        vec![vec!["2000"]]
    );
    assert_equals_batch(
        &client,
        "per_key",
        "SELECT k, count(*) AS n FROM s GROUP BY k",
    )
    .await;
    assert_eq!(
        rows(&client, "SELECT status FROM dstream_recoveries").await,
        vec![vec!["recovered"]]
    );
    // What does not depend on the dead worker keeps working.
    assert_eq!(rows(&client, "SELECT sum(a) FROM t").await, vec![vec!["3"]]);
    assert_eq!(
        rows(
            &client,
            "SELECT count(*) FROM dstream_workers WHERE status = 'alive'"
        )
        .await,
        vec![vec!["1"]]
    );
    server.stop().await;
}

/// Behind the clock (`ADVANCE n`, n > 1) the receivers seal each interval's
/// successor while it runs, and the successor's map tasks start then: in such a run
/// every interval after the first has all its map tasks started ahead, one interval
/// at a time none has, and the view holds what the batch query says either way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behind_the_clock_the_next_interval_is_mapped_ahead() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 500, key_cardinality = 20);
             CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k;
             ADVANCE 1; ADVANCE 1;
             ADVANCE 5;",
        )
        .await
        .expect("setup");
    let stats = rows(
        &client,
        "SELECT interval_id, map_tasks, map_tasks_ahead FROM dstream_intervals ORDER BY interval_id",
    )
    .await;
    let ahead: Vec<&str> = stats.iter().map(|row| row[2].as_str()).collect();
    assert_eq!(ahead, ["0", "0", "0", "8", "8", "8", "8"], "{stats:?}");
    assert!(stats.iter().all(|row| row[1] == "8"), "{stats:?}");
    assert_equals_batch(
        &client,
        "per_key",
        "SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k",
    )
    .await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_joins_late_gets_work() {
    // A coordinator without workers of its own, like `dstream coordinator`.
    let server = TestServer::start_with(|config| config.workers = 0)
        .await
        .expect("server");
    let engine = server.engine.clone().expect("engine");
    let stop_workers = CancellationToken::new();
    let mut workers = Vec::new();
    workers.push(join_worker(&engine, Duration::ZERO, stop_workers.clone()).await);
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 300, key_cardinality = 10);
             CREATE MATERIALIZED VIEW a AS SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k;
             ADVANCE 2;",
        )
        .await
        .expect("setup");
    workers.push(join_worker(&engine, Duration::ZERO, stop_workers.clone()).await);
    client
        .batch_execute(
            "CREATE MATERIALIZED VIEW b AS SELECT k, max(v) AS top FROM s GROUP BY k; ADVANCE 3;",
        )
        .await
        .expect("second view");
    // The late worker holds replicas of new blocks, so both workers run map tasks,
    // and it owns state partitions of the new view.
    let last = rows(
        &client,
        "SELECT workers FROM dstream_intervals ORDER BY interval_id DESC LIMIT 1",
    )
    .await;
    assert_eq!(last, vec![vec!["2"]]);
    let done = rows(
        &client,
        "SELECT id, tasks_done FROM dstream_workers ORDER BY id",
    )
    .await;
    assert_eq!(done.len(), 2, "{done:?}");
    let late: u64 = done[1][1].parse().expect("count");
    // 3 intervals: its share of 5 map tasks each, and 2 of the new view's 4 reduces.
    assert!(late >= 6, "the late worker ran only {late} tasks: {done:?}");
    // It took half the first view's state partitions too: each worker holds 4 of 8.
    assert_eq!(
        rows(
            &client,
            "SELECT id, state_partitions FROM dstream_workers ORDER BY id"
        )
        .await
        .iter()
        .map(|r| r[1].clone())
        .collect::<Vec<_>>(),
        vec!["4", "4"]
    );
    // Both views equal the batch query over everything the source produced.
    for (view, batch) in [
        (
            "a",
            "SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k",
        ),
        ("b", "SELECT k, max(v) AS top FROM s GROUP BY k"),
    ] {
        assert_equals_batch(&client, view, batch).await;
    }
    server.stop().await;
    stop_workers.cancel();
    for worker in workers {
        let _ = worker.await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_leaves_hands_its_work_over() {
    let server = TestServer::start_with(|config| {
        config.worker_mode = WorkerMode::Process(Some(dstream_binary()));
    })
    .await
    .expect("server");
    let client = server.client().await.expect("connect");
    let views = [
        (
            "per_key",
            "SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k",
        ),
        (
            "distinct_v",
            "SELECT k, count(DISTINCT v % 7) AS kinds FROM s GROUP BY k",
        ),
    ];
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 500, key_cardinality = 20);",
        )
        .await
        .expect("source");
    for (name, sql) in views {
        client
            .batch_execute(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}"))
            .await
            .expect("view");
    }
    client.batch_execute("ADVANCE 3").await.expect("advance");
    let before = rows(&client, "SELECT * FROM per_key ORDER BY k").await;

    // Worker 1 runs the source's receiver (the first worker gets it) and owns half
    // of every view's state partitions. Stop it the way an operator would.
    let pid = rows(&client, "SELECT pid FROM dstream_workers WHERE id = 1").await;
    let stopped = std::process::Command::new("kill")
        .args(["-TERM", &pid[0][0]])
        .status()
        .expect("kill");
    assert!(stopped.success());
    let asked = Instant::now();
    loop {
        let status = rows(
            &client,
            "SELECT id, status FROM dstream_workers ORDER BY id",
        )
        .await;
        if status[0][1] == "left" {
            assert_eq!(status[1][1], "alive", "{status:?}");
            break;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(30),
            "the worker did not leave: {status:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Nothing was lost: the state read from the new owner is the same, and ad-hoc
    // reads of the raw stream are served by the replicas.
    assert_eq!(
        rows(&client, "SELECT * FROM per_key ORDER BY k").await,
        before
    );

    // The remaining worker carries on with the receiver and all partitions.
    client.batch_execute("ADVANCE 3").await.expect("advance");
    let stats = rows(
        &client,
        "SELECT input_rows, workers FROM dstream_intervals ORDER BY interval_id DESC LIMIT 3",
    )
    .await;
    assert_eq!(stats, vec![vec!["500", "1"]; 3]);
    assert_eq!(
        rows(&client, "SELECT sum(n) FROM per_key").await,
        vec![vec!["3000"]]
    );
    for (view, batch) in views {
        assert_equals_batch(&client, view, batch).await;
    }
    server.stop().await;
}

/// A backlog seals interval *t+1* while *t* runs. A source dropped and created again
/// under the same name between the two seals *t+1* afresh: its input holds only the
/// new definition's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_source_created_again_while_behind_seals_its_own_input() {
    let server = TestServer::start_with(|config| config.workers = 0)
        .await
        .expect("server");
    let engine = server.engine.clone().expect("engine");
    let stop_worker = CancellationToken::new();
    // Every task waits, so that an interval is still running when the source is
    // dropped and created again: both land between it and the interval sealed ahead.
    let worker = join_worker(&engine, Duration::from_millis(400), stop_worker.clone()).await;
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE busy (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 100, key_cardinality = 5);
             CREATE MATERIALIZED VIEW slow AS SELECT k, count(*) AS n FROM busy GROUP BY k;
             CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 300, key_cardinality = 10);",
        )
        .await
        .expect("setup");
    // Each statement from its own session, queued in order while interval 0's tasks
    // wait; interval 1, due too, was sealed meanwhile.
    let in_session = |sql: &'static str, after: u64| {
        let server_client = server.client();
        async move {
            let client = server_client.await.expect("connect");
            tokio::time::sleep(Duration::from_millis(after)).await;
            client.batch_execute(sql).await
        }
    };
    let (advanced, dropped, created) = tokio::join!(
        in_session("ADVANCE 2", 0),
        in_session("DROP SOURCE s", 300),
        in_session(
            "CREATE SOURCE s (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 40, key_cardinality = 3)",
            500
        ),
    );
    advanced.expect("advance while behind");
    dropped.expect("drop");
    created.expect("create again");
    client.batch_execute("ADVANCE 2").await.expect("advance");
    // Only the new definition's rows: 40 per interval since its creation (interval
    // 1, or 2 had interval 1 run before it).
    let input = rows(&client, "SELECT count(*), max(k) FROM s").await;
    assert!(
        input == vec![vec!["120", "2"]] || input == vec![vec!["80", "2"]],
        "the new source's input: {input:?}"
    );
    server.stop().await;
    stop_worker.cancel();
    let _ = worker.await;
}
