//! The `tcp` connector: newline-delimited JSON or CSV records read from a socket, like
//! the socket text stream of Spark Streaming.
//!
//! The receiver connects to `host:port` and reads lines; lines that arrive during an
//! interval form its block. If the connection drops it reconnects every second, and
//! says so in the log. Options: `host` (default `127.0.0.1`), `port` (required),
//! `format` (`json` or `csv`, with `delimiter`), `on_error` (`skip` or `fail`).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::RecordBatch;
use dstream_planner::SourceDef;
use dstream_storage::{IntervalId, Timeline};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::connector::decode::{OnError, RecordDecoder, TextFormat};
use crate::connector::{Options, Receiver, ReceiverPosition, ReceiverStats};
use crate::error::{Error, Result, config_error};

/// Lines received and not yet sealed.
#[derive(Debug, Default)]
struct Pending {
    data: Vec<u8>,
}

/// Reads records from a TCP server.
#[derive(Debug)]
pub struct TcpReceiver {
    source: String,
    pending: Arc<Mutex<Pending>>,
    decoder: RecordDecoder,
    on_error: OnError,
    stats: ReceiverStats,
    reader: JoinHandle<()>,
}

impl TcpReceiver {
    pub fn open(source: &SourceDef, options: &Options) -> Result<Self> {
        let host = options.get("host").unwrap_or("127.0.0.1").to_string();
        let port: u16 = options.number("port", 0)?;
        if port == 0 {
            return Err(config_error("the tcp connector needs WITH (port = ...)"));
        }
        let format = TextFormat::from_options(options, &["json", "csv"])?
            .ok_or_else(|| config_error("the tcp connector reads json or csv"))?;
        let on_error = OnError::from_options(options)?;
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Internal("tcp receivers need a tokio runtime".into()))?;
        let pending = Arc::new(Mutex::new(Pending::default()));
        let reader = runtime.spawn(read_lines(
            source.name.clone(),
            format!("{host}:{port}"),
            pending.clone(),
        ));
        Ok(TcpReceiver {
            source: source.name.clone(),
            pending,
            decoder: RecordDecoder::new(source.record_schema.clone(), format),
            on_error,
            stats: ReceiverStats::default(),
            reader,
        })
    }
}

impl Drop for TcpReceiver {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

async fn read_lines(source: String, addr: String, pending: Arc<Mutex<Pending>>) {
    let mut announced_failure = false;
    loop {
        match TcpStream::connect(&addr).await {
            Ok(stream) => {
                info!(source = %source, %addr, "tcp source connected");
                announced_failure = false;
                let mut reader = BufReader::new(stream);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match reader.read_until(b'\n', &mut line).await {
                        Ok(0) => {
                            info!(source = %source, %addr, "tcp source disconnected; reconnecting");
                            break;
                        }
                        Ok(_) => {
                            if line.last() != Some(&b'\n') {
                                line.push(b'\n');
                            }
                            match pending.lock() {
                                Ok(mut p) => p.data.extend_from_slice(&line),
                                Err(poisoned) => {
                                    poisoned.into_inner().data.extend_from_slice(&line)
                                }
                            }
                        }
                        Err(e) => {
                            warn!(source = %source, %addr, error = %e, "tcp source read failed; reconnecting");
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                if !announced_failure {
                    warn!(source = %source, %addr, error = %e, "tcp source cannot connect; retrying every second");
                    announced_failure = true;
                }
            }
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

impl Receiver for TcpReceiver {
    fn seal(&mut self, _interval: IntervalId, _timeline: &Timeline) -> Result<Vec<RecordBatch>> {
        let data = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut p.data),
            Err(poisoned) => std::mem::take(&mut poisoned.into_inner().data),
        };
        self.decoder
            .decode(&data)?
            .accept(&self.source, None, self.on_error, &mut self.stats)
    }

    fn stats(&self) -> ReceiverStats {
        self.stats
    }

    /// Closes the connection; lines read but not sealed travel with the position.
    /// Lines the server sent that were not read off the socket yet are not; the
    /// server sees a disconnect, and the adopting receiver connects again.
    fn release(&mut self) -> ReceiverPosition {
        self.reader.abort();
        let pending = match self.pending.lock() {
            Ok(mut p) => std::mem::take(&mut p.data),
            Err(poisoned) => std::mem::take(&mut poisoned.into_inner().data),
        };
        ReceiverPosition {
            stats: self.stats,
            seen_files: Vec::new(),
            pending,
        }
    }

    fn resume(&mut self, position: ReceiverPosition) {
        self.stats = position.stats;
        let mut pending = match self.pending.lock() {
            Ok(p) => p,
            Err(poisoned) => poisoned.into_inner(),
        };
        let newer = std::mem::take(&mut pending.data);
        pending.data = position.pending;
        pending.data.extend_from_slice(&newer);
    }
}
