//! dstream benchmarks.
//!
//! `tumble-count`: events per second per core of a 1 s tumbling-window count over
//! `--keys` keys fed by the generator, run by the real engine interval by interval
//! (manual clock, so intervals run back to back), side by side with the same
//! aggregation run as one DataFusion batch query over the same rows, and the ratio.
//! The generator's own cost is measured separately so the stream figure can be read
//! with and without ingest.
//!
//! Run it in release mode: `cargo run --release -p dstream-bench -- tumble-count`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use arrow::array::RecordBatch;
use clap::{Parser, Subcommand};
use datafusion::catalog::MemTable;
use datafusion::prelude::{SessionConfig, SessionContext};
use dstream_server::Engine;
use dstream_server::clock::ManualClock;
use dstream_server::config::{ClockKind, ServeConfig};
use dstream_server::session::{self, StatementResult};
use tokio_util::sync::CancellationToken;

#[derive(Parser, Debug)]
#[command(about = "dstream benchmarks")]
struct Args {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand, Debug)]
enum Bench {
    /// 1 s tumbling-window count over many keys: stream vs. DataFusion batch.
    TumbleCount(TumbleCount),
}

#[derive(clap::Args, Debug)]
struct TumbleCount {
    /// Generated events per (simulated) second.
    #[arg(long = "events-per-second", default_value_t = 500_000)]
    rate: u64,
    /// Intervals (seconds of input) to process.
    #[arg(long, default_value_t = 10)]
    intervals: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// State partitions.
    #[arg(long, default_value_t = 4)]
    partitions: usize,
    /// Repetitions; the best of each side is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Most rows per input block (one map task each).
    #[arg(long, default_value_t = dstream_executor::block::BLOCK_ROWS)]
    block_rows: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.bench {
        Bench::TumbleCount(args) => runtime.block_on(tumble_count(args)),
    }
}

const SOURCE: &str = "CREATE SOURCE events (k BIGINT, ts TIMESTAMP, \
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator', \
    rows_per_second = {rate}, key_cardinality = {keys}, seed = 1)";
const VIEW: &str = "CREATE MATERIALIZED VIEW counts AS SELECT window_start, k, count(*) AS n \
    FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start, k EMIT ON WINDOW CLOSE";
const BATCH: &str = "SELECT date_bin(INTERVAL '1 second', ts) AS window_start, k, count(*) AS n \
    FROM events GROUP BY 1, 2";

