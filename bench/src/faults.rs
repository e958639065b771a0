//! Faults, as figures 11 and 13 of the D-Streams paper measure them.
//!
//! `recovery`: a running count over `--keys` keys on three worker processes; after
//! at least `--warmup` intervals one worker is killed with SIGKILL and `--after`
//! more intervals run. For each checkpoint spacing in `--checkpoints` (in intervals
//! of 1 s: 2, 10, 30 by default), the kill lands at each point of `--kill-at`:
//! half-way between two checkpoints, and just as a checkpoint is being written (the
//! worst case: the lost partitions come from the checkpoint before, and a whole
//! spacing of input is replayed). It reports the processing time of the intervals
//! around the kill against the median before it: the interval after the kill
//! includes noticing the loss and rebuilding the lost partitions in parallel on the
//! two survivors (last checkpoint + replay of the input since).
//!
//! `straggler`: the same count on two workers plus a third whose every task first
//! waits `--delay`, against three healthy workers: the median interval processing
//! time with the straggler, with speculation off and on, over the healthy median.
//!
//! Both run the coordinator in this process on the manual clock (intervals back to
//! back) and the workers as `dstream worker` processes.

use std::time::Duration;

use anyhow::{Context, bail};
use arrow::util::display::array_value_to_string;
use dstream_server::Engine;
use dstream_server::config::{ClockKind, ServeConfig, Speculation};

use crate::{Engined, batches, exec, start_config, worker_binary};

#[derive(clap::Args, Debug)]
pub struct Recovery {
    /// Generated events per (simulated) second.
    #[arg(long = "events-per-second", default_value_t = 1_000_000)]
    rate: u64,
    /// Distinct keys: the size of the state.
    #[arg(long, default_value_t = 1_000_000)]
    keys: u64,
    /// Checkpoint spacings to run with, in intervals (of 1 s).
    #[arg(long, value_delimiter = ',', default_value = "2,10,30")]
    checkpoints: Vec<u64>,
    /// Intervals at least before the kill.
    #[arg(long, default_value_t = 40)]
    warmup: u64,
    /// Where the kill lands: `halfway` between two checkpoints, or just as a
    /// `checkpoint` is being written.
    #[arg(
        long = "kill-at",
        value_delimiter = ',',
        default_value = "halfway,checkpoint"
    )]
    kill_at: Vec<KillAt>,
    /// Intervals after the kill.
    #[arg(long, default_value_t = 5)]
    after: u64,
    /// State partitions.
    #[arg(long, default_value_t = 6)]
    partitions: usize,
}

/// Where, between two checkpoints, `recovery` kills a worker.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum KillAt {
    Halfway,
    Checkpoint,
}

impl KillAt {
    /// Intervals to run before the kill, with a checkpoint every `every` intervals
    /// and at least `warmup` intervals first. A checkpoint is taken at the commit of
    /// every `every`-th interval (ids `every - 1`, `2 * every - 1`, ...).
    fn before(self, every: u64, warmup: u64) -> u64 {
        let every = every.max(1);
        let checkpoint = warmup.div_ceil(every).saturating_mul(every);
        match self {
            KillAt::Checkpoint => checkpoint,
            KillAt::Halfway => checkpoint.saturating_add(every / 2),
        }
    }

