//! One Postgres client connection, between the client's socket and pgwire.
//!
//! [`serve_connection`] owns the client's socket. It answers SSL and GSS requests
//! itself (no encryption yet), reads every message the client sends whole — within
//! [`ConnectionLimits::max_message_bytes`] — checks it ([`super::frames`]) and
//! only then hands it to pgwire over a local socket pair; pgwire's answers are
//! copied back to the client as they come. So:
//! - a malformed message ends the connection with an error (`08P01`), and no
//!   decoder reads past it;
//! - a connection beyond [`ConnectionLimits::max_connections`] is told so (`53300`)
//!   instead of being reset;
//! - a client that does not finish its startup within
//!   [`ConnectionLimits::startup_timeout`], or whose connection stays silent both
//!   ways for [`ConnectionLimits::idle_timeout`], is disconnected with an error;
//! - a connection holds at most one message of the client's at a time, and a slow
//!   reader of results holds back pgwire's writes rather than growing a buffer; a
//!   client that takes none of them for [`ConnectionLimits::send_timeout`] is
//!   disconnected, so that what it was sent is not held for it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use tracing::debug;

use super::frames::{
    CANCEL_REQUEST, Checked, GSS_REQUEST, MAX_STARTUP_MESSAGE, Refusal, SSL_REQUEST, check_message,
    error_response,
};

/// Limits on each client connection of the Postgres front door.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Connections served at once; more are refused with SQLSTATE `53300`.
    pub max_connections: usize,
    /// Longest message a client may send.
    pub max_message_bytes: usize,
    /// Time a new connection has to send its startup message.
    pub startup_timeout: Duration,
    /// A connection with no traffic either way for this long is closed (`None`:
    /// never).
    pub idle_timeout: Option<Duration>,
    /// A client that takes none of what is sent to it for this long is disconnected.
    pub send_timeout: Duration,
}

/// How long a connection that is being closed waits for pgwire to finish what it
/// was writing before its error goes out.
const DRAIN: Duration = Duration::from_secs(5);

/// Serves one client: `admitted` is false when the server is at its connection
/// limit, and the client is then told so once it has said hello.
pub async fn serve_connection(
    mut client: TcpStream,
    pgwire: UnixStream,
    limits: ConnectionLimits,
    admitted: bool,
) {
    let startup = tokio::time::timeout(limits.startup_timeout, read_startup(&mut client)).await;
    let startup = match startup {
        Ok(Ok(Some(startup))) => startup,
        Ok(Ok(None)) => return,
        Ok(Err(refusal)) => return refuse(&mut client, &refusal).await,
        Err(_) => {
            let refusal = Refusal::protocol(format!(
                "no startup message within {:?}",
                limits.startup_timeout
            ));
            return refuse(&mut client, &refusal).await;
        }
    };
    if !admitted {
        let refusal = Refusal {
            sqlstate: "53300",
            message: format!(
                "sorry, too many clients already (max_connections is {})",
                limits.max_connections
            ),
        };
        return refuse(&mut client, &refusal).await;
    }
    let activity = Arc::new(Activity::new());
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_pgwire, mut to_pgwire) = pgwire.into_split();
    if to_pgwire.write_all(&startup).await.is_err() {
        return;
    }
    let ended = {
        let up = forward_messages(&mut from_client, &mut to_pgwire, &limits, &activity);
        let down = copy_answers(
            &mut from_pgwire,
            &mut to_client,
            &activity,
            limits.send_timeout,
        );
        tokio::pin!(up, down);
        tokio::select! {
            ended = &mut up => ended,
            _ = &mut down => None,
        }
    };
    let Some(refusal) = ended else {
        let _ = to_pgwire.shutdown().await;
        // Let pgwire finish what it was sending.
        let _ = tokio::time::timeout(
            DRAIN,
            copy_answers(
                &mut from_pgwire,
                &mut to_client,
                &activity,
                limits.send_timeout,
            ),
        )
        .await;
        let _ = to_client.shutdown().await;
        return;
    };
    debug!(error = %refusal, "closing a pgwire connection");
    // pgwire stops reading; what it still writes goes out before the error.
    let _ = to_pgwire.shutdown().await;
    let _ = tokio::time::timeout(
        DRAIN,
        copy_answers(
            &mut from_pgwire,
            &mut to_client,
            &activity,
            limits.send_timeout,
        ),
    )
    .await;
    let _ = to_client.write_all(&error_response(&refusal)).await;
    let _ = to_client.shutdown().await;
}

/// Writes `refusal` to a client that has not started a session, and closes.
async fn refuse(client: &mut TcpStream, refusal: &Refusal) {
    debug!(error = %refusal, "refusing a pgwire connection");
    let _ = client.write_all(&error_response(refusal)).await;
    let _ = client.shutdown().await;
}

