//! How rows and timelines travel in control-plane messages: batches as Arrow IPC
//! stream bytes, timelines as [`proto::Timeline`].

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use dstream_storage::Timeline;
use tonic::Status;

use super::proto;
use crate::error::{Error, Result};

/// `batches` as an Arrow IPC stream (empty bytes for no rows).
pub fn ipc_bytes(schema: &SchemaRef, batches: &[RecordBatch]) -> Result<Vec<u8>> {
    if batches.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    {
        let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut out, schema)?;
        for batch in batches {
            writer.write(batch)?;
        }
        writer.finish()?;
    }
    Ok(out)
}

/// Reads an Arrow IPC stream written by [`ipc_bytes`].
pub fn read_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>> {
    if bytes.is_empty() {
        return Ok(Vec::new());
    }
    let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)?;
    reader
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(Error::from)
}

/// The coordinator's timeline as a request carries it.
pub fn timeline_message(timeline: &Timeline) -> proto::Timeline {
    proto::Timeline {
        origin_nanos: timeline.origin_nanos,
        width_nanos: timeline.width_nanos,
    }
}

/// The timeline a request carries; an error status if it carries none.
pub fn timeline(t: Option<proto::Timeline>) -> std::result::Result<Timeline, Status> {
    t.map(|t| Timeline {
        origin_nanos: t.origin_nanos,
        width_nanos: t.width_nanos.max(1),
    })
    .ok_or_else(|| Status::invalid_argument("missing timeline"))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    #[test]
    fn batches_and_timelines_read_back_as_written() -> Result<()> {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from(vec![1, 2, 3]))],
        )?;
        assert_eq!(
            read_ipc(&ipc_bytes(&schema, std::slice::from_ref(&batch))?)?,
            vec![batch]
        );
        assert!(ipc_bytes(&schema, &[])?.is_empty());
        assert!(read_ipc(&[])?.is_empty());

        let at = Timeline {
            origin_nanos: 5,
            width_nanos: 1_000,
        };
        assert_eq!(timeline(Some(timeline_message(&at))).ok(), Some(at));
        assert!(timeline(None).is_err());
        Ok(())
    }
}
