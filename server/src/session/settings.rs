//! Server settings and the manual clock: SET batch_interval and ADVANCE.

use super::*;

pub(super) async fn set_batch_interval(
    engine: &Engine,
    width: Duration,
) -> Result<StatementResult> {
    let mut state = engine.inner.state.lock().await;
    if !state.sources.is_empty() {
        return Err(Error::Invalid(
            "batch_interval can only change while no sources exist; drop them first".into(),
        ));
    }
    if width < Duration::from_millis(10) {
        return Err(Error::Invalid(
            "batch_interval must be at least 10ms".into(),
        ));
    }
    let mut settings = state.settings.clone();
    settings.insert("batch_interval".into(), format_duration(width));
    persist_catalog(engine, &state, &state.catalog, &settings).await?;
    state.settings = settings;
    // Continue where the current timeline is, on a boundary of the new width.
    let next_start = state.timeline.start_nanos(state.next);
    let step = width.as_nanos().max(1) as i64;
    let origin = next_start
        .div_euclid(step)
        .saturating_mul(step)
        .saturating_add(if next_start.rem_euclid(step) == 0 {
            0
        } else {
            step
        });
    state.timeline = dstream_storage::Timeline::new(origin, width);
    state.next = dstream_storage::IntervalId(0);
    // Interval numbers start again: nothing sealed under the old ones is kept.
    state.sealing = None;
    state.sealed_ahead = None;
    state.mapped_ahead = None;
    Ok(command("SET"))
}

/// The most intervals one `ADVANCE` runs.
const MAX_ADVANCE: u64 = 1_000_000_000;

pub(super) async fn advance(engine: &Engine, n: u64) -> Result<StatementResult> {
    let Some(manual) = engine.clock().as_manual() else {
        return Err(Error::Invalid(
            "ADVANCE needs the manual clock; start the server with --clock manual".into(),
        ));
    };
    if n > MAX_ADVANCE {
        return Err(Error::Invalid(format!(
            "ADVANCE {n} is out of range: one ADVANCE runs at most {MAX_ADVANCE} intervals"
        )));
    }
    let Some(target) = engine.committed_intervals().checked_add(n) else {
        return Err(Error::Invalid(format!("ADVANCE {n} is out of range")));
    };
    manual.advance(n);
    engine.wait_committed(target).await?;
    Ok(command(&format!("ADVANCE {n}")))
}
