//! Differential test: what continuous queries emit equals the same query run as one
//! batch over all the input.
//!
//! A seeded generator produces rows with out-of-order event times (up to 2 s late, with
//! a 3 s watermark slack, so no row is dropped as late). After many intervals each
//! view is read over pgwire and compared with batch SQL that this test runs in its own
//! DataFusion context over the raw rows fetched from the server. The batch queries are
//! written independently of dstream's plans: HOP windows are expanded row by row with
//! UNION ALL, not assembled from panes. Views of several stages (a view on a view,
//! aggregates of aggregates, top-N overall and per window, DISTINCT, UNION ALL) are
//! compared with the nested batch query.

use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch, TimestampNanosecondArray};
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
use arrow::util::display::array_value_to_string;
use datafusion::catalog::MemTable;
use datafusion::prelude::SessionContext;
use dstream_sql_tests::{TestServer, simple_rows};
use tokio_postgres::Client;

const NANOS: i64 = 1_000_000_000;

/// A view, the columns to compare (as SQL over the view), and the batch query that
/// must give the same rows.
struct Case {
    name: &'static str,
    create: &'static str,
    view_select: &'static str,
    oracle: &'static str,
}

fn cases() -> Vec<Case> {
    vec![
        Case {
            name: "running",
            create: "CREATE MATERIALIZED VIEW running AS SELECT k, count(*) AS n, sum(v) AS s, \
                     min(v) AS lo, max(v) AS hi, avg(v) AS a, count(DISTINCT v) AS d \
                     FROM events GROUP BY k",
            view_select: "SELECT CAST(k AS VARCHAR), CAST(n AS VARCHAR), CAST(s AS VARCHAR), \
                          CAST(lo AS VARCHAR), CAST(hi AS VARCHAR), CAST(round(a, 6) AS VARCHAR), \
                          CAST(d AS VARCHAR) FROM running",
            oracle: "SELECT CAST(k AS VARCHAR), CAST(count(*) AS VARCHAR), CAST(sum(v) AS VARCHAR), \
                     CAST(min(v) AS VARCHAR), CAST(max(v) AS VARCHAR), \
                     CAST(round(avg(v), 6) AS VARCHAR), CAST(count(DISTINCT v) AS VARCHAR) \
                     FROM events GROUP BY k",
        },
        Case {
            name: "filtered_having",
            create: "CREATE MATERIALIZED VIEW filtered_having AS SELECT k % 7 AS bucket, \
                     count(*) AS n FROM events WHERE v > 10 GROUP BY k % 7 HAVING count(*) > 20",
            view_select: "SELECT CAST(bucket AS VARCHAR), CAST(n AS VARCHAR) FROM filtered_having",
            oracle: "SELECT CAST(k % 7 AS VARCHAR), CAST(count(*) AS VARCHAR) FROM events \
                     WHERE v > 10 GROUP BY k % 7 HAVING count(*) > 20",
        },
        Case {
            name: "tumble_update",
            create: "CREATE MATERIALIZED VIEW tumble_update AS SELECT window_start, window_end, k, \
                     count(*) AS n, sum(v) AS s FROM TUMBLE(events, ts, INTERVAL '2' SECOND) \
                     GROUP BY window_start, window_end, k",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), \
                          CAST(CAST(window_end AS BIGINT) AS VARCHAR), CAST(k AS VARCHAR), \
                          CAST(n AS VARCHAR), CAST(s AS VARCHAR) FROM tumble_update",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(w + 2000000000 AS VARCHAR), CAST(k AS VARCHAR), \
                     CAST(count(*) AS VARCHAR), CAST(sum(v) AS VARCHAR) \
                     FROM (SELECT *, ts_ns - ts_ns % 2000000000 AS w FROM raw) GROUP BY w, k",
        },
        Case {
            name: "tumble_close",
            create: "CREATE MATERIALIZED VIEW tumble_close AS SELECT window_start, k, count(*) AS n, \
                     max(v) AS hi FROM TUMBLE(events, ts, INTERVAL '2' SECOND) \
                     GROUP BY window_start, k EMIT ON WINDOW CLOSE",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(k AS VARCHAR), \
                          CAST(n AS VARCHAR), CAST(hi AS VARCHAR) FROM tumble_close",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(k AS VARCHAR), CAST(count(*) AS VARCHAR), \
                     CAST(max(v) AS VARCHAR) \
                     FROM (SELECT *, ts_ns - ts_ns % 2000000000 AS w FROM raw) \
                     WHERE w + 2000000000 <= (SELECT wm FROM watermark) GROUP BY w, k",
        },
        Case {
            name: "hop_update",
            create: "CREATE MATERIALIZED VIEW hop_update AS SELECT window_start, window_end, \
                     k % 5 AS b, count(*) AS n, max(v) AS hi, avg(v) AS a \
                     FROM HOP(events, ts, INTERVAL '1' SECOND, INTERVAL '4' SECOND) \
                     GROUP BY window_start, window_end, k % 5",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), \
                          CAST(CAST(window_end AS BIGINT) AS VARCHAR), CAST(b AS VARCHAR), \
                          CAST(n AS VARCHAR), CAST(hi AS VARCHAR), CAST(round(a, 6) AS VARCHAR) \
                          FROM hop_update",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(w + 4000000000 AS VARCHAR), CAST(k % 5 AS VARCHAR), \
                     CAST(count(*) AS VARCHAR), CAST(max(v) AS VARCHAR), \
                     CAST(round(avg(v), 6) AS VARCHAR) FROM hop4 GROUP BY w, k % 5",
        },
        Case {
            name: "hop_close_invertible",
            create: "CREATE MATERIALIZED VIEW hop_close_invertible AS SELECT window_end, k % 3 AS b, \
                     count(*) AS n, sum(v) AS s, avg(v) AS a \
                     FROM HOP(events, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) \
                     GROUP BY window_end, k % 3 EMIT ON WINDOW CLOSE",
            view_select: "SELECT CAST(CAST(window_end AS BIGINT) AS VARCHAR), CAST(b AS VARCHAR), \
                          CAST(n AS VARCHAR), CAST(s AS VARCHAR), CAST(round(a, 6) AS VARCHAR) \
                          FROM hop_close_invertible",
            oracle: "SELECT CAST(w + 3000000000 AS VARCHAR), CAST(k % 3 AS VARCHAR), \
                     CAST(count(*) AS VARCHAR), CAST(sum(v) AS VARCHAR), \
                     CAST(round(avg(v), 6) AS VARCHAR) FROM hop3 \
                     WHERE w + 3000000000 <= (SELECT wm FROM watermark) GROUP BY w, k % 3",
        },
        Case {
            name: "hop_close_minmax",
            create: "CREATE MATERIALIZED VIEW hop_close_minmax AS SELECT window_start, k % 3 AS b, \
                     min(v) AS lo, count(DISTINCT k) AS keys \
                     FROM HOP(events, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) \
                     GROUP BY window_start, k % 3 EMIT ON WINDOW CLOSE",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(b AS VARCHAR), \
                          CAST(lo AS VARCHAR), CAST(keys AS VARCHAR) FROM hop_close_minmax",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(k % 3 AS VARCHAR), CAST(min(v) AS VARCHAR), \
                     CAST(count(DISTINCT k) AS VARCHAR) FROM hop3 \
                     WHERE w + 3000000000 <= (SELECT wm FROM watermark) GROUP BY w, k % 3",
        },
        Case {
            name: "processing_time",
            create: "CREATE MATERIALIZED VIEW processing_time AS SELECT window_start, count(*) AS n, \
                     sum(v) AS s FROM HOP(events, _interval, INTERVAL '1' SECOND, INTERVAL '3' SECOND) \
                     GROUP BY window_start EMIT ON WINDOW CLOSE",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(n AS VARCHAR), \
                          CAST(s AS VARCHAR) FROM processing_time",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(count(*) AS VARCHAR), CAST(sum(v) AS VARCHAR) \
                     FROM hop3_interval WHERE w + 3000000000 <= (SELECT last_end FROM watermark) \
                     GROUP BY w",
        },
        // Views of several stages.
        Case {
            name: "view_on_view",
            create: "CREATE MATERIALIZED VIEW view_on_view AS SELECT n % 5 AS b, count(*) AS c, \
                     max(hi) AS top, min(lo) AS bottom, sum(s) AS total, count(DISTINCT d) AS ds \
                     FROM running GROUP BY n % 5",
            view_select: "SELECT CAST(b AS VARCHAR), CAST(c AS VARCHAR), CAST(top AS VARCHAR), \
                          CAST(bottom AS VARCHAR), CAST(total AS VARCHAR), CAST(ds AS VARCHAR) \
                          FROM view_on_view",
            oracle: "SELECT CAST(n % 5 AS VARCHAR), CAST(count(*) AS VARCHAR), CAST(max(hi) AS VARCHAR), \
                     CAST(min(lo) AS VARCHAR), CAST(sum(s) AS VARCHAR), CAST(count(DISTINCT d) AS VARCHAR) \
                     FROM (SELECT k, count(*) AS n, sum(v) AS s, min(v) AS lo, max(v) AS hi, \
                     count(DISTINCT v) AS d FROM events GROUP BY k) GROUP BY n % 5",
        },
        Case {
            name: "inverted",
            create: "CREATE MATERIALIZED VIEW inverted AS SELECT n % 7 AS b, count(*) AS c, \
                     sum(s) AS t, avg(n) AS a FROM running GROUP BY n % 7",
            view_select: "SELECT CAST(b AS VARCHAR), CAST(c AS VARCHAR), CAST(t AS VARCHAR), \
                          CAST(round(a, 6) AS VARCHAR) FROM inverted",
            oracle: "SELECT CAST(n % 7 AS VARCHAR), CAST(count(*) AS VARCHAR), CAST(sum(s) AS VARCHAR), \
                     CAST(round(avg(n), 6) AS VARCHAR) FROM (SELECT k, count(*) AS n, sum(v) AS s \
                     FROM events GROUP BY k) GROUP BY n % 7",
        },
        Case {
            name: "aggregate_of_aggregates",
            create: "CREATE MATERIALIZED VIEW aggregate_of_aggregates AS SELECT window_start, \
                     max(n) AS top, count(*) AS keys, sum(n) AS total FROM (SELECT window_start, k, \
                     count(*) AS n FROM TUMBLE(events, ts, INTERVAL '2' SECOND) GROUP BY window_start, k) \
                     AS c GROUP BY window_start",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(top AS VARCHAR), \
                          CAST(keys AS VARCHAR), CAST(total AS VARCHAR) FROM aggregate_of_aggregates",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(max(n) AS VARCHAR), CAST(count(*) AS VARCHAR), \
                     CAST(sum(n) AS VARCHAR) FROM (SELECT w, k, count(*) AS n FROM \
                     (SELECT *, ts_ns - ts_ns % 2000000000 AS w FROM raw) GROUP BY w, k) GROUP BY w",
        },
        Case {
            name: "hot_keys",
            create: "CREATE MATERIALIZED VIEW hot_keys AS SELECT window_start, max(n) AS top FROM \
                     (SELECT window_start, k, count(*) AS n \
                     FROM HOP(events, ts, INTERVAL '1' SECOND, INTERVAL '3' SECOND) \
                     GROUP BY window_start, k) AS c GROUP BY window_start EMIT ON WINDOW CLOSE",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(top AS VARCHAR) \
                          FROM hot_keys",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(max(n) AS VARCHAR) FROM (SELECT w, k, count(*) AS n \
                     FROM hop3 WHERE w + 3000000000 <= (SELECT wm FROM watermark) GROUP BY w, k) \
                     GROUP BY w",
        },
        Case {
            name: "top_keys",
            create: "CREATE MATERIALIZED VIEW top_keys AS SELECT k, n FROM (SELECT k, count(*) AS n \
                     FROM events GROUP BY k) AS c ORDER BY n DESC, k LIMIT 5",
            view_select: "SELECT CAST(k AS VARCHAR), CAST(n AS VARCHAR) FROM top_keys",
            oracle: "SELECT CAST(k AS VARCHAR), CAST(n AS VARCHAR) FROM (SELECT k, n FROM \
                     (SELECT k, count(*) AS n FROM events GROUP BY k) ORDER BY n DESC, k LIMIT 5)",
        },
        Case {
            name: "top_per_window",
            create: "CREATE MATERIALIZED VIEW top_per_window AS SELECT window_start, k, n FROM \
                     (SELECT window_start, k, n, ROW_NUMBER() OVER (PARTITION BY window_start \
                     ORDER BY n DESC, k) AS rank FROM (SELECT window_start, k, count(*) AS n \
                     FROM TUMBLE(events, ts, INTERVAL '2' SECOND) GROUP BY window_start, k) AS c) \
                     AS ranked WHERE rank <= 3",
            view_select: "SELECT CAST(CAST(window_start AS BIGINT) AS VARCHAR), CAST(k AS VARCHAR), \
                          CAST(n AS VARCHAR) FROM top_per_window",
            oracle: "SELECT CAST(w AS VARCHAR), CAST(k AS VARCHAR), CAST(n AS VARCHAR) FROM \
                     (SELECT w, k, n, ROW_NUMBER() OVER (PARTITION BY w ORDER BY n DESC, k) AS rank \
                     FROM (SELECT w, k, count(*) AS n FROM \
                     (SELECT *, ts_ns - ts_ns % 2000000000 AS w FROM raw) GROUP BY w, k)) \
                     WHERE rank <= 3",
        },
        // Over a source, which only inserts: the top-N keeps its first rows only.
        Case {
            name: "top_events",
            create: "CREATE MATERIALIZED VIEW top_events AS SELECT k, v, ts FROM events \
                     ORDER BY v DESC, ts, k LIMIT 7 OFFSET 2",
            view_select: "SELECT CAST(k AS VARCHAR), CAST(v AS VARCHAR), \
                          CAST(CAST(ts AS BIGINT) AS VARCHAR) FROM top_events",
            oracle: "SELECT CAST(k AS VARCHAR), CAST(v AS VARCHAR), \
                     CAST(CAST(ts AS BIGINT) AS VARCHAR) FROM (SELECT k, v, ts FROM events \
                     ORDER BY v DESC, ts, k LIMIT 7 OFFSET 2)",
        },
        // The same per key, with ROW_NUMBER: each key keeps its first rows only.
        Case {
            name: "top_per_key",
            create: "CREATE MATERIALIZED VIEW top_per_key AS SELECT k, v, ts FROM (SELECT k, v, ts, \
                     ROW_NUMBER() OVER (PARTITION BY k % 5 ORDER BY v DESC, ts, k) AS r \
                     FROM events) AS x WHERE r <= 3",
            view_select: "SELECT CAST(k AS VARCHAR), CAST(v AS VARCHAR), \
                          CAST(CAST(ts AS BIGINT) AS VARCHAR) FROM top_per_key",
            oracle: "SELECT CAST(k AS VARCHAR), CAST(v AS VARCHAR), \
                     CAST(CAST(ts AS BIGINT) AS VARCHAR) FROM (SELECT k, v, ts, ROW_NUMBER() OVER \
                     (PARTITION BY k % 5 ORDER BY v DESC, ts, k) AS r FROM events) WHERE r <= 3",
        },
        Case {
            name: "distinct_pairs",
            create: "CREATE MATERIALIZED VIEW distinct_pairs AS SELECT DISTINCT k % 11 AS b, v % 3 AS m \
                     FROM events WHERE v > 50",
            view_select: "SELECT CAST(b AS VARCHAR), CAST(m AS VARCHAR) FROM distinct_pairs",
            oracle: "SELECT DISTINCT CAST(k % 11 AS VARCHAR), CAST(v % 3 AS VARCHAR) FROM events \
                     WHERE v > 50",
        },
        Case {
            name: "distinct_of_changes",
            create: "CREATE MATERIALIZED VIEW distinct_of_changes AS SELECT DISTINCT n / 10 AS tens \
                     FROM running",
            view_select: "SELECT CAST(tens AS VARCHAR) FROM distinct_of_changes",
            oracle: "SELECT DISTINCT CAST(n / 10 AS VARCHAR) FROM (SELECT k, count(*) AS n FROM events \
                     GROUP BY k)",
        },
        Case {
            name: "union_all",
            create: "CREATE MATERIALIZED VIEW union_all AS SELECT k % 4 AS b, count(*) AS n, sum(v) AS s \
                     FROM (SELECT k, v FROM events WHERE v < 20 UNION ALL \
                     SELECT k, v + 1000 FROM events WHERE v > 80) AS u GROUP BY k % 4",
            view_select: "SELECT CAST(b AS VARCHAR), CAST(n AS VARCHAR), CAST(s AS VARCHAR) FROM union_all",
            oracle: "SELECT CAST(k % 4 AS VARCHAR), CAST(count(*) AS VARCHAR), CAST(sum(v) AS VARCHAR) \
                     FROM (SELECT k, v FROM events WHERE v < 20 UNION ALL \
                     SELECT k, v + 1000 FROM events WHERE v > 80) GROUP BY k % 4",
        },
    ]
}

