//! The client side of the data plane: [`FlightPeers`] fetches shuffle pieces, view
//! partitions and blocks from peers over Arrow Flight, and puts blocks and tables to
//! them; tickets and put descriptors are [`proto::DataTicket`]s ([`ticket`]). The
//! serving side is `crate::worker::flight`.

use std::collections::HashMap;
use std::sync::Mutex;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::{FlightClient, FlightDescriptor, PutResult, Ticket};
use bytes::Bytes;
use futures::TryStreamExt;
use prost::Message;
use tonic::Status;

use super::proto::{self, data_ticket::Kind};
use crate::error::{Error, Result};

/// Decodes a ticket or put descriptor.
pub fn decode_ticket(bytes: &[u8]) -> std::result::Result<Kind, Status> {
    proto::DataTicket::decode(bytes)
        .ok()
        .and_then(|t| t.kind)
        .ok_or_else(|| Status::invalid_argument("not a dstream data ticket"))
}

/// Encodes a ticket.
pub fn ticket(kind: Kind) -> Bytes {
    Bytes::from(proto::DataTicket { kind: Some(kind) }.encode_to_vec())
}

/// Flight clients of the peers a process talks to, one channel each.
#[derive(Debug)]
pub struct FlightPeers {
    channels: Mutex<HashMap<String, tonic::transport::Channel>>,
    /// The runtime the channels' connections run on: the one this was made on, which
    /// answers requests, whichever runtime (a lower-priority one, see
    /// [`crate::worker::compute`]) first talks to a peer.
    runtime: Option<tokio::runtime::Handle>,
}

impl Default for FlightPeers {
    fn default() -> Self {
        Self {
            channels: Mutex::default(),
            runtime: tokio::runtime::Handle::try_current().ok(),
        }
    }
}

impl FlightPeers {
    fn client(&self, address: &str) -> Result<FlightClient> {
        let mut channels = match self.channels.lock() {
            Ok(c) => c,
            Err(poisoned) => poisoned.into_inner(),
        };
        let channel = match channels.get(address) {
            Some(c) => c.clone(),
            None => {
                let _on = self.runtime.as_ref().map(tokio::runtime::Handle::enter);
                let c = crate::rpc::channel(address)?;
                channels.insert(address.to_string(), c.clone());
                c
            }
        };
        let inner = arrow_flight::flight_service_client::FlightServiceClient::new(channel)
            .max_decoding_message_size(crate::rpc::MAX_MESSAGE_BYTES)
            .max_encoding_message_size(crate::rpc::MAX_MESSAGE_BYTES);
        Ok(FlightClient::new_from_inner(inner))
    }

    /// Fetches what `kind` names from the worker at `address`.
    pub async fn fetch(&self, address: &str, kind: Kind) -> Result<Vec<RecordBatch>> {
        let mut client = self.client(address)?;
        let stream = client
            .do_get(Ticket {
                ticket: ticket(kind),
            })
            .await
            .map_err(|e| flight_error(address, e))?;
        stream
            .try_collect()
            .await
            .map_err(|e| flight_error(address, e))
    }

    /// Fetches the pieces a shuffle ticket names (see [`proto::ShuffleRef`]) from the
    /// worker at `address`: one list of batches per block, in the ticket's order.
    pub async fn fetch_pieces(
        &self,
        address: &str,
        shuffle: proto::ShuffleRef,
    ) -> Result<Vec<Vec<RecordBatch>>> {
        let mut client = self.client(address)?;
        let asked = shuffle.more_blocks.len().saturating_add(1);
        let stream = client
            .do_get(Ticket {
                ticket: ticket(Kind::Shuffle(shuffle)),
            })
            .await
            .map_err(|e| flight_error(address, e))?;
        let rows = stream
            .headers()
            .get(PIECE_ROWS)
            .and_then(|rows| rows.to_str().ok())
            .map(|rows| rows.split(',').map(str::parse::<usize>).collect::<Vec<_>>())
            .and_then(|rows| {
                rows.into_iter()
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .ok()
            })
            .ok_or_else(|| Error::Remote(format!("{address}: no piece rows in the answer")))?;
        if rows.len() != asked {
            return Err(Error::Remote(format!(
                "{address}: {} pieces in the answer, {asked} asked for",
                rows.len()
            )));
        }
        let batches: Vec<RecordBatch> = stream
            .try_collect()
            .await
            .map_err(|e| flight_error(address, e))?;
        split_rows(batches, &rows).map_err(|e| Error::Remote(format!("{address}: {e}")))
    }

