//! Connectors end to end over pgwire: `file` (JSON, CSV, Parquet), `tcp` and
//! `nexmark`, with malformed records skipped and counted, or failing the source.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use dstream_sql_tests::{PgError, TestServer, simple_rows};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio_postgres::Client;

async fn rows(client: &Client, sql: &str) -> Vec<Vec<String>> {
    simple_rows(client, sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// SHOW SOURCES as (records, malformed, status) of one source.
async fn source_stats(client: &Client, name: &str) -> (String, String, String) {
    let all = rows(client, "SHOW SOURCES").await;
    let row = all
        .into_iter()
        .find(|r| r[0] == name)
        .unwrap_or_else(|| panic!("no source {name}"));
    (row[2].clone(), row[3].clone(), row[6].clone())
}

/// Moves a file into `dir` atomically, as the file connector expects.
fn drop_file(dir: &std::path::Path, name: &str, contents: &[u8]) {
    let staging = dir.join(format!(".{name}.tmp"));
    std::fs::write(&staging, contents).expect("write");
    std::fs::rename(&staging, dir.join(name)).expect("rename");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sources_read_new_files_and_skip_malformed_records() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    let dir = tempfile::tempdir().expect("tempdir");
    let (json, csv, parquet) = (
        dir.path().join("json"),
        dir.path().join("csv"),
        dir.path().join("parquet"),
    );
    for d in [&json, &csv, &parquet] {
        std::fs::create_dir(d).expect("mkdir");
    }
    client
        .batch_execute(&format!(
            "CREATE SOURCE j (k TEXT, n BIGINT) WITH (connector = 'file', path = '{}', format = 'json');
             CREATE SOURCE c (k TEXT, n BIGINT) WITH (connector = 'file', path = '{}', format = 'csv');
             CREATE SOURCE p (k TEXT, n BIGINT) WITH (connector = 'file', path = '{}', format = 'parquet');
             CREATE MATERIALIZED VIEW jt AS SELECT k, sum(n) AS total FROM j GROUP BY k;
             CREATE MATERIALIZED VIEW ct AS SELECT k, sum(n) AS total FROM c GROUP BY k;
             CREATE MATERIALIZED VIEW pt AS SELECT k, sum(n) AS total FROM p GROUP BY k;",
            json.display(),
            csv.display(),
            parquet.display()
        ))
        .await
        .map_err(PgError::from)
        .expect("create");

    drop_file(
        &json,
        "a.json",
        b"{\"k\": \"x\", \"n\": 1}\n{\"k\": \"y\", \"n\": 2}\nnot json at all\n",
    );
    drop_file(&csv, "a.csv", b"k,n\nx,10\ny,twenty\ny,20\n");
    let schema = Arc::new(Schema::new(vec![
        Field::new("n", DataType::Int64, false),
        Field::new("k", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(Int64Array::from(vec![100, 200, 300])),
            Arc::new(StringArray::from(vec!["x", "y", "x"])),
        ],
    )
    .expect("batch");
    let mut buf = Vec::new();
    let mut writer = parquet::arrow::ArrowWriter::try_new(&mut buf, schema, None).expect("writer");
    writer.write(&batch).expect("write");
    writer.close().expect("close");
    drop_file(&parquet, "a.parquet", &buf);
    drop_file(&parquet, "broken.parquet", b"this is not parquet");

    client.batch_execute("ADVANCE 1").await.expect("advance");
    // A second file in a later interval is read once, and old files are not re-read.
    drop_file(&json, "b.json", b"{\"k\": \"x\", \"n\": 5}\n");
    client.batch_execute("ADVANCE 2").await.expect("advance");

    assert_eq!(
        rows(&client, "SELECT * FROM jt ORDER BY k").await,
        vec![vec!["x", "6"], vec!["y", "2"]]
    );
    assert_eq!(
        rows(&client, "SELECT * FROM ct ORDER BY k").await,
        vec![vec!["x", "10"], vec!["y", "20"]]
    );
    assert_eq!(
        rows(&client, "SELECT * FROM pt ORDER BY k").await,
        vec![vec!["x", "400"], vec!["y", "200"]]
    );
    assert_eq!(
        source_stats(&client, "j").await,
        ("3".into(), "1".into(), "running".into())
    );
    assert_eq!(
        source_stats(&client, "c").await,
        ("2".into(), "1".into(), "running".into())
    );
    assert_eq!(
        source_stats(&client, "p").await,
        ("3".into(), "1".into(), "running".into())
    );

    // Under on_error = 'fail' a malformed record stops the source; what was committed
    // before stays.
    let strict = dir.path().join("strict");
    std::fs::create_dir(&strict).expect("mkdir");
    client
        .batch_execute(&format!(
            "CREATE SOURCE s (k TEXT, n BIGINT) WITH (connector = 'file', path = '{}', format = 'json', on_error = 'fail');
             CREATE MATERIALIZED VIEW st AS SELECT count(*) AS n FROM s;",
            strict.display()
        ))
        .await
        .expect("create strict");
    drop_file(&strict, "1.json", b"{\"k\": \"a\", \"n\": 1}\n");
    client.batch_execute("ADVANCE 1").await.expect("advance");
    drop_file(&strict, "2.json", b"{\"k\": \"a\", \"n\": oops}\n");
    client.batch_execute("ADVANCE 1").await.expect("advance");
    let (_, _, status) = source_stats(&client, "s").await;
    assert!(
        status.starts_with("failed: source \"s\" failed"),
        "{status}"
    );
    assert!(status.contains("2.json"), "{status}");
    assert_eq!(rows(&client, "SELECT n FROM st").await, vec![vec!["1"]]);
    // The server keeps serving.
    client.batch_execute("ADVANCE 1").await.expect("advance");
    assert_eq!(rows(&client, "SELECT * FROM jt ORDER BY k").await.len(), 2);

    let err = client
        .batch_execute(
            "CREATE SOURCE bad (k TEXT) WITH (connector = 'file', path = '/no/such/dir')",
        )
        .await
        .expect_err("missing directory");
    let err = PgError::from(err).to_string();
    assert!(err.contains("is not a directory"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_source_reads_lines_from_a_socket() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    let feed = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = feed.local_addr().expect("addr").port();
    client
        .batch_execute(&format!(
            "CREATE SOURCE lines (word TEXT, n BIGINT) WITH (connector = 'tcp', port = {port}, format = 'csv');
             CREATE MATERIALIZED VIEW words AS SELECT word, sum(n) AS total, count(*) AS c FROM lines GROUP BY word;"
        ))
        .await
        .map_err(PgError::from)
        .expect("create");
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(10), feed.accept())
        .await
        .expect("the receiver connects")
        .expect("accept");
    socket
        .write_all(b"apple,1\npear,2\nbroken line with no comma\napple,3\nplum,x\n")
        .await
        .expect("write");
    socket.flush().await.expect("flush");
    // The lines cross a real socket: seal intervals until they have arrived (bounded).
    let mut seen = 0;
    for _ in 0..100 {
        client.batch_execute("ADVANCE 1").await.expect("advance");
        let (records, malformed, _) = source_stats(&client, "lines").await;
        seen = records.parse::<u64>().unwrap_or(0) + malformed.parse::<u64>().unwrap_or(0);
        if seen >= 5 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, 5, "all five lines arrive");
    assert_eq!(
        rows(&client, "SELECT * FROM words ORDER BY word").await,
        vec![vec!["apple", "4", "2"], vec!["pear", "2", "1"]]
    );
    assert_eq!(
        source_stats(&client, "lines").await,
        ("3".into(), "2".into(), "running".into())
    );

    let err = client
        .batch_execute("CREATE SOURCE nope (a TEXT) WITH (connector = 'tcp')")
        .await
        .expect_err("port is required");
    let err = PgError::from(err).to_string();
    assert!(err.contains("needs WITH (port"), "{err}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nexmark_bids_aggregate_like_the_batch_query() {
    let server = TestServer::start().await.expect("server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE SOURCE bid (auction BIGINT, bidder BIGINT, price BIGINT, channel TEXT, date_time TIMESTAMP,
                WATERMARK FOR date_time AS date_time - INTERVAL '1' SECOND)
               WITH (connector = 'nexmark', nexmark.table = 'bid', nexmark.event_rate = 500);
             CREATE SOURCE auction (id BIGINT, seller BIGINT, category BIGINT, date_time TIMESTAMP)
               WITH (connector = 'nexmark', nexmark.table = 'auction', nexmark.event_rate = 500);
             CREATE MATERIALIZED VIEW q5ish AS
               SELECT window_start, auction, count(*) AS bids, max(price) AS top
               FROM TUMBLE(bid, date_time, INTERVAL '2' SECOND)
               GROUP BY window_start, auction EMIT ON WINDOW CLOSE;
             CREATE MATERIALIZED VIEW per_category AS SELECT category, count(*) AS n FROM auction GROUP BY category;
             ADVANCE 6;",
        )
        .await
        .expect("nexmark");
    let view = rows(
        &client,
        "SELECT CAST(window_start AS VARCHAR), auction, bids, top FROM q5ish ORDER BY 1, 2",
    )
    .await;
    let batch = rows(
        &client,
        "SELECT CAST(w AS VARCHAR), auction, count(*), max(price)
         FROM (SELECT date_bin(INTERVAL '2 seconds', date_time) AS w, auction, price FROM bid)
         WHERE w + INTERVAL '2 seconds' <= (SELECT max(date_time) - INTERVAL '1 second' FROM bid)
         GROUP BY w, auction ORDER BY 1, 2",
    )
    .await;
    assert!(!view.is_empty());
    assert_eq!(view, batch);
    // 500 events per second, 46 of 50 of them bids, 3 of 50 auctions.
    let counts = rows(
        &client,
        "SELECT (SELECT count(*) FROM bid) AS b, (SELECT count(*) FROM auction) AS a",
    )
    .await;
    assert_eq!(counts, vec![vec!["2760", "180"]]);
    let categories = rows(&client, "SELECT sum(n) FROM per_category").await;
    assert_eq!(categories, vec![vec!["180"]]);

    let err = client
        .batch_execute("CREATE SOURCE p (nickname TEXT) WITH (connector = 'nexmark', nexmark.table = 'person')")
        .await
        .expect_err("unknown column");
    let err = PgError::from(err).to_string();
    assert!(err.contains("have no column nickname"), "{err}");
    server.stop().await;
}
