//! dstream benchmarks.
//!
//! `tumble-count`: events per second per core of a 1 s tumbling-window count over
//! `--keys` keys fed by the generator, run by the real engine interval by interval
//! (manual clock, so intervals run back to back), side by side with the same
//! aggregation run as one DataFusion batch query over the same rows, and the ratio.
//! The generator's own cost is measured separately so the stream figure can be read
//! with and without ingest. The same invocation runs a two-stage view over the same
//! input — the count, then the ten keys with the most events in each window — and
//! reports it beside the one-stage count.
//!
//! With `--workers 1,2` the stream side runs once per worker count, each worker a
//! `dstream worker` process with `--worker-cores` task slots, and the throughput of
//! each is reported against the first, with the CPU time the coordinator (this
//! process) and the workers (its children) used during the best run, from `/proc`.
//!
//! `shuffle`: a worker's Flight endpoint serving map outputs to readers over loopback,
//! in GB/s, against Arrow IPC encoding and decoding the same batches in memory.
//!
//! `empty-interval`: the coordinator's cost of an interval with no input, with the real
//! clock at 100 ms and at 1 s intervals, read from `dstream_intervals`.
//!
//! `recovery` and `straggler` ([`faults`]): interval processing times around a
//! worker killed with SIGKILL, per checkpoint spacing, and with a straggling worker,
//! with and without speculation.
//!
//! Run them in release mode, after building the worker binary:
//! `cargo build --release --bin dstream && cargo run --release -p dstream-bench -- tumble-count`.

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

mod faults;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Processing time of empty intervals at 100 ms and 1 s.
    EmptyInterval(EmptyInterval),
    /// Shuffle reads over Arrow Flight on loopback, in GB/s.
    Shuffle(Shuffle),
    /// Interval processing times around a killed worker, per checkpoint spacing.
    Recovery(faults::Recovery),
    /// Interval processing times with a straggling worker, with and without speculation.
    Straggler(faults::Straggler),
}

#[derive(clap::Args, Debug)]
struct Shuffle {
    /// Megabytes of map output the serving worker holds (read once per run).
    #[arg(long, default_value_t = 256)]
    megabytes: usize,
    /// Shuffle partitions the output is split into (one read each).
    #[arg(long, default_value_t = 8)]
    partitions: usize,
    /// Concurrent readers to run with, e.g. 1,4.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    readers: Vec<usize>,
    /// Repetitions; the best is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

#[derive(clap::Args, Debug)]
struct EmptyInterval {
    /// Seconds to run each interval width.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Materialized views over the (empty) source.
    #[arg(long, default_value_t = 1)]
    views: usize,
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
    /// Worker counts to run the stream side with, e.g. 1,2.
    #[arg(long, value_delimiter = ',', default_value = "1,2")]
    workers: Vec<usize>,
    /// Task slots per worker.
    #[arg(long, default_value_t = 1)]
    worker_cores: usize,
    /// How long the stream run keeps raw input queryable, in seconds. Short, so that
    /// the run reaches the steady state in which expired blocks' memory is reused;
    /// the input lineage since the last checkpoint is kept whatever this says.
    #[arg(long, default_value_t = 5)]
    retention: u64,
    /// Let worker processes run on any core, instead of pinning worker i to core i
    /// (mod the cores), which gives each worker one core however many threads it
    /// runs: the 1-worker run measures one core, the 2-worker run two.
    #[arg(long)]
    no_pin: bool,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Coordinator logs, `warn` and above unless RUST_LOG says otherwise.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match args.bench {
        Bench::TumbleCount(args) => runtime.block_on(tumble_count(args)),
        Bench::EmptyInterval(args) => runtime.block_on(empty_interval(args)),
        Bench::Shuffle(args) => runtime.block_on(shuffle(args)),
        Bench::Recovery(args) => runtime.block_on(faults::recovery(args)),
        Bench::Straggler(args) => runtime.block_on(faults::straggler(args)),
    }
}

const SOURCE: &str = "CREATE SOURCE events (k BIGINT, ts TIMESTAMP, \
    WATERMARK FOR ts AS ts - INTERVAL '1' SECOND) WITH (connector = 'generator', \
    rows_per_second = {rate}, key_cardinality = {keys}, seed = 1)";
const VIEW: &str = "CREATE MATERIALIZED VIEW counts AS SELECT window_start, k, count(*) AS n \
    FROM TUMBLE(events, ts, INTERVAL '1' SECOND) GROUP BY window_start, k EMIT ON WINDOW CLOSE";
const BATCH: &str = "SELECT date_bin(INTERVAL '1 second', ts) AS window_start, k, count(*) AS n \
    FROM events GROUP BY 1, 2";
/// The two-stage view: the same count per key and window, then the ten keys with the
/// most events in each window (a stage of its own, keyed by the window).
const TWO_STAGE_VIEW: &str = "CREATE MATERIALIZED VIEW top10 AS SELECT window_start, k, n FROM \
    (SELECT window_start, k, n, ROW_NUMBER() OVER (PARTITION BY window_start ORDER BY n DESC, k) \
    AS r FROM (SELECT window_start, k, count(*) AS n FROM TUMBLE(events, ts, INTERVAL '1' SECOND) \
    GROUP BY window_start, k) AS c) AS ranked WHERE r <= 10 EMIT ON WINDOW CLOSE";

struct Engined {
    engine: Engine,
    shutdown: CancellationToken,
    _dir: tempfile::TempDir,
}

impl Engined {
    async fn stop(self) {
        self.shutdown.cancel();
        self.engine.stopped().await;
    }
}

/// The `dstream` binary next to this one (build it with `cargo build --release --bin
/// dstream`).
fn worker_binary() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("dstream"))
        .context("no directory for the worker binary")?;
    if !bin.exists() {
        bail!(
            "{} is missing: run `cargo build --release --bin dstream` first",
            bin.display()
        );
    }
    Ok(bin)
}

