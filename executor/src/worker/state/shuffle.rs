//! [`ShufflePieces`]: the map outputs a worker holds until their interval is over,
//! one piece per partition, fetched by the reduce tasks.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use dstream_storage::IntervalId;

use super::lock;
use crate::operator::ShufflePiece;

/// Key of a map task's output: (stage, interval, piece id; see `shuffle::piece_id`).
pub type ShuffleKey = (String, IntervalId, u32);

/// The map outputs held here; the only owner of them.
#[derive(Debug, Default)]
pub struct ShufflePieces(Mutex<HashMap<ShuffleKey, Arc<Vec<ShufflePiece>>>>);

impl ShufflePieces {
    /// Keeps a map task's output until its interval is over.
    pub fn put(&self, key: ShuffleKey, pieces: Vec<ShufflePiece>) {
        lock(&self.0).insert(key, Arc::new(pieces));
    }

    /// A map task's output, if held here.
    pub fn get(&self, key: &ShuffleKey) -> Option<Arc<Vec<ShufflePiece>>> {
        lock(&self.0).get(key).cloned()
    }

    /// Drops the map outputs of `interval` and earlier.
    pub fn expire(&self, interval: IntervalId) {
        lock(&self.0).retain(|(_, i, _), _| *i > interval);
    }

    /// Drops the map outputs of `interval` alone.
    pub fn drop_interval(&self, interval: IntervalId) {
        lock(&self.0).retain(|(_, i, _), _| *i != interval);
    }

    /// Forgets the outputs of stage `name` (dropped).
    pub fn forget(&self, name: &str) {
        lock(&self.0).retain(|(view, _, _), _| view != name);
    }

    /// Forgets every output.
    pub fn clear(&self) {
        lock(&self.0).clear();
    }
}
