//! Prometheus metrics of the coordinator: their names, and recording them.
//!
//! Everything here is also in a system table (`dstream_intervals`,
//! `dstream_checkpoints`, `dstream_recoveries`, `SHOW SOURCES`); the metrics are for
//! monitoring. `dstream serve` serves them at `http://<--metrics-addr>/metrics`
//! ([`install`]); an engine embedded without an exporter records into nothing.

use std::net::SocketAddr;

use metrics::{counter, gauge, histogram};

use crate::cluster::checkpoint::CheckpointStat;
use crate::cluster::recovery::RecoveryStat;
use crate::engine::IntervalStat;
use crate::error::{Error, Result};
use crate::state::EngineState;

/// Serves the metrics of this process at `http://addr/metrics`.
pub fn install(addr: SocketAddr) -> Result<()> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| Error::Config(format!("cannot serve metrics on {addr}: {e}")))
}

/// One committed interval, and where each source stands after it.
pub fn interval(stat: &IntervalStat, state: &EngineState) {
    counter!("dstream_intervals_total").increment(1);
    counter!("dstream_input_rows_total").increment(stat.input_rows);
    histogram!("dstream_interval_processing_seconds").record(stat.processing_time.as_secs_f64());
    histogram!("dstream_interval_scheduling_delay_seconds")
        .record(stat.scheduling_delay.as_secs_f64());
    counter!("dstream_speculative_tasks_total").increment(stat.speculative_tasks);
    counter!("dstream_shuffle_bytes_total").increment(stat.shuffle_bytes);
    gauge!("dstream_workers").set(stat.workers as f64);
    for (name, source) in &state.sources {
        let labels = [("source", name.clone())];
        gauge!("dstream_source_records", &labels).set(source.stats.receiver.records as f64);
        gauge!("dstream_source_malformed_records", &labels)
            .set(source.stats.receiver.malformed as f64);
        gauge!("dstream_source_late_rows", &labels).set(source.stats.late_rows as f64);
    }
}

/// A checkpoint that committed or failed.
pub fn checkpoint(stat: &CheckpointStat) {
    let status = if stat.error.is_none() {
        "committed"
    } else {
        "failed"
    };
    counter!("dstream_checkpoints_total", "status" => status).increment(1);
    histogram!("dstream_checkpoint_duration_seconds").record(stat.duration.as_secs_f64());
    if stat.error.is_none() {
        gauge!("dstream_checkpoint_bytes").set(stat.bytes as f64);
        gauge!("dstream_checkpoint_interval").set(stat.interval.0 as f64);
    }
}

/// A recovery from lost workers.
pub fn recovery(stat: &RecoveryStat) {
    let status = if stat.error.is_none() {
        "recovered"
    } else {
        "failed"
    };
    counter!("dstream_recoveries_total", "status" => status).increment(1);
    histogram!("dstream_recovery_duration_seconds").record(stat.duration.as_secs_f64());
    counter!("dstream_recovered_partitions_total").increment(stat.partitions);
    counter!("dstream_replayed_intervals_total").increment(stat.replayed_intervals);
}