struct Cluster {
    workers: usize,
    cores: usize,
}

async fn start_engine(
    partitions: usize,
    retention: u64,
    block_rows: usize,
    cluster: &Cluster,
) -> anyhow::Result<Engined> {
    let dir = tempfile::tempdir()?;
    let config = ServeConfig {
        data_dir: dir.path().join("data"),
        clock: ClockKind::Manual,
        partitions,
        batch_interval: Duration::from_secs(1),
        source_retention: Duration::from_secs(retention),
        block_rows,
        workers: cluster.workers,
        worker_cores: cluster.cores,
        worker_mode: dstream_server::config::WorkerMode::Process(Some(worker_binary()?)),
        // The batch side reads every input row back in one query.
        max_result_bytes: 64 << 30,
        http_addr: None,
        ..ServeConfig::default()
    };
    start_config(config, dir).await
}

/// Starts an engine with `config` on the manual clock; `dir` holds its data.
async fn start_config(config: ServeConfig, dir: tempfile::TempDir) -> anyhow::Result<Engined> {
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
        workers,
        worker_cores,
        retention,
        no_pin,
    } = args;
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    let events = rate * intervals;
    println!(
        "tumble-count: {events} events ({rate}/s for {intervals} intervals of 1s), {keys} keys, P = {partitions}, blocks of {block_rows} rows, {cores} cores, best of {runs}"
    );

    let mut input: Vec<RecordBatch> = Vec::new();
    let mut windows = 0;
    let mut top_rows = 0;
    let source = SOURCE
        .replace("{rate}", &rate.to_string())
        .replace("{keys}", &keys.to_string());
    // Both sides seal one interval more than `intervals`: it moves the watermark past
    // the last window.
    let advance = format!("ADVANCE {}", intervals + 1);
    let mut measured: Vec<Measured> = workers
        .iter()
        .map(|&workers| Measured {
            workers,
            best_stream: Duration::MAX,
            best_gen: Duration::MAX,
            cpu: CpuTime::default(),
            streams: Vec::new(),
            best_two_stage: Duration::MAX,
            two_stages: Vec::new(),
        })
        .collect();
    // Runs alternate between the worker counts, so that a machine that gets slower
    // or faster during the bench moves every count alike.
    for _ in 0..runs {
        for m in measured.iter_mut() {
            let cluster = Cluster {
                workers: m.workers,
                cores: worker_cores,
            };
            // Generator alone: a source with no view, sealed interval by interval. It
            // keeps all its input, which the batch side reads back.
            let e = start_engine(partitions, intervals + 2, block_rows, &cluster).await?;
            if !no_pin {
                pin_workers(&e.engine, cores).await?;
            }
            exec(&e.engine, &source).await?;
            let started = Instant::now();
            exec(&e.engine, &advance).await?;
            m.best_gen = m.best_gen.min(started.elapsed());
            if input.is_empty() {
                input = batches(exec(&e.engine, "SELECT k, ts FROM events").await?);
            }
            e.stop().await;

            // The continuous query.
            let e = start_engine(partitions, retention, block_rows, &cluster).await?;
            if !no_pin {
                pin_workers(&e.engine, cores).await?;
            }
            exec(&e.engine, &source).await?;
            exec(&e.engine, VIEW).await?;
            let cpu_before = CpuTime::now()?;
            let started = Instant::now();
            exec(&e.engine, &advance).await?;
            let elapsed = started.elapsed();
            if elapsed < m.best_stream {
                m.best_stream = elapsed;
                m.cpu = CpuTime::now()?.minus(&cpu_before);
            }
            m.streams.push(elapsed);
            windows = rows(&exec(&e.engine, "SELECT * FROM counts").await?);
            e.stop().await;

            // The two-stage view: the count, then the top 10 of each window.
            let e = start_engine(partitions, retention, block_rows, &cluster).await?;
            if !no_pin {
                pin_workers(&e.engine, cores).await?;
            }
            exec(&e.engine, &source).await?;
            exec(&e.engine, TWO_STAGE_VIEW).await?;
            let started = Instant::now();
            exec(&e.engine, &advance).await?;
            let elapsed = started.elapsed();
            m.best_two_stage = m.best_two_stage.min(elapsed);
            m.two_stages.push(elapsed);
            top_rows = rows(&exec(&e.engine, "SELECT * FROM top10").await?);
            e.stop().await;
        }
    }
    if top_rows == 0 || top_rows % 10 != 0 || top_rows > (intervals as usize + 1) * 10 {
        bail!(
            "the two-stage view kept {top_rows} rows for {intervals} windows; expected 10 per window"
        );
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
    let per_second = |d: Duration| total / d.as_secs_f64();
    println!("| measure | time | events/s | events/s/core |");
    println!("|---|---|---|---|");
    for Measured {
        workers: count,
        best_stream,
        best_gen,
        ..
    } in &measured
    {
        let stream_only = best_stream.saturating_sub(*best_gen);
        println!(
            "| generator alone, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            best_gen.as_secs_f64(),
            per_second(*best_gen),
            per_core(*best_gen)
        );
        println!(
            "| stream, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            best_stream.as_secs_f64(),
            per_second(*best_stream),
            per_core(*best_stream)
        );
        println!(
            "| stream minus generator, {count} worker(s) | {:.3} s | {:.0} | {:.0} |",
            stream_only.as_secs_f64(),
            per_second(stream_only),
            per_core(stream_only)
        );
    }
    for m in &measured {
        println!(
            "| two stages (count, then top 10 per window), {} worker(s) | {:.3} s | {:.0} | {:.0} |",
            m.workers,
            m.best_two_stage.as_secs_f64(),
            per_second(m.best_two_stage),
            per_core(m.best_two_stage)
        );
    }
    println!(
        "| DataFusion batch, same rows, {cores} threads | {:.3} s | {:.0} | {:.0} |",
        best_batch.as_secs_f64(),
        per_second(best_batch),
        per_core(best_batch)
    );
    println!(
        "| stream run | wall | coordinator CPU | workers' CPU | cores busy | worker CPU per million events |"
    );
    println!("|---|---|---|---|---|---|");
    for Measured {
        workers: count,
        best_stream,
        cpu,
        ..
    } in &measured
    {
        println!(
            "| {count} worker(s) | {:.3} s | {:.3} s | {:.3} s | {:.2} | {:.1} ms |",
            best_stream.as_secs_f64(),
            cpu.coordinator.as_secs_f64(),
            cpu.workers.as_secs_f64(),
            (cpu.coordinator + cpu.workers).as_secs_f64() / best_stream.as_secs_f64(),
            cpu.workers.as_secs_f64() * 1e3 / (total / 1e6)
        );
    }
    if let Some(first) = measured.first() {
        for m in measured.iter().skip(1) {
            println!(
                "throughput with {} workers / with {}: {:.2}x (best runs), {:.2}x (median runs)",
                m.workers,
                first.workers,
                first.best_stream.as_secs_f64() / m.best_stream.as_secs_f64(),
                first.median_stream().as_secs_f64() / m.median_stream().as_secs_f64()
            );
        }
    }
    if let Some(Measured {
        workers: count,
        best_stream,
        best_gen,
        ..
    }) = measured.last()
    {
        let stream_only = best_stream.saturating_sub(*best_gen);
        println!(
            "ratio stream ({count} workers) / batch throughput: {:.2} (incl. generator), {:.2} (minus generator)",
            best_batch.as_secs_f64() / best_stream.as_secs_f64(),
            best_batch.as_secs_f64() / stream_only.as_secs_f64().max(1e-9)
        );
    }
    for m in &measured {
        let times: Vec<String> = m
            .streams
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        println!(
            "stream runs with {} worker(s), in order: {} s",
            m.workers,
            times.join(", ")
        );
        let times: Vec<String> = m
            .two_stages
            .iter()
            .map(|t| format!("{:.3}", t.as_secs_f64()))
            .collect();
        println!(
            "two-stage runs with {} worker(s), in order: {} s; two stages / one stage: {:.2}x the time (best runs)",
            m.workers,
            times.join(", "),
            m.best_two_stage.as_secs_f64() / m.best_stream.as_secs_f64()
        );
    }
    println!(
        "stream emitted {windows} window rows; batch {batch_rows} (batch includes the still-open last window)"
    );
    Ok(())
}

