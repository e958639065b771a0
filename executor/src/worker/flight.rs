//! The data plane: Arrow Flight between workers, and between the coordinator and
//! workers.
//!
//! [`FlightEndpoint`] serves a worker's data: `do_get` streams shuffle outputs, view
//! partitions, input blocks and (for a handover) state partitions; `do_put` stores a
//! replica of an input block (sent without its constant `_interval` column, and kept
//! encoded until read), the lineage a replayable source's blocks are kept as instead,
//! or the rows of a table.
//! Tickets and put descriptors are [`proto::DataTicket`]s. Batches travel as Arrow
//! IPC (Flight's own encoding) — no row-by-row encoding anywhere — and a worker
//! reading its own data skips Flight and shares the batches (see `service`).
//!
//! The client side, [`crate::rpc::FlightPeers`], is part of the wire contract.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::Schema;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use dstream_storage::IntervalId;
use futures::{Stream, StreamExt, TryStreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::state::{EncodedBlock, LineageBlocks, ViewRowsRead, WorkerState};
use crate::connector::Split;
use crate::rpc::flight::{PIECE_ROWS, decode_ticket};
use crate::rpc::proto::{self, data_ticket::Kind};

type BoxedStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send + 'static>>;

/// The Flight service of one worker.
#[derive(Debug)]
pub struct FlightEndpoint {
    state: Arc<WorkerState>,
}

impl FlightEndpoint {
    pub fn new(state: Arc<WorkerState>) -> Self {
        FlightEndpoint { state }
    }

    /// One component of partition `s.partition`'s piece of each map output `s` names
    /// (`s.block`, then `s.more_blocks`), in that order.
    fn pieces(&self, s: &proto::ShuffleRef) -> std::result::Result<Vec<Vec<RecordBatch>>, Status> {
        let blocks = std::iter::once(s.block).chain(s.more_blocks.iter().copied());
        blocks
            .map(|block| {
                let key = (s.view.clone(), IntervalId(s.interval), block);
                let pieces = self.state.shuffle.get(&key).ok_or_else(|| {
                    Status::not_found(format!(
                        "no map output of view {} for block {block} of interval {}",
                        s.view, s.interval
                    ))
                })?;
                let piece = pieces.get(s.partition as usize).ok_or_else(|| {
                    Status::invalid_argument(format!("no partition {}", s.partition))
                })?;
                Ok(match s.component {
                    0 => piece.rows.clone(),
                    k => (k as usize)
                        .checked_sub(1)
                        .and_then(|d| piece.distinct.get(d))
                        .cloned()
                        .unwrap_or_default(),
                })
            })
            .collect()
    }

    fn batches_for(&self, kind: Kind) -> std::result::Result<Vec<RecordBatch>, Status> {
        match kind {
            Kind::Shuffle(s) => Ok(self.pieces(&s)?.into_iter().flatten().collect()),
            Kind::ViewRows(v) => {
                match self
                    .state
                    .partitions
                    .view_rows(&v.view, v.partition, IntervalId(v.interval))
                {
                    ViewRowsRead::Rows(rows) => Ok(rows.as_ref().clone()),
                    ViewRowsRead::TooOld => Err(Status::aborted(format!(
                        "view {} partition {} no longer holds interval {}; retry the query",
                        v.view, v.partition, v.interval
                    ))),
                    ViewRowsRead::NotHere => Err(Status::aborted(format!(
                        "view {} partition {} moved to another worker; retry the query",
                        v.view, v.partition
                    ))),
                }
            }
            Kind::SourceBlocks(s) => {
                let mut batches = Vec::new();
                for b in &s.blocks {
                    let block = self
                        .state
                        .block(&s.source, IntervalId(b.interval), b.index)
                        .map_err(|e| Status::internal(e.to_string()))?
                        .ok_or_else(|| {
                            Status::not_found(format!(
                                "block {} of interval {} of source {} is not held here",
                                b.index, b.interval, s.source
                            ))
                        })?;
                    batches.extend(block.batches.iter().cloned());
                }
                Ok(batches)
            }
            Kind::PartitionState(part) => super::handover::partition_part(&self.state, &part)
                .ok_or_else(|| {
                    Status::not_found(format!(
                        "no {:?} part {} of view {} partition {} here",
                        part.part(),
                        part.index,
                        part.view,
                        part.partition
                    ))
                }),
            Kind::Block(_) | Kind::Lineage(_) | Kind::Table(_) => Err(Status::invalid_argument(
                "blocks, lineages and tables are put, not fetched",
            )),
        }
    }

    /// Keeps a block replica as the Flight messages it arrived in, once its schema
    /// is checked against the source's (less the `_interval` column it travels
    /// without).
    async fn store_replica(
        &self,
        b: proto::BlockRef,
        messages: Vec<FlightData>,
    ) -> std::result::Result<(), Status> {
        let (schema, interval_start) = {
            let installed = self.state.installed.lock().await;
            installed
                .as_ref()
                .and_then(|i| {
                    i.catalog.source(&b.source).map(|d| {
                        (
                            d.schema.clone(),
                            i.timeline.start_nanos(IntervalId(b.interval)),
                        )
                    })
                })
                .ok_or_else(|| {
                    Status::failed_precondition(format!("unknown source {}", b.source))
                })?
        };
        let mismatch = |detail: String| {
            Status::invalid_argument(format!(
                "a block of source {} does not match its schema: {detail}",
                b.source
            ))
        };
        let sent = messages
            .first()
            .ok_or_else(|| mismatch("no schema".into()))
            .and_then(|m| Schema::try_from(m).map_err(|e| mismatch(e.to_string())))?;
        let records: Vec<usize> = (0..schema.fields().len().saturating_sub(1)).collect();
        let expected = schema
            .project(&records)
            .map_err(|e| mismatch(e.to_string()))?;
        if sent.fields() != expected.fields() {
            return Err(mismatch(format!("got {sent:?}")));
        }
        self.state.blocks.put_encoded(EncodedBlock {
            source: b.source,
            interval: IntervalId(b.interval),
            index: b.index as usize,
            schema,
            interval_start,
            messages,
        });
        Ok(())
    }

    /// Keeps the lineage of a replayable source's blocks, in place of their rows.
    async fn store_lineage(&self, lineage: proto::BlockLineage) -> std::result::Result<(), Status> {
        let (def, block_rows) = {
            let installed = self.state.installed.lock().await;
            installed
                .as_ref()
                .and_then(|i| {
                    i.catalog
                        .source(&lineage.source)
                        .map(|d| (d.clone(), i.block_rows))
                })
                .ok_or_else(|| {
                    Status::failed_precondition(format!("unknown source {}", lineage.source))
                })?
        };
        let timeline = crate::rpc::codec::timeline(lineage.timeline)?;
        let held = LineageBlocks::new(
            def,
            block_rows,
            Split {
                index: lineage.split,
                count: lineage.splits.max(1),
            },
            IntervalId(lineage.interval),
            timeline,
            lineage.watermark,
        );
        self.state.blocks.put_lineage(held, &lineage.blocks);
        Ok(())
    }

    async fn store(
        &self,
        kind: Kind,
        batches: Vec<RecordBatch>,
    ) -> std::result::Result<(), Status> {
        match kind {
            Kind::Table(t) => {
                let installed = self.state.installed.lock().await;
                let table = installed
                    .as_ref()
                    .and_then(|i| i.memory_tables.get(&t.name).cloned())
                    .ok_or_else(|| {
                        Status::failed_precondition(format!("unknown table {}", t.name))
                    })?;
                let partition = table.batches.first().cloned().ok_or_else(|| {
                    Status::internal(format!("table {} has no partition", t.name))
                })?;
                *partition.write().await = batches;
                Ok(())
            }
            _ => Err(Status::invalid_argument("only blocks and tables are put")),
        }
    }
}

fn unsupported<T>(what: &str) -> std::result::Result<T, Status> {
    Err(Status::unimplemented(format!(
        "{what} is not part of dstream's data plane"
    )))
}

fn encode(batches: Vec<RecordBatch>) -> BoxedStream<FlightData> {
    let stream = FlightDataEncoderBuilder::new()
        .build(futures::stream::iter(batches.into_iter().map(Ok)))
        .map_err(|e| Status::internal(e.to_string()));
    Box::pin(stream)
}

#[tonic::async_trait]
impl FlightService for FlightEndpoint {
    type HandshakeStream = BoxedStream<HandshakeResponse>;
    type ListFlightsStream = BoxedStream<FlightInfo>;
    type DoGetStream = BoxedStream<FlightData>;
    type DoPutStream = BoxedStream<PutResult>;
    type DoExchangeStream = BoxedStream<FlightData>;
    type DoActionStream = BoxedStream<arrow_flight::Result>;
    type ListActionsStream = BoxedStream<ActionType>;

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> std::result::Result<Response<Self::DoGetStream>, Status> {
        let kind = decode_ticket(&request.into_inner().ticket)?;
        if let Kind::Shuffle(s) = &kind {
            // The pieces travel as one stream; a header says where each ends.
            let pieces = self.pieces(s)?;
            let rows: Vec<String> = pieces
                .iter()
                .map(|p| {
                    p.iter()
                        .map(RecordBatch::num_rows)
                        .sum::<usize>()
                        .to_string()
                })
                .collect();
            let mut response = Response::new(encode(pieces.into_iter().flatten().collect()));
            let rows = rows
                .join(",")
                .parse()
                .map_err(|_| Status::internal("piece rows"))?;
            response.metadata_mut().insert(PIECE_ROWS, rows);
            return Ok(response);
        }
        Ok(Response::new(encode(self.batches_for(kind)?)))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoPutStream>, Status> {
        let mut stream = request.into_inner();
        let first = stream
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("empty put"))?;
        let descriptor = first
            .flight_descriptor
            .clone()
            .ok_or_else(|| Status::invalid_argument("a put needs a descriptor"))?;
        let kind = decode_ticket(&descriptor.cmd)?;
        if let Kind::Lineage(lineage) = kind {
            while stream.message().await?.is_some() {}
            self.store_lineage(lineage).await?;
            let done = futures::stream::once(async { Ok(PutResult::default()) });
            return Ok(Response::new(Box::pin(done)));
        }
        if let Kind::Block(b) = kind {
            let mut messages = vec![first];
            while let Some(message) = stream.message().await? {
                messages.push(message);
            }
            self.store_replica(b, messages).await?;
            let done = futures::stream::once(async { Ok(PutResult::default()) });
            return Ok(Response::new(Box::pin(done)));
        }
        let rest = stream.map_err(|s| FlightError::Tonic(Box::new(s)));
        let all = futures::stream::once(async move { Ok(first) }).chain(rest);
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(all)
            .try_collect()
            .await
            .map_err(|e| Status::invalid_argument(format!("bad put stream: {e}")))?;
        self.store(kind, batches).await?;
        let done = futures::stream::once(async { Ok(PutResult::default()) });
        Ok(Response::new(Box::pin(done)))
    }

    async fn handshake(
        &self,
        _: Request<Streaming<HandshakeRequest>>,
    ) -> std::result::Result<Response<Self::HandshakeStream>, Status> {
        unsupported("handshake")
    }

    async fn list_flights(
        &self,
        _: Request<Criteria>,
    ) -> std::result::Result<Response<Self::ListFlightsStream>, Status> {
        unsupported("list_flights")
    }

    async fn get_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<FlightInfo>, Status> {
        unsupported("get_flight_info")
    }

    async fn poll_flight_info(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<PollInfo>, Status> {
        unsupported("poll_flight_info")
    }

    async fn get_schema(
        &self,
        _: Request<FlightDescriptor>,
    ) -> std::result::Result<Response<SchemaResult>, Status> {
        unsupported("get_schema")
    }

    async fn do_exchange(
        &self,
        _: Request<Streaming<FlightData>>,
    ) -> std::result::Result<Response<Self::DoExchangeStream>, Status> {
        unsupported("do_exchange")
    }

    async fn do_action(
        &self,
        _: Request<Action>,
    ) -> std::result::Result<Response<Self::DoActionStream>, Status> {
        unsupported("do_action")
    }

    async fn list_actions(
        &self,
        _: Request<Empty>,
    ) -> std::result::Result<Response<Self::ListActionsStream>, Status> {
        unsupported("list_actions")
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field};
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::error::{Error, Result};
    use crate::operator::ShufflePiece;
    use crate::rpc::FlightPeers;

    fn batch(values: Vec<i64>) -> Result<RecordBatch> {
        let schema = Arc::new(Schema::new(vec![Field::new("k", DataType::Int64, false)]));
        Ok(RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from(values))],
        )?)
    }

    /// A map output of two partitions whose rows are `first..first + 4`, split by
    /// parity, each piece in two batches; its count(DISTINCT ...) pairs hold `first`.
    fn map_output(first: i64) -> Result<Vec<ShufflePiece>> {
        (0..2)
            .map(|p| {
                let rows: Vec<i64> = (first..first + 4).filter(|k| k % 2 == p).collect();
                Ok(ShufflePiece {
                    rows: vec![batch(rows[..1].to_vec())?, batch(rows[1..].to_vec())?],
                    distinct: vec![vec![batch(vec![first])?]],
                })
            })
            .collect()
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

    #[tokio::test]
    async fn one_fetch_reads_a_partition_of_several_map_outputs_in_the_order_asked() -> Result<()> {
        let state = Arc::new(WorkerState::new(String::new(), 1));
        for (block, first) in [(0, 0), (3, 10), (5, 20)] {
            state
                .shuffle
                .put(("v".into(), IntervalId(7), block), map_output(first)?);
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = format!("http://{}", listener.local_addr()?);
        let stop = CancellationToken::new();
        let server = crate::worker::serve(state, listener, stop.clone());
        let peers = FlightPeers::default();
        let fetch = |block, component, more_blocks: Vec<u32>| {
            let shuffle = proto::ShuffleRef {
                view: "v".into(),
                interval: 7,
                block,
                partition: 1,
                component,
                more_blocks,
            };
            peers.fetch_pieces(&address, shuffle)
        };
        let values_of = |pieces: Vec<Vec<RecordBatch>>| -> Vec<Vec<i64>> {
            pieces.iter().map(|p| values(p)).collect()
        };

        let rows = fetch(5, 0, vec![0, 3]).await?;
        assert_eq!(
            values_of(rows),
            vec![vec![21, 23], vec![1, 3], vec![11, 13]]
        );
        let distinct = fetch(3, 1, vec![5]).await?;
        assert_eq!(values_of(distinct), vec![vec![10], vec![20]]);
        assert_eq!(values_of(fetch(0, 0, Vec::new()).await?), vec![vec![1, 3]]);
        // A component the outputs do not have reads as empty pieces.
        assert_eq!(
            values_of(fetch(0, 2, vec![3]).await?),
            vec![Vec::<i64>::new(); 2]
        );
        // A block whose output is not held here fails the whole fetch, naming it.
        let missing = fetch(0, 0, vec![4]).await;
        assert!(
            matches!(&missing, Err(Error::Remote(m)) if m.contains("block 4")),
            "{missing:?}"
        );

        stop.cancel();
        server
            .await
            .map_err(|e| Error::Internal(e.to_string()))?
            .map_err(|e| Error::Internal(e.to_string()))?;
        Ok(())
    }
}
