//! The matching engine in its own process, on the log (`engine.mode = "external"`,
//! crash-safe mode; ENGINE.md is the protocol).
//!
//! The core numbers every engine request it makes (1, 2, ...) and gathers the
//! requests one input of the log makes into a *batch*, numbered too: batch `m` is
//! message `m` of the requests stream, which every gateway applying the log makes
//! alike and offers to publish ([`crate::Effects::requests`]). Engines read that
//! stream in order and append, for each batch, one answer to the gateways' own log
//! ([`crate::input::Record::EngineAnswer`]). The core applies the first answer to
//! each batch, in log order, and keeps a digest of it: a later answer to the same
//! batch (a second engine, or one catching up after a restart) changes nothing and
//! is compared with the first. A batch stays *unanswered*, and is offered again to a
//! gateway started from a snapshot, until its answer is applied.
//!
//! Everything here is part of the core's image, so a snapshot restores it; the
//! counts of answers are this process's own.

use std::collections::VecDeque;
use std::hash::Hasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use bytes::Bytes;
use matching_stub as engine;
use matching_stub::wire::{self, Answers, BatchAnswer, RequestBatch};
use serde::{Deserialize, Serialize};

use crate::engine_link::{EngineLink, Refused};
use crate::snapshot::EngineImage;

/// Largest requests message the core makes: a log input that makes more requests
/// than fit is split over several batches.
pub const MAX_BATCH_BYTES: usize = 256 * 1024;

/// How many first answers' digests are kept to compare later answers with.
pub const COMPARED_ANSWERS: usize = 8_192;

/// A batch of requests for the requests stream: its number (its sequence there)
/// and its encoding ([`RequestBatch`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutgoingBatch {
    /// The batch's number: its message's sequence in the requests stream.
    pub number: u64,
    /// The requests message.
    pub bytes: Bytes,
}

/// What the core made of an engine's answer to one batch.
#[derive(Debug)]
pub enum AnswerVerdict {
    /// The first answer to the oldest unanswered batch: its events, in order, to
    /// route.
    First {
        /// The batch.
        batch: u64,
        /// The engine that answered.
        engine: String,
        /// The events of each request, one after another.
        events: Vec<engine::Event>,
    },
    /// A later answer to a batch answered already: ignored.
    Again {
        /// The batch.
        batch: u64,
        /// The engine that answered.
        engine: String,
        /// Whether it is the first answer byte for byte; `None` when the first is
        /// too old to compare (more than [`COMPARED_ANSWERS`] batches ago).
        same: Option<bool>,
    },
    /// Not an answer the core can use (undecodable, ahead of the unanswered batches,
    /// or not the batch's requests): ignored, and the batch waits for another.
    Unexpected {
        /// Why.
        why: String,
    },
}

/// Answers counted by this process since it started.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct AnswerCounts {
    /// First answers applied.
    pub first: u64,
    /// Later answers equal to the first.
    pub same: u64,
    /// Later answers that differ from the first: two engines disagree.
    pub differed: u64,
    /// Later answers too late to compare.
    pub uncompared: u64,
    /// Answers the core could not use.
    pub unexpected: u64,
    /// The latest batch whose later answer differed (0: none).
    pub latest_difference: u64,
}

/// A batch made and not yet answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Unanswered {
    number: u64,
    first_request: u64,
    requests: u32,
    bytes: Bytes,
}

/// The external engine's part of the core's state (in its image).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExternalImage {
    /// The number of the next request made.
    next_request: u64,
    /// The number of the next batch made.
    next_batch: u64,
    /// Batches made and not yet answered, oldest first.
    unanswered: VecDeque<Unanswered>,
    /// The highest batch answered (batches are answered in order).
    answered_through: u64,
    /// Digests of the latest first answers, by batch, oldest first.
    answered: VecDeque<(u64, u64)>,
}

/// The core's link to engines in their own processes.
#[derive(Debug)]
pub struct External {
    state: Mutex<State>,
    counts: Counts,
}

#[derive(Debug)]
struct State {
    image: ExternalImage,
    /// Requests of the batch being made, while an input is applied.
    open: Vec<engine::Request>,
    open_bytes: usize,
    /// Batches made and not yet handed to the edge.
    made: Vec<OutgoingBatch>,
}