/// Loads the server's raw rows into a local DataFusion context, with helper views for
/// window expansion and the final watermark.
async fn oracle_context(client: &Client, watermark_slack: i64, width: i64) -> SessionContext {
    let rows = simple_rows(
        client,
        "SELECT k, v, CAST(ts AS BIGINT), CAST(_interval AS BIGINT) FROM events",
    )
    .await
    .expect("fetch raw rows");
    assert!(
        rows.len() > 1000,
        "expected plenty of input, got {}",
        rows.len()
    );
    let col = |i: usize| -> Vec<i64> {
        rows.iter()
            .map(|r| r[i].parse::<i64>().expect("integer column"))
            .collect()
    };
    let schema = Arc::new(Schema::new(vec![
        Field::new("k", DataType::Int64, false),
        Field::new("v", DataType::Int64, false),
        Field::new("ts", DataType::Timestamp(TimeUnit::Nanosecond, None), false),
        Field::new("ts_ns", DataType::Int64, false),
        Field::new("iv_ns", DataType::Int64, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(col(0))),
            Arc::new(Int64Array::from(col(1))),
            Arc::new(TimestampNanosecondArray::from(col(2))),
            Arc::new(Int64Array::from(col(2))),
            Arc::new(Int64Array::from(col(3))),
        ],
    )
    .expect("batch");
    let ctx = SessionContext::new();
    let table = MemTable::try_new(schema, vec![vec![batch]]).expect("memtable");
    ctx.register_table("raw", Arc::new(table))
        .expect("register");
    let setup = [
        "CREATE VIEW events AS SELECT k, v, ts FROM raw".to_string(),
        // The watermark after the last interval, and the end of the last interval.
        format!(
            "CREATE VIEW watermark AS SELECT max(ts_ns) - {watermark_slack} AS wm, \
             max(iv_ns) + {width} AS last_end FROM raw"
        ),
        // Every row in each of the HOP windows that contain it.
        hop_expansion("hop4", "ts_ns", 4),
        hop_expansion("hop3", "ts_ns", 3),
        hop_expansion("hop3_interval", "iv_ns", 3),
    ];
    for sql in setup {
        ctx.sql(&sql).await.expect("oracle setup");
    }
    ctx
}

/// `CREATE VIEW name` with one row per (row, window) for 1 s slides of `panes` seconds.
fn hop_expansion(name: &str, time: &str, panes: i64) -> String {
    let branches: Vec<String> = (0..panes)
        .map(|i| {
            format!(
                "SELECT k, v, {time} - {time} % {NANOS} - {} AS w FROM raw",
                i * NANOS
            )
        })
        .collect();
    format!("CREATE VIEW {name} AS {}", branches.join(" UNION ALL "))
}

async fn oracle_rows(ctx: &SessionContext, sql: &str) -> Vec<Vec<String>> {
    let batches = ctx
        .sql(sql)
        .await
        .unwrap_or_else(|e| panic!("oracle query {sql}: {e}"))
        .collect()
        .await
        .expect("oracle rows");
    let mut rows = Vec::new();
    for batch in batches {
        for r in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| {
                        if c.is_null(r) {
                            "NULL".to_string()
                        } else {
                            array_value_to_string(c, r).expect("display")
                        }
                    })
                    .collect(),
            );
        }
    }
    rows.sort();
    rows
}

