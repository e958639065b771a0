//! The HTTP API's management endpoints and live results against a real server, with
//! real clients (reqwest, a WebSocket client, raw TCP for slow clients): every answer
//! checked against the OpenAPI document, the live results checked against the view
//! queried with SQL, resumption after a disconnect, and slow requests refused.

use std::collections::BTreeMap;
use std::time::Duration;

use dstream_sql_tests::TestServer;
use dstream_sql_tests::openapi::{check, response_schema, schema};
use futures::StreamExt;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const SETUP: &str = "
    CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP)
      WITH (connector = 'generator', rows_per_second = 40, key_cardinality = 4, seed = 3);
    CREATE MATERIALIZED VIEW v AS SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k;
    CREATE TABLE dims (k BIGINT, name TEXT);";

/// How long a test waits for something the server should send at once.
const PATIENCE: Duration = Duration::from_secs(20);

/// Runs `sql` over `POST /v1/sql` and returns its JSON answer.
async fn sql(server: &TestServer, sql: &str) -> Value {
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/sql", server.http_url()))
        .body(sql.to_string())
        .send()
        .await
        .expect("an answer");
    assert!(answer.status().is_success(), "{sql}: {}", answer.status());
    answer.json().await.expect("JSON")
}

/// `GET path`: its status and JSON body.
async fn get(server: &TestServer, path: &str) -> (u16, Value) {
    let answer = reqwest::get(format!("{}{path}", server.http_url()))
        .await
        .expect("an answer");
    let status = answer.status().as_u16();
    (status, answer.json().await.expect("JSON"))
}

async fn document(server: &TestServer) -> Value {
    get(server, "/v1/openapi.json").await.1
}

async fn started() -> TestServer {
    let server = TestServer::start().await.expect("start the server");
    sql(&server, SETUP).await;
    server
}

/// The rows of view `v`, as canonical JSON texts counted.
type Rows = BTreeMap<String, usize>;

async fn view_rows(server: &TestServer) -> Rows {
    let answer = sql(server, "SELECT * FROM v").await;
    let mut rows = Rows::new();
    for row in answer["results"][0]["rows"].as_array().expect("rows") {
        *rows.entry(row.to_string()).or_default() += 1;
    }
    rows
}

/// Applies one live-results message to `rows`: a snapshot replaces them, changes
/// delete and insert.
fn apply(rows: &mut Rows, message: &Value) {
    if message["kind"] == "snapshot" {
        rows.clear();
    }
    for deleted in message["deletes"].as_array().expect("deletes") {
        let key = deleted.to_string();
        let count = rows.get_mut(&key).unwrap_or_else(|| {
            panic!("{key} deleted but not there: {message}");
        });
        *count -= 1;
        if *count == 0 {
            rows.remove(&key);
        }
    }
    for inserted in message["inserts"].as_array().expect("inserts") {
        *rows.entry(inserted.to_string()).or_default() += 1;
    }
}

