//! Server configuration: flags, environment variables (`DSTREAM_*`) and an optional
//! TOML file, in that order of precedence, over documented defaults.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use dstream_planner::StatementLimits;
use dstream_storage::{S3Options, StoreConfig};
use serde::Deserialize;

pub use crate::cluster::local::{Restarts, WorkerMode};
pub use crate::cluster::stage::Speculation;
use crate::error::{Error, Result};

/// Which interval clock the server runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClockKind {
    /// Intervals follow wall-clock time (the default).
    Real,
    /// Intervals advance only on `ADVANCE n` (tests, demos).
    Manual,
}

/// Everything `dstream serve` needs.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Where the catalog and table data live.
    pub data_dir: PathBuf,
    /// Postgres wire protocol listen address.
    pub pg_addr: SocketAddr,
    /// Width of one interval.
    pub batch_interval: Duration,
    /// State partitions per materialized view (P).
    pub partitions: usize,
    pub clock: ClockKind,
    /// How long the raw rows of each source stay queryable.
    pub source_retention: Duration,
    /// Most rows in one input block (one map task).
    pub block_rows: usize,
    /// Where the coordinator's gRPC service listens for workers.
    pub grpc_addr: SocketAddr,
    /// Worker processes the server starts itself (0: only workers that join).
    pub workers: usize,
    /// Whether those workers are child processes or run inside the server process.
    pub worker_mode: WorkerMode,
    /// When local workers that die are started again.
    pub worker_restarts: Restarts,
    /// Task slots of each local worker (0: the machine's cores shared among them).
    pub worker_cores: usize,
    /// Where checkpoints, the catalog and table data live: `file:///path`,
    /// `s3://bucket/prefix` or `memory://name`. `None`: `file://` + `data_dir`.
    pub store: Option<String>,
    /// Settings of an `s3://` store; unset ones come from the `AWS_*` environment.
    pub s3: S3Options,
    /// Checkpoint every this many intervals (0: the count does not trigger one).
    pub checkpoint_intervals: u64,
    /// Checkpoint at least this often (`None`: time does not trigger one).
    pub checkpoint_every: Option<Duration>,
    /// Committed checkpoints kept in the store; older ones are deleted.
    pub checkpoints_kept: usize,
    /// When straggling tasks get a speculative copy (`None`: never).
    pub speculation: Option<Speculation>,
    /// Where `dstream serve` serves Prometheus metrics (`None`: nowhere).
    pub metrics_addr: Option<SocketAddr>,
    /// Where the HTTP API listens (`None`: nowhere); port 0 picks a free one.
    pub http_addr: Option<SocketAddr>,
    /// How big and deep a statement may be, and how many windows a view may keep.
    pub limits: StatementLimits,
    /// Queries (SELECT, EXPLAIN, SHOW, DESCRIBE) running longer are cancelled
    /// (`None`: never).
    pub statement_timeout: Option<Duration>,
    /// Memory one ad-hoc query may use for its joins, sorts and aggregations.
    pub query_memory: usize,
    /// Largest result one ad-hoc query may return, in bytes of Arrow data.
    pub max_result_bytes: usize,
    /// Postgres connections served at once.
    pub max_connections: usize,
    /// Time a new connection has to send its startup message.
    pub startup_timeout: Duration,
    /// A connection silent both ways this long is closed (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// A client that takes none of what the server sends for this long is
    /// disconnected: the rest of its results are not held for it.
    pub send_timeout: Duration,
    /// Time an HTTP client has to send a request's headers, and then its body.
    pub http_request_timeout: Duration,
}

/// Default of [`ServeConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 100;
/// Default of [`ServeConfig::startup_timeout`].
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ServeConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default of [`ServeConfig::send_timeout`].
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`ServeConfig::http_request_timeout`].
pub const DEFAULT_HTTP_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`ServeConfig::statement_timeout`].
pub const DEFAULT_STATEMENT_TIMEOUT: Duration = Duration::from_secs(300);
/// Default of [`ServeConfig::query_memory`]: 1 GiB.
pub const DEFAULT_QUERY_MEMORY: usize = 1 << 30;
/// Default of [`ServeConfig::max_result_bytes`]: 256 MiB.
pub const DEFAULT_MAX_RESULT_BYTES: usize = 256 << 20;

