//! The records pushed to an `http` source and not yet sealed: [`Inbox`].
//!
//! `POST /v1/sources/{name}` offers each decoded body to the source's inbox, which
//! takes it unless the records it holds are over the source's bound (the answer is
//! then 429). Each body taken gets the next number of the inbox's sequence. A seal
//! of the source's receiver carries the bodies from the receiver's position on
//! ([`Inbox::from`], up to a budget of bytes per seal request), and the receiver's position moves past them once the seal is
//! recorded; only then are they forgotten ([`Inbox::release`]). A seal lost with its
//! worker is not recorded, so the next one carries the same bodies again.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};

use arrow::array::RecordBatch;
use dstream_executor::connector::push::{DecodedBody, PushLimits, PushOptions};
use dstream_planner::SourceDef;

/// One body taken.
#[derive(Debug)]
struct Body {
    seq: u64,
    batches: Vec<RecordBatch>,
    malformed: u64,
    rows: u64,
    bytes: u64,
}

#[derive(Debug, Default)]
struct Held {
    bodies: VecDeque<Body>,
    /// The number the next body gets.
    next: u64,
    rows: u64,
    bytes: u64,
}

/// How many bodies of one source are decoded at once; more wait their turn, so the
/// memory of bodies read but not yet taken stays bounded.
pub const DECODING_AT_ONCE: usize = 4;

/// The records accepted for one pushed source and not yet sealed.
#[derive(Debug)]
pub struct Inbox {
    pub def: Arc<SourceDef>,
    pub options: PushOptions,
    held: Mutex<Held>,
    /// Turns to decode a body ([`DECODING_AT_ONCE`]).
    pub decoding: tokio::sync::Semaphore,
}

/// What an offer of a body came to.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer {
    /// Taken: the rows and bytes the inbox holds now.
    Taken { held_rows: u64, held_bytes: u64 },
    /// Refused: the inbox holds the source's bound or more.
    Full { held_rows: u64, held_bytes: u64 },
}

/// The bodies a seal carries.
#[derive(Debug, Default)]
pub struct Pushed {
    pub batches: Vec<RecordBatch>,
    pub malformed: u64,
    /// The position after them.
    pub until: u64,
    /// Their size.
    pub bytes: u64,
}

impl Inbox {
    pub fn new(def: Arc<SourceDef>, options: PushOptions) -> Self {
        Inbox {
            def,
            options,
            held: Mutex::new(Held::default()),
            decoding: tokio::sync::Semaphore::new(DECODING_AT_ONCE),
        }
    }