#[tokio::test]
async fn management_endpoints_report_what_sql_sees_and_match_the_document() {
    let server = started().await;
    sql(&server, "ADVANCE 2").await;
    let doc = document(&server).await;
    let checked = async |path: &str, documented: &str| -> Value {
        let (status, body) = get(&server, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        check(
            &doc,
            response_schema(&doc, "get", documented, 200),
            &body,
            path,
        );
        body
    };

    let status = checked("/v1/status", "/v1/status").await;
    let committed = status["committed_interval"].as_u64().expect("an interval");
    assert_eq!(
        (&status["sources"], &status["views"], &status["tables"]),
        (&1.into(), &1.into(), &1.into())
    );
    assert_eq!(status["batch_interval_ms"], 1000.0);
    assert!(status["workers_alive"].as_u64() >= Some(1), "{status}");

    let sources = checked("/v1/sources", "/v1/sources").await;
    assert_eq!(sources.as_array().map(Vec::len), Some(1));
    let source = checked("/v1/sources/s", "/v1/sources/{name}").await;
    assert_eq!(source["connector"], "generator");
    assert_eq!(source["status"], "running");
    assert_eq!(source["last_interval"], committed);
    assert_eq!(source["last_interval_rows"], 40, "{source}");
    assert_eq!(source["records"], 80, "{source}");

    let view = checked("/v1/views/v", "/v1/views/{name}").await;
    assert_eq!(view["status"], "running");
    assert_eq!(view["reads"], serde_json::json!(["s"]));
    assert_eq!(view["last_interval"], committed);
    let count = sql(&server, "SELECT count(*) AS n FROM v").await;
    assert_eq!(view["rows"], count["results"][0]["rows"][0]["n"]);
    assert_eq!(view["rows_in"], 40, "{view}");
    assert!(view["rows_out"].as_u64() > Some(0), "{view}");
    assert!(view["state_bytes"].as_u64() > Some(0), "{view}");
    let columns: Vec<&str> = view["columns"]
        .as_array()
        .expect("columns")
        .iter()
        .filter_map(|c| c["name"].as_str())
        .collect();
    assert_eq!(columns, ["k", "n", "total"]);
    checked("/v1/views", "/v1/views").await;

    let table = checked("/v1/tables/dims", "/v1/tables/{name}").await;
    assert_eq!(table["kind"], "memory");
    checked("/v1/tables", "/v1/tables").await;

    let workers = checked("/v1/workers", "/v1/workers").await;
    assert!(
        workers
            .as_array()
            .expect("workers")
            .iter()
            .any(|w| w["status"] == "alive"),
        "{workers}"
    );
    let intervals = checked("/v1/intervals?limit=1", "/v1/intervals").await;
    assert_eq!(intervals[0]["interval_id"], committed, "{intervals}");
    assert_eq!(intervals.as_array().map(Vec::len), Some(1));
    checked("/v1/checkpoints", "/v1/checkpoints").await;
    let recoveries = checked("/v1/recoveries", "/v1/recoveries").await;
    assert_eq!(recoveries, serde_json::json!([]));

    // Unknown names, a bad query string and a wrong method: JSON errors.
    for (path, status, code) in [
        ("/v1/sources/nope", 404, "undefined_object"),
        ("/v1/views/nope", 404, "undefined_object"),
        ("/v1/tables/nope", 404, "undefined_object"),
        ("/v1/intervals?limit=many", 400, "bad_request"),
        ("/v1/views/nope/changes", 404, "undefined_object"),
    ] {
        let (got, body) = get(&server, path).await;
        assert_eq!(
            (got, body["error"]["code"].as_str()),
            (status, Some(code)),
            "{path}: {body}"
        );
        check(&doc, schema(&doc, "ApiError"), &body, path);
    }
    let answer = reqwest::Client::new()
        .post(format!("{}/v1/status", server.http_url()))
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 405);
    let body: Value = answer.json().await.expect("JSON");
    assert_eq!(body["error"]["code"], "method_not_allowed");
    server.stop().await;
}

/// Server-Sent Events as they arrive: `(event, id, data)`.
struct Events {
    body: std::pin::Pin<Box<dyn futures::Stream<Item = reqwest::Result<bytes::Bytes>> + Send>>,
    buffer: String,
}

impl Events {
    async fn open(server: &TestServer, query: &str, last_event_id: Option<u64>) -> Events {
        let mut request =
            reqwest::Client::new().get(format!("{}/v1/views/{query}", server.http_url()));
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let answer = request.send().await.expect("an answer");
        assert_eq!(answer.status(), 200);
        assert_eq!(
            answer.headers()["content-type"].to_str().ok(),
            Some("text/event-stream")
        );
        Events {
            body: Box::pin(answer.bytes_stream()),
            buffer: String::new(),
        }
    }

    /// The next event that is not a comment.
    async fn next(&mut self) -> (String, Option<u64>, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let (mut event, mut id, mut data) = (String::new(), None, String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().parse().ok();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a keep-alive comment
                }
                return (event, id, serde_json::from_str(&data).expect("JSON data"));
            }
            let chunk = tokio::time::timeout(PATIENCE, self.body.next())
                .await
                .expect("an event in time")
                .expect("the stream goes on")
                .expect("bytes");
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }
}

