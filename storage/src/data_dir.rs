//! The data directory: where a deployment keeps its durable files.
//!
//! [`DataDir`] wraps an [`ObjectStore`] rooted at the directory. Today it is always a
//! local directory (`file://`); the object-store indirection is what lets later
//! deployments point it at S3 without touching its users.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use object_store::local::LocalFileSystem;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};

use crate::error::{Error, Result};

/// Durable storage of one deployment, addressed by relative paths such as `catalog.json`.
#[derive(Clone, Debug)]
pub struct DataDir {
    root: PathBuf,
    store: Arc<dyn ObjectStore>,
}

impl DataDir {
    /// Opens (creating it if needed) a local data directory.
    pub fn open_local(root: impl AsRef<Path>) -> Result<Self> {
        let root = root.as_ref().to_path_buf();
        let display = root.display().to_string();
        std::fs::create_dir_all(&root).map_err(|e| Error::DataDir {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        let root = root.canonicalize().map_err(|e| Error::DataDir {
            path: display.clone(),
            reason: e.to_string(),
        })?;
        let store = LocalFileSystem::new_with_prefix(&root).map_err(|e| Error::DataDir {
            path: display,
            reason: e.to_string(),
        })?;
        Ok(DataDir {
            root,
            store: Arc::new(store),
        })
    }

    /// The local directory this data directory lives in.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes `bytes` to `path`, replacing what was there. Local writes are atomic
    /// (written aside, then renamed), so a reader sees the old or the new file whole.
    pub async fn put(&self, path: &str, bytes: Bytes) -> Result<()> {
        self.store
            .put(&StorePath::from(path), PutPayload::from_bytes(bytes))
            .await?;
        Ok(())
    }

    /// Reads `path`, or `None` if it does not exist.
    pub async fn get(&self, path: &str) -> Result<Option<Bytes>> {
        match self.store.get(&StorePath::from(path)).await {
            Ok(result) => Ok(Some(result.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Deletes `path`; deleting a missing file is not an error.
    pub async fn delete(&self, path: &str) -> Result<()> {
        match self.store.delete(&StorePath::from(path)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn put_get_delete_round_trip() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("dstream-datadir-{}", std::process::id()));
        let data = DataDir::open_local(&dir)?;
        assert_eq!(data.get("a/b.json").await?, None);
        data.put("a/b.json", Bytes::from_static(b"{}")).await?;
        assert_eq!(data.get("a/b.json").await?, Some(Bytes::from_static(b"{}")));
        data.delete("a/b.json").await?;
        data.delete("a/b.json").await?;
        assert_eq!(data.get("a/b.json").await?, None);
        let _ = std::fs::remove_dir_all(dir);
        Ok(())
    }
}