struct Engined {
    engine: Engine,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn start_engine(
    partitions: usize,
    intervals: u64,
    block_rows: usize,
) -> anyhow::Result<Engined> {
    let dir = tempfile::tempdir()?;
    let config = ServeConfig {
        data_dir: dir.path().join("data"),
        clock: ClockKind::Manual,
        partitions,
        batch_interval: Duration::from_secs(1),
        source_retention: Duration::from_secs(intervals + 2),
        block_rows,
        workers: 2,
        worker_mode: dstream_server::config::WorkerMode::InProcess,
        ..ServeConfig::default()
    };
    let shutdown = CancellationToken::new();
    let clock = Arc::new(ManualClock::new(1_767_225_600_000_000_000));
    let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let engine = Engine::start(config, clock, grpc, shutdown.clone()).await?;
    Ok(Engined {
        engine,
        shutdown,
        _dir: dir,
    })
}

async fn exec(engine: &Engine, sql: &str) -> anyhow::Result<Vec<StatementResult>> {
    session::execute(engine, sql)
        .await
        .with_context(|| format!("executing {sql}"))
}

fn rows(results: &[StatementResult]) -> usize {
    results
        .iter()
        .map(|r| match r {
            StatementResult::Rows { batches, .. } => batches.iter().map(|b| b.num_rows()).sum(),
            _ => 0,
        })
        .sum()
}

fn batches(results: Vec<StatementResult>) -> Vec<RecordBatch> {
    results
        .into_iter()
        .flat_map(|r| match r {
            StatementResult::Rows { batches, .. } => batches,
            _ => vec![],
        })
        .collect()
}

async fn tumble_count(args: TumbleCount) -> anyhow::Result<()> {
    let TumbleCount {
        rate,
        intervals,
        keys,
        partitions,
        runs,
        block_rows,
    } = args;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let events = rate * intervals;
    println!(
        "tumble-count: {events} events ({rate}/s for {intervals} intervals of 1s), {keys} keys, P = {partitions}, blocks of {block_rows} rows, {cores} cores, best of {runs}"
    );

    let mut best_stream = Duration::MAX;
    let mut best_gen = Duration::MAX;
    let mut input: Vec<RecordBatch> = Vec::new();
    let mut windows = 0;
    let source = SOURCE
        .replace("{rate}", &rate.to_string())
        .replace("{keys}", &keys.to_string());
    // Both sides seal one interval more than `intervals`: it moves the watermark past
    // the last window.
    let advance = format!("ADVANCE {}", intervals + 1);
    for _ in 0..runs {
        // Generator alone: a source with no view, sealed interval by interval.
        let e = start_engine(partitions, intervals, block_rows).await?;
        exec(&e.engine, &source).await?;
        let started = Instant::now();
        exec(&e.engine, &advance).await?;
        best_gen = best_gen.min(started.elapsed());
        e.shutdown.cancel();

        // The continuous query.
        let e = start_engine(partitions, intervals, block_rows).await?;
        exec(&e.engine, &source).await?;
        exec(&e.engine, VIEW).await?;
        let started = Instant::now();
        exec(&e.engine, &advance).await?;
        best_stream = best_stream.min(started.elapsed());
        windows = rows(&exec(&e.engine, "SELECT * FROM counts").await?);
        if input.is_empty() {
            input = batches(exec(&e.engine, "SELECT k, ts FROM events").await?);
        }
        e.shutdown.cancel();
    }
    let input_rows: usize = input.iter().map(|b| b.num_rows()).sum();
    let extra = rate as usize; // the extra interval that closes the last window
    if input_rows != events as usize + extra {
        bail!(
            "expected {} input rows, read back {input_rows}",
            events as usize + extra
        );
    }

    // The batch baseline over the same rows (all intervals, like the stream).
    let ctx = SessionContext::new_with_config(SessionConfig::new().with_target_partitions(cores));
    let schema = input[0].schema();
    let chunks: Vec<Vec<RecordBatch>> = (0..cores)
        .map(|i| input.iter().skip(i).step_by(cores).cloned().collect())
        .collect();
    ctx.register_table("events", Arc::new(MemTable::try_new(schema, chunks)?))?;
    let mut best_batch = Duration::MAX;
    let mut batch_rows = 0;
    for _ in 0..runs {
        let started = Instant::now();
        let out = ctx.sql(BATCH).await?.collect().await?;
        best_batch = best_batch.min(started.elapsed());
        batch_rows = out.iter().map(|b| b.num_rows()).sum();
    }
    if windows == 0 || batch_rows < windows {
        bail!("stream emitted {windows} window rows, batch {batch_rows}: not comparable");
    }

    let total = (events as usize + extra) as f64;
    let per_core = |d: Duration| total / d.as_secs_f64() / cores as f64;
    let stream_only = best_stream.saturating_sub(best_gen);
    println!("| measure | time | events/s/core |");
    println!("|---|---|---|");
    println!(
        "| generator alone | {:.3} s | {:.0} |",
        best_gen.as_secs_f64(),
        per_core(best_gen)
    );
    println!(
        "| stream (engine, incl. generator) | {:.3} s | {:.0} |",
        best_stream.as_secs_f64(),
        per_core(best_stream)
    );
    println!(
        "| stream minus generator | {:.3} s | {:.0} |",
        stream_only.as_secs_f64(),
        per_core(stream_only)
    );
    println!(
        "| DataFusion batch, same rows | {:.3} s | {:.0} |",
        best_batch.as_secs_f64(),
        per_core(best_batch)
    );
    println!(
        "ratio stream/batch throughput: {:.2} (incl. generator), {:.2} (minus generator)",
        best_batch.as_secs_f64() / best_stream.as_secs_f64(),
        best_batch.as_secs_f64() / stream_only.as_secs_f64().max(1e-9)
    );
    println!(
        "stream emitted {windows} window rows; batch {batch_rows} (batch includes the still-open last window)"
    );
    Ok(())
}
