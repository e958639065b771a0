//! The Postgres wire protocol front door, so that `psql`, JDBC, psycopg and
//! tokio-postgres talk to dstream as to PostgreSQL.
//!
//! [`PgHandler`] implements pgwire's simple and extended query handlers on top of
//! [`crate::session`]; Arrow results are encoded with arrow-pg's type mapping. Errors
//! carry the SQLSTATE of [`Error::sqlstate`]. `SUBSCRIBE` streams as `COPY ... TO
//! STDOUT` in text format, one chunk per interval, so psql prints it live.
//!
//! The entry point is [`serve`].

use std::fmt::Debug;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, SchemaRef};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch, into_pg_type};
use async_trait::async_trait;
use datafusion::common::{ParamValues, ScalarValue};
use futures::{Sink, SinkExt, stream};
use pgwire::api::auth::noop::NoopStartupHandler;
use pgwire::api::cancel::DefaultCancelHandler;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::stmt::QueryParser;
use pgwire::api::{ClientInfo, ClientPortalStore, ConnectionManager, PgWireServerHandlers, Type};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};
use pgwire::messages::data::DataRow;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::engine::Engine;
use crate::error::{Error, Result};
use crate::session::{self, StatementResult};
use crate::subscribe::Subscription;
use dstream_planner::Statement;

mod connection;
mod frames;

pub use connection::ConnectionLimits;

/// Accepts Postgres connections on `listener` until `shutdown` is cancelled. Each
/// connection is checked by [`connection::serve_connection`] before pgwire reads it.
pub async fn serve(
    listener: TcpListener,
    engine: Engine,
    shutdown: CancellationToken,
) -> Result<()> {
    let limits = engine.config().connection_limits();
    let admission = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let connections_registry = Arc::new(ConnectionManager::new());
    let handlers = Arc::new(PgHandlers {
        handler: Arc::new(PgHandler {
            engine: engine.clone(),
            parser: Arc::new(DstreamQueryParser { engine }),
            connections: connections_registry.clone(),
        }),
        cancel: Arc::new(DefaultCancelHandler::new(connections_registry)),
    });
    info!(addr = %listener.local_addr()?, "pgwire listening");
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            accepted = listener.accept() => {
                let (socket, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        // E.g. too many open files: keep serving the connections we
                        // have and try again shortly.
                        warn!(error = %e, "cannot accept a pgwire connection; retrying");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                debug!(%peer, "pgwire connection");
                let (ours, theirs) = match tokio::net::UnixStream::pair() {
                    Ok(pair) => pair,
                    Err(e) => {
                        warn!(error = %e, "cannot open a socket pair for a pgwire connection");
                        continue;
                    }
                };
                // Held for as long as the connection is served.
                let permit = admission.clone().try_acquire_owned().ok();
                if permit.is_none() {
                    warn!(%peer, max = limits.max_connections, "refusing a pgwire connection: too many clients");
                }
                let handlers = handlers.clone();
                connections.spawn(async move {
                    let admitted = permit.is_some();
                    let checked = connection::serve_connection(socket, ours, limits, admitted);
                    let session = async move {
                        if admitted
                            && let Err(e) = pgwire::tokio::process_socket_unix(theirs, handlers).await
                        {
                            debug!(%peer, error = %e, "pgwire connection ended with an error");
                        }
                    };
                    // A client that leaves stops its statement (a query; see
                    // `session::execute_statement`) instead of leaving it running.
                    tokio::pin!(checked, session);
                    tokio::select! {
                        _ = &mut checked => {}
                        _ = &mut session => checked.await,
                    }
                    drop(permit);
                });
            }
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
    connections.abort_all();
    Ok(())
}

struct PgHandlers {
    handler: Arc<PgHandler>,
    cancel: Arc<DefaultCancelHandler>,
}

impl PgWireServerHandlers for PgHandlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.handler.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.handler.clone()
    }

    fn startup_handler(&self) -> Arc<impl pgwire::api::auth::StartupHandler> {
        self.handler.clone()
    }

    /// Cancel requests (psql's Ctrl-C) stop the connection's running statement, such
    /// as a SUBSCRIBE.
    fn cancel_handler(&self) -> Arc<impl pgwire::api::cancel::CancelHandler> {
        self.cancel.clone()
    }
}

