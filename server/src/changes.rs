//! The changes of each view, sent to its subscribers and kept for a while so that a
//! subscriber that lost its connection can resume where it left off: [`ChangeFeeds`].
//!
//! A view's reduce tasks send its changes to the coordinator only while the view's
//! feed is wanted: while it has subscribers, and for [`RESUME_WINDOW`] after the last
//! one left. While wanted, the feed keeps the changes of its recent intervals (at
//! most [`RESUME_INTERVALS`] of them and [`RESUME_BYTES`]), and knows from which
//! interval on it has every one of them; a subscriber resuming after an interval
//! from then on gets exactly the intervals it missed, and one resuming from earlier
//! gets the view's current rows instead.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use dstream_storage::IntervalId;
use tokio::sync::broadcast;

use crate::engine::ChangeBatch;

/// How long a view's changes are still kept after its last subscriber left.
pub const RESUME_WINDOW: Duration = Duration::from_secs(60);

/// At most how many intervals of changes a view's feed keeps.
pub const RESUME_INTERVALS: usize = 1000;

/// At most how many bytes of changes a view's feed keeps.
pub const RESUME_BYTES: usize = 64 << 20;

/// How many intervals of changes a subscriber may fall behind before it is closed.
const SUBSCRIBER_BACKLOG: usize = 1024;

/// The change feeds of every view that has or recently had subscribers.
#[derive(Debug, Default)]
pub struct ChangeFeeds {
    feeds: Mutex<HashMap<String, Feed>>,
}

/// One view's feed.
#[derive(Debug)]
struct Feed {
    tx: broadcast::Sender<Arc<ChangeBatch>>,
    /// The changes of recent intervals with changes, oldest first.
    recent: VecDeque<Arc<ChangeBatch>>,
    recent_bytes: usize,
    /// Every interval from this one on that changed the view is in `recent`; `None`
    /// when nothing is kept.
    complete_from: Option<IntervalId>,
    /// When the feed was last seen without subscribers (`None`: it has some).
    idle_since: Option<Instant>,
}

impl Feed {
    fn new() -> Self {
        Feed {
            tx: broadcast::channel(SUBSCRIBER_BACKLOG).0,
            recent: VecDeque::new(),
            recent_bytes: 0,
            complete_from: None,
            idle_since: None,
        }
    }

    fn forget(&mut self) {
        self.recent.clear();
        self.recent_bytes = 0;
        self.complete_from = None;
    }
}

/// The memory the changes of one interval take.
fn size_of(batch: &ChangeBatch) -> usize {
    batch
        .changelog
        .deletes
        .iter()
        .chain(&batch.changelog.inserts)
        .map(|b| b.get_array_memory_size())
        .sum()
}

