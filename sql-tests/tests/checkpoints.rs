//! Checkpoints: every view partition is written to the object store and committed by
//! a manifest; what the files hold equals what the view shows; old checkpoints are
//! deleted; a store that cannot be written fails the checkpoint clearly and the stream
//! goes on. The same test runs against a real S3-compatible server when
//! `DSTREAM_TEST_S3_ENDPOINT` is set (`scripts/test.sh` starts one).

use std::time::Duration;

use arrow::array::RecordBatch;
use dstream_server::Engine;
use dstream_server::config::ServeConfig;
use dstream_server::session::{self, StatementResult};
use dstream_sql_tests::TestServer;
use dstream_storage::checkpoint::{self, Manifest, VIEW_ROWS};
use dstream_storage::{DataDir, IntervalId, S3Options, StoreConfig};

const SETUP: &str = "
    CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP, WATERMARK FOR ts AS ts - INTERVAL '1' SECOND)
      WITH (connector = 'generator', rows_per_second = 500, key_cardinality = 40, seed = 7);
    CREATE MATERIALIZED VIEW totals AS
      SELECT k, count(*) AS n, sum(v) AS total, count(DISTINCT v % 10) AS d FROM s GROUP BY k;
    CREATE MATERIALIZED VIEW windows AS
      SELECT window_start, k, count(*) AS n FROM TUMBLE(s, ts, INTERVAL '2' SECOND)
      GROUP BY window_start, k EMIT ON WINDOW CLOSE;";

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
        .map(str::to_string)
        .collect();
    rows.sort();
    rows
}