/// Serves every connection; holds no per-connection state.
pub struct PgHandler {
    engine: Engine,
    parser: Arc<DstreamQueryParser>,
    /// Live connections, by the key clients send in cancel requests.
    connections: Arc<ConnectionManager>,
}

impl NoopStartupHandler for PgHandler {
    fn connection_manager(&self) -> Option<Arc<ConnectionManager>> {
        Some(self.connections.clone())
    }
}

/// A client-visible error with its SQLSTATE.
fn pg_error(e: &Error) -> PgWireError {
    PgWireError::UserError(Box::new(error_info(e)))
}

fn error_info(e: &Error) -> ErrorInfo {
    ErrorInfo::new("ERROR".to_owned(), e.sqlstate().to_owned(), e.to_string())
}

fn command_response(tag: &str, rows: Option<u64>) -> Response {
    let mut t = Tag::new(tag);
    if let Some(n) = rows {
        t = t.with_oid(0).with_rows(n as usize);
    }
    Response::Execution(t)
}

fn rows_response(
    schema: &SchemaRef,
    batches: Vec<RecordBatch>,
    format: &Format,
) -> PgWireResult<Response> {
    let fields = Arc::new(arrow_schema_to_pg_fields(schema, format, None)?);
    let rows = batches
        .into_iter()
        .flat_map({
            let fields = fields.clone();
            move |batch| encode_recordbatch(fields.clone(), batch)
        })
        .collect::<Vec<PgWireResult<DataRow>>>();
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(rows),
    )))
}

/// Encodes rows as COPY text: tab-separated, `\N` for NULL, one line per row.
fn copy_text(batches: &[RecordBatch]) -> Result<Vec<u8>> {
    let options = FormatOptions::default()
        .with_null("\\N")
        .with_timestamp_format(Some("%Y-%m-%d %H:%M:%S%.f"));
    let mut out = Vec::new();
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Internal(e.to_string()))?;
        for row in 0..batch.num_rows() {
            for (i, f) in formatters.iter().enumerate() {
                if i > 0 {
                    out.push(b'\t');
                }
                let text = f.value(row).to_string();
                if batch.column(i).is_null(row) {
                    out.extend_from_slice(b"\\N");
                } else {
                    for ch in text.bytes() {
                        match ch {
                            b'\\' => out.extend_from_slice(b"\\\\"),
                            b'\t' => out.extend_from_slice(b"\\t"),
                            b'\n' => out.extend_from_slice(b"\\n"),
                            b'\r' => out.extend_from_slice(b"\\r"),
                            c => out.push(c),
                        }
                    }
                }
            }
            out.push(b'\n');
        }
    }
    Ok(out)
}

/// Streams a subscription as `COPY ... TO STDOUT` text, flushing every interval's
/// chunk as soon as it is committed, until the view is dropped or the client leaves.
async fn stream_subscription<C>(
    client: &mut C,
    mut subscription: Subscription,
) -> PgWireResult<Response>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    let columns = subscription.schema().fields().len();
    client
        .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
            0,
            columns as i16,
            vec![0; columns],
        )))
        .await?;
    let mut rows = 0usize;
    while let Some(chunk) = subscription.next_chunk().await {
        let text = match chunk.and_then(|batches| {
            rows = rows.saturating_add(batches.iter().map(|b| b.num_rows()).sum::<usize>());
            copy_text(&batches)
        }) {
            Ok(text) => text,
            // An ErrorResponse ends the COPY (CopyFail is the client's message).
            Err(e) => return Err(pg_error(&e)),
        };
        if !text.is_empty() {
            client
                .send(PgWireBackendMessage::CopyData(CopyData::new(text.into())))
                .await?;
        }
    }
    client
        .send(PgWireBackendMessage::CopyDone(CopyDone::new()))
        .await?;
    Ok(Response::Execution(Tag::new("COPY").with_rows(rows)))
}