    fn describe(self, before: u64) -> String {
        match self {
            KillAt::Halfway => "half-way".to_string(),
            KillAt::Checkpoint => format!("checkpoint {} being written", before.saturating_sub(1)),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct Straggler {
    /// Generated events per (simulated) second.
    #[arg(long = "events-per-second", default_value_t = 2_000_000)]
    rate: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Intervals measured (after two to warm up).
    #[arg(long, default_value_t = 20)]
    intervals: u64,
    /// How long each task of the straggler waits before it runs.
    #[arg(long, default_value = "1s")]
    delay: String,
    /// State partitions.
    #[arg(long, default_value_t = 6)]
    partitions: usize,
}

const SOURCE: &str = "CREATE SOURCE events (k BIGINT, v BIGINT) WITH (connector = 'generator', \
    rows_per_second = {rate}, key_cardinality = {keys}, seed = 7)";
const VIEW: &str = "CREATE MATERIALIZED VIEW counts AS SELECT k, count(*) AS n, sum(v) AS total FROM events GROUP BY k";

fn source(rate: u64, keys: u64) -> String {
    SOURCE
        .replace("{rate}", &rate.to_string())
        .replace("{keys}", &keys.to_string())
}

fn config(
    workers: usize,
    partitions: usize,
    dir: &tempfile::TempDir,
) -> anyhow::Result<ServeConfig> {
    Ok(ServeConfig {
        data_dir: dir.path().join("data"),
        clock: ClockKind::Manual,
        partitions,
        batch_interval: Duration::from_secs(1),
        source_retention: Duration::from_secs(2),
        workers,
        worker_cores: 1,
        worker_mode: dstream_server::config::WorkerMode::Process(Some(worker_binary()?)),
        http_addr: None,
        ..ServeConfig::default()
    })
}

/// Rows of a query as text.
async fn text(engine: &Engine, sql: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let mut rows = Vec::new();
    for batch in batches(exec(engine, sql).await?) {
        for row in 0..batch.num_rows() {
            rows.push(
                batch
                    .columns()
                    .iter()
                    .map(|c| array_value_to_string(c, row))
                    .collect::<Result<Vec<_>, _>>()?,
            );
        }
    }
    Ok(rows)
}

/// Processing times (ms) of the intervals from `first` on, by interval.
async fn processing_times(engine: &Engine, first: u64) -> anyhow::Result<Vec<(u64, f64)>> {
    text(
        engine,
        &format!(
            "SELECT interval_id, processing_time_ms FROM dstream_intervals \
             WHERE interval_id >= {first} ORDER BY interval_id"
        ),
    )
    .await?
    .into_iter()
    .map(|r| Ok((r[0].parse()?, r[1].parse()?)))
    .collect()
}

fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN)
}

pub async fn recovery(args: Recovery) -> anyhow::Result<()> {
    println!(
        "recovery: running count over {} keys, {} events per 1 s interval, P = {}, 3 worker processes (1 task slot each); SIGKILL of one after at least {} intervals, then {} more",
        args.keys, args.rate, args.partitions, args.warmup, args.after
    );
    println!(
        "| checkpoint every | kill | normal interval (median before) | interval after the kill | difference | recovery | partitions rebuilt | checkpoint loaded | intervals replayed | intervals around the kill (ms) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &every in &args.checkpoints {
        for &at in &args.kill_at {
            let before = at.before(every, args.warmup);
            let row = recover_once(&args, every, before).await?;
            println!("| {every} s | {} | {row} |", at.describe(before));
        }
    }
    Ok(())
}

/// One run of `recovery`: checkpoints every `every` intervals, the kill after
/// `before`; the rest of its table row.
async fn recover_once(args: &Recovery, every: u64, before: u64) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let mut config = config(3, args.partitions, &dir)?;
    config.checkpoint_intervals = every;
    config.checkpoint_every = None;
    let Engined {
        engine, shutdown, ..
    } = start_config(config, dir).await?;
    // Every worker is there before the view is placed: each owns as many partitions.
    engine
        .cluster()
        .wait_for_workers(3, Duration::from_secs(20))
        .await?;
    exec(&engine, &source(args.rate, args.keys)).await?;
    exec(&engine, VIEW).await?;
    exec(&engine, &format!("ADVANCE {before}")).await?;
    let pids = engine.local_worker_pids().await;
    let victim = *pids.first().context("no worker processes")?;
    let killed = std::process::Command::new("kill")
        .args(["-KILL", &victim.to_string()])
        .status()?;
    if !killed.success() {
        bail!("could not kill worker process {victim}");
    }
    exec(&engine, &format!("ADVANCE {}", args.after)).await?;
    let times = processing_times(&engine, 2).await?;
    let kill_at = before; // the first interval run after the kill
    let normal = median(
        &times
            .iter()
            .filter(|(i, _)| *i < kill_at)
            .map(|(_, t)| *t)
            .collect::<Vec<_>>(),
    );
    let after = times
        .iter()
        .find(|(i, _)| *i == kill_at)
        .map_or(f64::NAN, |(_, t)| *t);
    let around: Vec<String> = times
        .iter()
        .filter(|(i, _)| *i + 3 >= kill_at && *i <= kill_at + 3)
        .map(|(i, t)| format!("{i}: {t:.0}"))
        .collect();
    let recovery = text(
        &engine,
        "SELECT round(duration_ms, 0), coalesce(CAST(checkpoint_interval AS VARCHAR), 'none'), \
         replayed_intervals, status, partitions FROM dstream_recoveries",
    )
    .await?;
    let Some(r) = recovery.first() else {
        bail!("no recovery was recorded");
    };
    if r[3] != "recovered" {
        bail!("the recovery did not complete: {r:?}");
    }
    shutdown.cancel();
    engine.stopped().await;
    Ok(format!(
        "{normal:.0} ms | {after:.0} ms | {:+.0} ms | {} ms | {} | {} | {} | {}",
        after - normal,
        r[0],
        r[4],
        r[1],
        r[2],
        around.join(", ")
    ))
}

