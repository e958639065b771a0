//! Ad-hoc reads see exactly one completed interval: two views of the same source,
//! read in one query while intervals commit concurrently, always agree.

use dstream_sql_tests::{TestServer, simple_rows};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_never_see_half_an_interval() {
    let server = TestServer::start().await.expect("server");
    let writer = server.client().await.expect("connect");
    let reader = server.client().await.expect("connect");
    writer
        .batch_execute(
            "CREATE SOURCE s (k BIGINT) WITH (connector = 'generator', rows_per_second = 500, key_cardinality = 50);
             CREATE MATERIALIZED VIEW total AS SELECT count(*) AS n FROM s;
             CREATE MATERIALIZED VIEW per_key AS SELECT k, count(*) AS n FROM s GROUP BY k;",
        )
        .await
        .expect("setup");
    #[allow(clippy::disallowed_methods)] // awaited below
    let advancing = tokio::spawn(async move {
        for _ in 0..20 {
            writer.batch_execute("ADVANCE 1").await.expect("advance");
        }
    });
    let mut reads = 0;
    let mut distinct_totals = std::collections::BTreeSet::new();
    while !advancing.is_finished() || reads < 5 {
        let row = simple_rows(
            &reader,
            "SELECT (SELECT coalesce(sum(n), 0) FROM per_key) AS by_key, \
                    (SELECT coalesce(max(n), 0) FROM total) AS total, \
                    (SELECT count(*) FROM s) AS raw",
        )
        .await
        .expect("read");
        assert_eq!(
            row[0][0], row[0][1],
            "views from different intervals: {row:?}"
        );
        assert_eq!(
            row[0][1], row[0][2],
            "view and raw rows from different intervals: {row:?}"
        );
        distinct_totals.insert(row[0][1].parse::<u64>().expect("count"));
        reads += 1;
    }
    advancing.await.expect("advance task");
    assert!(
        distinct_totals.len() >= 2,
        "reads should have overlapped several commits, saw totals {distinct_totals:?}"
    );
    server.stop().await;
}
