//! Rows of user tables, stored as Arrow IPC files under `tables/<name>.arrow`.

use std::io::Cursor;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow::ipc::reader::FileReader;
use arrow::ipc::writer::FileWriter;
use bytes::Bytes;

use crate::data_dir::DataDir;
use crate::error::Result;

fn table_path(name: &str) -> String {
    format!("tables/{name}.arrow")
}

/// Stores the full contents of table `name`, replacing earlier contents.
pub async fn store_table(
    dir: &DataDir,
    name: &str,
    schema: &SchemaRef,
    batches: &[RecordBatch],
) -> Result<()> {
    let mut buf = Vec::new();
    {
        let mut writer = FileWriter::try_new(&mut buf, schema)?;
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    dir.put(&table_path(name), Bytes::from(buf)).await
}

/// Loads the stored contents of table `name`, or `None` if it has never been stored.
pub async fn load_table(dir: &DataDir, name: &str) -> Result<Option<Vec<RecordBatch>>> {
    let Some(bytes) = dir.get(&table_path(name)).await? else {
        return Ok(None);
    };
    let reader = FileReader::try_new(Cursor::new(bytes), None)?;
    let batches = reader.collect::<std::result::Result<Vec<_>, _>>()?;
    Ok(Some(batches))
}

/// Removes the stored contents of table `name`.
pub async fn drop_table(dir: &DataDir, name: &str) -> Result<()> {
    dir.delete(&table_path(name)).await
}
