//! User tables as the coordinator holds them: rows inserted with `INSERT`, or files.

use std::sync::Arc;

use arrow::array::RecordBatch;
use datafusion::catalog::{MemTable, TableProvider};

/// A user table.
#[derive(Clone, Debug)]
pub enum TableSlot {
    /// Rows inserted with `INSERT`, persisted in the data directory.
    Memory(Arc<MemTable>),
    /// Files in a directory.
    File(Arc<dyn TableProvider>),
}

impl TableSlot {
    pub fn provider(&self) -> Arc<dyn TableProvider> {
        match self {
            TableSlot::Memory(m) => m.clone(),
            TableSlot::File(f) => f.clone(),
        }
    }
}

/// The rows of a memory table, every partition in order.
pub async fn memory_rows(table: &MemTable) -> Vec<RecordBatch> {
    let mut rows = Vec::new();
    for partition in &table.batches {
        rows.extend(partition.read().await.iter().cloned());
    }
    rows
}
