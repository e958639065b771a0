//! `GET /v1/views/{name}/changes`: a view's live results, as Server-Sent Events or,
//! when the request asks to upgrade, over a WebSocket.
//!
//! Both carry the same JSON [`ChangeMessage`]s: first a `snapshot` (the view's rows),
//! then one `changes` message per interval that changed the view. Each message of an
//! interval carries its id (the SSE `id`), and a client that reconnects with it
//! (`Last-Event-ID`, which browsers' `EventSource` sends by itself, or `?after=`)
//! resumes with the intervals it missed — or, when they are no longer kept, with a
//! new snapshot. See [`crate::changes`] for how long changes are kept.

use std::convert::Infallible;
use std::time::Duration;

use arrow::array::RecordBatch;
use axum::extract::rejection::QueryRejection;
use axum::extract::ws::{
    Message, WebSocket, WebSocketUpgrade, rejection::WebSocketUpgradeRejection,
};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use dstream_storage::IntervalId;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use utoipa::{IntoParams, ToSchema};

use super::Closing;
use super::error::{ApiError, HttpError};
use super::sql::json_rows;
use crate::engine::Engine;
use crate::session::format_timestamp;
use crate::subscribe::{Subscription, SubscriptionEvent};

/// How often an idle event stream sends a comment, so that proxies keep it open.
const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// Where to resume a stream.
#[derive(Debug, Deserialize, IntoParams)]
pub struct Resume {
    /// The last interval the client has: the stream starts with the changes after
    /// it (or a snapshot, if they are no longer kept). `Last-Event-ID` says the same.
    pub after: Option<u64>,
}

/// One message of a view's live results.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ChangeMessage {
    /// `snapshot`: `inserts` are all the view's rows, replacing what the client
    /// had. `changes`: the rows one interval deleted and inserted.
    pub kind: String,
    /// The interval the message is as of (`null` for a snapshot before the first).
    pub interval: Option<u64>,
    pub interval_start: Option<String>,
    /// Rows, each an object keyed by column name.
    #[schema(value_type = Vec<Object>)]
    pub deletes: Vec<serde_json::Value>,
    #[schema(value_type = Vec<Object>)]
    pub inserts: Vec<serde_json::Value>,
}

/// A view's live results.
#[utoipa::path(
    get,
    path = "/v1/views/{name}/changes",
    params(
        ("name" = String, Path, description = "The view's name"),
        ("Last-Event-ID" = Option<u64>, Header, description = "The last interval the client has, as `?after=`"),
        Resume,
    ),
    responses(
        (status = 200, description = "Server-Sent Events, each a `ChangeMessage` as `data`, its `kind` as `event` and its interval as `id`; an `error` event carries an `ApiError` and ends the stream",
            content_type = "text/event-stream", body = ChangeMessage),
        (status = 101, description = "With `Upgrade: websocket`: a WebSocket whose text messages are `ChangeMessage`s, or an `ApiError` before the close"),
        (status = 400, description = "A bad `after` or `Last-Event-ID`", body = ApiError),
        (status = 404, description = "No such view", body = ApiError),
        (status = 409, description = "The view failed and stopped", body = ApiError),
    )
)]
pub async fn changes(
    State(engine): State<Engine>,
    axum::Extension(Closing(closing)): axum::Extension<Closing>,
    Path(name): Path<String>,
    resume: Result<Query<Resume>, QueryRejection>,
    headers: HeaderMap,
    upgrade: Result<WebSocketUpgrade, WebSocketUpgradeRejection>,
) -> Result<Response, HttpError> {
    let resume = resume
        .map_err(|e| HttpError::request(StatusCode::BAD_REQUEST, "bad_request", e.body_text()))?;
    let after = match (resume.after, headers.get("last-event-id")) {
        (Some(after), _) => Some(after),
        (None, Some(id)) => Some(
            id.to_str()
                .ok()
                .and_then(|id| id.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    HttpError::request(
                        StatusCode::BAD_REQUEST,
                        "bad_request",
                        "Last-Event-ID is not an interval id",
                    )
                })?,
        ),
        (None, None) => None,
    };
    let wants_websocket = headers
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("websocket"));
    let upgrade = if wants_websocket {
        Some(upgrade.map_err(|e| HttpError::request(e.status(), "bad_request", e.body_text()))?)
    } else {
        None
    };
    let subscription = Subscription::resume(&engine, &name, after.map(IntervalId)).await?;
    Ok(match upgrade {
        Some(upgrade) => upgrade
            .on_upgrade(move |socket| over_websocket(socket, subscription, closing))
            .into_response(),
        None => Sse::new(events(subscription).take_until(closing.cancelled_owned()))
            .keep_alive(KeepAlive::new().interval(KEEP_ALIVE))
            .into_response(),
    })
}

