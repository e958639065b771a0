//! Identifiers of the D-Stream model: intervals and partitions.
//!
//! An interval is a slice of arrival time `[start, start + batch_interval)`. Intervals
//! are numbered from the [`Timeline`]'s origin, so that the number and the wall-clock
//! start of an interval can always be derived from each other.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The sequence number of an interval; interval 0 starts at the timeline's origin.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct IntervalId(pub u64);

impl IntervalId {
    /// The interval after this one.
    pub fn next(self) -> Self {
        IntervalId(self.0 + 1)
    }
}

impl fmt::Display for IntervalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// One of the P hash partitions of a keyed dataset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct PartitionId(pub u32);

impl fmt::Display for PartitionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "p{}", self.0)
    }
}

/// Maps interval numbers to wall-clock times: interval `i` covers
/// `[origin + i * width, origin + (i + 1) * width)`, times in nanoseconds since the epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Timeline {
    /// Start of interval 0, nanoseconds since the Unix epoch.
    pub origin_nanos: i64,
    /// Width of one interval (the batch interval), in nanoseconds.
    pub width_nanos: i64,
}

impl Timeline {
    /// A timeline with the given origin and interval width.
    pub fn new(origin_nanos: i64, width: Duration) -> Self {
        let width_nanos = i64::try_from(width.as_nanos()).unwrap_or(i64::MAX).max(1);
        Timeline {
            origin_nanos,
            width_nanos,
        }
    }

    /// Start of `interval`, nanoseconds since the epoch.
    pub fn start_nanos(&self, interval: IntervalId) -> i64 {
        self.origin_nanos + self.width_nanos * interval.0 as i64
    }

    /// End (exclusive) of `interval`, nanoseconds since the epoch.
    pub fn end_nanos(&self, interval: IntervalId) -> i64 {
        self.start_nanos(interval) + self.width_nanos
    }

    /// The width of one interval.
    pub fn width(&self) -> Duration {
        Duration::from_nanos(self.width_nanos as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_bounds_follow_the_origin() {
        let t = Timeline::new(1_000, Duration::from_nanos(100));
        assert_eq!(t.start_nanos(IntervalId(0)), 1_000);
        assert_eq!(t.end_nanos(IntervalId(2)), 1_300);
    }
}
