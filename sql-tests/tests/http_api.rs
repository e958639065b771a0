//! The HTTP API against a real server, with a real HTTP client (reqwest) and curl as
//! the README shows it: statements in, results as JSON, CSV and Arrow IPC, errors as
//! JSON with their SQLSTATE, and every answer checked against the OpenAPI document the
//! server serves.

use arrow::array::{Array, Int64Array};
use dstream_sql_tests::TestServer;
use dstream_sql_tests::openapi::{check, schema};
use serde_json::{Value, json};
use tokio::process::Command;

/// A server with a table of three rows and a view over a generator that has run.
async fn server() -> TestServer {
    let server = TestServer::start().await.expect("start the server");
    let client = server.client().await.expect("connect");
    client
        .batch_execute(
            "CREATE TABLE t (id BIGINT, name TEXT); \
             INSERT INTO t VALUES (1, 'one'), (2, 'two'), (3, NULL)",
        )
        .await
        .expect("set up");
    server
}

async fn post(
    server: &TestServer,
    content_type: &str,
    accept: &str,
    body: impl Into<reqwest::Body>,
) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{}/v1/sql", server.http_url()))
        .header("content-type", content_type)
        .header("accept", accept)
        .body(body)
        .send()
        .await
        .expect("an answer")
}

/// The OpenAPI document `server` serves.
async fn openapi_document(server: &TestServer) -> Value {
    reqwest::get(format!("{}/v1/openapi.json", server.http_url()))
        .await
        .expect("the document")
        .json()
        .await
        .expect("JSON")
}