impl Default for ServeConfig {
    fn default() -> Self {
        ServeConfig {
            data_dir: PathBuf::from("dstream-data"),
            pg_addr: SocketAddr::from(([127, 0, 0, 1], 6875)),
            batch_interval: Duration::from_secs(1),
            partitions: 4,
            clock: ClockKind::Real,
            source_retention: Duration::from_secs(300),
            block_rows: dstream_executor::block::BLOCK_ROWS,
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 6876)),
            workers: 2,
            worker_mode: WorkerMode::Process(None),
            worker_restarts: Restarts::default(),
            worker_cores: 0,
            store: None,
            s3: S3Options::default(),
            checkpoint_intervals: 10,
            checkpoint_every: Some(Duration::from_secs(10)),
            checkpoints_kept: 3,
            speculation: Some(Speculation::default()),
            metrics_addr: Some(SocketAddr::from(([127, 0, 0, 1], 6877))),
            http_addr: Some(SocketAddr::from(([127, 0, 0, 1], 6878))),
            limits: StatementLimits::default(),
            statement_timeout: Some(DEFAULT_STATEMENT_TIMEOUT),
            query_memory: DEFAULT_QUERY_MEMORY,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
            send_timeout: DEFAULT_SEND_TIMEOUT,
            http_request_timeout: DEFAULT_HTTP_REQUEST_TIMEOUT,
        }
    }
}

/// The `[serve]` section of a TOML configuration file; every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub pg_addr: Option<SocketAddr>,
    pub batch_interval: Option<String>,
    pub partitions: Option<usize>,
    pub clock: Option<ClockKind>,
    pub source_retention: Option<String>,
    pub block_rows: Option<usize>,
    pub grpc_addr: Option<SocketAddr>,
    pub workers: Option<usize>,
    pub restart_workers: Option<bool>,
    pub worker_cores: Option<usize>,
    pub store: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_access_key_id: Option<String>,
    pub s3_secret_access_key: Option<String>,
    pub s3_allow_http: Option<bool>,
    pub checkpoint_intervals: Option<u64>,
    pub checkpoint_every: Option<String>,
    pub checkpoints_kept: Option<usize>,
    pub speculation: Option<bool>,
    pub speculation_multiplier: Option<f64>,
    pub speculation_min: Option<String>,
    /// An address, or `off`.
    pub metrics_addr: Option<String>,
    /// An address, or `off`.
    pub http_addr: Option<String>,
    pub max_statement_bytes: Option<String>,
    pub max_expression_depth: Option<usize>,
    pub max_expression_nodes: Option<usize>,
    pub max_windows_per_row: Option<u64>,
    pub max_windows_per_interval: Option<u64>,
    /// A duration, or `off`.
    pub statement_timeout: Option<String>,
    pub query_memory: Option<String>,
    pub max_result_bytes: Option<String>,
    pub max_connections: Option<usize>,
    pub startup_timeout: Option<String>,
    /// A duration, or `off`.
    pub idle_timeout: Option<String>,
    pub send_timeout: Option<String>,
    pub http_request_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDocument {
    #[serde(default)]
    serve: FileConfig,
}