/// The JSON of one event, or of the error that ends the stream.
enum Encoded {
    Message {
        kind: &'static str,
        interval: Option<IntervalId>,
        json: String,
    },
    Error(String),
}

/// The next message of `subscription`, encoded; `None` when the view is dropped.
async fn next_message(subscription: &mut Subscription) -> Option<Encoded> {
    let event = match subscription.next_event().await? {
        Ok(event) => event,
        Err(e) => return Some(Encoded::Error(error_json(HttpError::from(e)))),
    };
    let (kind, interval, start, deletes, inserts): (_, _, _, &[RecordBatch], &[RecordBatch]) =
        match &event {
            SubscriptionEvent::Snapshot {
                interval,
                interval_start,
                rows,
            } => (
                "snapshot",
                *interval,
                interval.map(|_| *interval_start),
                &[],
                rows,
            ),
            SubscriptionEvent::Changes(change) => (
                "changes",
                Some(change.interval),
                Some(change.interval_start),
                &change.changelog.deletes,
                &change.changelog.inserts,
            ),
        };
    match message_json(kind, interval, start, deletes, inserts) {
        Ok(json) => Some(Encoded::Message {
            kind,
            interval,
            json,
        }),
        Err(e) => Some(Encoded::Error(error_json(HttpError::from(
            crate::error::Error::Internal(e.to_string()),
        )))),
    }
}

/// A [`ChangeMessage`] as JSON, its rows written batch by batch.
fn message_json(
    kind: &str,
    interval: Option<IntervalId>,
    start: Option<i64>,
    deletes: &[RecordBatch],
    inserts: &[RecordBatch],
) -> Result<String, std::io::Error> {
    let mut out = serde_json::json!({
        "kind": kind,
        "interval": interval.map(|i| i.0),
        "interval_start": start.map(format_timestamp),
    })
    .to_string()
    .into_bytes();
    // Drop the closing brace, then add the rows.
    out.pop();
    for (name, rows) in [("deletes", deletes), ("inserts", inserts)] {
        out.extend(format!(",\"{name}\":[").as_bytes());
        let mut first = true;
        for batch in rows.iter().filter(|b| b.num_rows() > 0) {
            if !first {
                out.push(b',');
            }
            first = false;
            out.extend(json_rows(batch)?);
        }
        out.push(b']');
    }
    out.push(b'}');
    String::from_utf8(out).map_err(std::io::Error::other)
}

fn error_json(e: HttpError) -> String {
    let body: ApiError = e.into();
    serde_json::to_string(&body).unwrap_or_default()
}

/// The subscription as Server-Sent Events, ending after an error.
fn events(subscription: Subscription) -> impl Stream<Item = Result<Event, Infallible>> {
    futures::stream::unfold(Some(subscription), |subscription| async move {
        let mut subscription = subscription?;
        let event = match next_message(&mut subscription).await? {
            Encoded::Message {
                kind,
                interval,
                json,
            } => {
                let event = Event::default().event(kind).data(json);
                let event = match interval {
                    Some(i) => event.id(i.0.to_string()),
                    None => event,
                };
                return Some((Ok(event), Some(subscription)));
            }
            Encoded::Error(json) => Event::default().event("error").data(json),
        };
        Some((Ok(event), None))
    })
}

/// Sends the subscription's messages over `socket` until the view is dropped, an
/// error ends it, the client closes, or the server shuts down (`closing`).
async fn over_websocket(
    mut socket: WebSocket,
    mut subscription: Subscription,
    closing: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = closing.cancelled() => break,
            message = next_message(&mut subscription) => {
                let (text, last) = match message {
                    Some(Encoded::Message { json, .. }) => (json, false),
                    Some(Encoded::Error(json)) => (json, true),
                    None => break,
                };
                if socket.send(Message::Text(text.into())).await.is_err() {
                    return;
                }
                if last {
                    break;
                }
            }
            received = socket.recv() => match received {
                // Pings are answered by the socket itself; anything else is ignored.
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => return,
                Some(Ok(_)) => {}
            },
        }
    }
    let _ = socket.send(Message::Close(None)).await;
}