/// Reads the startup phase: answers SSL and GSS requests with 'N' (not supported)
/// and returns the startup (or cancel) message, whole; `None` if the client left.
async fn read_startup(client: &mut TcpStream) -> Result<Option<Vec<u8>>, Refusal> {
    loop {
        let mut len = [0u8; 4];
        if client.read_exact(&mut len).await.is_err() {
            return Ok(None);
        }
        let declared = i32::from_be_bytes(len);
        let size = usize::try_from(declared)
            .ok()
            .filter(|n| (8..=MAX_STARTUP_MESSAGE).contains(n))
            .ok_or_else(|| {
                Refusal::protocol(format!("invalid startup message length {declared}"))
            })?;
        let mut code = [0u8; 4];
        let mut rest = vec![0u8; size.saturating_sub(8)];
        if client.read_exact(&mut code).await.is_err()
            || client.read_exact(&mut rest).await.is_err()
        {
            return Ok(None);
        }
        let message = [len.as_slice(), code.as_slice(), rest.as_slice()].concat();
        let code = i32::from_be_bytes(code);
        match code {
            SSL_REQUEST | GSS_REQUEST => {
                if client.write_all(b"N").await.is_err() {
                    return Ok(None);
                }
            }
            CANCEL_REQUEST => return Ok(Some(message)),
            // Protocol 3.x: the major version is the high 16 bits.
            code if code >> 16 == 3 => return Ok(Some(message)),
            code => {
                return Err(Refusal::protocol(format!(
                    "unsupported frontend protocol {}.{}",
                    code >> 16,
                    code & 0xffff
                )));
            }
        }
    }
}

/// Forwards the client's messages to pgwire, each read whole and checked. Ends with
/// `None` when the client closes, or with why the connection is to be closed.
async fn forward_messages(
    client: &mut (impl AsyncRead + Unpin),
    pgwire: &mut (impl AsyncWrite + Unpin),
    limits: &ConnectionLimits,
    activity: &Activity,
) -> Option<Refusal> {
    let mut header = [0u8; 5];
    let mut body = Vec::new();
    loop {
        let read = tokio::select! {
            read = client.read_exact(&mut header) => read,
            idle = activity.idle_for(limits.idle_timeout) => {
                return Some(Refusal {
                    sqlstate: "57P05",
                    message: format!("terminating connection due to idle timeout ({idle:?})"),
                });
            }
        };
        if read.is_err() {
            return None;
        }
        activity.touch();
        let kind = header[0];
        let declared = i32::from_be_bytes([header[1], header[2], header[3], header[4]]);
        // The length counts itself (4 bytes) but not the kind.
        let size = usize::try_from(declared)
            .ok()
            .and_then(|n| n.checked_sub(4));
        let Some(size) = size else {
            return Some(Refusal::protocol(format!(
                "invalid length {declared} of message '{}'",
                char::from(kind)
            )));
        };
        if size > limits.max_message_bytes {
            return Some(Refusal {
                sqlstate: "54000",
                message: format!(
                    "message of {size} bytes is larger than the {} a client may send",
                    limits.max_message_bytes
                ),
            });
        }
        body.clear();
        body.resize(size, 0);
        if client.read_exact(&mut body).await.is_err() {
            return None;
        }
        activity.touch();
        let forwarded = match check_message(kind, &body) {
            Ok(Checked::AsIs) => forward(pgwire, kind, &body).await,
            Ok(Checked::Rewritten(rewritten)) => forward(pgwire, kind, &rewritten).await,
            Err(refusal) => return Some(refusal),
        };
        if forwarded.is_err() {
            return None;
        }
        // A session ends with Terminate; pgwire closes its side then.
        body.shrink_to(64 * 1024);
    }
}

async fn forward(
    pgwire: &mut (impl AsyncWrite + Unpin),
    kind: u8,
    body: &[u8],
) -> std::io::Result<()> {
    let len = body
        .len()
        .checked_add(4)
        .and_then(|len| i32::try_from(len).ok())
        .ok_or_else(|| std::io::Error::other("message too long"))?;
    let mut header = [0u8; 5];
    header[0] = kind;
    header[1..].copy_from_slice(&len.to_be_bytes());
    pgwire.write_all(&header).await?;
    pgwire.write_all(body).await
}

/// Copies pgwire's answers to the client until pgwire closes, or the client takes
/// none of a write for `send_timeout`.
async fn copy_answers(
    pgwire: &mut (impl AsyncRead + Unpin),
    client: &mut (impl AsyncWrite + Unpin),
    activity: &Activity,
    send_timeout: Duration,
) {
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let read = match pgwire.read(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buffer.get(..n).unwrap_or_default(),
        };
        activity.touch();
        let mut rest = read;
        while !rest.is_empty() {
            match tokio::time::timeout(send_timeout, client.write(rest)).await {
                Ok(Ok(n)) if n > 0 => rest = rest.get(n..).unwrap_or_default(),
                Ok(_) => return,
                Err(_) => {
                    debug!(
                        ?send_timeout,
                        "a client took none of its answers; disconnecting it"
                    );
                    return;
                }
            }
            activity.touch();
        }
    }
}

/// When a connection last carried bytes, either way.
struct Activity {
    started: Instant,
    /// Milliseconds after `started`.
    last: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let now = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.store(now, Ordering::Relaxed);
    }

    /// Returns once the connection has been silent for `timeout` (never if `None`).
    async fn idle_for(&self, timeout: Option<Duration>) -> Duration {
        let Some(timeout) = timeout else {
            return std::future::pending().await;
        };
        loop {
            let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
            let silent = self.started.elapsed().saturating_sub(last);
            if silent >= timeout {
                return silent;
            }
            tokio::time::sleep(timeout.saturating_sub(silent)).await;
        }
    }
}