async fn into_response<C>(
    client: &mut C,
    result: StatementResult,
    format: &Format,
) -> PgWireResult<Response>
where
    C: Sink<PgWireBackendMessage> + Unpin + Send,
    C::Error: Debug,
    PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
{
    match result {
        StatementResult::Rows { schema, batches } => rows_response(&schema, batches, format),
        StatementResult::Command { tag, rows } => Ok(command_response(&tag, rows)),
        StatementResult::Subscribe(sub) => stream_subscription(client, sub).await,
    }
}

#[async_trait]
impl SimpleQueryHandler for PgHandler {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statements = match session::parse(&self.engine, query).await {
            Ok(s) => s,
            Err(e) => return Err(pg_error(&e)),
        };
        let mut responses = Vec::with_capacity(statements.len());
        for statement in statements {
            match session::execute_statement(&self.engine, statement).await {
                Ok(result) => {
                    responses.push(into_response(client, result, &Format::UnifiedText).await?)
                }
                Err(e) => {
                    responses.push(Response::Error(Box::new(error_info(&e))));
                    break;
                }
            }
        }
        Ok(responses)
    }
}

/// A statement prepared with the extended protocol, with what `Describe` reports.
#[derive(Clone, Debug)]
pub struct Prepared {
    statement: Statement,
    schema: Option<SchemaRef>,
    parameters: Vec<Option<DataType>>,
}

/// Parses statements for the extended protocol. Statements that return rows are
/// planned (queries) or run (SHOW, DESCRIBE, EXPLAIN) at parse time so that their row
/// shape can be described before execution.
#[derive(Debug)]
pub struct DstreamQueryParser {
    engine: Engine,
}

fn pg_type_of(t: &Option<DataType>) -> Type {
    match t {
        Some(t) => into_pg_type(t).unwrap_or(Type::UNKNOWN),
        None => Type::UNKNOWN,
    }
}

#[async_trait]
impl QueryParser for DstreamQueryParser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        _client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let statement = session::parse_one(&self.engine, sql)
            .await
            .map_err(|e| pg_error(&e))?;
        let mut prepared = Prepared {
            statement,
            schema: None,
            parameters: vec![],
        };
        self.describe(&mut prepared)
            .await
            .map_err(|e| pg_error(&e))?;
        Ok(Some(prepared))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        Ok(stmt.parameters.iter().map(pg_type_of).collect())
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.schema {
            Some(schema) => Ok(arrow_schema_to_pg_fields(
                schema,
                format.unwrap_or(&Format::UnifiedText),
                None,
            )?),
            None => Ok(vec![]),
        }
    }
}

impl DstreamQueryParser {
    /// Fills in the result schema and parameter types of a prepared statement.
    async fn describe(&self, prepared: &mut Prepared) -> Result<()> {
        match &prepared.statement {
            Statement::Sql(stmt)
                if matches!(
                    stmt.as_ref(),
                    datafusion::sql::sqlparser::ast::Statement::Query(_)
                        | datafusion::sql::sqlparser::ast::Statement::Explain { .. }
                ) =>
            {
                let (schema, params) =
                    session::describe_query(&self.engine, stmt.as_ref().clone()).await?;
                prepared.schema = Some(schema);
                prepared.parameters = params;
            }
            Statement::Sql(stmt)
                if matches!(
                    stmt.as_ref(),
                    datafusion::sql::sqlparser::ast::Statement::ShowVariable { .. }
                ) =>
            {
                if let StatementResult::Rows { schema, .. } =
                    session::execute_statement(&self.engine, prepared.statement.clone()).await?
                {
                    prepared.schema = Some(schema);
                }
            }
            Statement::Show(_) | Statement::Describe(_) | Statement::ExplainView(_) => {
                if let StatementResult::Rows { schema, .. } =
                    session::execute_statement(&self.engine, prepared.statement.clone()).await?
                {
                    prepared.schema = Some(schema);
                }
            }
            Statement::Subscribe(name) => {
                prepared.schema = Some(Subscription::schema_of(&self.engine, name)?);
            }
            _ => {}
        }
        Ok(())
    }
}