    fn held(&self) -> MutexGuard<'_, Held> {
        match self.held.lock() {
            Ok(held) => held,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// The bound on what the inbox holds.
    pub fn limits(&self) -> PushLimits {
        self.options.limits
    }

    /// Whether the inbox holds its bound or more: a body offered now is refused.
    pub fn is_full(&self) -> bool {
        let held = self.held();
        let limits = self.limits();
        held.rows >= limits.max_rows || held.bytes >= limits.max_bytes
    }

    /// Takes `body` unless the inbox is full. A body may take the inbox over its
    /// bound; the next one is refused until seals bring it back under.
    pub fn offer(&self, body: DecodedBody) -> Offer {
        let limits = self.limits();
        let mut held = self.held();
        if held.rows >= limits.max_rows || held.bytes >= limits.max_bytes {
            return Offer::Full {
                held_rows: held.rows,
                held_bytes: held.bytes,
            };
        }
        let (rows, bytes) = (body.rows(), body.bytes());
        let seq = held.next;
        held.next = seq.saturating_add(1);
        held.rows = held.rows.saturating_add(rows);
        held.bytes = held.bytes.saturating_add(bytes);
        held.bodies.push_back(Body {
            seq,
            batches: body.batches,
            malformed: body.malformed,
            rows,
            bytes,
        });
        Offer::Taken {
            held_rows: held.rows,
            held_bytes: held.bytes,
        }
    }

    /// The bodies from position `from` on, for a seal, while they come to less than
    /// `budget` bytes (the last one may go over); none if `budget` is 0.
    pub fn from(&self, from: u64, budget: u64) -> Pushed {
        let held = self.held();
        let mut pushed = Pushed {
            until: from,
            ..Pushed::default()
        };
        let mut bytes = 0u64;
        for body in held.bodies.iter().filter(|b| b.seq >= from) {
            if bytes >= budget {
                break;
            }
            bytes = bytes.saturating_add(body.bytes);
            pushed.batches.extend(body.batches.iter().cloned());
            pushed.malformed = pushed.malformed.saturating_add(body.malformed);
            pushed.until = body.seq.saturating_add(1);
        }
        pushed.bytes = bytes;
        pushed
    }

    /// Forgets the bodies before position `until`: their seal is recorded.
    pub fn release(&self, until: u64) {
        let mut held = self.held();
        while held.bodies.front().is_some_and(|b| b.seq < until) {
            if let Some(body) = held.bodies.pop_front() {
                held.rows = held.rows.saturating_sub(body.rows);
                held.bytes = held.bytes.saturating_sub(body.bytes);
            }
        }
    }

    /// The rows and bytes held.
    pub fn held_size(&self) -> (u64, u64) {
        let held = self.held();
        (held.rows, held.bytes)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};
    use dstream_executor::connector::Options;
    use dstream_planner::ConnectorSpec;

    use super::*;

    fn inbox(max_rows: u64) -> Inbox {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let options: BTreeMap<String, String> =
            [("max_pending_rows".to_string(), max_rows.to_string())].into();
        let def = SourceDef {
            name: "s".into(),
            schema: schema.clone(),
            record_schema: schema,
            watermark: None,
            connector: ConnectorSpec {
                connector: "http".into(),
                options: options.clone(),
            },
            sql: String::new(),
        };
        let parsed = PushOptions::from_options(&Options::new(&options)).expect("options");
        Inbox::new(Arc::new(def), parsed)
    }

    fn body(rows: i64) -> DecodedBody {
        let schema = Arc::new(Schema::new(vec![Field::new("a", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            schema,
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .expect("batch");
        DecodedBody {
            batches: vec![batch],
            malformed: 0,
        }
    }

    fn rows(pushed: &Pushed) -> usize {
        pushed.batches.iter().map(|b| b.num_rows()).sum()
    }

    #[test]
    fn bodies_are_kept_until_their_seal_is_recorded() {
        let inbox = inbox(100);
        assert!(matches!(
            inbox.offer(body(3)),
            Offer::Taken { held_rows: 3, .. }
        ));
        assert!(matches!(
            inbox.offer(body(4)),
            Offer::Taken { held_rows: 7, .. }
        ));
        // A seal takes both; lost with its worker, the next takes them again.
        let first = inbox.from(0, u64::MAX);
        assert_eq!((rows(&first), first.until), (7, 2));
        inbox.offer(body(5));
        let again = inbox.from(0, u64::MAX);
        assert_eq!((rows(&again), again.until), (12, 3));
        // A seal with a budget takes bodies until it is spent; with none, nothing.
        let one = inbox.from(0, 1);
        assert_eq!((rows(&one), one.until), (3, 1));
        let none = inbox.from(1, 0);
        assert_eq!((rows(&none), none.until), (0, 1));
        // Recorded up to 2: what the next seal takes is the third body only.
        inbox.release(2);
        assert_eq!(inbox.held_size().0, 5);
        let next = inbox.from(2, u64::MAX);
        assert_eq!((rows(&next), next.until), (5, 3));
    }

    #[test]
    fn an_inbox_over_its_bound_refuses_bodies_until_seals_release_them() {
        let inbox = inbox(10);
        assert!(matches!(inbox.offer(body(8)), Offer::Taken { .. }));
        // Under the bound, a body is taken even if it goes over.
        assert!(matches!(
            inbox.offer(body(8)),
            Offer::Taken { held_rows: 16, .. }
        ));
        assert!(inbox.is_full());
        assert_eq!(
            inbox.offer(body(1)),
            Offer::Full {
                held_rows: 16,
                held_bytes: inbox.held_size().1
            }
        );
        inbox.release(2);
        assert!(!inbox.is_full());
        assert!(matches!(
            inbox.offer(body(1)),
            Offer::Taken { held_rows: 1, .. }
        ));
    }
}