async fn compare_all(client: &Client, after: u64) {
    let ctx = oracle_context(client, 3 * NANOS, NANOS).await;
    for case in cases() {
        let mut actual = simple_rows(client, case.view_select)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
        actual.sort();
        let expected = oracle_rows(&ctx, case.oracle).await;
        assert!(
            !expected.is_empty(),
            "{}: the oracle has no rows after {after} intervals; the test proves nothing",
            case.name
        );
        if actual != expected {
            let missing: Vec<_> = expected
                .iter()
                .filter(|r| !actual.contains(r))
                .take(5)
                .collect();
            let extra: Vec<_> = actual
                .iter()
                .filter(|r| !expected.contains(r))
                .take(5)
                .collect();
            panic!(
                "{} differs from batch SQL after {after} intervals: {} rows vs {} expected\n\
                 missing (first 5): {missing:?}\nunexpected (first 5): {extra:?}",
                case.name,
                actual.len(),
                expected.len()
            );
        }
        println!(
            "{:>22}: {} rows equal after {after} intervals",
            case.name,
            actual.len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuous_results_equal_batch_results() {
    let server = TestServer::start().await.expect("start server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE events (k BIGINT, v BIGINT, ts TIMESTAMP, \
               WATERMARK FOR ts AS ts - INTERVAL '3' SECOND) \
             WITH (connector = 'generator', rows_per_second = 300, key_cardinality = 40, \
                   seed = 42, fields.v.cardinality = 100, max_out_of_orderness = '2s')",
        )
        .await
        .expect("create source");
    for case in cases() {
        client
            .batch_execute(case.create)
            .await
            .unwrap_or_else(|e| panic!("{}: {e}", case.name));
    }
    let mut done = 0;
    for step in [1u64, 4, 7, 13] {
        client
            .batch_execute(&format!("ADVANCE {step}"))
            .await
            .expect("advance");
        done += step;
        if done >= 12 {
            compare_all(&client, done).await;
        }
    }
    let late = simple_rows(&client, "SHOW SOURCES")
        .await
        .expect("show sources");
    assert_eq!(late[0][4], "0", "no row may be late in this test: {late:?}");
    server.stop().await;
}
