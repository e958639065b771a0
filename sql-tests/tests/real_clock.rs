//! With the real clock, intervals advance by themselves at the batch interval.

use std::time::{Duration, Instant};

use dstream_server::config::{ClockKind, ServeConfig};
use dstream_sql_tests::{connect, simple_rows};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clock_seals_intervals_on_its_own() {
    let dir = tempfile::tempdir().expect("tempdir");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let config = ServeConfig {
        data_dir: dir.path().join("data"),
        pg_addr: addr,
        clock: ClockKind::Real,
        batch_interval: Duration::from_millis(100),
        ..ServeConfig::default()
    };
    let shutdown = CancellationToken::new();
    #[allow(clippy::disallowed_methods)] // awaited at the end
    let server = tokio::spawn(dstream_server::run(config, listener, shutdown.clone()));
    let client = connect(addr).await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE s (k BIGINT) WITH (connector = 'generator', rows_per_second = 100);
             CREATE MATERIALIZED VIEW c AS SELECT count(*) AS n FROM s;",
        )
        .await
        .expect("setup");
    let err = client
        .batch_execute("ADVANCE 1")
        .await
        .expect_err("manual only");
    assert!(format!("{:?}", err).contains("ADVANCE needs the manual clock"));
    // Wall time is what is under test here: wait (bounded) for several intervals.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: u64 = simple_rows(&client, "SELECT coalesce(max(n), 0) FROM c")
            .await
            .expect("read")[0][0]
            .parse()
            .expect("count");
        if n >= 30 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "only {n} rows after 20 s of 100 ms intervals"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Intervals start on whole multiples of the batch interval.
    let misaligned = simple_rows(
        &client,
        "SELECT count(*) FROM s WHERE CAST(_interval AS BIGINT) % 100000000 <> 0",
    )
    .await
    .expect("read");
    assert_eq!(misaligned, vec![vec!["0"]]);
    shutdown.cancel();
    server.await.expect("join").expect("clean shutdown");
}
