//! Records pushed over HTTP (`POST /v1/sources/{name}`, `connector = 'http'`) against
//! a real server: JSON, CSV and Arrow bodies end up in the view as the batch query
//! over the pushed rows says; bad bodies get a 4xx and nothing of them is taken; a
//! source over its bound answers 429 with `Retry-After`; and with worker processes
//! killed (`kill -9`) while bodies arrive and intervals run, every row accepted with
//! 200 is counted once.

use std::sync::Arc;
use std::time::Duration;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use dstream_server::config::WorkerMode;
use dstream_sql_tests::openapi::{check, response_schema};
use dstream_sql_tests::{TestServer, dstream_binary};
use serde_json::{Value, json};

async fn sql(server: &TestServer, sql: &str) -> Value {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/sql", server.http_url()))
        .body(sql.to_string())
        .send()
        .await
        .expect("an answer");
    let status = answer.status();
    let body: Value = answer.json().await.expect("JSON");
    assert!(status.is_success(), "{sql}: {body}");
    body
}

/// The rows of the last statement of `query`.
async fn rows(server: &TestServer, query: &str) -> Value {
    let mut answer = sql(server, query).await;
    answer["results"][0]["rows"].take()
}

/// `POST /v1/sources/{source}` of `body` as `content_type`: its status, headers and
/// JSON answer.
async fn push(
    server: &TestServer,
    source: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/sources/{source}", server.http_url()))
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("an answer");
    let status = answer.status().as_u16();
    let headers = answer.headers().clone();
    (status, headers, answer.json().await.expect("JSON"))
}

fn arrow_body(batch: &RecordBatch) -> Vec<u8> {
    let mut out = Vec::new();
    let mut writer =
        arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema()).expect("writer");
    writer.write(batch).expect("write");
    writer.finish().expect("finish");
    drop(writer);
    out
}

