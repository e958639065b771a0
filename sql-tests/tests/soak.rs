//! The soak test: a seeded stream runs while a worker is killed at random every 20–30
//! seconds, the whole server is killed and restarted once half way, and another
//! connection sends garbage all along. At the end every view equals the same views
//! after a fault-free run over the same intervals (and that run's views equal batch
//! SQL over its input), and the server's memory stayed under its bound.
//!
//! `DSTREAM_SOAK_SECONDS` (default 150) sets how long the faults go on,
//! `DSTREAM_SOAK_SEED` replays a run, `DSTREAM_SOAK_MAX_RSS_MB` (default 4096) is the
//! bound on the resident memory of the server and its workers together. For hours:
//!
//! ```sh
//! DSTREAM_SOAK_SECONDS=14400 cargo test -p dstream-sql-tests --test soak -- --nocapture
//! ```

use std::time::{Duration, Instant};

use dstream_sql_tests::ServeProcess;
use tokio::io::AsyncWriteExt;
use tokio_postgres::{Client, SimpleQueryMessage};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A small deterministic generator (xorshift), so that a seed replays a run.
struct Dice(u64);

impl Dice {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

const SETUP: &str = "
    CREATE SOURCE s (k BIGINT, v BIGINT, ts TIMESTAMP,
        WATERMARK FOR ts AS ts - INTERVAL '2' SECOND)
      WITH (connector = 'generator', rows_per_second = 400, key_cardinality = 40);
    CREATE MATERIALIZED VIEW per_key AS
      SELECT k, count(*) AS n, sum(v) AS total, min(v) AS lo, max(v) AS hi FROM s GROUP BY k;
    CREATE MATERIALIZED VIEW per_window AS
      SELECT window_start, window_end, count(*) AS n, count(DISTINCT k) AS keys
      FROM TUMBLE(s, ts, INTERVAL '5' SECOND)
      GROUP BY window_start, window_end EMIT ON WINDOW CLOSE;";

/// Each view's rows, and the batch query over the input that gives them (`None`:
/// compared with the fault-free run only: which windows are closed depends on the
/// watermark as of each interval).
const VIEWS: [(&str, &str, Option<&str>); 2] = [
    (
        "per_key",
        "SELECT k, n, total, lo, hi FROM per_key ORDER BY k",
        Some("SELECT k, count(*), sum(v), min(v), max(v) FROM s GROUP BY k ORDER BY k"),
    ),
    (
        "per_window",
        "SELECT CAST(window_start AS TEXT), n, keys FROM per_window ORDER BY 1",
        None,
    ),
];

/// The server's own arguments: a checkpoint every 5 intervals, the input kept for the
/// batch queries, and a statement timeout.
const ARGS: [&str; 10] = [
    // The garbage includes a query that would run for hours.
    "--statement-timeout",
    "10s",
    "--block-rows",
    "256",
    "--source-retention",
    "24h",
    "--checkpoint-intervals",
    "5",
    "--checkpoint-every",
    "off",
];

async fn lines(client: &Client, sql: &str) -> Vec<String> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL"))
                    .collect::<Vec<_>>()
                    .join("|"),
            ),
            _ => None,
        })
        .collect()
}

/// The last interval every view has committed.
async fn last_interval(client: &Client) -> u64 {
    let rows = lines(client, "SHOW MATERIALIZED VIEWS").await;
    rows.iter()
        .map(|r| {
            r.split('|')
                .nth(4)
                .and_then(|i| i.parse().ok())
                .unwrap_or(0)
        })
        .min()
        .unwrap_or(0)
}

/// Resident memory of `pid` and its children, in MiB.
fn resident_mib(pids: &[u32]) -> u64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .sum::<u64>()
        / 1024
}

/// Statements and bytes that must only ever get errors.
const GARBAGE: [&str; 8] = [
    "SELEC 1",
    "SELECT * FROM nothing_here",
    "CREATE MATERIALIZED VIEW g AS SELECT window_start, count(*) FROM HOP(s, ts, INTERVAL '1' SECOND, INTERVAL '100000' SECOND) GROUP BY window_start",
    "SELECT $0",
    "SELECT count(*) FROM generate_series(1, 100000000000)",
    "CREATE SOURCE s (x INT) WITH (connector = 'nope')",
    "DROP SOURCE s",
    "INSERT INTO nowhere VALUES (1)",
];

