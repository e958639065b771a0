//! Fault injection for object stores, for testing what failing storage does.
//!
//! [`FaultyStore`] wraps any [`ObjectStore`]: every read and write first waits
//! [`StoreFaults::latency`] (listing and deleting do not), and the writes numbered
//! [`StoreFaults::fail`] (counted from 1 over every faulty store of this process,
//! retries included) fail with an injected error. A
//! [`crate::DataDir`] opened while `DSTREAM_FAULT_STORE` is set (e.g.
//! `latency=50ms,fail=10-30`) wraps its store in one, so a test can make the
//! coordinator or a worker process see a slow store, or an outage of some writes.

use std::fmt;
use std::ops::{Range, RangeInclusive};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

use crate::error::{Error, Result};

/// The environment variable that turns fault injection on for a process's stores.
pub const FAULTS_ENV: &str = "DSTREAM_FAULT_STORE";

/// What to inject.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoreFaults {
    /// Every call waits this long first.
    pub latency: Duration,
    /// These writes fail (numbered from 1 in this process).
    pub fail: Option<RangeInclusive<u64>>,
}

impl StoreFaults {
    /// Parses `latency=50ms,fail=10-30` (either part may be left out).
    pub fn parse(text: &str) -> Result<Self> {
        let bad = |reason: String| Error::DataDir {
            path: FAULTS_ENV.into(),
            reason,
        };
        let mut faults = StoreFaults::default();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some(("latency", value)) => {
                    faults.latency = parse_millis(value)
                        .ok_or_else(|| bad(format!("latency {value:?}: use e.g. 50ms")))?;
                }
                Some(("fail", value)) => {
                    let range = value
                        .split_once('-')
                        .and_then(|(a, b)| Some(a.trim().parse().ok()?..=b.trim().parse().ok()?))
                        .ok_or_else(|| bad(format!("fail {value:?}: use e.g. 10-30")))?;
                    faults.fail = Some(range);
                }
                _ => return Err(bad(format!("{part:?}: expected latency=... or fail=N-M"))),
            }
        }
        Ok(faults)
    }

    /// The faults `DSTREAM_FAULT_STORE` asks for, if it is set.
    pub fn from_env() -> Result<Option<Self>> {
        match std::env::var(FAULTS_ENV) {
            Ok(text) => Self::parse(&text).map(Some),
            Err(_) => Ok(None),
        }
    }
}

fn parse_millis(text: &str) -> Option<Duration> {
    let text = text.trim();
    if let Some(ms) = text.strip_suffix("ms") {
        return ms.trim().parse().ok().map(Duration::from_millis);
    }
    text.strip_suffix('s')?
        .trim()
        .parse()
        .ok()
        .map(Duration::from_secs)
}

/// Writes through faulty stores in this process, for [`StoreFaults::fail`].
static WRITES: AtomicU64 = AtomicU64::new(0);

/// A store whose calls are slowed down and some of whose writes fail.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: StoreFaults,
    /// Counts this store's writes instead of the process's (tests of the wrapper).
    own_count: Option<AtomicU64>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: StoreFaults) -> Self {
        FaultyStore {
            inner,
            faults,
            own_count: None,
        }
    }

    async fn delay(&self) {
        if !self.faults.latency.is_zero() {
            tokio::time::sleep(self.faults.latency).await;
        }
    }

    /// Waits, then counts a write and fails it if it is one of the failing ones.
    async fn write(&self, location: &Path) -> object_store::Result<()> {
        self.delay().await;
        let n = self
            .own_count
            .as_ref()
            .unwrap_or(&WRITES)
            .fetch_add(1, Ordering::SeqCst)
            + 1;
        match &self.faults.fail {
            Some(failing) if failing.contains(&n) => Err(object_store::Error::Generic {
                store: "fault injection",
                source: format!("injected failure of write {n} ({location})").into(),
            }),
            _ => Ok(()),
        }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> object_store::Result<PutResult> {
        self.write(location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.write(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(
        &self,
        location: &Path,
        options: GetOptions,
    ) -> object_store::Result<GetResult> {
        self.delay().await;
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(
        &self,
        location: &Path,
        ranges: &[Range<u64>],
    ) -> object_store::Result<Vec<Bytes>> {
        self.delay().await;
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.inner.list_with_offset(prefix, offset)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        self.delay().await;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(
        &self,
        from: &Path,
        to: &Path,
        options: CopyOptions,
    ) -> object_store::Result<()> {
        self.write(to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(
        &self,
        from: &Path,
        to: &Path,
        options: RenameOptions,
    ) -> object_store::Result<()> {
        self.write(to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use object_store::ObjectStoreExt;
    use object_store::memory::InMemory;

    use super::*;

    #[test]
    fn faults_parse_from_text() -> Result<()> {
        assert_eq!(
            StoreFaults::parse("latency=50ms, fail=3-4")?,
            StoreFaults {
                latency: Duration::from_millis(50),
                fail: Some(3..=4),
            }
        );
        assert_eq!(StoreFaults::parse("")?, StoreFaults::default());
        assert!(StoreFaults::parse("fail=3").is_err());
        assert!(StoreFaults::parse("latency=fast").is_err());
        assert!(StoreFaults::parse("drop=all").is_err());
        Ok(())
    }

    #[tokio::test]
    async fn the_chosen_writes_fail_and_nothing_else() {
        let store = FaultyStore {
            own_count: Some(AtomicU64::new(0)),
            ..FaultyStore::new(
                Arc::new(InMemory::new()),
                StoreFaults {
                    latency: Duration::ZERO,
                    fail: Some(2..=3),
                },
            )
        };
        let path = |i: u32| Path::from(format!("f{i}"));
        let mut outcomes = Vec::new();
        for i in 1..=4 {
            outcomes.push(store.put(&path(i), Bytes::from("x").into()).await.is_ok());
        }
        assert_eq!(outcomes, vec![true, false, false, true]);
        // A failed write wrote nothing; reads are never failed.
        assert!(store.get(&path(2)).await.is_err());
        assert!(store.get(&path(4)).await.is_ok());
    }
}