/// One worker count's runs of `tumble-count`.
struct Measured {
    workers: usize,
    best_stream: Duration,
    best_gen: Duration,
    /// CPU time of the best stream run.
    cpu: CpuTime,
    /// Every stream run's time.
    streams: Vec<Duration>,
    /// The best and every run of the two-stage view (count, then top 10 per window).
    best_two_stage: Duration,
    two_stages: Vec<Duration>,
}

impl Measured {
    fn median_stream(&self) -> Duration {
        let mut times = self.streams.clone();
        times.sort();
        times.get(times.len() / 2).copied().unwrap_or_default()
    }
}

/// Pins worker process i, all its threads, to core i mod `cores` (with `taskset`).
async fn pin_workers(engine: &Engine, cores: usize) -> anyhow::Result<()> {
    for (i, pid) in engine.local_worker_pids().await.into_iter().enumerate() {
        let status = std::process::Command::new("taskset")
            .args(["-a", "-p", "-c", &(i % cores).to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()
            .context("running taskset to pin a worker to a core (--no-pin runs without)")?;
        if !status.success() {
            bail!("taskset could not pin worker {pid} to core {}", i % cores);
        }
    }
    Ok(())
}

/// CPU time used by this process (the coordinator) and by its children (the worker
/// processes), from `/proc`.
#[derive(Debug, Default, Clone, Copy)]
struct CpuTime {
    coordinator: Duration,
    workers: Duration,
}

impl CpuTime {
    fn now() -> anyhow::Result<Self> {
        let me = std::process::id();
        let mut cpu = CpuTime {
            coordinator: proc_cpu(me)?.map(|(_, t)| t).unwrap_or_default(),
            workers: Duration::ZERO,
        };
        for entry in std::fs::read_dir("/proc")? {
            let Some(pid) = entry?.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            if let Some((parent, time)) = proc_cpu(pid)?
                && parent == me
            {
                cpu.workers += time;
            }
        }
        Ok(cpu)
    }

    fn minus(&self, before: &CpuTime) -> CpuTime {
        CpuTime {
            coordinator: self.coordinator.saturating_sub(before.coordinator),
            workers: self.workers.saturating_sub(before.workers),
        }
    }
}

/// A process's parent and user+system CPU time; `None` if it is gone.
fn proc_cpu(pid: u32) -> anyhow::Result<Option<(u32, Duration)>> {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Ok(None);
    };
    // Fields after the parenthesised command name: state, ppid, ..., utime (12th), stime.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .context("malformed /proc stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parent = fields
        .get(1)
        .and_then(|f| f.parse().ok())
        .context("no ppid")?;
    let ticks: u64 = fields
        .get(11..13)
        .context("no utime/stime")?
        .iter()
        .map(|f| f.parse::<u64>().unwrap_or(0))
        .sum();
    // The kernel reports in USER_HZ, which is 100 on Linux.
    Ok(Some((parent, Duration::from_millis(ticks * 10))))
}

async fn empty_interval(args: EmptyInterval) -> anyhow::Result<()> {
    println!(
        "empty-interval: one source with no input, {} view(s), real clock, {} s per width, 2 worker processes",
        args.views, args.seconds
    );
    println!("| batch interval | intervals | processing p50 | p99 | max | scheduling delay p50 |");
    println!("|---|---|---|---|---|---|");
    for width_ms in [100u64, 1000] {
        let dir = tempfile::tempdir()?;
        let config = ServeConfig {
            data_dir: dir.path().join("data"),
            clock: ClockKind::Real,
            batch_interval: Duration::from_millis(width_ms),
            workers: 2,
            worker_cores: 1,
            worker_mode: dstream_server::config::WorkerMode::Process(Some(worker_binary()?)),
            http_addr: None,
            ..ServeConfig::default()
        };
        let shutdown = CancellationToken::new();
        let clock = dstream_server::clock_for(&config);
        let grpc = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let engine = Engine::start(config, clock, grpc, shutdown.clone()).await?;
        exec(
            &engine,
            "CREATE SOURCE quiet (k BIGINT, v BIGINT) WITH (connector = 'generator', rows_per_second = 0)",
        )
        .await?;
        for i in 0..args.views {
            exec(
                &engine,
                &format!("CREATE MATERIALIZED VIEW v{i} AS SELECT k, count(*) AS n, sum(v) AS s FROM quiet GROUP BY k"),
            )
            .await?;
        }
        let first = engine.committed_intervals();
        tokio::time::sleep(Duration::from_secs(args.seconds)).await;
        let sql = format!(
            "SELECT count(*), \
               round(approx_percentile_cont(processing_time_ms, 0.5), 2), \
               round(approx_percentile_cont(processing_time_ms, 0.99), 2), round(max(processing_time_ms), 2), \
               round(approx_percentile_cont(scheduling_delay_ms, 0.5), 2) \
             FROM dstream_intervals WHERE interval_id >= {}",
            first + 1
        );
        let out = batches(exec(&engine, &sql).await?);
        let text = arrow::util::pretty::pretty_format_batches(&out)?.to_string();
        let row = text
            .lines()
            .nth(3)
            .unwrap_or_default()
            .trim_matches('|')
            .split('|')
            .map(|c| c.trim().to_string())
            .collect::<Vec<_>>();
        if row.len() == 5 {
            println!(
                "| {width_ms} ms | {} | {} ms | {} ms | {} ms | {} ms |",
                row[0], row[1], row[2], row[3], row[4]
            );
        } else {
            println!("| {width_ms} ms | {text} |");
        }
        shutdown.cancel();
        engine.stopped().await;
    }
    Ok(())
}

/// One shuffle piece's worth of partial aggregates: (window_start, k, n, label).
fn shuffle_batch(rows: usize, seed: i64) -> anyhow::Result<RecordBatch> {
    use arrow::array::{Int64Array, StringArray, TimestampNanosecondArray};
    use arrow::datatypes::{DataType, Field, Schema, TimeUnit};
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "window_start",
            DataType::Timestamp(TimeUnit::Nanosecond, None),
            false,
        ),
        Field::new("k", DataType::Int64, false),
        Field::new("n", DataType::Int64, false),
        Field::new("label", DataType::Utf8, false),
    ]));
    let base = seed * rows as i64;
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampNanosecondArray::from_iter_values(
                (0..rows as i64).map(|i| 1_767_225_600_000_000_000 + (base + i) / 1000),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..rows as i64).map(|i| base + i),
            )),
            Arc::new(Int64Array::from_iter_values(
                (0..rows as i64).map(|i| (base + i) % 97),
            )),
            Arc::new(StringArray::from_iter_values(
                (0..rows as i64).map(|i| format!("key-{:08}", (base + i) % 100_000)),
            )),
        ],
    )?)
}