#[tokio::test]
async fn live_results_stream_as_events_and_resume_after_the_last_interval_seen() {
    let server = started().await;
    sql(&server, "ADVANCE 1").await;
    let doc = document(&server).await;
    let message_schema = response_schema(&doc, "get", "/v1/views/{name}/changes", 200);
    let mut rows = Rows::new();

    let mut events = Events::open(&server, "v/changes", None).await;
    let (event, id, snapshot) = events.next().await;
    check(&doc, message_schema, &snapshot, "snapshot");
    assert_eq!(event, "snapshot");
    assert_eq!(id, snapshot["interval"].as_u64());
    apply(&mut rows, &snapshot);
    assert_eq!(rows, view_rows(&server).await);

    sql(&server, "ADVANCE 1").await;
    let (event, id, changes) = events.next().await;
    check(&doc, message_schema, &changes, "changes");
    assert_eq!(event, "changes");
    assert!(!changes["deletes"].as_array().expect("deletes").is_empty());
    apply(&mut rows, &changes);
    assert_eq!(rows, view_rows(&server).await);
    let seen = id.expect("an interval id");

    // Disconnected, the client misses two intervals; it resumes with exactly them.
    drop(events);
    sql(&server, "ADVANCE 2").await;
    let mut events = Events::open(&server, "v/changes", Some(seen)).await;
    for missed in [seen + 1, seen + 2] {
        let (event, id, changes) = events.next().await;
        assert_eq!((event.as_str(), id), ("changes", Some(missed)));
        apply(&mut rows, &changes);
    }
    assert_eq!(rows, view_rows(&server).await);
    drop(events);

    // Resuming from before the changes kept starts again from a snapshot: those of
    // a view nobody subscribed to are not kept at all.
    sql(
        &server,
        "CREATE MATERIALIZED VIEW w AS SELECT k, count(*) AS n, sum(v) AS total FROM s GROUP BY k",
    )
    .await;
    sql(&server, "ADVANCE 2").await;
    let mut events = Events::open(&server, "w/changes?after=1", None).await;
    let (event, id, snapshot) = events.next().await;
    assert_eq!(event, "snapshot");
    assert_eq!(id, Some(seen + 4));
    let mut fresh = Rows::new();
    apply(&mut fresh, &snapshot);
    assert_eq!(fresh.len(), 4);

    // A bad resume point is a 400.
    let answer = reqwest::Client::new()
        .get(format!("{}/v1/views/v/changes", server.http_url()))
        .header("last-event-id", "yesterday")
        .send()
        .await
        .expect("an answer");
    assert_eq!(answer.status(), 400);
    // A server that stops ends the streams open on it.
    let mut open = Events::open(&server, "v/changes", None).await;
    open.next().await;
    server.stop().await;
    loop {
        let chunk = tokio::time::timeout(PATIENCE, open.body.next())
            .await
            .expect("the stream ends with the server");
        if !matches!(chunk, Some(Ok(_))) {
            break;
        }
    }
}

#[tokio::test]
async fn live_results_stream_over_a_websocket() {
    let server = started().await;
    sql(&server, "ADVANCE 1").await;
    let url = format!(
        "{}/v1/views/v/changes",
        server.http_url().replacen("http://", "ws://", 1)
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("a WebSocket");
    let mut next = async || -> Value {
        loop {
            let message = tokio::time::timeout(PATIENCE, socket.next())
                .await
                .expect("a message in time")
                .expect("the socket stays open")
                .expect("a message");
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                return serde_json::from_str(&text).expect("JSON");
            }
        }
    };
    let mut rows = Rows::new();
    let snapshot = next().await;
    assert_eq!(snapshot["kind"], "snapshot");
    apply(&mut rows, &snapshot);
    for _ in 0..2 {
        sql(&server, "ADVANCE 1").await;
        let changes = next().await;
        assert_eq!(changes["kind"], "changes");
        apply(&mut rows, &changes);
        assert_eq!(rows, view_rows(&server).await);
    }
    socket.close(None).await.expect("close");
    server.stop().await;
}

#[tokio::test]
async fn slow_clients_get_408_and_hold_up_nobody() {
    let server = TestServer::start_with(|c| c.http_request_timeout = Duration::from_secs(1))
        .await
        .expect("start the server");
    let addr = server.http_url().replacen("http://", "", 1);

    // Headers that never end: the connection is closed.
    let mut headers = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    headers
        .write_all(b"GET /v1/status HTTP/1.1\r\nHost: dstream\r\n")
        .await
        .expect("write");
    // A body that never comes: 408, as JSON.
    let mut body = tokio::net::TcpStream::connect(&addr)
        .await
        .expect("connect");
    body.write_all(
        b"POST /v1/sql HTTP/1.1\r\nHost: dstream\r\nContent-Type: text/plain\r\n\
          Content-Length: 100\r\n\r\nSELECT",
    )
    .await
    .expect("write");

    // Meanwhile others are served.
    let (status, _) = get(&server, "/v1/status").await;
    assert_eq!(status, 200);

    let read_all = async |stream: &mut tokio::net::TcpStream| -> String {
        let mut out = Vec::new();
        tokio::time::timeout(PATIENCE, stream.read_to_end(&mut out))
            .await
            .expect("closed in time")
            .expect("read");
        String::from_utf8_lossy(&out).to_string()
    };
    let answer = read_all(&mut headers).await;
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 408"),
        "{answer}"
    );
    let answer = read_all(&mut body).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("\"code\":\"request_timeout\""), "{answer}");
    let (status, _) = get(&server, "/v1/status").await;
    assert_eq!(status, 200);
    server.stop().await;
}
