//! Recovery from lost workers and stragglers: `kill -9` of worker processes between
//! intervals, under load (while intervals and checkpoints run), and twice in a row;
//! a worker whose every task is slowed down. Every run's views must equal a
//! fault-free run's, and the batch oracle over the raw input; `dstream_recoveries`
//! says what was rebuilt and from which checkpoint, `dstream_intervals` how many
//! speculative copies ran.

use std::time::Duration;

use arrow::array::RecordBatch;
use dstream_server::Engine;
use dstream_server::config::{Speculation, WorkerMode};
use dstream_server::session::{self, StatementResult};
use dstream_sql_tests::{TestServer, dstream_binary, simple_rows};

const SETUP: &str = "
    CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
      WITH (connector = 'generator', rows_per_second = 20000, key_cardinality = 500, seed = 11);
    CREATE MATERIALIZED VIEW totals AS
      SELECT k, count(*) AS n, sum(v) AS total, count(DISTINCT v % 10) AS d FROM s GROUP BY k;
    CREATE MATERIALIZED VIEW tumbles AS
      SELECT window_start, k % 20 AS b, count(*) AS n, sum(v) AS total
      FROM TUMBLE(s, ts, INTERVAL '2' SECOND) GROUP BY window_start, k % 20;
    CREATE MATERIALIZED VIEW closed AS
      SELECT window_start, k % 5 AS b, count(*) AS n FROM TUMBLE(s, ts, INTERVAL '3' SECOND)
      GROUP BY window_start, k % 5 EMIT ON WINDOW CLOSE;
    CREATE MATERIALIZED VIEW hops AS
      SELECT window_start, k % 10 AS b, max(v) AS hi
      FROM HOP(s, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) GROUP BY window_start, k % 10;
    CREATE MATERIALIZED VIEW picked AS SELECT k, v FROM s WHERE v % 97 = 0;
    CREATE MATERIALIZED VIEW spread AS
      SELECT n % 10 AS b, count(*) AS keys, max(total) AS top FROM totals GROUP BY n % 10;
    CREATE MATERIALIZED VIEW leaders AS
      SELECT k, n FROM (SELECT k, count(*) AS n FROM s GROUP BY k) AS c ORDER BY n DESC, k LIMIT 5;";

/// A view created later in some runs (after interval 7), its rows, and the batch
/// query over the raw input from interval 8 (8 s after the manual clock's origin)
/// that gives them.
const LATE_VIEW: &str = "CREATE MATERIALIZED VIEW late AS \
    SELECT k % 7 AS b, count(*) AS n, sum(v) AS total FROM s GROUP BY k % 7";
const LATE_ROWS: &str = "SELECT b, n, total FROM late";
const LATE_ORACLE: &str = "SELECT k % 7, count(*), sum(v) FROM s \
    WHERE _interval >= TIMESTAMP '2026-01-01 00:00:08' GROUP BY k % 7";

/// Each view, read as text, with the batch query over the raw input that must give
/// the same rows (`None`: compared with the fault-free run only).
const VIEWS: [(&str, &str, Option<&str>); 7] = [
    (
        "totals",
        "SELECT k, n, total, d FROM totals",
        Some("SELECT k, count(*), sum(v), count(DISTINCT v % 10) FROM s GROUP BY k"),
    ),
    (
        "tumbles",
        "SELECT CAST(window_start AS VARCHAR), b, n, total FROM tumbles",
        Some(
            "SELECT CAST(date_bin(INTERVAL '2 seconds', ts, TIMESTAMP '1970-01-01 00:00:00') AS VARCHAR), \
             k % 20, count(*), sum(v) FROM s GROUP BY 1, 2",
        ),
    ),
    (
        "closed",
        "SELECT CAST(window_start AS VARCHAR), b, n FROM closed",
        None,
    ),
    (
        "hops",
        "SELECT CAST(window_start AS VARCHAR), b, hi FROM hops",
        None,
    ),
    (
        "picked",
        "SELECT k, v FROM picked",
        Some("SELECT k, v FROM s WHERE v % 97 = 0"),
    ),
    // Views of several stages: a view on a view, and a top-N over a count.
    (
        "spread",
        "SELECT b, keys, top FROM spread",
        Some(
            "SELECT n % 10, count(*), max(total) FROM \
             (SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k) AS t GROUP BY n % 10",
        ),
    ),
    (
        "leaders",
        "SELECT k, n FROM leaders",
        Some(
            "SELECT k, n FROM (SELECT k, n FROM (SELECT k, count(*) AS n FROM s GROUP BY k) AS c \
             ORDER BY n DESC, k LIMIT 5) AS top",
        ),
    ),
];