/// Sends garbage on its own connections until `stop`.
async fn send_garbage(
    addr: std::net::SocketAddr,
    seed: u64,
    stop: tokio_util::sync::CancellationToken,
) -> u64 {
    let mut dice = Dice(seed | 1);
    let mut sent = 0;
    while !stop.is_cancelled() {
        if dice.between(0, 3) == 0 {
            // Noise on the wire.
            let noise: Vec<u8> = (0..dice.between(1, 200))
                .map(|_| dice.next() as u8)
                .collect();
            let _ = tokio::time::timeout(Duration::from_secs(5), async {
                if let Ok(mut socket) = tokio::net::TcpStream::connect(addr).await {
                    let _ = socket.write_all(&noise).await;
                }
            })
            .await;
        } else if let Ok(Ok(client)) =
            tokio::time::timeout(Duration::from_secs(10), dstream_sql_tests::connect(addr)).await
        {
            let deep = format!("SELECT {}", vec!["1"; 5000].join(" + "));
            let sql = match dice.between(0, GARBAGE.len() as u64) as usize {
                i if i < GARBAGE.len() => GARBAGE[i].to_string(),
                _ => deep,
            };
            let _ = tokio::time::timeout(Duration::from_secs(30), client.simple_query(&sql)).await;
        }
        sent += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_survives_kills_a_restart_and_garbage() {
    let seconds = env_or("DSTREAM_SOAK_SECONDS", 150);
    let seed = env_or(
        "DSTREAM_SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(7, |d| d.as_secs()),
    );
    let max_rss = env_or("DSTREAM_SOAK_MAX_RSS_MB", 4096);
    eprintln!("soak: {seconds} s, DSTREAM_SOAK_SEED={seed}");
    let mut dice = Dice(seed | 1);
    let dir = tempfile::tempdir().expect("a directory");
    let data = dir.path().join("data");

    let mut server = ServeProcess::start(&data, &ARGS, &[]).await;
    server.client.batch_execute(SETUP).await.expect("setup");
    let addr = server.addr;
    let mut stop = tokio_util::sync::CancellationToken::new();
    #[allow(clippy::disallowed_methods)] // awaited when the server restarts and at the end
    let mut garbage = tokio::spawn(send_garbage(addr, seed, stop.clone()));

    let started = Instant::now();
    let until = started + Duration::from_secs(seconds);
    let restart_at = started + Duration::from_secs(seconds / 2);
    let mut restarted = false;
    let mut next_kill = started + Duration::from_secs(dice.between(20, 30));
    let (mut kills, mut peak) = (0u32, 0u64);
    while Instant::now() < until {
        let client = &server.client;
        let advanced =
            tokio::time::timeout(Duration::from_secs(120), client.simple_query("ADVANCE 1")).await;
        match advanced {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("ADVANCE failed: {e}"),
            Err(_) => panic!("ADVANCE hung for 120 s"),
        }
        let mut pids: Vec<u32> = server.child.id().into_iter().collect();
        for row in lines(
            client,
            "SELECT pid FROM dstream_workers WHERE status = 'alive'",
        )
        .await
        {
            pids.extend(row.parse::<u32>().ok());
        }
        let rss = resident_mib(&pids);
        peak = peak.max(rss);
        assert!(rss <= max_rss, "the server uses {rss} MiB, over {max_rss}");
        if Instant::now() >= next_kill && pids.len() > 1 {
            let victim = pids[1 + (dice.next() as usize) % (pids.len() - 1)];
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &victim.to_string()])
                .status();
            kills += 1;
            next_kill = Instant::now() + Duration::from_secs(dice.between(20, 30));
        }
        if !restarted && Instant::now() >= restart_at {
            // The whole server dies; a new one resumes from its checkpoint.
            stop.cancel();
            let _ = (&mut garbage).await;
            server.kill().await;
            server = ServeProcess::start(&data, &ARGS, &[]).await;
            restarted = true;
            stop = tokio_util::sync::CancellationToken::new();
            #[allow(clippy::disallowed_methods)] // awaited at the end
            let next = tokio::spawn(send_garbage(server.addr, seed ^ 0x5eed, stop.clone()));
            garbage = next;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.cancel();
    let sent = garbage.await.unwrap_or(0);
    let client = &server.client;
    let last = last_interval(client).await;
    let mut faulty: Vec<Vec<String>> = Vec::new();
    for (_, select, _) in VIEWS {
        faulty.push(lines(client, select).await);
    }
    assert!(
        lines(client, "SHOW MATERIALIZED VIEWS")
            .await
            .iter()
            .all(|r| r.ends_with("|running")),
        "every view runs"
    );
    server.kill().await;
    eprintln!(
        "soak: {} intervals, {kills} workers killed, 1 server restart, {sent} garbage \
         requests after it, peak {peak} MiB",
        last + 1
    );
    assert!(kills >= 1 || seconds < 30, "no worker was killed");

    // The same intervals without faults; its views equal batch SQL over its input.
    let clean_dir = tempfile::tempdir().expect("a directory");
    let clean_server = ServeProcess::start(&clean_dir.path().join("data"), &ARGS, &[]).await;
    let clean = &clean_server.client;
    clean.batch_execute(SETUP).await.expect("setup");
    clean
        .batch_execute(&format!("ADVANCE {}", last + 1))
        .await
        .expect("advance");
    for ((name, select, oracle), faulty_rows) in VIEWS.iter().zip(&faulty) {
        let clean_rows = lines(clean, select).await;
        assert!(!clean_rows.is_empty(), "{name} has rows");
        if let Some(oracle) = oracle {
            assert_eq!(
                clean_rows,
                lines(clean, oracle).await,
                "{name} equals batch SQL"
            );
        }
        assert_eq!(
            faulty_rows, &clean_rows,
            "{name} after kills and a restart equals the fault-free run"
        );
    }
    clean_server.kill().await;
}