#[derive(Debug, Default)]
struct Counts {
    first: AtomicU64,
    same: AtomicU64,
    differed: AtomicU64,
    uncompared: AtomicU64,
    unexpected: AtomicU64,
    latest_difference: AtomicU64,
}

impl External {
    /// A link for a new log: the first request and batch are number 1.
    pub fn new() -> Self {
        Self::from_image(ExternalImage {
            next_request: 1,
            next_batch: 1,
            ..ExternalImage::default()
        })
    }

    /// The link as a snapshot left it.
    pub fn from_image(image: ExternalImage) -> Self {
        External {
            state: Mutex::new(State {
                image,
                open: Vec::new(),
                open_bytes: 0,
                made: Vec::new(),
            }),
            counts: Counts::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Default for External {
    fn default() -> Self {
        Self::new()
    }
}

impl State {
    /// Makes the open requests a batch.
    fn close_batch(&mut self) {
        if self.open.is_empty() {
            return;
        }
        let requests = std::mem::take(&mut self.open);
        self.open_bytes = 0;
        let image = &mut self.image;
        let count = requests.len() as u64;
        let batch = RequestBatch {
            first_request: image.next_request,
            requests,
        };
        let bytes = Bytes::from(batch.encode());
        let number = image.next_batch;
        image.unanswered.push_back(Unanswered {
            number,
            first_request: image.next_request,
            requests: u32::try_from(count).unwrap_or(u32::MAX),
            bytes: bytes.clone(),
        });
        image.next_request += count;
        image.next_batch += 1;
        self.made.push(OutgoingBatch { number, bytes });
    }
}

impl EngineLink for External {
    fn submit(
        &self,
        request: engine::Request,
        _answered_later: &mut dyn FnMut(&mut Vec<engine::Event>),
    ) -> Result<(), Refused> {
        let mut state = self.state();
        let len = wire::request_len(&request);
        if state.open_bytes + len + wire::REQUESTS_HEADER_LEN > MAX_BATCH_BYTES {
            state.close_batch();
        }
        state.open_bytes += len;
        state.open.push(request);
        Ok(())
    }

    fn answers_at_once(&self) -> bool {
        false
    }

    fn orders_of(&self, _account: u64) -> Option<Vec<engine::OrderView>> {
        None
    }

    fn image(&self) -> Option<EngineImage> {
        let state = self.state();
        // Between inputs nothing is open.
        debug_assert!(state.open.is_empty());
        Some(EngineImage::External(state.image.clone()))
    }

    fn end_of_input(&self) -> Vec<OutgoingBatch> {
        let mut state = self.state();
        state.close_batch();
        std::mem::take(&mut state.made)
    }

    fn unanswered(&self) -> Vec<OutgoingBatch> {
        self.state()
            .image
            .unanswered
            .iter()
            .map(|batch| OutgoingBatch {
                number: batch.number,
                bytes: batch.bytes.clone(),
            })
            .collect()
    }

    fn answered_through(&self) -> u64 {
        self.state().image.answered_through
    }

    fn unanswered_count(&self) -> usize {
        self.state().image.unanswered.len()
    }

    fn answer(&self, bytes: &[u8]) -> Vec<AnswerVerdict> {
        let verdicts = match Answers::decode(bytes) {
            Ok(answers) => {
                let mut state = self.state();
                answers
                    .batches
                    .into_iter()
                    .map(|batch| state.image.judge(&answers.engine, batch))
                    .collect()
            }
            Err(error) => vec![AnswerVerdict::Unexpected {
                why: format!("undecodable answers: {error}"),
            }],
        };
        for verdict in &verdicts {
            self.count(verdict);
        }
        verdicts
    }

    fn answer_counts(&self) -> AnswerCounts {
        let c = &self.counts;
        AnswerCounts {
            first: c.first.load(Ordering::Relaxed),
            same: c.same.load(Ordering::Relaxed),
            differed: c.differed.load(Ordering::Relaxed),
            uncompared: c.uncompared.load(Ordering::Relaxed),
            unexpected: c.unexpected.load(Ordering::Relaxed),
            latest_difference: c.latest_difference.load(Ordering::Relaxed),
        }
    }

    fn queued(&self) -> usize {
        self.state()
            .image
            .unanswered
            .iter()
            .map(|batch| batch.requests as usize)
            .sum()
    }
}

impl External {
    fn count(&self, verdict: &AnswerVerdict) {
        let counter = match verdict {
            AnswerVerdict::First { .. } => &self.counts.first,
            AnswerVerdict::Again {
                same: Some(true), ..
            } => &self.counts.same,
            AnswerVerdict::Again {
                same: Some(false),
                batch,
                ..
            } => {
                self.counts
                    .latest_difference
                    .store(*batch, Ordering::Relaxed);
                &self.counts.differed
            }
            AnswerVerdict::Again { same: None, .. } => &self.counts.uncompared,
            AnswerVerdict::Unexpected { .. } => &self.counts.unexpected,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

impl ExternalImage {
    /// Applies `engine`'s answer to one batch if it is the first to the oldest
    /// unanswered one; compares it with the first otherwise.
    fn judge(&mut self, engine: &str, answer: BatchAnswer) -> AnswerVerdict {
        let digest = digest(&answer.encode());
        if answer.batch <= self.answered_through {
            let first = self
                .answered
                .binary_search_by_key(&answer.batch, |(batch, _)| *batch)
                .ok()
                .map(|at| self.answered[at].1);
            return AnswerVerdict::Again {
                batch: answer.batch,
                engine: engine.to_owned(),
                same: first.map(|first| first == digest),
            };
        }
        let Some(oldest) = self.unanswered.front() else {
            return AnswerVerdict::Unexpected {
                why: format!(
                    "{engine} answered batch {}, which was not made",
                    answer.batch
                ),
            };
        };
        if answer.batch != oldest.number
            || answer.first_request != oldest.first_request
            || answer.events.len() != oldest.requests as usize
        {
            return AnswerVerdict::Unexpected {
                why: format!(
                    "{engine} answered batch {} ({} requests from request {}), the oldest \
                     unanswered is batch {} ({} requests from request {})",
                    answer.batch,
                    answer.events.len(),
                    answer.first_request,
                    oldest.number,
                    oldest.requests,
                    oldest.first_request,
                ),
            };
        }
        self.unanswered.pop_front();
        self.answered_through = answer.batch;
        if self.answered.len() == COMPARED_ANSWERS {
            self.answered.pop_front();
        }
        self.answered.push_back((answer.batch, digest));
        AnswerVerdict::First {
            batch: answer.batch,
            engine: engine.to_owned(),
            events: answer.events.into_iter().flatten().collect(),
        }
    }
}

/// A digest of an answer's compared bytes, the same in every process.
fn digest(bytes: &[u8]) -> u64 {
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(bytes);
    hasher.write_usize(bytes.len());
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use matching_stub::{Event, MassCancelScope, Owner, Request};

    use super::*;

    const OWNER: Owner = Owner {
        account: 1,
        session: 2,
    };

    fn query(tag: u64) -> Request {
        Request::QueryOrders { account: 1, tag }
    }

    fn answer(engine: &str, batch: u64, first: u64, events: Vec<Vec<Event>>) -> Vec<u8> {
        Answers {
            engine: engine.into(),
            batches: vec![BatchAnswer {
                batch,
                first_request: first,
                events,
            }],
        }
        .encode()
    }

    /// The verdict on a message of one batch's answer.
    fn one(mut verdicts: Vec<AnswerVerdict>) -> AnswerVerdict {
        assert_eq!(verdicts.len(), 1, "{verdicts:?}");
        verdicts.remove(0)
    }

    fn states(tag: u64) -> Vec<Event> {
        vec![Event::OrderStates {
            account: 1,
            tag,
            orders: vec![],
        }]
    }

    #[test]
    fn requests_of_one_input_make_one_numbered_batch() {
        let link = External::new();
        let mut route = |_: &mut Vec<Event>| {};
        assert!(link.end_of_input().is_empty(), "no request, no batch");
        link.submit(query(1), &mut route).expect("taken");
        link.submit(query(2), &mut route).expect("taken");
        let made = link.end_of_input();
        assert_eq!(made.len(), 1);
        assert_eq!(made[0].number, 1);
        let batch = RequestBatch::decode(&made[0].bytes).expect("decodes");
        assert_eq!(batch.first_request, 1);
        assert_eq!(batch.requests, vec![query(1), query(2)]);
        link.submit(query(3), &mut route).expect("taken");
        let made = link.end_of_input();
        assert_eq!(made[0].number, 2);
        assert_eq!(
            RequestBatch::decode(&made[0].bytes)
                .expect("decodes")
                .first_request,
            3
        );
        assert_eq!(link.unanswered().len(), 2);
        assert_eq!(link.queued(), 3);
    }

    #[test]
    fn many_requests_of_one_input_are_split_into_batches_under_the_limit() {
        let link = External::new();
        let mut route = |_: &mut Vec<Event>| {};
        let cancel = Request::MassCancel {
            scope: MassCancelScope::Session(OWNER),
            reason: matching_stub::CancelReason::SessionEnded,
        };
        let per_request = wire::request_len(&cancel);
        let count = 2 * MAX_BATCH_BYTES / per_request;
        for _ in 0..count {
            link.submit(cancel, &mut route).expect("taken");
        }
        let made = link.end_of_input();
        assert!(made.len() >= 2);
        assert!(made
            .iter()
            .all(|batch| batch.bytes.len() <= MAX_BATCH_BYTES));
        let total: usize = made
            .iter()
            .map(|b| {
                RequestBatch::decode(&b.bytes)
                    .expect("decodes")
                    .requests
                    .len()
            })
            .sum();
        assert_eq!(total, count);
    }

    #[test]
    fn the_first_answer_wins_and_later_ones_are_compared() {
        let link = External::new();
        let mut route = |_: &mut Vec<Event>| {};
        link.submit(query(1), &mut route).expect("taken");
        link.end_of_input();
        link.submit(query(2), &mut route).expect("taken");
        link.end_of_input();

        // Ahead of the oldest unanswered batch: not used.
        let early = one(link.answer(&answer("b", 2, 2, vec![states(2)])));
        assert!(
            matches!(early, AnswerVerdict::Unexpected { .. }),
            "{early:?}"
        );
        // The wrong number of requests: not used.
        let short = one(link.answer(&answer("b", 1, 1, vec![])));
        assert!(matches!(short, AnswerVerdict::Unexpected { .. }));
        let garbage = one(link.answer(&[9, 9, 9]));
        assert!(matches!(garbage, AnswerVerdict::Unexpected { .. }));
        // Request sequences that wrap past u64::MAX: refused, not an overflow.
        let wrapping = answer("b", 1, u64::MAX, vec![states(1), states(1)]);
        let wrapping = one(link.answer(&wrapping));
        assert!(
            matches!(wrapping, AnswerVerdict::Unexpected { .. }),
            "{wrapping:?}"
        );

        match one(link.answer(&answer("a", 1, 1, vec![states(1)]))) {
            AnswerVerdict::First { batch, events, .. } => {
                assert_eq!(batch, 1);
                assert_eq!(events, states(1));
            }
            other => panic!("{other:?}"),
        }
        let same = one(link.answer(&answer("b", 1, 1, vec![states(1)])));
        assert!(
            matches!(
                same,
                AnswerVerdict::Again {
                    same: Some(true),
                    ..
                }
            ),
            "{same:?}"
        );
        let differs = one(link.answer(&answer("c", 1, 1, vec![states(9)])));
        assert!(matches!(
            differs,
            AnswerVerdict::Again {
                same: Some(false),
                ..
            }
        ));
        let counts = link.answer_counts();
        assert_eq!(
            (
                counts.first,
                counts.same,
                counts.differed,
                counts.unexpected
            ),
            (1, 1, 1, 4)
        );
        assert_eq!(counts.latest_difference, 1);
        assert_eq!(link.unanswered().len(), 1, "batch 2 waits");
        assert!(matches!(
            one(link.answer(&answer("b", 2, 2, vec![states(2)]))),
            AnswerVerdict::First { batch: 2, .. }
        ));
        assert!(link.unanswered().is_empty());
    }

    #[test]
    fn one_message_answers_consecutive_batches_in_order() {
        let link = External::new();
        let mut route = |_: &mut Vec<Event>| {};
        for tag in 1..=3 {
            link.submit(query(tag), &mut route).expect("taken");
            link.end_of_input();
        }
        let batch = |number: u64| BatchAnswer {
            batch: number,
            first_request: number,
            events: vec![states(number)],
        };
        let first_two = Answers {
            engine: "a".into(),
            batches: vec![batch(1), batch(2)],
        };
        let verdicts = link.answer(&first_two.encode());
        assert!(verdicts
            .iter()
            .all(|v| matches!(v, AnswerVerdict::First { .. })));
        // Another engine groups its answers otherwise: each batch is compared.
        let all = Answers {
            engine: "b".into(),
            batches: vec![batch(1), batch(2), batch(3)],
        };
        let verdicts = link.answer(&all.encode());
        assert!(matches!(
            verdicts[0],
            AnswerVerdict::Again {
                same: Some(true),
                ..
            }
        ));
        assert!(matches!(
            verdicts[1],
            AnswerVerdict::Again {
                same: Some(true),
                ..
            }
        ));
        assert!(matches!(verdicts[2], AnswerVerdict::First { batch: 3, .. }));
    }

    proptest::proptest! {
        /// Two engines answer the same batches, each in order, in groups of any
        /// size, their messages interleaved in any way: every batch is applied
        /// once, in order, and every later answer is found the same.
        #[test]
        fn hot_hot_engines_in_any_interleaving_apply_each_batch_once_in_order(
            batches in 1u64..40,
            groups in proptest::collection::vec(1usize..5, 2),
            picks in proptest::collection::vec(proptest::bool::ANY, 0..100),
        ) {
            let link = External::new();
            let mut route = |_: &mut Vec<Event>| {};
            for tag in 1..=batches {
                link.submit(query(tag), &mut route).expect("taken");
                link.end_of_input();
            }
            // Each engine's messages: its answers in order, `groups[e]` batches each.
            let messages = |engine: usize| -> VecDeque<Vec<u8>> {
                let answers: Vec<BatchAnswer> = (1..=batches)
                    .map(|n| BatchAnswer { batch: n, first_request: n, events: vec![states(n)] })
                    .collect();
                answers
                    .chunks(groups[engine])
                    .map(|chunk| Answers { engine: format!("e{engine}"), batches: chunk.to_vec() }.encode())
                    .collect()
            };
            let mut queues = [messages(0), messages(1)];
            let mut applied = Vec::new();
            let mut picks = picks.into_iter();
            while !queues[0].is_empty() || !queues[1].is_empty() {
                let mut engine = usize::from(picks.next().unwrap_or(false));
                if queues[engine].is_empty() {
                    engine = 1 - engine;
                }
                let message = queues[engine].pop_front().expect("one is left");
                for verdict in link.answer(&message) {
                    match verdict {
                        AnswerVerdict::First { batch, .. } => applied.push(batch),
                        AnswerVerdict::Again { same, .. } => proptest::prop_assert_eq!(same, Some(true)),
                        AnswerVerdict::Unexpected { why } => proptest::prop_assert!(false, "{}", why),
                    }
                }
            }
            proptest::prop_assert_eq!(applied, (1..=batches).collect::<Vec<_>>());
            proptest::prop_assert!(link.unanswered().is_empty());
        }
    }

    #[test]
    fn a_restored_link_goes_on_where_its_image_left_off() {
        let link = External::new();
        let mut route = |_: &mut Vec<Event>| {};
        link.submit(query(1), &mut route).expect("taken");
        link.end_of_input();
        let Some(EngineImage::External(image)) = link.image() else {
            panic!("an external image");
        };
        let restored = External::from_image(image);
        assert_eq!(restored.unanswered(), link.unanswered());
        restored.submit(query(2), &mut route).expect("taken");
        assert_eq!(restored.end_of_input()[0].number, 2);
        assert!(matches!(
            one(restored.answer(&answer("a", 1, 1, vec![states(1)]))),
            AnswerVerdict::First { batch: 1, .. }
        ));
    }
}