async fn batches(engine: &Engine, sql: &str) -> Vec<RecordBatch> {
    session::execute(engine, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .flat_map(|r| match r {
            StatementResult::Rows { batches, .. } => batches,
            _ => vec![],
        })
        .collect()
}

/// Rows as sorted lines of text, to compare row sets.
fn lines(batches: &[RecordBatch]) -> Vec<String> {
    let text = arrow::util::pretty::pretty_format_batches(batches)
        .expect("format")
        .to_string();
    let mut rows: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(1) // the header
        .map(|l| l.split('|').map(str::trim).collect::<Vec<_>>().join("|"))
        .collect();
    rows.sort();
    rows
}

async fn query(engine: &Engine, sql: &str) -> Vec<String> {
    lines(&batches(engine, sql).await)
}

/// What a run does, in order.
#[derive(Clone, Copy, Debug)]
enum Step {
    Advance(u64),
    /// Waits until a checkpoint of interval `at` or later is committed.
    Checkpointed(u64),
    /// `kill -9` of the n-th worker process.
    Kill(usize),
    /// Advances while `kill -9` hits the n-th worker after the delay.
    KillDuring(u64, usize, Duration),
    /// Starts another `dstream worker` process, which joins the cluster.
    Join,
    /// The same, with every task of that worker delayed this long: a straggler.
    JoinStraggler(Duration),
    /// The same, with every object store call of that worker delayed this long: its
    /// part of each checkpoint is written last, long after the others'.
    JoinSlowStore(Duration),
    /// Waits until a checkpoint is being written and every worker but the last that
    /// joined has written its partitions of it, then `kill -9` of the n-th worker:
    /// the checkpoint never commits, but holds the lost partitions.
    KillWhenWritten(usize),
    /// Creates [`LATE_VIEW`].
    CreateLateView,
}

/// What a run ends with: each view's rows, `dstream_recoveries`, the state
/// partitions each live worker holds (by worker id), and the speculative copies run.
struct Outcome {
    views: Vec<(String, Vec<String>)>,
    recoveries: Vec<String>,
    partitions: Vec<String>,
    speculative_tasks: String,
    /// Intervals that ran speculative copies.
    speculated_in: Vec<String>,
    /// The rows of [`LATE_VIEW`], if it was created.
    late: Vec<String>,
    /// The checkpoint each recovery loaded from (`none` without).
    loaded: Vec<String>,
    /// The checkpoint [`Step::KillWhenWritten`] killed during.
    killed_during: Option<u64>,
}

/// Runs `steps` on a fresh server; with `oracle`, checks the views against batch
/// queries over the raw input (which needs every input block on a live worker).
async fn run(workers: usize, checkpoint_intervals: u64, steps: &[Step], oracle: bool) -> Outcome {
    let server = TestServer::start_with(|c| {
        c.worker_mode = WorkerMode::Process(Some(dstream_binary()));
        // Killed workers stay dead: each run compares where partitions end up.
        c.worker_restarts.enabled = false;
        c.workers = workers;
        c.block_rows = 4096;
        c.checkpoint_intervals = checkpoint_intervals;
        c.checkpoint_every = None;
        // Tasks of a debug build on a busy machine vary a lot: only a worker slower
        // than anything noise makes (the straggler's 3 s) is copied.
        c.speculation = Some(Speculation {
            min_runtime: Duration::from_secs(1),
            ..Speculation::default()
        });
    })
    .await
    .expect("server");
    let engine = server.engine.clone().expect("engine");
    let pids = engine.local_worker_pids().await;
    assert_eq!(pids.len(), workers);
    batches(&engine, SETUP).await;
    let kill = |n: usize| {
        let pid: u32 = pids[n];
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -9 {pid}");
    };
    let mut joined = Vec::new();
    let mut killed_during = None;
    for step in steps {
        match *step {
            Step::Join | Step::JoinStraggler(_) | Step::JoinSlowStore(_) => {
                let alive = engine.cluster().alive().len();
                let mut command = tokio::process::Command::new(dstream_binary());
                if let Step::JoinStraggler(delay) = step {
                    command.env(
                        "DSTREAM_FAULT_TASK_DELAY",
                        format!("{}ms", delay.as_millis()),
                    );
                }
                if let Step::JoinSlowStore(delay) = step {
                    command.env(
                        "DSTREAM_FAULT_STORE",
                        format!("latency={}ms", delay.as_millis()),
                    );
                }
                let child = command
                    .args(["worker", "--coordinator", engine.coordinator_url()])
                    .kill_on_drop(true)
                    .spawn()
                    .expect("start a worker");
                joined.push(child);
                engine
                    .cluster()
                    .wait_for_workers(alive + 1, Duration::from_secs(20))
                    .await
                    .expect("the new worker joins");
            }
            Step::Advance(n) => {
                batches(&engine, &format!("ADVANCE {n}")).await;
            }
            Step::Checkpointed(at) => {
                let sql = format!(
                    "SELECT interval_id FROM dstream_checkpoints WHERE status = 'committed' AND interval_id >= {at}"
                );
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while query(&engine, &sql).await.is_empty() {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no checkpoint at or after {at}: {:?}",
                        query(&engine, "SELECT * FROM dstream_checkpoints").await
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            Step::Kill(n) => kill(n),
            Step::KillWhenWritten(n) => {
                let workers = query(
                    &engine,
                    "SELECT id, state_partitions FROM dstream_workers WHERE status = 'alive' ORDER BY id",
                )
                .await;
                let counts: Vec<u64> = workers
                    .iter()
                    .filter_map(|w| w.split('|').nth(2)?.parse().ok())
                    .collect();
                let (total, slow) = (counts.iter().sum::<u64>(), counts.last().copied());
                let others = total - slow.expect("a worker joined");
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                let at = loop {
                    if let Some((at, written)) = unfinished_checkpoint(&server.data_dir)
                        && written >= others
                    {
                        break at;
                    }
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "no checkpoint with {others} partitions written and no manifest"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                };
                kill(n);
                killed_during = Some(at);
            }
            Step::CreateLateView => {
                batches(&engine, LATE_VIEW).await;
            }
            Step::KillDuring(intervals, n, delay) => {
                let sql = format!("ADVANCE {intervals}");
                let advance = batches(&engine, &sql);
                let killing = async {
                    tokio::time::sleep(delay).await;
                    kill(n);
                };
                tokio::join!(advance, killing);
            }
        }
    }
    let mut views = Vec::new();
    let check_oracle = oracle;
    for (name, select, oracle) in VIEWS {
        let rows = query(&engine, select).await;
        assert!(!rows.is_empty(), "{name} has rows");
        if let Some(oracle) = oracle.filter(|_| check_oracle) {
            assert_eq!(
                rows,
                query(&engine, oracle).await,
                "{name} equals the batch query over all the input"
            );
        }
        views.push((name.to_string(), rows));
    }
    let mut late = Vec::new();
    if steps.iter().any(|s| matches!(s, Step::CreateLateView)) {
        late = query(&engine, LATE_ROWS).await;
        if check_oracle {
            assert_eq!(late, query(&engine, LATE_ORACLE).await, "late equals batch");
        }
    }
    let recoveries = query(
        &engine,
        "SELECT status, lost_workers, partitions, receivers, checkpoint_interval IS NOT NULL, \
         replayed_intervals > 0, coalesce(error, '') FROM dstream_recoveries",
    )
    .await;
    let partitions = query(
        &engine,
        "SELECT id, state_partitions FROM dstream_workers WHERE status = 'alive'",
    )
    .await;
    let loaded = query(
        &engine,
        "SELECT coalesce(CAST(checkpoint_interval AS VARCHAR), 'none') FROM dstream_recoveries",
    )
    .await;
    let speculative_tasks = query(
        &engine,
        "SELECT sum(speculative_tasks) FROM dstream_intervals",
    )
    .await
    .concat();
    let speculated_in = query(
        &engine,
        "SELECT interval_id FROM dstream_intervals WHERE speculative_tasks > 0",
    )
    .await;
    server.stop().await;
    for mut child in joined {
        let _ = child.kill().await;
    }
    Outcome {
        views,
        recoveries,
        partitions,
        speculative_tasks,
        speculated_in,
        late,
        loaded,
        killed_during,
    }
}

/// The newest checkpoint in `data` that has files but no manifest, and how many of
/// its partitions' records (`written.json`) are written.
fn unfinished_checkpoint(data: &std::path::Path) -> Option<(u64, u64)> {
    let newest = std::fs::read_dir(data.join("checkpoints"))
        .ok()?
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u64>().ok())
        .max()?;
    if data.join(format!("manifests/{newest:020}.json")).exists() {
        return None;
    }
    let dir = data.join(format!("checkpoints/{newest:020}"));
    let mut written = 0;
    for view in std::fs::read_dir(dir).ok()?.flatten() {
        for partition in std::fs::read_dir(view.path()).ok()?.flatten() {
            if partition.path().join("written.json").exists() {
                written += 1;
            }
        }
    }
    Some((newest, written))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_workers_are_recovered_with_the_same_results() {
    // What the coordinator logs about recoveries shows with RUST_LOG=info.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let intervals = 12;
    let clean = run(2, 3, &[Step::Advance(intervals)], true).await;
    assert!(clean.recoveries.is_empty(), "{:?}", clean.recoveries);

    // Between intervals, after a checkpoint: the lost partitions are loaded from it
    // and the intervals since are replayed. A replacement worker that joins later
    // takes its share of partitions back.
    let killed = run(
        2,
        3,
        &[
            Step::Advance(7),
            Step::Checkpointed(5),
            Step::Kill(1),
            Step::Advance(2),
            Step::Join,
            Step::Advance(intervals - 9),
        ],
        true,
    )
    .await;
    assert_eq!(killed.views, clean.views, "kill between intervals");
    assert_eq!(killed.recoveries.len(), 1, "{:?}", killed.recoveries);
    let recovery: Vec<&str> = killed.recoveries[0].split('|').collect();
    // status, lost worker, partitions, receivers, from a checkpoint, replayed, error
    assert_eq!(recovery[1], "recovered", "{recovery:?}");
    assert_ne!(recovery[3], "0", "partitions were rebuilt: {recovery:?}");
    assert_ne!(recovery[4], "0", "receivers were reopened: {recovery:?}");
    assert_eq!(recovery[5], "true", "from a checkpoint: {recovery:?}");
    assert_eq!(recovery[6], "true", "input was replayed: {recovery:?}");
    // 32 partitions (8 stages of 4: 7 views, one of two stages), evenly over the
    // survivor and the replacement.
    assert!(
        killed.partitions.len() == 2 && killed.partitions.iter().all(|p| p.ends_with("|16|")),
        "{:?}",
        killed.partitions
    );

    // Under load, while intervals run and checkpoints are written.
    let under_load = run(
        2,
        2,
        &[
            Step::Advance(3),
            Step::KillDuring(intervals - 3, 0, Duration::from_millis(150)),
        ],
        true,
    )
    .await;
    assert_eq!(under_load.views, clean.views, "kill under load");
    assert!(
        !under_load.recoveries.is_empty()
            && under_load
                .recoveries
                .iter()
                .all(|r| r.contains("recovered")),
        "{:?}",
        under_load.recoveries
    );

    // Two deaths in a row, out of three workers: the first recovery's checkpoint
    // makes the second one possible.
    let twice = run(
        3,
        3,
        &[
            Step::Advance(4),
            Step::Kill(0),
            Step::Advance(3),
            Step::Checkpointed(4),
            Step::Kill(2),
            Step::Advance(intervals - 7),
        ],
        // Input from before the first death may have lost both its copies.
        false,
    )
    .await;
    assert_eq!(twice.views, clean.views, "two deaths in a row");
    assert_eq!(twice.recoveries.len(), 2, "{:?}", twice.recoveries);
    assert!(
        twice.recoveries.iter().all(|r| r.contains("recovered")),
        "{:?}",
        twice.recoveries
    );

    // Four intervals replayed, into views that fold them at once (no window) and
    // views that take them one by one (windows): the one-by-one commits must not
    // drop what the folds read.
    let several = run(
        2,
        6,
        &[
            Step::Advance(7),
            Step::Checkpointed(5),
            Step::Advance(3),
            Step::Kill(1),
            Step::Advance(intervals - 10),
        ],
        true,
    )
    .await;
    assert_eq!(several.views, clean.views, "several intervals replayed");
    assert!(
        several.recoveries.len() == 1 && several.recoveries[0].contains("recovered"),
        "{:?}",
        several.recoveries
    );

    // Killed while a checkpoint is being written, after writing its part of it: the
    // checkpoint never commits (its part is not acknowledged), yet the lost
    // partitions are loaded from it, not from the checkpoint before.
    let mid_checkpoint = run(
        2,
        3,
        &[
            Step::JoinSlowStore(Duration::from_millis(300)),
            Step::Advance(3),
            Step::Checkpointed(2),
            Step::Advance(3),
            Step::KillWhenWritten(0),
            Step::Advance(intervals - 6),
        ],
        true,
    )
    .await;
    assert_eq!(
        mid_checkpoint.views, clean.views,
        "kill during a checkpoint"
    );
    let at = mid_checkpoint
        .killed_during
        .expect("killed during a checkpoint");
    assert_eq!(
        mid_checkpoint.loaded,
        [format!("|{at}|")],
        "loaded from the unfinished checkpoint: {:?}",
        mid_checkpoint.recoveries
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_straggler_is_outrun_by_speculative_copies() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let intervals = 8;
    let clean = run(2, 3, &[Step::Advance(intervals)], true).await;
    assert_eq!(
        clean.speculative_tasks, "|0|",
        "no copies without a straggler"
    );

    // A third worker joins whose every task first waits 3 s. Evening out gives it a
    // third of the state partitions and it holds replicas, so it gets map and reduce
    // tasks; copies of them on the other workers finish first. Reduce copies take
    // their partitions along, so the straggler ends with none, and the blocks it
    // holds are mapped by their other holders from then on.
    let straggling = run(
        2,
        3,
        &[
            Step::Advance(2),
            Step::JoinStraggler(Duration::from_secs(3)),
            Step::Advance(intervals - 2),
        ],
        true,
    )
    .await;
    assert_eq!(straggling.views, clean.views, "with a straggler");
    assert_ne!(straggling.speculative_tasks, "|0|", "copies ran");
    assert!(
        straggling.partitions.contains(&"|3|0|".to_string()),
        "the straggler (worker 3) kept no partition: {:?}",
        straggling.partitions
    );
    // Once outrun, it gets no more map tasks either (for a while): only the first
    // interval with it ran copies, and the next one if its map tasks were placed
    // ahead, while the first ran and before the straggler was outrun.
    assert!(
        straggling.speculated_in.first().is_some_and(|i| i == "|2|")
            && straggling
                .speculated_in
                .iter()
                .all(|i| i == "|2|" || i == "|3|"),
        "intervals with copies: {:?}",
        straggling.speculated_in
    );
}

/// A `dstream serve` process on `data` (manual clock, two worker processes, a
/// checkpoint every 3 intervals), in its own process group so that it can be killed
/// with its workers like a machine that fails; and a client connected to it. With
/// `faults`, every process's store is a faulty one (`DSTREAM_FAULT_STORE`).
async fn serve(
    data: &std::path::Path,
    faults: Option<&str>,
) -> (
    tokio::process::Child,
    tokio_postgres::Client,
    std::net::SocketAddr,
) {
    // Three distinct free ports: held together while they are picked.
    let held: Vec<std::net::TcpListener> = (0..3)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").expect("a free port"))
        .collect();
    let port = |i: usize| held[i].local_addr().expect("a port").to_string();
    let (pg, grpc, metrics) = (port(0), port(1), port(2));
    drop(held);
    let mut command = tokio::process::Command::new(dstream_binary());
    // Its log (and its workers') only says more than warnings when asked to.
    command.env(
        "RUST_LOG",
        std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
    );
    if let Some(faults) = faults {
        command.env("DSTREAM_FAULT_STORE", faults);
    }
    let child = command
        .arg("serve")
        .arg("--data-dir")
        .arg(data)
        .args([
            "--pg-addr",
            &pg,
            "--grpc-addr",
            &grpc,
            "--metrics-addr",
            &metrics,
            "--http-addr",
            "off",
        ])
        .args(["--clock", "manual", "--workers", "2", "--worker-cores", "1"])
        .args(["--partitions", "4", "--block-rows", "4096"])
        .args(["--checkpoint-intervals", "3", "--checkpoint-every", "off"])
        .process_group(0)
        .kill_on_drop(true)
        .spawn()
        .expect("start dstream serve");
    let (pg, metrics) = (
        pg.parse().expect("an address"),
        metrics.parse().expect("an address"),
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match dstream_sql_tests::connect(pg).await {
            Ok(client) => return (child, client, metrics),
            Err(e) if tokio::time::Instant::now() > deadline => panic!("connect to {pg}: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// `SELECT` rows as sorted `|a|b|` lines, like [`lines`].
async fn pg_lines(client: &tokio_postgres::Client, sql: &str) -> Vec<String> {
    let mut rows: Vec<String> = simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .map(|r| format!("|{}|", r.join("|")))
        .collect();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_server_resumes_from_its_latest_checkpoint() {
    let intervals = 12;
    let clean = run(
        2,
        3,
        &[
            Step::Advance(8),
            Step::CreateLateView,
            Step::Advance(intervals - 8),
        ],
        true,
    )
    .await;

    // The whole server — coordinator and workers — is killed with SIGKILL after
    // interval 8, a checkpoint having committed at interval 4 or later.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (first, client, metrics) = serve(&data, None).await;
    client.batch_execute(SETUP).await.expect("setup");
    client.batch_execute("ADVANCE 7").await.expect("advance");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while pg_lines(
        &client,
        "SELECT interval_id FROM dstream_checkpoints WHERE status = 'committed' AND interval_id >= 4",
    )
    .await
    .is_empty()
    {
        assert!(tokio::time::Instant::now() < deadline, "no checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // A view created after the checkpoint starts with interval 8 — again after the
    // restart.
    client.batch_execute("ADVANCE 1").await.expect("advance");
    client.batch_execute(LATE_VIEW).await.expect("late view");
    client.batch_execute("ADVANCE 1").await.expect("advance");
    // What happened is in the Prometheus metrics too.
    let scraped = scrape(metrics).await;
    for expected in [
        "dstream_intervals_total 9",
        "dstream_checkpoints_total{status=\"committed\"}",
        "dstream_checkpoint_duration_seconds",
        "dstream_interval_processing_seconds",
        "dstream_source_records{source=\"s\"}",
    ] {
        assert!(scraped.contains(expected), "{expected} in {scraped}");
    }
    kill_group(first);
    drop(client);

    // Restarted on the same store, it resumes every view from the checkpoint and
    // runs the intervals after it again.
    let (second, client, _) = serve(&data, None).await;
    let at = resumed_at(&client).await;
    assert!(
        (4..=8).contains(&at),
        "resumed from the checkpoint at 4..=8: {at}"
    );
    finish_like(&client, intervals, at, &clean).await;
    assert_eq!(
        pg_lines(&client, LATE_ROWS).await,
        clean.late,
        "a view created after the checkpoint"
    );
    kill_group(second);
}

/// The text of `http://addr/metrics`.
async fn scrape(addr: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("metrics");
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .await
        .expect("request");
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .expect("response");
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    response
}

/// `kill -9` of a `serve` process and its workers.
fn kill_group(server: tokio::process::Child) {
    let group = server.id().expect("pid");
    let killed = std::process::Command::new("kill")
        .args(["-KILL", "--", &format!("-{group}")])
        .status()
        .expect("kill");
    assert!(killed.success());
}

/// The interval a restarted server resumed from: the last interval of every view of
/// [`VIEWS`].
async fn resumed_at(client: &tokio_postgres::Client) -> u64 {
    let resumed: Vec<u64> = simple_rows(client, "SHOW MATERIALIZED VIEWS")
        .await
        .expect("show")
        .iter()
        .filter(|r| VIEWS.iter().any(|(name, ..)| r[0] == *name))
        .map(|r| r[4].parse().expect("a last interval"))
        .collect();
    assert_eq!(resumed.len(), VIEWS.len(), "{resumed:?}");
    assert!(resumed.iter().all(|i| *i == resumed[0]), "{resumed:?}");
    resumed[0]
}

/// Runs a server resumed `at` up to interval `intervals - 1`, and requires its views
/// to equal `clean`'s.
async fn finish_like(client: &tokio_postgres::Client, intervals: u64, at: u64, clean: &Outcome) {
    client
        .batch_execute(&format!("ADVANCE {}", intervals - 1 - at))
        .await
        .expect("advance");
    for ((name, select, _), (clean_name, clean_rows)) in VIEWS.iter().zip(&clean.views) {
        assert_eq!(name, clean_name);
        assert_eq!(
            &pg_lines(client, select).await,
            clean_rows,
            "{name} after a restart equals the run without one"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_store_never_commits_half_a_checkpoint() {
    let intervals = 12;
    let clean = run(2, 3, &[Step::Advance(intervals)], true).await;

    // Every store call of the coordinator and of each worker waits 20 ms, and each
    // process's writes 10 to 19 fail (the coordinator's first eight write the
    // catalog, its ninth the first manifest): more than retries cover, so the
    // checkpoints written meanwhile fail; later ones commit.
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let (first, client, _) = serve(&data, Some("latency=20ms,fail=10-19")).await;
    client.batch_execute(SETUP).await.expect("setup");
    client.batch_execute("ADVANCE 9").await.expect("advance");
    let statuses = "SELECT DISTINCT status FROM dstream_checkpoints";
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while pg_lines(&client, statuses).await != ["|committed|", "|failed|"] {
        assert!(
            tokio::time::Instant::now() < deadline,
            "a failed and a committed checkpoint: {:?}",
            pg_lines(&client, "SELECT * FROM dstream_checkpoints").await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = pg_lines(
        &client,
        "SELECT error FROM dstream_checkpoints WHERE status = 'failed'",
    )
    .await;
    assert!(
        failed.iter().all(|e| e.contains("injected failure")),
        "checkpoints failed for the injected errors: {failed:?}"
    );
    // The stream went on meanwhile; it is killed while a checkpoint of the last
    // intervals is being written (slowly).
    client.batch_execute("ADVANCE 3").await.expect("advance");
    kill_group(first);
    drop(client);

    // Restarted without faults, it resumes from the newest checkpoint that committed
    // — whole — and ends as the run without faults.
    let (second, client, _) = serve(&data, None).await;
    let at = resumed_at(&client).await;
    finish_like(&client, intervals, at, &clean).await;
    kill_group(second);
}
