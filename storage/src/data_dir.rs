//! The data directory: where a deployment keeps its durable files.
//!
//! [`DataDir`] wraps an [`ObjectStore`] and a prefix inside it. Its location is a URL
//! ([`StoreConfig`]):
//! - `file:///path` — a local directory (the embedded default);
//! - `s3://bucket/prefix` — any S3-compatible endpoint; endpoint, region and
//!   credentials come from [`S3Options`] or the standard `AWS_*` environment variables;
//! - `memory://name` — in this process's memory, for tests. Every [`DataDir`] opened
//!   with the same name in one process shares the same objects.
//!
//! Paths are relative (`catalog.json`, `checkpoints/...`) and always use `/`.
//! Writes that fail with an error that may pass (anything but a missing object, an
//! existing one or a refused precondition) are tried [`WRITE_ATTEMPTS`] times.
//! With `DSTREAM_FAULT_STORE` set, the store is wrapped in a
//! [`FaultyStore`](crate::fault_store::FaultyStore) (testing only).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::fault_store::{FaultyStore, StoreFaults};

/// How many times a write is tried before its error is returned.
pub const WRITE_ATTEMPTS: u32 = 3;
/// The wait before the second attempt; it doubles for each further one.
const RETRY_BACKOFF: Duration = Duration::from_millis(100);

/// Connection settings for `s3://` stores. Unset fields fall back to the standard AWS
/// environment variables (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
/// `AWS_SECRET_ACCESS_KEY`, `AWS_ALLOW_HTTP`, ...).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct S3Options {
    /// An S3-compatible endpoint such as `http://127.0.0.1:9000`.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// Allows plain `http://` endpoints; implied by an `http://` endpoint.
    pub allow_http: Option<bool>,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "<hidden>"),
            )
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// Where a deployment's durable data lives.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreConfig {
    /// `file:///path`, `s3://bucket/prefix` or `memory://name`.
    pub url: String,
    pub s3: S3Options,
}

impl StoreConfig {
    /// A local directory.
    pub fn local(path: impl AsRef<Path>) -> Self {
        StoreConfig {
            url: format!("file://{}", absolute(path.as_ref()).display()),
            s3: S3Options::default(),
        }
    }
}

fn absolute(path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir()
            .map(|d| d.join(path))
            .unwrap_or_else(|_| path.to_path_buf())
    }
}

/// The in-memory stores of this process, by name.
fn memory_stores() -> &'static Mutex<HashMap<String, Arc<InMemory>>> {
    static STORES: OnceLock<Mutex<HashMap<String, Arc<InMemory>>>> = OnceLock::new();
    STORES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// One object in a listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    /// Relative to the data directory.
    pub path: String,
    pub size: u64,
}

/// Durable storage of one deployment, addressed by relative paths such as `catalog.json`.
#[derive(Clone, Debug)]
pub struct DataDir {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
}