impl ChangeFeeds {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Feed>> {
        match self.feeds.lock() {
            Ok(feeds) => feeds,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Subscribes to `view`'s changes. Call it between intervals, with `next` the
    /// interval to run next: from it on, every interval's changes come to the feed.
    pub fn subscribe(&self, view: &str, next: IntervalId) -> broadcast::Receiver<Arc<ChangeBatch>> {
        let mut feeds = self.lock();
        let feed = feeds.entry(view.to_string()).or_insert_with(Feed::new);
        feed.idle_since = None;
        feed.complete_from.get_or_insert(next);
        feed.tx.subscribe()
    }

    /// Whether `view`'s changes should come to the coordinator in the interval about
    /// to run: it has subscribers, or had some less than [`RESUME_WINDOW`] ago. A
    /// feed idle for longer forgets what it kept.
    pub fn wanted(&self, view: &str) -> bool {
        let mut feeds = self.lock();
        let Some(feed) = feeds.get_mut(view) else {
            return false;
        };
        if feed.tx.receiver_count() > 0 {
            feed.idle_since = None;
            return true;
        }
        let idle_since = *feed.idle_since.get_or_insert_with(Instant::now);
        if idle_since.elapsed() < RESUME_WINDOW {
            return true;
        }
        feeds.remove(view);
        false
    }

    /// Whether `view` has subscribers right now.
    pub fn has_subscribers(&self, view: &str) -> bool {
        self.lock()
            .get(view)
            .is_some_and(|feed| feed.tx.receiver_count() > 0)
    }

    /// Sends the changes of one interval to `view`'s subscribers and keeps them. A
    /// view whose changes stayed on the workers in some interval has no feed then
    /// (see [`ChangeFeeds::wanted`]), so what a feed keeps has no gap.
    pub fn publish(&self, view: &str, batch: Arc<ChangeBatch>) {
        let mut feeds = self.lock();
        let Some(feed) = feeds.get_mut(view) else {
            return;
        };
        // No receivers is fine: the changes are kept for one that resumes.
        let _ = feed.tx.send(batch.clone());
        if batch.failure.is_some() {
            feed.forget();
            return;
        }
        feed.recent_bytes = feed.recent_bytes.saturating_add(size_of(&batch));
        feed.recent.push_back(batch);
        while feed.recent.len() > RESUME_INTERVALS || feed.recent_bytes > RESUME_BYTES {
            let Some(oldest) = feed.recent.pop_front() else {
                break;
            };
            feed.recent_bytes = feed.recent_bytes.saturating_sub(size_of(&oldest));
            feed.complete_from = Some(oldest.interval.next());
        }
    }

    /// The changes of `view` after interval `after`, oldest first, if the feed kept
    /// every one of them; `None` if some are no longer kept.
    pub fn since(&self, view: &str, after: IntervalId) -> Option<Vec<Arc<ChangeBatch>>> {
        let feeds = self.lock();
        let feed = feeds.get(view)?;
        let complete_from = feed.complete_from?;
        if complete_from > after.next() {
            return None;
        }
        Some(
            feed.recent
                .iter()
                .filter(|b| b.interval > after)
                .cloned()
                .collect(),
        )
    }

    /// Forgets `view`'s feed: its subscribers see the end of their stream.
    pub fn remove(&self, view: &str) {
        self.lock().remove(view);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ChangeBatch;

    fn changes(interval: u64) -> Arc<ChangeBatch> {
        Arc::new(ChangeBatch {
            interval: IntervalId(interval),
            interval_start: 0,
            changelog: Default::default(),
            failure: None,
        })
    }

    fn intervals(batches: Option<Vec<Arc<ChangeBatch>>>) -> Option<Vec<u64>> {
        batches.map(|b| b.iter().map(|c| c.interval.0).collect())
    }

    #[test]
    fn a_feed_resumes_after_any_interval_it_kept_everything_since() {
        let feeds = ChangeFeeds::default();
        assert!(!feeds.wanted("v"));
        let rx = feeds.subscribe("v", IntervalId(5));
        assert!(feeds.wanted("v") && feeds.has_subscribers("v"));
        for i in [5, 7, 8] {
            feeds.publish("v", changes(i));
        }
        assert_eq!(
            intervals(feeds.since("v", IntervalId(4))),
            Some(vec![5, 7, 8])
        );
        assert_eq!(intervals(feeds.since("v", IntervalId(6))), Some(vec![7, 8]));
        assert_eq!(intervals(feeds.since("v", IntervalId(8))), Some(vec![]));
        // Interval 4 may have changed the view before the feed started.
        assert_eq!(intervals(feeds.since("v", IntervalId(3))), None);
        drop(rx);
        // Without subscribers, the feed is kept for a subscriber that resumes.
        assert!(feeds.wanted("v") && !feeds.has_subscribers("v"));
        assert_eq!(intervals(feeds.since("v", IntervalId(7))), Some(vec![8]));
        feeds.remove("v");
        assert_eq!(intervals(feeds.since("v", IntervalId(7))), None);
    }

    #[test]
    fn a_feed_keeps_a_bounded_number_of_intervals() {
        let feeds = ChangeFeeds::default();
        let _rx = feeds.subscribe("v", IntervalId(0));
        let total = RESUME_INTERVALS as u64 + 10;
        for i in 0..total {
            feeds.publish("v", changes(i));
        }
        assert_eq!(intervals(feeds.since("v", IntervalId(5))), None);
        let kept = intervals(feeds.since("v", IntervalId(9))).unwrap_or_default();
        assert_eq!(kept.len(), RESUME_INTERVALS);
        assert_eq!(kept.first(), Some(&10));
    }
}
