//! Where things run: [`Placement`] says which worker runs each state partition of a
//! view stage, or each receiver (split) of a source, and [`Load`] says which worker
//! takes the next one.
//!
//! Every phase that moves work — the first placement, a speculative copy that won,
//! a handover off a leaving worker, evening out after a join, a recovery — changes
//! a placement only through [`Placement::move_to`] (or builds a new one with
//! [`Placement::spread`] and [`Placement::push`]), and picks targets with a [`Load`]
//! counted over the same placements, so that the answer to "who has partition p" is
//! always the one kept here.

use std::collections::{BTreeMap, BTreeSet};

/// The worker of each partition (or receiver), by index; empty until placed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Placement(Vec<u64>);

impl Placement {
    /// `count` partitions over `workers` round-robin, partition p on
    /// `workers[(start + p) % workers.len()]`; unplaced when there are no workers.
    pub fn spread(workers: &[u64], count: usize, start: usize) -> Self {
        Placement(
            workers
                .iter()
                .cycle()
                .skip(start)
                .take(count)
                .copied()
                .collect(),
        )
    }

    /// Whether every partition has a worker (a placement is made whole or not at all).
    pub fn is_placed(&self) -> bool {
        !self.0.is_empty()
    }

    /// How many partitions (receivers) are placed.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether nothing is placed.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The worker of partition `p`, if placed.
    pub fn owner(&self, p: u32) -> Option<u64> {
        self.0.get(p as usize).copied()
    }

    /// Each partition with its worker, in partition order.
    pub fn iter(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        self.0.iter().enumerate().map(|(p, w)| (p as u32, *w))
    }

    /// The workers, one per partition (so a worker appears once per partition it runs).
    pub fn workers(&self) -> impl Iterator<Item = u64> + '_ {
        self.0.iter().copied()
    }

    /// The distinct workers that run a partition.
    pub fn worker_set(&self) -> BTreeSet<u64> {
        self.0.iter().copied().collect()
    }

    /// Whether `worker` runs any partition.
    pub fn uses(&self, worker: u64) -> bool {
        self.0.contains(&worker)
    }

    /// The partitions `worker` runs.
    pub fn on(&self, worker: u64) -> impl Iterator<Item = u32> + '_ {
        self.iter()
            .filter(move |(_, w)| *w == worker)
            .map(|(p, _)| p)
    }

    /// Moves partition `p` to `worker`; returns the worker it left if it moved. A
    /// partition that is not placed is left alone.
    pub fn move_to(&mut self, p: u32, worker: u64) -> Option<u64> {
        let owner = self.0.get_mut(p as usize)?;
        (*owner != worker).then(|| std::mem::replace(owner, worker))
    }

    /// Places one more partition (a source's next receiver) on `worker`.
    pub fn push(&mut self, worker: u64) {
        self.0.push(worker);
    }
}

/// How many partitions (or receivers) each candidate worker runs, to give the next
/// one to the worker with the fewest (ties to the lowest id).
#[derive(Clone, Debug, Default)]
pub struct Load(BTreeMap<u64, usize>);

impl Load {
    /// The load of `candidates` under `placements`; workers that are not candidates
    /// (dead, leaving, not installed) are not counted and never picked.
    pub fn new<'a>(
        candidates: impl IntoIterator<Item = u64>,
        placements: impl IntoIterator<Item = &'a Placement>,
    ) -> Self {
        let mut load: BTreeMap<u64, usize> = candidates.into_iter().map(|w| (w, 0)).collect();
        for worker in placements.into_iter().flat_map(Placement::workers) {
            if let Some(n) = load.get_mut(&worker) {
                *n = n.saturating_add(1);
            }
        }
        Load(load)
    }

    /// The candidate with the fewest, counted as running one more.
    pub fn pick(&mut self) -> Option<u64> {
        let (worker, n) = self.0.iter_mut().min_by_key(|(w, n)| (**n, **w))?;
        *n = n.saturating_add(1);
        Some(*worker)
    }

    /// How many `worker` runs.
    pub fn of(&self, worker: u64) -> usize {
        self.0.get(&worker).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spread_placement_goes_round_robin_and_moves_one_partition_at_a_time() {
        let mut placement = Placement::spread(&[1, 2], 5, 1);
        assert_eq!(placement.workers().collect::<Vec<_>>(), vec![2, 1, 2, 1, 2]);
        assert_eq!(placement.on(1).collect::<Vec<_>>(), vec![1, 3]);
        assert_eq!(placement.move_to(1, 3), Some(1));
        assert_eq!(placement.move_to(1, 3), None, "already there");
        assert_eq!(placement.move_to(9, 3), None, "no such partition");
        assert_eq!(placement.owner(1), Some(3));
        assert!(!Placement::spread(&[], 4, 0).is_placed());
    }

    #[test]
    fn the_next_partition_goes_to_the_candidate_with_the_fewest() {
        let placed = [Placement::spread(&[1, 1, 2], 3, 0)];
        // Worker 9 runs partitions but is no candidate: it is neither counted nor picked.
        let other = Placement::spread(&[9], 2, 0);
        let mut load = Load::new([1, 2, 3], placed.iter().chain([&other]));
        assert_eq!((load.of(1), load.of(2), load.of(3)), (2, 1, 0));
        assert_eq!(load.pick(), Some(3));
        assert_eq!(load.pick(), Some(2));
        assert_eq!(load.pick(), Some(3));
        assert_eq!(load.pick(), Some(1));
        assert_eq!(Load::new([], placed.iter()).pick(), None);
    }
}
