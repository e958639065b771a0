//! The extended query protocol as drivers use it: prepared statements, typed results
//! in binary format, and `$n` parameters.

use dstream_sql_tests::{PgError, TestServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepared_statements_with_parameters_and_typed_results() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE clicks (user_id BIGINT, url TEXT, price DOUBLE, ts TIMESTAMP)
               WITH (connector = 'generator', rows_per_second = 40, key_cardinality = 4, seed = 9);
             CREATE MATERIALIZED VIEW per_url AS
               SELECT url, count(*) AS n, avg(price) AS mean FROM clicks GROUP BY url;
             ADVANCE 2;",
        )
        .await
        .expect("setup");

    let statement = client
        .prepare("SELECT url, n, mean FROM per_url WHERE n >= $1 ORDER BY url")
        .await
        .map_err(PgError::from)
        .expect("prepare");
    assert_eq!(statement.columns().len(), 3);
    let rows = client
        .query(&statement, &[&0i64])
        .await
        .map_err(PgError::from)
        .expect("query");
    assert_eq!(rows.len(), 4);
    let total: i64 = rows.iter().map(|r| r.get::<_, i64>("n")).sum();
    assert_eq!(total, 80);
    let url: &str = rows[0].get("url");
    assert_eq!(url, "k0");
    let mean: f64 = rows[0].get("mean");
    assert!((0.0..1000.0).contains(&mean));

    let rows = client
        .query("SELECT n FROM per_url WHERE url = $1", &[&"k2"])
        .await
        .map_err(PgError::from)
        .expect("text parameter");
    assert_eq!(rows.len(), 1);

    // Statements without rows, and dstream's own statements, work over it too.
    client
        .execute("ADVANCE 1", &[])
        .await
        .map_err(PgError::from)
        .expect("advance");
    let shown = client
        .query("SHOW MATERIALIZED VIEWS", &[])
        .await
        .map_err(PgError::from)
        .expect("show");
    assert_eq!(shown.len(), 1);
    assert_eq!(shown[0].get::<_, &str>("name"), "per_url");
    let ts = client
        .query("SELECT max(ts) AS latest FROM clicks", &[])
        .await
        .map_err(PgError::from)
        .expect("timestamp");
    assert_eq!(ts.len(), 1);

    let err = client
        .query("SELECT nope FROM per_url", &[])
        .await
        .expect_err("unknown column");
    assert_eq!(err.code().map(|c| c.code()), Some("42703"));
    server.stop().await;
}