impl FileConfig {
    /// Reads the `[serve]` section of a TOML file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::Config(format!("cannot read {}: {e}", path.display())))?;
        let doc: FileDocument =
            toml::from_str(&text).map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
        Ok(doc.serve)
    }

    /// Applies the file's values over `config`.
    pub fn apply(self, config: &mut ServeConfig) -> Result<()> {
        if let Some(v) = self.data_dir {
            config.data_dir = v;
        }
        if let Some(v) = self.pg_addr {
            config.pg_addr = v;
        }
        if let Some(v) = self.batch_interval {
            config.batch_interval = parse_duration(&v)?;
        }
        if let Some(v) = self.partitions {
            config.partitions = v;
        }
        if let Some(v) = self.clock {
            config.clock = v;
        }
        if let Some(v) = self.source_retention {
            config.source_retention = parse_duration(&v)?;
        }
        if let Some(v) = self.block_rows {
            config.block_rows = v;
        }
        if let Some(v) = self.grpc_addr {
            config.grpc_addr = v;
        }
        if let Some(v) = self.workers {
            config.workers = v;
        }
        if let Some(v) = self.restart_workers {
            config.worker_restarts.enabled = v;
        }
        if let Some(v) = self.worker_cores {
            config.worker_cores = v;
        }
        if let Some(v) = self.store {
            config.store = Some(v);
        }
        if let Some(v) = self.s3_endpoint {
            config.s3.endpoint = Some(v);
        }
        if let Some(v) = self.s3_region {
            config.s3.region = Some(v);
        }
        if let Some(v) = self.s3_access_key_id {
            config.s3.access_key_id = Some(v);
        }
        if let Some(v) = self.s3_secret_access_key {
            config.s3.secret_access_key = Some(v);
        }
        if let Some(v) = self.s3_allow_http {
            config.s3.allow_http = Some(v);
        }
        if let Some(v) = self.checkpoint_intervals {
            config.checkpoint_intervals = v;
        }
        if let Some(v) = self.checkpoint_every {
            config.checkpoint_every = parse_optional_duration(&v)?;
        }
        if let Some(v) = self.checkpoints_kept {
            config.checkpoints_kept = v;
        }
        if let Some(v) = self.metrics_addr {
            config.metrics_addr = parse_optional_addr("metrics_addr", &v)?;
        }
        if let Some(v) = self.http_addr {
            config.http_addr = parse_optional_addr("http_addr", &v)?;
        }
        if let Some(v) = &self.max_statement_bytes {
            config.limits.max_statement_bytes = parse_bytes(v)?;
        }
        if let Some(v) = self.max_expression_depth {
            config.limits.max_expression_depth = v;
        }
        if let Some(v) = self.max_expression_nodes {
            config.limits.max_expression_nodes = v;
        }
        if let Some(v) = self.max_windows_per_row {
            config.limits.max_windows_per_row = v;
        }
        if let Some(v) = self.max_windows_per_interval {
            config.limits.max_windows_per_interval = v;
        }
        if let Some(v) = &self.statement_timeout {
            config.statement_timeout = parse_optional_duration(v)?;
        }
        if let Some(v) = &self.query_memory {
            config.query_memory = parse_bytes(v)?;
        }
        if let Some(v) = &self.max_result_bytes {
            config.max_result_bytes = parse_bytes(v)?;
        }
        if let Some(v) = self.max_connections {
            config.max_connections = v;
        }
        if let Some(v) = &self.startup_timeout {
            config.startup_timeout = parse_duration(v)?;
        }
        if let Some(v) = &self.idle_timeout {
            config.idle_timeout = parse_optional_duration(v)?;
        }
        if let Some(v) = &self.send_timeout {
            config.send_timeout = parse_duration(v)?;
        }
        if let Some(v) = &self.http_request_timeout {
            config.http_request_timeout = parse_duration(v)?;
        }
        if let Some(on) = self.speculation {
            config.speculation = on.then(|| config.speculation.unwrap_or_default());
        }
        if let Some(policy) = &mut config.speculation {
            if let Some(v) = self.speculation_multiplier {
                policy.multiplier = v;
            }
            if let Some(v) = &self.speculation_min {
                policy.min_runtime = parse_duration(v)?;
            }
        }
        Ok(())
    }
}

/// An address, or `off` for none.
fn parse_optional_addr(name: &str, v: &str) -> Result<Option<SocketAddr>> {
    if v.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    v.trim()
        .parse()
        .map(Some)
        .map_err(|e| Error::Config(format!("{name} {v:?}: {e} (an address, or off)")))
}

/// A duration, or `off` for none.
pub fn parse_optional_duration(text: &str) -> Result<Option<Duration>> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    parse_duration(text).map(Some)
}

/// Parses a size in bytes: a number, optionally followed by `KiB`, `MiB` or `GiB`
/// (or `K`, `M`, `G`, `KB`, `MB`, `GB`, all powers of 1024).
pub fn parse_bytes(text: &str) -> Result<usize> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        _ => {
            return Err(Error::Config(format!(
                "{text:?} is not a size: use bytes, or a number with KiB, MiB or GiB"
            )));
        }
    };
    digits
        .parse::<usize>()
        .ok()
        .and_then(|n| n.checked_mul(1usize << shift))
        .ok_or_else(|| Error::Config(format!("{text:?} is not a size in bytes")))
}

/// Parses a duration such as `1s` or `250ms` for configuration values.
pub fn parse_duration(text: &str) -> Result<Duration> {
    dstream_planner::duration::parse_duration(text).map_err(|e| Error::Config(e.to_string()))
}