    /// Stores `batches` at the worker at `address` under `kind`.
    pub async fn put(
        &self,
        address: &str,
        kind: Kind,
        schema: SchemaRef,
        batches: Vec<RecordBatch>,
    ) -> Result<()> {
        let mut client = self.client(address)?;
        let descriptor = FlightDescriptor::new_cmd(ticket(kind));
        let data = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .with_flight_descriptor(Some(descriptor))
            .build(futures::stream::iter(batches.into_iter().map(Ok)));
        let results: Vec<PutResult> = client
            .do_put(data)
            .await
            .map_err(|e| flight_error(address, e))?
            .try_collect()
            .await
            .map_err(|e| flight_error(address, e))?;
        if results.is_empty() {
            return Err(Error::Internal(format!(
                "{address} did not acknowledge a put"
            )));
        }
        Ok(())
    }
}

/// The header of a shuffle fetch's answer: the rows of each piece, comma-separated.
pub(crate) const PIECE_ROWS: &str = "dstream-piece-rows";

/// Cuts `batches` into consecutive runs of `rows` rows each (slicing a batch that
/// straddles two runs, without copying).
fn split_rows(
    batches: Vec<RecordBatch>,
    rows: &[usize],
) -> std::result::Result<Vec<Vec<RecordBatch>>, String> {
    let mut batches = batches.into_iter().filter(|b| b.num_rows() > 0);
    let mut carry: Option<RecordBatch> = None;
    let mut runs = Vec::with_capacity(rows.len());
    for &wanted in rows {
        let mut run = Vec::new();
        let mut left = wanted;
        while left > 0 {
            let Some(batch) = carry.take().or_else(|| batches.next()) else {
                return Err(format!(
                    "the pieces hold fewer rows than the {wanted} announced"
                ));
            };
            if batch.num_rows() > left {
                carry = Some(batch.slice(left, batch.num_rows().saturating_sub(left)));
                run.push(batch.slice(0, left));
                left = 0;
            } else {
                left = left.saturating_sub(batch.num_rows());
                run.push(batch);
            }
        }
        runs.push(run);
    }
    if carry.is_some() || batches.next().is_some() {
        return Err("the pieces hold more rows than announced".into());
    }
    Ok(runs)
}

fn flight_error(address: &str, e: FlightError) -> Error {
    match e {
        FlightError::Tonic(status) if status.code() == tonic::Code::Aborted => {
            Error::Moved(format!("{address}: {}", status.message()))
        }
        FlightError::Tonic(status) => Error::Remote(format!("{address}: {}", status.message())),
        other => Error::Remote(format!("{address}: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{Array, Int64Array};
    use arrow::datatypes::{DataType, Field, Schema};

    use super::*;

    fn batch(values: Vec<i64>) -> Result<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        Ok(RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(values))],
        )?)
    }

    fn values(batches: &[RecordBatch]) -> Vec<i64> {
        batches
            .iter()
            .flat_map(|b| {
                let column = b.column(0).as_any().downcast_ref::<Int64Array>();
                column.map(|c| c.values().to_vec()).unwrap_or_default()
            })
            .collect()
    }

    #[test]
    fn batches_are_cut_into_pieces_by_their_rows() -> Result<()> {
        let batches = || -> Result<Vec<RecordBatch>> {
            Ok(vec![
                batch(vec![1, 2, 3])?,
                batch(vec![])?,
                batch(vec![4, 5])?,
            ])
        };
        let pieces = split_rows(batches()?, &[2, 0, 2, 1]).map_err(Error::Internal)?;
        let pieces: Vec<Vec<i64>> = pieces.iter().map(|p| values(p)).collect();
        assert_eq!(pieces, vec![vec![1, 2], vec![], vec![3, 4], vec![5]]);
        assert!(split_rows(batches()?, &[2, 2]).is_err());
        assert!(split_rows(batches()?, &[4, 2]).is_err());
        Ok(())
    }
}