fn gbps(bytes: usize, elapsed: Duration) -> f64 {
    bytes as f64 / elapsed.as_secs_f64() / 1e9
}

async fn shuffle(args: Shuffle) -> anyhow::Result<()> {
    use dstream_executor::operator::ShufflePiece;
    use dstream_executor::rpc::FlightPeers;
    use dstream_executor::rpc::proto::{ShuffleRef, data_ticket::Kind};
    use dstream_executor::worker::{WorkerState, serve};
    use dstream_storage::IntervalId;

    const BATCH_ROWS: usize = 8192;
    let per_batch = shuffle_batch(BATCH_ROWS, 0)?.get_array_memory_size();
    let partitions = args.partitions.max(1);
    let batches_per_piece = (args.megabytes * 1_000_000 / per_batch / partitions).max(1);
    let mut pieces = Vec::with_capacity(partitions);
    let mut seed = 0;
    for _ in 0..partitions {
        let mut rows = Vec::with_capacity(batches_per_piece);
        for _ in 0..batches_per_piece {
            rows.push(shuffle_batch(BATCH_ROWS, seed)?);
            seed += 1;
        }
        pieces.push(ShufflePiece {
            rows,
            distinct: vec![],
        });
    }
    let total: usize = pieces
        .iter()
        .flat_map(|p| p.rows.iter())
        .map(|b| b.get_array_memory_size())
        .sum();
    println!(
        "shuffle: {:.0} MB of map output in {partitions} partitions ({} batches of {BATCH_ROWS} rows each), best of {}",
        total as f64 / 1e6,
        batches_per_piece,
        args.runs
    );

    // Baseline: the same batches through Arrow IPC in memory, one thread.
    let mut best_ipc = Duration::MAX;
    for _ in 0..args.runs {
        let started = Instant::now();
        for piece in &pieces {
            let schema = piece.rows[0].schema();
            let mut buffer = Vec::new();
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut buffer, &schema)?;
            for batch in &piece.rows {
                writer.write(batch)?;
            }
            writer.finish()?;
            drop(writer);
            let reader = arrow::ipc::reader::StreamReader::try_new(buffer.as_slice(), None)?;
            for batch in reader {
                std::hint::black_box(batch?);
            }
        }
        best_ipc = best_ipc.min(started.elapsed());
    }

    // A worker's Flight endpoint holding the pieces as one map task's output.
    let state = Arc::new(WorkerState::new(String::new(), 1));
    state
        .shuffle
        .put(("v".to_string(), IntervalId(0), 0), pieces);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    let server = serve(state, listener, stop.clone());
    let peers = Arc::new(FlightPeers::default());

    println!("| path | readers | time | GB/s | vs. in-memory IPC |");
    println!("|---|---|---|---|---|");
    println!(
        "| Arrow IPC encode + decode in memory | 1 | {:.0} ms | {:.2} | 1.00x |",
        best_ipc.as_secs_f64() * 1000.0,
        gbps(total, best_ipc)
    );
    for &readers in &args.readers {
        let readers = readers.max(1);
        let mut best = Duration::MAX;
        for _ in 0..args.runs {
            let started = Instant::now();
            let mut tasks = tokio::task::JoinSet::new();
            for r in 0..readers {
                let (peers, address) = (peers.clone(), address.clone());
                tasks.spawn(async move {
                    let mut rows = 0usize;
                    for p in (r..partitions).step_by(readers) {
                        let kind = Kind::Shuffle(ShuffleRef {
                            view: "v".to_string(),
                            interval: 0,
                            block: 0,
                            partition: p as u32,
                            component: 0,
                            more_blocks: Vec::new(),
                        });
                        let batches = peers.fetch(&address, kind).await?;
                        rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
                    }
                    anyhow::Ok(rows)
                });
            }
            let mut rows = 0;
            while let Some(done) = tasks.join_next().await {
                rows += done??;
            }
            let elapsed = started.elapsed();
            if rows != partitions * batches_per_piece * BATCH_ROWS {
                bail!(
                    "read {rows} rows, expected {}",
                    partitions * batches_per_piece * BATCH_ROWS
                );
            }
            best = best.min(elapsed);
        }
        println!(
            "| Flight do_get over loopback | {readers} | {:.0} ms | {:.2} | {:.2}x |",
            best.as_secs_f64() * 1000.0,
            gbps(total, best),
            gbps(total, best) / gbps(total, best_ipc)
        );
    }
    stop.cancel();
    let _ = server.await;
    Ok(())
}