/// Waits until `dstream_checkpoints` has `count` rows, and returns them as
/// (interval, status, error).
async fn checkpoints(engine: &Engine, count: usize) -> Vec<(String, String, String)> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let out = batches(
            engine,
            "SELECT CAST(interval_id AS VARCHAR) AS i, status, coalesce(error, '') AS e FROM dstream_checkpoints",
        )
        .await;
        let rows: Vec<(String, String, String)> = lines(&out)
            .into_iter()
            .map(|l| {
                let cells: Vec<String> = l
                    .trim_matches('|')
                    .split('|')
                    .map(|c| c.trim().to_string())
                    .collect();
                (
                    cells.first().cloned().unwrap_or_default(),
                    cells.get(1).cloned().unwrap_or_default(),
                    cells.get(2).cloned().unwrap_or_default(),
                )
            })
            .collect();
        if rows.len() >= count {
            return rows;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "expected {count} checkpoints, have {rows:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The rows of one view as the latest checkpoint holds them, read from the store.
async fn checkpointed_rows(store: &DataDir, manifest: &Manifest, view: &str) -> Vec<RecordBatch> {
    let mut rows = Vec::new();
    let partitions = &manifest
        .views
        .get(view)
        .expect("view in manifest")
        .partitions;
    assert_eq!(partitions.len(), 4, "every partition is in the manifest");
    for p in partitions {
        for file in p.files.iter().filter(|f| f.part == VIEW_ROWS) {
            rows.extend(checkpoint::read_part(store, file).await.expect("read part"));
        }
    }
    rows
}

async fn checkpoints_hold_the_committed_state(configure: impl FnOnce(&mut ServeConfig)) {
    let mut store_config = None;
    let server = TestServer::start_with(|c| {
        c.checkpoint_intervals = 3;
        c.checkpoint_every = None;
        c.checkpoints_kept = 1;
        configure(c);
        store_config = Some(c.store_config());
    })
    .await
    .expect("server");
    let store = DataDir::open(&store_config.expect("configured")).expect("store");
    let engine = server.engine.clone().expect("engine");
    batches(&engine, SETUP).await;
    // Intervals 0..=5: checkpoints after 2 and 5. A checkpoint is not started while
    // the previous one is being written, so the second ADVANCE waits for the first.
    batches(&engine, "ADVANCE 3").await;
    checkpoints(&engine, 1).await;
    batches(&engine, "ADVANCE 3").await;
    let done = checkpoints(&engine, 2).await;
    assert_eq!(
        done,
        vec![
            ("2".into(), "committed".into(), String::new()),
            ("5".into(), "committed".into(), String::new())
        ]
    );
    // Only the newest is kept: the older one is deleted once the newer committed.
    // (The manifest goes first, then the files.)
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let manifests = Manifest::list(&store).await.expect("list");
        let old_files = store
            .list(&checkpoint::checkpoint_dir(IntervalId(2)))
            .await
            .expect("list");
        if manifests == vec![IntervalId(5)] && old_files.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "old checkpoint not deleted: {manifests:?}, {old_files:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let manifest = Manifest::latest(&store)
        .await
        .expect("read manifest")
        .expect("a manifest");
    assert_eq!(manifest.interval, 5);
    assert!(
        manifest
            .views
            .get("totals")
            .is_some_and(|v| v.sql.contains("count(DISTINCT"))
    );
    assert!(manifest.sources.get("s").is_some_and(|s| s.records == 3000));
    // The last committed interval is the checkpoint's: the view shows what the files hold.
    for view in ["totals", "windows"] {
        let shown = lines(&batches(&engine, &format!("SELECT * FROM {view}")).await);
        let stored = lines(&checkpointed_rows(&store, &manifest, view).await);
        assert!(!shown.is_empty(), "{view} has rows");
        assert_eq!(
            shown, stored,
            "{view}: the checkpoint holds the view's rows"
        );
    }
    // Accumulators are there too, with every count(DISTINCT ...)'s pairs.
    let totals = &manifest.views["totals"].partitions;
    for table in ["rows", "distinct-0"] {
        assert!(
            totals
                .iter()
                .any(|p| p.files.iter().any(|f| f.part == table)),
            "a partition of totals keeps table {table}"
        );
    }
    assert!(
        totals
            .iter()
            .all(|p| p.files.iter().all(|f| f.part != "distinct-1")),
        "totals has one count(DISTINCT)"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_in_a_local_directory() {
    checkpoints_hold_the_committed_state(|_| {}).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn checkpoints_in_s3() {
    let Ok(endpoint) = std::env::var("DSTREAM_TEST_S3_ENDPOINT") else {
        eprintln!("DSTREAM_TEST_S3_ENDPOINT is not set: skipped");
        return;
    };
    let bucket = std::env::var("DSTREAM_TEST_S3_BUCKET").unwrap_or_else(|_| "dstream".into());
    let prefix = format!("checkpoints-test-{}", std::process::id());
    checkpoints_hold_the_committed_state(|c| {
        c.store = Some(format!("s3://{bucket}/{prefix}"));
        c.s3 = S3Options {
            endpoint: Some(endpoint),
            access_key_id: Some("test".into()),
            secret_access_key: Some("test".into()),
            ..Default::default()
        };
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_be_written_fails_the_checkpoint_clearly() {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().join("store");
    std::fs::create_dir_all(&root).expect("mkdir");
    // A file where the checkpoint directory should be: every write under it fails
    // (as a full disk or a permission error would), whoever runs the test.
    std::fs::write(root.join("checkpoints"), b"in the way").expect("write");
    let store = StoreConfig::local(&root);
    let server = TestServer::start_with(|c| {
        c.store = Some(store.url.clone());
        c.checkpoint_intervals = 2;
        c.checkpoint_every = None;
    })
    .await
    .expect("server");
    let engine = server.engine.clone().expect("engine");
    batches(&engine, SETUP).await;
    batches(&engine, "ADVANCE 2").await;
    let done = checkpoints(&engine, 1).await;
    let (interval, status, error) = &done[0];
    assert_eq!((interval.as_str(), status.as_str()), ("1", "failed"));
    assert!(
        error.contains("checkpoints/") && error.contains(&store.url),
        "the error names what could not be written: {error}"
    );
    // Nothing was committed, and the stream goes on.
    let data = DataDir::open(&store).expect("store");
    assert!(Manifest::list(&data).await.expect("list").is_empty());
    batches(&engine, "ADVANCE 1").await;
    let n = lines(&batches(&engine, "SELECT sum(n) FROM totals").await);
    assert!(n.iter().any(|l| l.contains("1500")), "{n:?}");
    server.stop().await;
}
