//! The interval clock, injected: it decides when the next interval may be sealed.
//!
//! [`RealClock`] follows wall-clock time: interval *t* is sealed when it has ended.
//! [`ManualClock`] ignores time: an interval is sealed only when a user (or test) runs
//! `ADVANCE n`, so results are deterministic and tests never sleep.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Semaphore;

/// Decides when intervals end.
#[async_trait]
pub trait IntervalClock: Send + Sync + std::fmt::Debug {
    /// Nanoseconds since the epoch now, as this clock sees it; the origin of a new
    /// timeline.
    fn now_nanos(&self) -> i64;

    /// Waits until the interval ending at `end_nanos` may be sealed.
    async fn wait_until(&self, end_nanos: i64);

    /// Whether the interval ending at `end_nanos`, the one after the interval just
    /// started, may be sealed now without waiting. (The manual clock answers for
    /// that interval whatever `end_nanos` says: whether an `ADVANCE` let it run.)
    fn has_ended(&self, end_nanos: i64) -> bool;

    /// The manual clock, if this is one.
    fn as_manual(&self) -> Option<&ManualClock> {
        None
    }
}

/// Wall-clock time.
#[derive(Debug, Default)]
pub struct RealClock;

#[async_trait]
impl IntervalClock for RealClock {
    fn now_nanos(&self) -> i64 {
        chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0)
    }

    fn has_ended(&self, end_nanos: i64) -> bool {
        self.now_nanos() >= end_nanos
    }

    async fn wait_until(&self, end_nanos: i64) {
        let now = self.now_nanos();
        if end_nanos > now {
            tokio::time::sleep(Duration::from_nanos(end_nanos.abs_diff(now))).await;
        }
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    origin_nanos: i64,
    permits: Arc<Semaphore>,
}

impl ManualClock {
    /// A manual clock whose first interval starts at `origin_nanos`.
    pub fn new(origin_nanos: i64) -> Self {
        ManualClock {
            origin_nanos,
            permits: Arc::new(Semaphore::new(0)),
        }
    }

    /// Lets `n` more intervals be sealed.
    pub fn advance(&self, n: u64) {
        self.permits.add_permits(n as usize);
    }
}

#[async_trait]
impl IntervalClock for ManualClock {
    fn now_nanos(&self) -> i64 {
        self.origin_nanos
    }

    async fn wait_until(&self, _end_nanos: i64) {
        if let Ok(permit) = self.permits.acquire().await {
            permit.forget();
        }
    }

    fn has_ended(&self, _end_nanos: i64) -> bool {
        self.permits.available_permits() > 0
    }

    fn as_manual(&self) -> Option<&ManualClock> {
        Some(self)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[tokio::test]
    async fn real_clock_waits_until_the_interval_has_ended() {
        let clock = RealClock;
        let started = Instant::now();
        clock.wait_until(clock.now_nanos() + 30_000_000).await;
        assert!(started.elapsed() >= Duration::from_millis(29));
        // An interval that already ended does not wait.
        let started = Instant::now();
        clock.wait_until(clock.now_nanos() - 1_000_000_000).await;
        assert!(started.elapsed() < Duration::from_millis(20));
        assert!(clock.has_ended(clock.now_nanos() - 1));
        assert!(!clock.has_ended(clock.now_nanos() + 1_000_000_000));
    }

    #[tokio::test]
    async fn manual_clock_moves_only_when_advanced() {
        let clock = Arc::new(ManualClock::new(0));
        let waiting = {
            let clock = clock.clone();
            #[allow(clippy::disallowed_methods)] // awaited below
            tokio::spawn(async move { clock.wait_until(i64::MAX).await })
        };
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished());
        assert!(!clock.has_ended(i64::MIN));
        clock.advance(2);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("advanced")
            .expect("task");
        // One more interval may be sealed at once.
        assert!(clock.has_ended(i64::MAX));
        clock.wait_until(i64::MAX).await;
        assert!(!clock.has_ended(i64::MIN));
    }
}
