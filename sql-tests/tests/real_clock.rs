//! With the real clock, intervals advance by themselves at the batch interval.

use std::time::{Duration, Instant};

use dstream_server::config::ClockKind;
use dstream_sql_tests::{TestServer, simple_rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_clock_seals_intervals_on_its_own() {
    let server = TestServer::start_with(|config| {
        config.clock = ClockKind::Real;
        config.batch_interval = Duration::from_millis(100);
    })
    .await
    .expect("server");
    let client = server.client().await.expect("connect");
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
    server.stop().await;
}