#[tokio::test]
async fn pushed_records_reach_the_view_in_every_format() {
    let server = TestServer::start().await.expect("start the server");
    sql(
        &server,
        "CREATE SOURCE orders (id BIGINT NOT NULL, name TEXT, amount DOUBLE) WITH (connector = 'http');
         CREATE MATERIALIZED VIEW totals AS
           SELECT name, count(*) AS n, sum(amount) AS total FROM orders GROUP BY name",
    )
    .await;
    let doc: Value = reqwest::get(format!("{}/v1/openapi.json", server.http_url()))
        .await
        .expect("document")
        .json()
        .await
        .expect("JSON");
    let answer_schema = response_schema(&doc, "post", "/v1/sources/{name}", 200);

    let (status, _, answer) = push(
        &server,
        "orders",
        "application/x-ndjson",
        "{\"id\": 1, \"name\": \"ann\", \"amount\": 2.5}\n{\"id\": 2, \"name\": \"bob\", \"amount\": 1}\n",
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    check(&doc, answer_schema, &answer, "ndjson");
    assert_eq!(
        (&answer["accepted"], &answer["malformed"]),
        (&json!(2), &json!(0))
    );
    let (status, _, answer) = push(&server, "orders", "text/csv", "3,ann,4\n4,cy,\n").await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");
    // Arrow: columns by name in another order, a type that casts, a nullable one left out.
    let schema = Arc::new(Schema::new(vec![
        Field::new("name", DataType::Utf8, true),
        Field::new("id", DataType::Int32, false),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(StringArray::from(vec!["bob", "dee"])),
            Arc::new(arrow::array::Int32Array::from(vec![5, 6])),
        ],
    )
    .expect("batch");
    let (status, _, answer) = push(
        &server,
        "orders",
        "application/vnd.apache.arrow.stream",
        arrow_body(&batch),
    )
    .await;
    assert_eq!((status, &answer["accepted"]), (200, &json!(2)), "{answer}");
    // A malformed line is skipped and counted (the default, on_error = 'skip').
    let (status, _, answer) = push(
        &server,
        "orders",
        "application/x-ndjson",
        "{\"id\": 7, \"name\": \"ann\", \"amount\": 1}\n{\"id\": oops}\n",
    )
    .await;
    assert_eq!(
        (status, &answer["accepted"], &answer["malformed"]),
        (200, &json!(1), &json!(1)),
        "{answer}"
    );

    sql(&server, "ADVANCE 1").await;
    let view = rows(&server, "SELECT name, n, total FROM totals ORDER BY name").await;
    let batch_query = rows(
        &server,
        "SELECT name, count(*) AS n, sum(amount) AS total FROM orders GROUP BY name ORDER BY name",
    )
    .await;
    assert_eq!(view, batch_query);
    assert_eq!(
        view,
        json!([
            {"name": "ann", "n": 3, "total": 7.5},
            {"name": "bob", "n": 2, "total": 1.0},
            {"name": "cy", "n": 1, "total": null},
            {"name": "dee", "n": 1, "total": null},
        ])
    );
    let status: Value = reqwest::get(format!("{}/v1/sources/orders", server.http_url()))
        .await
        .expect("status")
        .json()
        .await
        .expect("JSON");
    assert_eq!(
        (
            &status["connector"],
            &status["records"],
            &status["malformed"]
        ),
        (&json!("http"), &json!(7), &json!(1)),
        "{status}"
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_whole_and_the_source_goes_on() {
    let server = TestServer::start().await.expect("start the server");
    sql(
        &server,
        "CREATE SOURCE strict (id BIGINT NOT NULL, name TEXT) WITH (connector = 'http', on_error = 'fail');
         CREATE SOURCE gen (id BIGINT) WITH (connector = 'generator', rows_per_second = 10);
         CREATE MATERIALIZED VIEW ids AS SELECT count(*) AS n, sum(id) AS s FROM strict",
    )
    .await;
    let cases: [(&str, &str, Vec<u8>, u16, &str); 6] = [
        (
            "strict",
            "application/x-ndjson",
            b"{\"id\": 1}\n{\"id\": \"x\" \n".to_vec(),
            400,
            "malformed_records",
        ),
        (
            "strict",
            "application/vnd.apache.arrow.stream",
            b"not an arrow stream".to_vec(),
            400,
            "malformed_records",
        ),
        (
            "strict",
            "image/png",
            b"{}".to_vec(),
            415,
            "unsupported_media_type",
        ),
        (
            "nowhere",
            "application/x-ndjson",
            b"{}".to_vec(),
            404,
            "undefined_object",
        ),
        (
            "gen",
            "application/x-ndjson",
            b"{\"id\": 1}".to_vec(),
            409,
            "not_pushable",
        ),
        (
            "strict",
            "application/x-ndjson",
            vec![b' '; 17 << 20],
            413,
            "payload_too_large",
        ),
    ];
    for (source, content_type, body, status, code) in cases {
        let (got, _, answer) = push(&server, source, content_type, body).await;
        assert_eq!(
            (got, answer["error"]["code"].as_str()),
            (status, Some(code)),
            "{source} {content_type}: {answer}"
        );
    }
    // An Arrow stream with a column the source lacks, or without a NOT NULL one.
    for fields in [
        vec![("id", DataType::Int64), ("extra", DataType::Int64)],
        vec![("name", DataType::Utf8)],
    ] {
        let schema = Arc::new(Schema::new(
            fields
                .iter()
                .map(|(n, t)| Field::new(*n, t.clone(), true))
                .collect::<Vec<_>>(),
        ));
        let columns = fields
            .iter()
            .map(|(_, t)| arrow::array::new_null_array(t, 1))
            .collect();
        let batch = RecordBatch::try_new(schema, columns).expect("batch");
        let (got, _, answer) = push(
            &server,
            "strict",
            "application/vnd.apache.arrow.stream",
            arrow_body(&batch),
        )
        .await;
        assert_eq!(
            (got, &answer["error"]["code"]),
            (400, &json!("malformed_records")),
            "{answer}"
        );
    }
    // Nothing of the refused bodies was taken; a good one is.
    let (status, _, _) = push(&server, "strict", "application/x-ndjson", "{\"id\": 5}\n").await;
    assert_eq!(status, 200);
    sql(&server, "ADVANCE 1").await;
    assert_eq!(
        rows(&server, "SELECT n, s FROM ids").await,
        json!([{"n": 1, "s": 5}])
    );
    server.stop().await;
}

#[tokio::test]
async fn a_source_over_its_bound_answers_429_until_the_next_seal() {
    let server = TestServer::start().await.expect("start the server");
    sql(
        &server,
        "CREATE SOURCE p (id BIGINT) WITH (connector = 'http', max_pending_rows = 10);
         CREATE MATERIALIZED VIEW c AS SELECT count(*) AS n FROM p",
    )
    .await;
    let body = |from: i64, n: i64| -> String {
        (from..from + n)
            .map(|i| format!("{{\"id\": {i}}}\n"))
            .collect()
    };
    let (status, _, answer) = push(&server, "p", "application/x-ndjson", body(0, 8)).await;
    assert_eq!((status, &answer["pending_rows"]), (200, &json!(8)));
    // Under the bound, a body is taken even if it goes over.
    let (status, _, answer) = push(&server, "p", "application/x-ndjson", body(8, 8)).await;
    assert_eq!((status, &answer["pending_rows"]), (200, &json!(16)));
    let (status, headers, answer) = push(&server, "p", "application/x-ndjson", body(16, 1)).await;
    assert_eq!(
        (status, &answer["error"]["code"]),
        (429, &json!("source_behind")),
        "{answer}"
    );
    assert_eq!(headers["retry-after"].to_str().ok(), Some("1"));
    // The seal takes what was held; the source takes bodies again.
    sql(&server, "ADVANCE 1").await;
    let (status, _, answer) = push(&server, "p", "application/x-ndjson", body(16, 1)).await;
    assert_eq!(
        (status, &answer["pending_rows"]),
        (200, &json!(1)),
        "{answer}"
    );
    sql(&server, "ADVANCE 1").await;
    assert_eq!(rows(&server, "SELECT n FROM c").await, json!([{"n": 17}]));
    server.stop().await;
}

#[tokio::test]
async fn rows_accepted_survive_workers_killed_while_they_arrive() {
    let server = TestServer::start_with(|c| {
        c.worker_mode = WorkerMode::Process(Some(dstream_binary()));
        c.worker_restarts.enabled = false;
        c.workers = 3;
        c.checkpoint_intervals = 1;
        c.checkpoint_every = None;
    })
    .await
    .expect("server");
    let engine = server.engine.clone().expect("engine");
    let pids = engine.local_worker_pids().await;
    assert_eq!(pids.len(), 3);
    sql(
        &server,
        "CREATE SOURCE p (id BIGINT NOT NULL, k BIGINT) WITH (connector = 'http');
         CREATE MATERIALIZED VIEW by_k AS SELECT k, count(*) AS n, sum(id) AS s FROM p GROUP BY k;
         CREATE MATERIALIZED VIEW ids AS SELECT count(*) AS n, count(DISTINCT id) AS d, sum(id) AS s FROM p",
    )
    .await;
    let kill = |n: usize| {
        let pid = pids[n].to_string();
        let killed = std::process::Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("kill");
        assert!(killed.success(), "kill -9 {pid}");
    };
    // Bodies of 50 rows, pushed one after another; the ids of those accepted.
    let mut next_id = 0i64;
    let mut accepted: Vec<i64> = Vec::new();
    let mut push_some = async |bodies: usize| {
        for _ in 0..bodies {
            let ids: Vec<i64> = (next_id..next_id + 50).collect();
            next_id += 50;
            let body: String = ids
                .iter()
                .map(|i| format!("{{\"id\": {i}, \"k\": {}}}\n", i % 7))
                .collect();
            let (status, _, answer) = push(&server, "p", "application/x-ndjson", body).await;
            match status {
                200 => accepted.extend(ids),
                429 => tokio::time::sleep(Duration::from_millis(50)).await,
                other => panic!("push answered {other}: {answer}"),
            }
        }
    };
    push_some(10).await;
    sql(&server, "ADVANCE 1").await;
    push_some(10).await;
    // A worker killed between intervals, with bodies waiting.
    kill(0);
    sql(&server, "ADVANCE 1").await;
    // A worker killed while an interval seals and runs, with bodies arriving.
    push_some(5).await;
    let advance = async {
        sql(&server, "ADVANCE 2").await;
    };
    let killing = async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        kill(1);
    };
    let pushing = async {
        push_some(10).await;
    };
    tokio::join!(advance, killing, pushing);
    sql(&server, "ADVANCE 2").await;

    let n = accepted.len() as i64;
    let s: i64 = accepted.iter().sum();
    assert!(n >= 1000, "most bodies are taken: {n}");
    assert_eq!(
        rows(&server, "SELECT n, d, s FROM ids").await,
        json!([{"n": n, "d": n, "s": s}]),
        "every row accepted, once"
    );
    // The batch query over the rows accepted (the raw blocks of the first intervals
    // went with both their holders: reading the source itself would fail).
    let by_k = rows(&server, "SELECT k, n, s FROM by_k ORDER BY k").await;
    let mut oracle: std::collections::BTreeMap<i64, (i64, i64)> = Default::default();
    for id in &accepted {
        let entry = oracle.entry(id % 7).or_default();
        entry.0 += 1;
        entry.1 += id;
    }
    let oracle: Vec<Value> = oracle
        .into_iter()
        .map(|(k, (n, s))| json!({"k": k, "n": n, "s": s}))
        .collect();
    assert_eq!(by_k, Value::Array(oracle));
    let recoveries = rows(&server, "SELECT status FROM dstream_recoveries").await;
    let recoveries = recoveries.as_array().expect("rows");
    assert!(
        recoveries.len() >= 2 && recoveries.iter().all(|r| r["status"] == "recovered"),
        "{recoveries:?}"
    );
    server.stop().await;
}