pub async fn straggler(args: Straggler) -> anyhow::Result<()> {
    let delay = dstream_server::config::parse_duration(&args.delay)?;
    println!(
        "straggler: running count over {} keys, {} events per 1 s interval, P = {}, 2 worker processes + a third whose tasks each wait {delay:?} first; median of {} intervals",
        args.keys, args.rate, args.partitions, args.intervals
    );
    println!("| run | median interval | p90 | max | speculative copies | vs. healthy |");
    println!("|---|---|---|---|---|---|");
    let runs = [
        ("3 healthy workers", Duration::ZERO, true),
        ("straggler, speculation off", delay, false),
        ("straggler, speculation on", delay, true),
    ];
    let mut healthy = f64::NAN;
    for (name, delay, speculation) in runs {
        let dir = tempfile::tempdir()?;
        let mut config = config(2, args.partitions, &dir)?;
        config.speculation = speculation.then(Speculation::default);
        let Engined {
            engine, shutdown, ..
        } = start_config(config, dir).await?;
        engine
            .cluster()
            .wait_for_workers(2, Duration::from_secs(20))
            .await?;
        let mut third = tokio::process::Command::new(worker_binary()?);
        third
            .args(["worker", "--coordinator", engine.coordinator_url()])
            .args(["--cores", "1"])
            .kill_on_drop(true);
        if !delay.is_zero() {
            third.env(
                "DSTREAM_FAULT_TASK_DELAY",
                format!("{}ms", delay.as_millis()),
            );
        }
        let mut third = third.spawn()?;
        engine
            .cluster()
            .wait_for_workers(3, Duration::from_secs(20))
            .await?;
        exec(&engine, &source(args.rate, args.keys)).await?;
        exec(&engine, VIEW).await?;
        exec(&engine, &format!("ADVANCE {}", args.intervals + 2)).await?;
        let times: Vec<f64> = processing_times(&engine, 2)
            .await?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        let copies = text(
            &engine,
            "SELECT sum(speculative_tasks) FROM dstream_intervals",
        )
        .await?;
        let mut sorted = times.clone();
        sorted.sort_by(f64::total_cmp);
        let p90 = sorted
            .get(sorted.len() * 9 / 10)
            .copied()
            .unwrap_or(f64::NAN);
        let mid = median(&times);
        if healthy.is_nan() {
            healthy = mid;
        }
        println!(
            "| {name} | {mid:.0} ms | {p90:.0} ms | {:.0} ms | {} | {:.2}x |",
            sorted.last().copied().unwrap_or(f64::NAN),
            copies.concat().concat(),
            mid / healthy
        );
        shutdown.cancel();
        engine.stopped().await;
        let _ = third.kill().await;
    }
    Ok(())
}