impl DataDir {
    /// Opens the store `config` names; a local directory is created if needed.
    pub fn open(config: &StoreConfig) -> Result<Self> {
        let url = config.url.trim_end_matches('/').to_string();
        let bad = |reason: String| Error::DataDir {
            path: url.clone(),
            reason,
        };
        if let Some(path) = url.strip_prefix("file://") {
            return Self::open_local(if path.is_empty() { "/" } else { path });
        }
        if let Some(name) = url.strip_prefix("memory://") {
            let store = match memory_stores().lock() {
                Ok(mut stores) => stores.entry(name.to_string()).or_default().clone(),
                Err(poisoned) => poisoned
                    .into_inner()
                    .entry(name.to_string())
                    .or_default()
                    .clone(),
            };
            return DataDir::new(url, store, StorePath::default());
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(bad("an s3:// URL names a bucket: s3://bucket/prefix".into()));
            }
            let store = s3_store(bucket, &config.s3).map_err(|e| bad(e.to_string()))?;
            return DataDir::new(url.clone(), Arc::new(store), StorePath::from(prefix));
        }
        Err(bad(
            "unsupported store URL: use file:///path, s3://bucket/prefix or memory://name".into(),
        ))
    }

    /// Opens (creating it if needed) a local data directory.
    pub fn open_local(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let display = root.display().to_string();
        let bad = |e: std::io::Error| Error::DataDir {
            path: display.clone(),
            reason: e.to_string(),
        };
        std::fs::create_dir_all(&root).map_err(bad)?;
        let root = root.canonicalize().map_err(bad)?;
        let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| Error::DataDir {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        DataDir::new(
            format!("file://{}", root.display()),
            Arc::new(store),
            StorePath::default(),
        )
    }

    fn new(url: String, store: Arc<dyn ObjectStore>, prefix: StorePath) -> Result<Self> {
        let store: Arc<dyn ObjectStore> = match StoreFaults::from_env()? {
            Some(faults) => {
                tracing::warn!(%url, ?faults, "fault injection: this store is slowed down and some of its writes fail");
                Arc::new(FaultyStore::new(store, faults))
            }
            None => store,
        };
        Ok(DataDir { url, store, prefix })
    }

    /// Runs a write, again after a short wait while it fails with an error that may
    /// pass, at most [`WRITE_ATTEMPTS`] times.
    async fn retried<T, F, Fut>(&self, path: &str, write: F) -> object_store::Result<T>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut wait = RETRY_BACKOFF;
        let mut attempt = 1;
        loop {
            match write().await {
                Err(e) if attempt < WRITE_ATTEMPTS && may_pass(&e) => {
                    tracing::warn!(url = %self.url, path, attempt, error = %e, "a write to the store failed; trying again");
                    tokio::time::sleep(wait).await;
                    wait *= 2;
                    attempt += 1;
                }
                outcome => return outcome,
            }
        }
    }

    /// The URL this data directory was opened from, e.g. `s3://bucket/prefix`.
    pub fn url(&self) -> &str {
        &self.url
    }

    fn path(&self, relative: &str) -> StorePath {
        let mut path = self.prefix.clone();
        for part in relative.split('/').filter(|p| !p.is_empty()) {
            path = path.join(part);
        }
        path
    }

    fn relative(&self, path: &StorePath) -> String {
        match path.prefix_match(&self.prefix) {
            Some(parts) => parts
                .map(|p| p.as_ref().to_string())
                .collect::<Vec<_>>()
                .join("/"),
            None => path.to_string(),
        }
    }

    /// Writes `bytes` to `path`, replacing what was there. Writes are atomic: a
    /// reader sees the old or the new object whole (local files are written aside,
    /// then renamed).
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        let location = self.path(path);
        self.retried(path, || {
            self.store
                .put(&location, PutPayload::from_bytes(bytes.clone()))
        })
        .await
        .map_err(|e| self.error("writing", path, e))?;
        Ok(())
    }

    /// Writes `bytes` to `path` only if nothing is there yet: `true` if written,
    /// `false` if `path` already existed (and was left as it was).
    pub async fn put_if_absent(&self, path: &str, bytes: Bytes) -> Result<bool> {
        let location = self.path(path);
        let put = || {
            let options = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            self.store
                .put_opts(&location, PutPayload::from_bytes(bytes.clone()), options)
        };
        // A retry after a write that did happen finds the object there: `false`, as
        // for any earlier writer's.
        match self.retried(path, put).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
            // Some S3-compatible stores answer a failed If-None-Match with 412.
            Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(e) => Err(self.error("writing", path, e)),
        }
    }

    /// Reads `path`, or `None` if it does not exist.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>> {
        match self.store.get(&self.path(path)).await {
            Ok(result) => Ok(Some(
                result
                    .bytes()
                    .await
                    .map_err(|e| self.error("reading", path, e))?,
            )),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("reading", path, e)),
        }
    }

    /// Deletes `path`; deleting a missing file is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&self.path(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.error("deleting", path, e)),
        }
    }

    /// Every object under `prefix` (a directory-like path), in no particular order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let objects: Vec<_> = self
            .store
            .list(Some(&self.path(prefix)))
            .try_collect()
            .await
            .or_else(|e| match e {
                object_store::Error::NotFound { .. } => Ok(Vec::new()),
                e => Err(self.error("listing", prefix, e)),
            })?;
        Ok(objects
            .iter()
            .map(|o| Listed {
                path: self.relative(&o.location),
                size: o.size,
            })
            .collect())
    }

    /// Deletes every object under `prefix`.
    pub async fn delete_prefix(&self, prefix: &str) -> Result<()> {
        for listed in self.list(prefix).await? {
            self.delete(&listed.path).await?;
        }
        Ok(())
    }

    fn error(&self, doing: &str, path: &str, e: object_store::Error) -> Error {
        Error::Store {
            what: format!("{doing} {}/{path}", self.url),
            source: e,
        }
    }
}

/// Whether a store error may pass if the write is tried again.
fn may_pass(e: &object_store::Error) -> bool {
    !matches!(
        e,
        object_store::Error::NotFound { .. }
            | object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. }
            | object_store::Error::NotSupported { .. }
            | object_store::Error::NotImplemented { .. }
            | object_store::Error::InvalidPath { .. }
            | object_store::Error::UnknownConfigurationKey { .. }
    )
}