/// Decodes the bound parameters of `portal` as DataFusion values.
fn parameter_values(portal: &Portal<Prepared>) -> PgWireResult<Vec<ScalarValue>> {
    let declared = &portal.statement.statement.parameters;
    let client_types = &portal.statement.parameter_types;
    (0..portal.parameter_len())
        .map(|i| {
            let pg_type = client_types
                .get(i)
                .cloned()
                .flatten()
                .unwrap_or_else(|| pg_type_of(declared.get(i).unwrap_or(&None)));
            let invalid = |e: PgWireError| {
                PgWireError::UserError(Box::new(ErrorInfo::new(
                    "ERROR".to_owned(),
                    "22P02".to_owned(),
                    format!("invalid value for parameter ${}: {e}", i.saturating_add(1)),
                )))
            };
            Ok(match pg_type {
                Type::BOOL => {
                    ScalarValue::Boolean(portal.parameter::<bool>(i, &pg_type).map_err(invalid)?)
                }
                Type::INT2 => {
                    ScalarValue::Int16(portal.parameter::<i16>(i, &pg_type).map_err(invalid)?)
                }
                Type::INT4 => {
                    ScalarValue::Int32(portal.parameter::<i32>(i, &pg_type).map_err(invalid)?)
                }
                Type::INT8 => {
                    ScalarValue::Int64(portal.parameter::<i64>(i, &pg_type).map_err(invalid)?)
                }
                Type::FLOAT4 => {
                    ScalarValue::Float32(portal.parameter::<f32>(i, &pg_type).map_err(invalid)?)
                }
                Type::FLOAT8 => {
                    ScalarValue::Float64(portal.parameter::<f64>(i, &pg_type).map_err(invalid)?)
                }
                Type::TIMESTAMP => ScalarValue::TimestampNanosecond(
                    portal
                        .parameter::<chrono::NaiveDateTime>(i, &pg_type)
                        .map_err(invalid)?
                        .and_then(|t| t.and_utc().timestamp_nanos_opt()),
                    None,
                ),
                _ => ScalarValue::Utf8(
                    portal
                        .parameter::<String>(i, &Type::TEXT)
                        .map_err(invalid)?,
                ),
            })
        })
        .collect()
}

#[async_trait]
impl ExtendedQueryHandler for PgHandler {
    type Statement = Prepared;
    type QueryParser = DstreamQueryParser;

    fn query_parser(&self) -> Arc<Self::QueryParser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: pgwire::api::store::PortalStore<Statement = Prepared>,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let statement = portal.statement.statement.statement.clone();
        let result = match statement {
            Statement::Sql(stmt)
                if matches!(
                    stmt.as_ref(),
                    datafusion::sql::sqlparser::ast::Statement::Query(_)
                ) =>
            {
                let params = parameter_values(portal)?;
                let params = (!params.is_empty()).then_some(ParamValues::List(
                    params.into_iter().map(Into::into).collect(),
                ));
                session::query_with_params(&self.engine, *stmt, params).await
            }
            other => session::execute_statement(&self.engine, other).await,
        };
        match result {
            Ok(result) => into_response(client, result, &portal.result_column_format).await,
            Err(e) => Err(pg_error(&e)),
        }
    }
}
