//! The persisted catalog: every definition a user made, as the SQL that made it.
//!
//! Definitions are kept as their original statements, in creation order, so that a
//! restarted server rebuilds its catalog by replaying them through the same planner
//! that accepted them the first time. The file is versioned JSON (`catalog.json`).

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;
use crate::error::{Error, Result};

const CATALOG_PATH: &str = "catalog.json";
const FORMAT_VERSION: u32 = 1;

/// What kind of object a catalog entry defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EntryKind {
    Source,
    Table,
    MaterializedView,
}

/// One definition: its name, kind and the statement that created it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub name: String,
    pub kind: EntryKind,
    pub sql: String,
    /// Sources and views: the first interval the object took part in (the one after
    /// its creation), so that resuming from a checkpoint taken before it was created
    /// starts it where it first started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// The persisted catalog: definitions in creation order and server settings made with
/// `SET` (such as `batch_interval`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogState {
    pub entries: Vec<CatalogEntry>,
    #[serde(default)]
    pub settings: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct CatalogDocument {
    version: u32,
    #[serde(flatten)]
    state: CatalogState,
}

/// Reads and writes the catalog file of a [`DataDir`].
#[derive(Clone, Debug)]
pub struct CatalogFile {
    dir: DataDir,
}

impl CatalogFile {
    pub fn new(dir: DataDir) -> Self {
        CatalogFile { dir }
    }

    /// The stored catalog; empty for a new data directory.
    pub async fn load(&self) -> Result<CatalogState> {
        let Some(bytes) = self.dir.get(CATALOG_PATH).await? else {
            return Ok(CatalogState::default());
        };
        let doc: CatalogDocument = serde_json::from_slice(&bytes).map_err(|e| Error::Corrupt {
            what: CATALOG_PATH.to_string(),
            reason: e.to_string(),
        })?;
        if doc.version != FORMAT_VERSION {
            return Err(Error::Corrupt {
                what: CATALOG_PATH.to_string(),
                reason: format!(
                    "format version {} is not supported (expected {FORMAT_VERSION})",
                    doc.version
                ),
            });
        }
        Ok(doc.state)
    }

    /// Replaces the stored catalog.
    pub async fn store(&self, state: &CatalogState) -> Result<()> {
        let doc = CatalogDocument {
            version: FORMAT_VERSION,
            state: state.clone(),
        };
        let json = serde_json::to_vec_pretty(&doc).map_err(|e| Error::Corrupt {
            what: CATALOG_PATH.to_string(),
            reason: e.to_string(),
        })?;
        self.dir.put(CATALOG_PATH, Bytes::from(json)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn catalog_round_trips_and_rejects_unknown_versions() -> Result<()> {
        let root = std::env::temp_dir().join(format!("dstream-catalog-{}", std::process::id()));
        let dir = DataDir::open_local(&root)?;
        let file = CatalogFile::new(dir.clone());
        assert_eq!(file.load().await?, CatalogState::default());
        let mut state = CatalogState::default();
        state.entries.push(CatalogEntry {
            name: "s".into(),
            kind: EntryKind::Source,
            sql: "CREATE SOURCE s (a BIGINT) WITH (connector = 'generator')".into(),
            since: Some(4),
        });
        state.settings.insert("batch_interval".into(), "1s".into());
        file.store(&state).await?;
        assert_eq!(file.load().await?, state);
        dir.put(
            CATALOG_PATH,
            Bytes::from_static(b"{\"version\": 99, \"entries\": []}"),
        )
        .await?;
        assert!(matches!(file.load().await, Err(Error::Corrupt { .. })));
        let _ = std::fs::remove_dir_all(root);
        Ok(())
    }
}
