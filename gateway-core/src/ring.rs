//! The per-session outbound ring: every server message not yet acknowledged, encoded
//! once, indexed by server sequence number.
//!
//! Messages are [`Bytes`], so a replay or a live send hands out a reference-counted
//! view of the bytes encoded at append time: nothing is encoded or copied again.
//! Appending is O(1); a cumulative ack trims from the front in O(1) per released
//! message; any retained sequence is found in O(1).

use std::collections::VecDeque;

use bytes::Bytes;

/// Limits of one ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RingLimits {
    /// Most messages retained.
    pub max_messages: usize,
    /// Most bytes of encoded messages retained.
    pub max_bytes: usize,
}

impl Default for RingLimits {
    /// 16,384 messages and 1 MiB, as PROTOCOL.md states.
    fn default() -> Self {
        RingLimits {
            max_messages: 16_384,
            max_bytes: 1 << 20,
        }
    }
}

/// Where a requested sequence stands relative to what the ring retains.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplayStart {
    /// Every message from the requested sequence on is retained (possibly none yet).
    Retained,
    /// Messages before `oldest_available` were released; the caller must fall back to
    /// a snapshot.
    Released {
        /// The oldest sequence still retained (or the next to be appended if none is).
        oldest_available: u64,
    },
}

/// Bounded, sequence-indexed store of encoded outbound messages.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct OutboundRing {
    frames: VecDeque<Bytes>,
    /// Sequence of `frames[0]`; when empty, the sequence the next append gets.
    first_seq: u64,
    bytes: usize,
    limits: RingLimits,
}

impl OutboundRing {
    /// An empty ring whose first message will have sequence 1.
    pub fn new(limits: RingLimits) -> Self {
        OutboundRing {
            frames: VecDeque::new(),
            first_seq: 1,
            bytes: 0,
            limits,
        }
    }

    /// Sequence the next appended message gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.frames.len() as u64
    }

    /// Oldest retained sequence, or [`Self::next_seq`] when nothing is retained.
    pub fn oldest_seq(&self) -> u64 {
        self.first_seq
    }

    /// Highest sequence ever appended (0 before the first).
    pub fn last_seq(&self) -> u64 {
        self.next_seq() - 1
    }

    /// Number of retained messages.
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// True when nothing is retained.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// Bytes of retained messages.
    pub fn retained_bytes(&self) -> usize {
        self.bytes
    }

    /// Stores the message with sequence [`Self::next_seq`], releasing the oldest ones
    /// if a limit would be exceeded. Returns how many were released that way (they
    /// had not been acknowledged).
    pub fn append(&mut self, frame: Bytes) -> usize {
        let mut released = 0;
        while !self.frames.is_empty()
            && (self.frames.len() >= self.limits.max_messages
                || self.bytes + frame.len() > self.limits.max_bytes)
        {
            self.pop_front();
            released += 1;
        }
        self.bytes += frame.len();
        self.frames.push_back(frame);
        released
    }

    /// Releases every message up to and including `seq`. Acks beyond the last
    /// appended sequence release everything retained.
    pub fn ack(&mut self, seq: u64) {
        while self.first_seq <= seq && !self.frames.is_empty() {
            self.pop_front();
        }
    }

    fn pop_front(&mut self) {
        if let Some(frame) = self.frames.pop_front() {
            self.bytes -= frame.len();
            self.first_seq += 1;
        }
    }

    /// The retained message with sequence `seq`.
    pub fn get(&self, seq: u64) -> Option<&Bytes> {
        let index = usize::try_from(seq.checked_sub(self.first_seq)?).ok()?;
        self.frames.get(index)
    }

    /// Whether a replay from `seq` can be served from the ring.
    pub fn replay_start(&self, seq: u64) -> ReplayStart {
        if seq >= self.first_seq {
            ReplayStart::Retained
        } else {
            ReplayStart::Released {
                oldest_available: self.first_seq,
            }
        }
    }

    /// The retained messages from `seq` on, in order. Empty if `seq` is past the end
    /// or was released.
    pub fn replay_from(&self, seq: u64) -> impl Iterator<Item = &Bytes> + '_ {
        let start = seq
            .checked_sub(self.first_seq)
            .and_then(|offset| usize::try_from(offset).ok())
            .unwrap_or(usize::MAX)
            .min(self.frames.len());
        self.frames.range(start..)
    }

    /// Returns spare capacity to the allocator; used when a session goes idle.
    pub fn shrink_to_fit(&mut self) {
        self.frames.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(n: u8, len: usize) -> Bytes {
        Bytes::from(vec![n; len])
    }

    fn ring(max_messages: usize, max_bytes: usize) -> OutboundRing {
        OutboundRing::new(RingLimits {
            max_messages,
            max_bytes,
        })
    }

    #[test]
    fn sequences_start_at_one_and_are_indexed() {
        let mut ring = ring(10, 1000);
        assert_eq!((ring.next_seq(), ring.last_seq()), (1, 0));
        for n in 1..=3 {
            assert_eq!(ring.append(frame(n, 4)), 0);
        }
        assert_eq!(ring.get(2), Some(&frame(2, 4)));
        assert_eq!(ring.get(0), None);
        assert_eq!(ring.get(4), None);
        assert_eq!(
            (ring.oldest_seq(), ring.last_seq(), ring.retained_bytes()),
            (1, 3, 12)
        );
    }

    #[test]
    fn cumulative_ack_trims_the_front_and_tolerates_old_or_future_acks() {
        let mut ring = ring(10, 1000);
        (1..=5).for_each(|n| {
            ring.append(frame(n, 4));
        });
        ring.ack(3);
        assert_eq!(
            (ring.oldest_seq(), ring.len(), ring.retained_bytes()),
            (4, 2, 8)
        );
        ring.ack(1);
        assert_eq!(ring.oldest_seq(), 4);
        ring.ack(99);
        assert!(ring.is_empty());
        assert_eq!((ring.oldest_seq(), ring.next_seq()), (6, 6));
    }

    #[test]
    fn replay_yields_everything_after_a_retained_sequence() {
        let mut ring = ring(10, 1000);
        (1..=5).for_each(|n| {
            ring.append(frame(n, 1));
        });
        ring.ack(2);
        let replayed: Vec<u8> = ring.replay_from(4).map(|b| b[0]).collect();
        assert_eq!(replayed, [4, 5]);
        assert_eq!(ring.replay_from(6).count(), 0);
        assert_eq!(ring.replay_start(3), ReplayStart::Retained);
        assert_eq!(
            ring.replay_start(2),
            ReplayStart::Released {
                oldest_available: 3
            }
        );
        assert_eq!(
            ring.replay_from(1).count(),
            0,
            "released sequences are never replayed"
        );
    }

    #[test]
    fn the_message_limit_releases_the_oldest() {
        let mut ring = ring(3, 1000);
        let released: usize = (1..=5).map(|n| ring.append(frame(n, 1))).sum();
        assert_eq!(released, 2);
        assert_eq!((ring.oldest_seq(), ring.last_seq()), (3, 5));
    }

    #[test]
    fn the_byte_limit_releases_the_oldest_but_always_keeps_the_newest() {
        let mut ring = ring(100, 10);
        ring.append(frame(1, 4));
        ring.append(frame(2, 4));
        assert_eq!(ring.append(frame(3, 4)), 1);
        assert_eq!((ring.oldest_seq(), ring.retained_bytes()), (2, 8));
        assert_eq!(
            ring.append(frame(4, 50)),
            2,
            "an oversized message still goes in, alone"
        );
        assert_eq!((ring.oldest_seq(), ring.len()), (4, 1));
    }
}