fn s3_store(
    bucket: &str,
    options: &S3Options,
) -> object_store::Result<object_store::aws::AmazonS3> {
    use object_store::ClientConfigKey;
    use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
    let mut builder = AmazonS3Builder::from_env().with_bucket_name(bucket);
    if let Some(endpoint) = &options.endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    if let Some(region) = &options.region {
        builder = builder.with_region(region);
    }
    if let Some(key) = &options.access_key_id {
        builder = builder.with_access_key_id(key);
    }
    if let Some(secret) = &options.secret_access_key {
        builder = builder.with_secret_access_key(secret);
    }
    let endpoint = options
        .endpoint
        .clone()
        .or_else(|| builder.get_config_value(&AmazonS3ConfigKey::Endpoint));
    let http_endpoint = endpoint.is_some_and(|e| e.starts_with("http://"));
    if let Some(allow) = options.allow_http.or(http_endpoint.then_some(true)) {
        builder = builder.with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::AllowHttp),
            allow.to_string(),
        );
    }
    // The request signer needs a region even where the endpoint ignores it.
    if builder
        .get_config_value(&AmazonS3ConfigKey::Region)
        .is_none()
    {
        builder = builder.with_region("us-east-1");
    }
    builder.build()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn round_trip(data: &DataDir) -> Result<()> {
        assert_eq!(data.get("a/b.json").await?, None);
        data.put("a/b.json", Bytes::from_static(b"{}")).await?;
        assert_eq!(data.get("a/b.json").await?, Some(Bytes::from_static(b"{}")));
        assert!(
            data.put_if_absent("a/c.json", Bytes::from_static(b"1"))
                .await?
        );
        assert!(
            !data
                .put_if_absent("a/c.json", Bytes::from_static(b"2"))
                .await?
        );
        assert_eq!(data.get("a/c.json").await?, Some(Bytes::from_static(b"1")));
        let mut listed = data.list("a").await?;
        listed.sort_by(|x, y| x.path.cmp(&y.path));
        assert_eq!(
            listed,
            vec![
                Listed {
                    path: "a/b.json".into(),
                    size: 2
                },
                Listed {
                    path: "a/c.json".into(),
                    size: 1
                }
            ]
        );
        assert!(data.list("nothing/here").await?.is_empty());
        data.delete("a/b.json").await?;
        data.delete("a/b.json").await?;
        assert_eq!(data.get("a/b.json").await?, None);
        data.delete_prefix("a").await?;
        assert!(data.list("a").await?.is_empty());
        Ok(())
    }

    #[tokio::test]
    async fn local_directories_round_trip() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("dstream-datadir-{}", std::process::id()));
        round_trip(&DataDir::open_local(&dir)?).await?;
        round_trip(&DataDir::open(&StoreConfig::local(&dir))?).await?;
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }

    #[tokio::test]
    async fn memory_stores_are_shared_by_name() -> Result<()> {
        let config = StoreConfig {
            url: "memory://shared-by-name".into(),
            ..Default::default()
        };
        round_trip(&DataDir::open(&config)?).await?;
        DataDir::open(&config)?
            .put("x", Bytes::from_static(b"1"))
            .await?;
        assert_eq!(
            DataDir::open(&config)?.get("x").await?,
            Some(Bytes::from_static(b"1"))
        );
        let other = StoreConfig {
            url: "memory://another".into(),
            ..Default::default()
        };
        assert_eq!(DataDir::open(&other)?.get("x").await?, None);
        Ok(())
    }

    #[test]
    fn unsupported_urls_are_refused_clearly() {
        for url in ["ftp://host/x", "s3://", "/just/a/path"] {
            let config = StoreConfig {
                url: url.into(),
                ..Default::default()
            };
            let err = DataDir::open(&config).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains(url.trim_end_matches('/'))),
                "{url}: {err:?}"
            );
        }
    }

    /// Runs against a real S3-compatible server when `DSTREAM_TEST_S3_ENDPOINT` is set
    /// (`scripts/test.sh` starts one); the bucket `DSTREAM_TEST_S3_BUCKET` must exist.
    #[tokio::test]
    async fn s3_round_trips_against_a_real_server() -> Result<()> {
        let Ok(endpoint) = std::env::var("DSTREAM_TEST_S3_ENDPOINT") else {
            eprintln!("DSTREAM_TEST_S3_ENDPOINT is not set: skipped");
            return Ok(());
        };
        let bucket = std::env::var("DSTREAM_TEST_S3_BUCKET").unwrap_or_else(|_| "dstream".into());
        let config = StoreConfig {
            url: format!("s3://{bucket}/unit-{}", std::process::id()),
            s3: S3Options {
                endpoint: Some(endpoint),
                access_key_id: Some("test".into()),
                secret_access_key: Some("test".into()),
                ..Default::default()
            },
        };
        round_trip(&DataDir::open(&config)?).await
    }
}