impl ServeConfig {
    /// Task slots per local worker: as configured, or the cores shared evenly.
    pub fn worker_cores(&self) -> usize {
        if self.worker_cores > 0 {
            return self.worker_cores;
        }
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        cores.checked_div(self.workers).unwrap_or(cores).max(1)
    }

    /// The object store: as configured, or the data directory.
    pub fn store_config(&self) -> StoreConfig {
        match &self.store {
            Some(url) => StoreConfig {
                url: url.clone(),
                s3: self.s3.clone(),
            },
            None => StoreConfig::local(&self.data_dir),
        }
    }

    /// The limits every Postgres connection is served under.
    pub fn connection_limits(&self) -> crate::pgwire::ConnectionLimits {
        crate::pgwire::ConnectionLimits {
            max_connections: self.max_connections,
            // A statement at its limit, and a megabyte of parameters with it.
            max_message_bytes: self.limits.max_statement_bytes.saturating_add(1 << 20),
            startup_timeout: self.startup_timeout,
            idle_timeout: self.idle_timeout,
            send_timeout: self.send_timeout,
        }
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<()> {
        if self.partitions == 0 || self.partitions > 1024 {
            return Err(Error::Config(
                "partitions must be between 1 and 1024".into(),
            ));
        }
        if self.block_rows == 0 {
            return Err(Error::Config("block_rows must be positive".into()));
        }
        if self.workers > 64 {
            return Err(Error::Config("workers must be at most 64".into()));
        }
        if self.batch_interval < Duration::from_millis(10) {
            return Err(Error::Config("batch_interval must be at least 10ms".into()));
        }
        if self.checkpoints_kept == 0 {
            return Err(Error::Config("checkpoints_kept must be at least 1".into()));
        }
        let limits = &self.limits;
        if limits.max_statement_bytes == 0
            || limits.max_expression_depth == 0
            || limits.max_expression_nodes == 0
            || limits.max_windows_per_row == 0
            || limits.max_windows_per_interval == 0
        {
            return Err(Error::Config(
                "max_statement_bytes, max_expression_depth, max_expression_nodes, \
                 max_windows_per_row and max_windows_per_interval must be positive"
                    .into(),
            ));
        }
        if limits.max_expression_depth > dstream_planner::limits::MAX_EXPRESSION_DEPTH {
            return Err(Error::Config(format!(
                "max_expression_depth must be at most {}: deeper statements need more stack \
                 than the server's threads have",
                dstream_planner::limits::MAX_EXPRESSION_DEPTH
            )));
        }
        if self.max_connections == 0 {
            return Err(Error::Config("max_connections must be positive".into()));
        }
        if self.query_memory == 0 || self.max_result_bytes == 0 {
            return Err(Error::Config(
                "query_memory and max_result_bytes must be positive".into(),
            ));
        }
        if let Some(policy) = &self.speculation
            && !(policy.multiplier >= 1.0 && policy.multiplier.is_finite())
        {
            return Err(Error::Config(
                "speculation_multiplier must be at least 1".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_values_apply_over_defaults_and_unknown_keys_are_rejected() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("dstream-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("dstream.toml");
        std::fs::write(
            &path,
            "[serve]\nbatch_interval = \"250ms\"\npartitions = 8\nclock = \"manual\"\n",
        )?;
        let mut config = ServeConfig::default();
        FileConfig::load(&path)?.apply(&mut config)?;
        assert_eq!(config.batch_interval, Duration::from_millis(250));
        assert_eq!(config.partitions, 8);
        assert_eq!(config.clock, ClockKind::Manual);
        assert_eq!(config.pg_addr, ServeConfig::default().pg_addr);

        std::fs::write(&path, "[serve]\nbatch_intervall = \"1s\"\n")?;
        let err = FileConfig::load(&path).map(|_| ());
        assert!(
            matches!(&err, Err(Error::Config(m)) if m.contains("batch_intervall")),
            "{err:?}"
        );
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[test]
    fn sizes_parse_with_binary_units() -> Result<()> {
        assert_eq!(parse_bytes("4096")?, 4096);
        assert_eq!(parse_bytes("64KiB")?, 64 << 10);
        assert_eq!(parse_bytes("256 MiB")?, 256 << 20);
        assert_eq!(parse_bytes("1G")?, 1 << 30);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("1TiB").is_err());
        assert!(parse_bytes("99999999999999999999").is_err());
        Ok(())
    }
}