#[tokio::test]
async fn statements_answer_as_json_csv_and_arrow_and_match_the_openapi_document() {
    let server = server().await;
    let doc = openapi_document(&server).await;
    assert!(doc["paths"]["/v1/sql"]["post"].is_object(), "{doc}");

    // JSON: one outcome per statement, as the document describes them.
    let answer = post(
        &server,
        "text/plain",
        "application/json",
        "INSERT INTO t VALUES (4, 'four'); SELECT id, name FROM t ORDER BY id",
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "application/json");
    let body: Value = answer.json().await.expect("JSON");
    check(&doc, schema(&doc, "SqlResponse"), &body, "SqlResponse");
    assert_eq!(
        body,
        json!({"results": [
            {"kind": "command", "tag": "INSERT", "affected": 1},
            {"kind": "rows",
             "columns": [{"name": "id", "type": "BIGINT", "nullable": true},
                         {"name": "name", "type": "TEXT", "nullable": true}],
             "rows": [{"id": 1, "name": "one"}, {"id": 2, "name": "two"},
                      {"id": 3, "name": null}, {"id": 4, "name": "four"}]}
        ]})
    );

    // The same as a JSON request, with no rows.
    let answer = post(
        &server,
        "application/json",
        "*/*",
        json!({"sql": "SELECT id FROM t WHERE id > 100"}).to_string(),
    )
    .await;
    let body: Value = answer.json().await.expect("JSON");
    check(&doc, schema(&doc, "SqlResponse"), &body, "SqlResponse");
    assert_eq!(body["results"][0]["rows"], json!([]));

    // CSV: the last statement's rows, with a header.
    let answer = post(
        &server,
        "text/plain",
        "text/csv",
        "SELECT id, name FROM t ORDER BY id",
    )
    .await;
    assert_eq!(answer.status(), 200);
    assert_eq!(answer.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(
        answer.text().await.expect("text"),
        "id,name\n1,one\n2,two\n3,\n4,four\n"
    );

    // Arrow IPC: the same rows, as Arrow.
    let answer = post(
        &server,
        "text/plain",
        "application/vnd.apache.arrow.stream",
        "SELECT id FROM t ORDER BY id",
    )
    .await;
    assert_eq!(answer.status(), 200);
    let bytes = answer.bytes().await.expect("bytes");
    let batches: Vec<_> =
        arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .expect("an Arrow stream")
            .collect::<Result<_, _>>()
            .expect("batches");
    let ids: Vec<i64> = batches
        .iter()
        .flat_map(|b| {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<Int64Array>()
                .expect("BIGINT");
            (0..ids.len()).map(|i| ids.value(i)).collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, vec![1, 2, 3, 4]);
    server.stop().await;
}

/// A request that fails: content type, `Accept`, body, and the status, code and
/// SQLSTATE of its answer.
type BadRequest = (
    &'static str,
    &'static str,
    String,
    u16,
    &'static str,
    Option<&'static str>,
);

#[tokio::test]
async fn bad_requests_get_json_errors_with_their_sqlstate_and_status() {
    let server = server().await;
    let doc = openapi_document(&server).await;
    let cases: Vec<BadRequest> = vec![
        (
            "text/plain",
            "application/json",
            "SELEC 1".into(),
            400,
            "syntax_error",
            Some("42601"),
        ),
        (
            "text/plain",
            "application/json",
            "SELECT * FROM nowhere".into(),
            404,
            "undefined_object",
            Some("42P01"),
        ),
        (
            "text/plain",
            "application/json",
            "CREATE TABLE t (a BIGINT)".into(),
            409,
            "duplicate_object",
            Some("42P07"),
        ),
        (
            "text/plain",
            "text/html",
            "SELECT 1".into(),
            406,
            "not_acceptable",
            None,
        ),
        (
            "text/plain",
            "text/csv",
            "INSERT INTO t VALUES (9, 'nine')".into(),
            406,
            "not_acceptable",
            None,
        ),
        (
            "image/png",
            "application/json",
            "SELECT 1".into(),
            415,
            "unsupported_media_type",
            None,
        ),
        (
            "application/json",
            "application/json",
            "{\"query\": 1}".into(),
            400,
            "bad_request",
            None,
        ),
        (
            "text/plain",
            "application/json",
            "x".repeat(17 << 20),
            413,
            "payload_too_large",
            None,
        ),
    ];
    for (content_type, accept, body, status, code, sqlstate) in cases {
        let what = format!("{content_type} / {accept} / {:.40}", body);
        let answer = post(&server, content_type, accept, body).await;
        assert_eq!(answer.status().as_u16(), status, "{what}");
        let error: Value = answer.json().await.expect("a JSON error");
        check(&doc, schema(&doc, "ApiError"), &error, "ApiError");
        assert_eq!(error["error"]["code"], code, "{what}: {error}");
        assert_eq!(error["error"]["status"], status, "{what}");
        assert_eq!(
            error["error"]["sqlstate"].as_str(),
            sqlstate,
            "{what}: {error}"
        );
    }
    // An unknown path, and the server still answers afterwards.
    let answer = reqwest::get(format!("{}/v2/nothing", server.http_url()))
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 404);
    let answer = post(
        &server,
        "text/plain",
        "text/csv",
        "SELECT count(*) AS n FROM t",
    )
    .await;
    assert_eq!(answer.text().await.expect("text"), "n\n4\n");
    server.stop().await;
}

#[tokio::test]
async fn curl_runs_the_readme_examples() {
    let server = server().await;
    let url = format!("{}/v1/sql", server.http_url());
    // Not blocking: the server answers on this test's runtime.
    let curl = async |args: &[&str]| -> String {
        let out = Command::new("curl")
            .args(["-sS", "--fail-with-body", "--max-time", "30"])
            .args(args)
            .output()
            .await
            .expect("run curl (scripts/test.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "curl {args:?}: {text} {}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    // As the README shows them.
    let json = curl(&[&url, "-d", "SELECT id, name FROM t ORDER BY id LIMIT 2"]).await;
    let body: Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(
        body["results"][0]["rows"],
        json!([{"id": 1, "name": "one"}, {"id": 2, "name": "two"}])
    );
    let csv = curl(&[
        &url,
        "-H",
        "Accept: text/csv",
        "-d",
        "SELECT id FROM t ORDER BY id",
    ])
    .await;
    assert_eq!(csv, "id\n1\n2\n3\n");

    // Pushing records to an http source, its view's status, and its live results.
    let base = server.http_url();
    curl(&[
        &url,
        "-d",
        "CREATE SOURCE orders (id BIGINT, name TEXT, amount DOUBLE) WITH (connector = 'http'); \
         CREATE MATERIALIZED VIEW counts AS SELECT name, count(*) AS n FROM orders GROUP BY name",
    ])
    .await;
    let pushed = curl(&[
        &format!("{base}/v1/sources/orders"),
        "-H",
        "Content-Type: application/x-ndjson",
        "--data-binary",
        "{\"id\": 1, \"name\": \"ann\", \"amount\": 2.5}\n{\"id\": 2, \"name\": \"bob\", \"amount\": 1}\n",
    ])
    .await;
    assert!(pushed.contains("\"accepted\":2"), "{pushed}");
    curl(&[&url, "-d", "ADVANCE 1"]).await;
    let status: Value =
        serde_json::from_str(&curl(&[&format!("{base}/v1/views/counts")]).await).expect("JSON");
    assert_eq!(
        (&status["status"], &status["rows"]),
        (&json!("running"), &json!(2))
    );
    // The live results: the snapshot arrives, then curl gives up waiting (exit 28).
    let out = Command::new("curl")
        .args(["-sS", "-N", "--max-time", "2"])
        .arg(format!("{base}/v1/views/counts/changes"))
        .output()
        .await
        .expect("run curl");
    let events = String::from_utf8_lossy(&out.stdout);
    assert!(events.starts_with("event: snapshot\n"), "{events}");
    assert!(events.contains("\"name\":\"ann\""), "{events}");
    server.stop().await;
}
