//! Input the coordinator tracks per interval: blocks and where they are held.
//!
//! A source's sealed input and a read stage's kept changes are both a
//! [`SealedInterval`]: blocks of one interval, each on the workers holding a copy.

use dstream_storage::IntervalId;

/// An input block as the coordinator tracks it: where it is held.
#[derive(Clone, Debug)]
pub struct BlockInfo {
    pub interval: IntervalId,
    pub index: u32,
    pub rows: u64,
    pub bytes: u64,
    /// Workers holding a copy: the receiver's worker and its replica.
    pub holders: Vec<u64>,
}

/// The input of one source in one interval: its blocks, and the source's watermark
/// once they were sealed.
#[derive(Clone, Debug)]
pub struct SealedInterval {
    pub interval: IntervalId,
    pub blocks: Vec<BlockInfo>,
    pub watermark: Option<i64>,
}
