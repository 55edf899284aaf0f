//! The core's inputs: every change to the core is a [`Record`], appended by a
//! gateway run as an [`Entry`] (who, when, who waits), and applied in the order of
//! the log; applying one gives an [`Outcome`] to the gateway that waits for it.
//!
//! [`crate::machine::Core::apply`] applies them. In embedded mode the log is in the
//! gateway's memory and applies each entry as it is appended; in crash-safe mode the
//! entries travel on a NATS JetStream stream (the gateway's `sequencer`), and every
//! gateway on it applies all of them, so each holds the same core.

use bytes::Bytes;
use matching_stub as engine;
use proto::ReasonCode;
use serde::{Deserialize, Serialize};

use crate::registry::SessionHandle;
use crate::session::ConnectionId;
use crate::token::TokenEntropy;

/// Largest record the core accepts from the stream, and largest batch of records
/// (NATS's default largest message): a frame is far smaller, an operator's revoke of
/// many sessions is not.
pub const MAX_RECORD_LEN: usize = 1 << 20;

/// Bytes a batch spends on each entry besides the entry's own: its length.
pub const BATCH_OVERHEAD: usize = 4;

/// Bytes a batch spends once: its time.
pub const BATCH_HEADER: usize = 8;

/// One input of the session core.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Record {
    /// A gateway run started: the earlier run of the same name, if any, has ended
    /// and its connections are gone. The record's stream position names the run
    /// and prefixes the ids of the connections it accepts.
    Started {
        /// The gateway's name (`sequencer.gateway_name`).
        gateway: String,
        /// How long the run may stay silent before it is declared gone
        /// (`sequencer.gateway_timeout_ms`).
        timeout_ms: u64,
        /// The fingerprint of its core settings (`Config::core_fingerprint`).
        settings: u64,
    },
    /// A client on `conn` authenticated as `account` (whose own session limit is
    /// `max_sessions`); `login` is its encoded `Login` frame.
    Login {
        /// The connection.
        conn: ConnectionId,
        /// The authenticated account.
        account: u64,
        /// The account's own session limit, if it has one.
        max_sessions: Option<u64>,
        /// The encoded `Login` frame.
        login: Vec<u8>,
        /// The random part of the session's first token, drawn by the edge.
        entropy: TokenEntropy,
        /// The account's orders as the engine told the appending gateway, when the
        /// engine is out of process; `None`: the core reads them from its engine.
        account_orders: Option<Vec<engine::OrderView>>,
    },
    /// A client on `conn` asked to resume; `resume` is its encoded `Resume` frame.
    Resume {
        /// The connection.
        conn: ConnectionId,
        /// The encoded `Resume` frame.
        resume: Vec<u8>,
        /// The highest server sequence the appending gateway run sent the session,
        /// if the session was last on that run as far as the run knew: the most its
        /// client can acknowledge if the core finds the same.
        sent_here: Option<u64>,
        /// The random part of the rotated token, drawn by the edge.
        entropy: TokenEntropy,
    },
    /// A frame of session `session`'s client on `conn` after the handshake.
    Frame {
        /// The session the connection is attached to.
        session: u64,
        /// The connection.
        conn: ConnectionId,
        /// The encoded frame.
        frame: Vec<u8>,
    },
    /// The connection `conn` of session `session` is gone.
    ConnectionLost {
        /// The session.
        session: u64,
        /// The connection.
        conn: ConnectionId,
    },
    /// The engine answered (an engine out of process): its events, in its order.
    EngineEvents {
        /// The events.
        events: Vec<engine::Event>,
    },
    /// An engine on the log answered a batch of requests (`engine.mode =
    /// "external"`): the answer message as the engine appended it (ENGINE.md), read
    /// from the log's answers subject. Applied whoever appended it: the first answer
    /// to a batch is routed, later ones are compared with it.
    EngineAnswer {
        /// The answer message.
        answer: Vec<u8>,
    },
    /// A gateway asks the engine for an account's orders (a login's snapshot, an
    /// operator's check): the engine's `OrderStates` answer carries `tag`, which
    /// only the asking gateway waits on.
    QueryOrders {
        /// The account.
        account: u64,
        /// The asking gateway's tag for the answer.
        tag: u64,
    },
    /// Time passed: fire due cancel-on-disconnect and expiry timers.
    Tick,
    /// An operator ended these sessions.
    Revoke {
        /// The sessions.
        sessions: Vec<u64>,
    },
    /// An operator cancelled every working order of an account and ended its
    /// sessions.
    KillSwitch {
        /// The account.
        account: u64,
    },
    /// Every session ends (`ShuttingDown`): the gateway stops and its sessions live
    /// in its memory only (embedded mode).
    EndAll,
    /// An operator installed a new token key for minting.
    RotateKey {
        /// The new key's id.
        key_id: u32,
        /// Its secret (the stream is as secret as the key file).
        secret: Vec<u8>,
    },
    /// An operator retired a token key.
    RetireKey {
        /// The key's id.
        key_id: u32,
    },
    /// The edge gave up on the login or resume of `conn` (no answer from the core in
    /// time) and closed it: a session the core attached to it anyway is detached,
    /// so that it expires and its cancel-on-disconnect runs rather than staying
    /// attached to nothing.
    Abandoned {
        /// The connection.
        conn: ConnectionId,
    },
    /// The appending gateway run stops (a graceful stop, or a start it refused): it
    /// ends now, its connections are gone, and the next run takes snapshots, without
    /// waiting for `sequencer.gateway_timeout_ms` of silence.
    Stopped,
}

/// A record as appended: by which gateway run, when, and who waits for its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    /// The stream position of the appending gateway run's `Started` record (0 for
    /// that record itself): the core applies records of live runs only, so a run
    /// that ended (replaced, or paused or cut off for too long) changes nothing.
    pub from: u64,
    /// The appending gateway's monotonic clock when it appended the record
    /// (`gateway::clock::now`, Unix milliseconds), or, read from the stream, when
    /// its batch left ([`encode_batch`]): the core reads its time off it
    /// ([`crate::members`]).
    pub time_ms: u64,
    /// A ticket the appending gateway waits on for the outcome (0: nobody waits).
    pub reply: u64,
    /// The record.
    pub record: Record,
}

/// Why an entry could not be read back.
#[derive(Debug, thiserror::Error)]
pub enum EntryError {
    /// Larger than [`MAX_RECORD_LEN`].
    #[error("entry of {0} bytes is larger than the limit")]
    TooLarge(usize),
    /// Not an entry.
    #[error("undecodable entry: {0}")]
    Undecodable(#[from] postcard::Error),
    /// A batch whose last entry is cut short.
    #[error("a batch of entries ends inside an entry")]
    Truncated,
}

impl Entry {
    /// The entry's bytes on the stream.
    pub fn encode(&self) -> Bytes {
        // Serializing these plain types into a vector cannot fail.
        Bytes::from(postcard::to_stdvec(self).unwrap_or_default())
    }

    /// Reads an entry, refusing oversized or malformed bytes.
    pub fn decode(bytes: &[u8]) -> Result<Entry, EntryError> {
        if bytes.len() > MAX_RECORD_LEN {
            return Err(EntryError::TooLarge(bytes.len()));
        }
        Ok(postcard::from_bytes(bytes)?)
    }
}

/// Puts encoded entries ([`Entry::encode`]) into one message of the stream, in
/// order, stamped with `time_ms`, its gateway's clock when the batch was made: the
/// time (8 bytes, little-endian), then each entry as its length (4 bytes,
/// little-endian) and its bytes. A gateway's records travel in such batches, one
/// message and one acknowledgement for many.
///
/// The batch's time is its entries' time on the stream: records that waited
/// together for the stream (a NATS leader election) carry the time they left, not
/// the times they queued, so the core's time after an outage moves at once to the
/// outage's end and then at the clock's pace (see [`crate::members`]).
pub fn encode_batch(time_ms: u64, entries: &[Bytes]) -> Bytes {
    let len = BATCH_HEADER
        + entries
            .iter()
            .map(|e| e.len() + BATCH_OVERHEAD)
            .sum::<usize>();
    let mut batch = Vec::with_capacity(len);
    batch.extend_from_slice(&time_ms.to_le_bytes());
    for entry in entries {
        // An entry is at most MAX_RECORD_LEN long, which fits.
        let entry_len = u32::try_from(entry.len()).unwrap_or(u32::MAX);
        batch.extend_from_slice(&entry_len.to_le_bytes());
        batch.extend_from_slice(entry);
    }
    Bytes::from(batch)
}

/// Reads a batch ([`encode_batch`]) back into its entries, each with the batch's
/// time, refusing an oversized message, a missing time, a length running past the
/// end, or an entry that does not decode.
pub fn decode_batch(bytes: &[u8]) -> Result<Vec<Entry>, EntryError> {
    if bytes.len() > MAX_RECORD_LEN {
        return Err(EntryError::TooLarge(bytes.len()));
    }
    let Some((time_ms, mut rest)) = bytes.split_first_chunk::<BATCH_HEADER>() else {
        return Err(EntryError::Truncated);
    };
    let time_ms = u64::from_le_bytes(*time_ms);
    let mut entries = Vec::new();
    while !rest.is_empty() {
        let Some((len, tail)) = rest.split_first_chunk::<BATCH_OVERHEAD>() else {
            return Err(EntryError::Truncated);
        };
        let len = u32::from_le_bytes(*len) as usize;
        if len > tail.len() {
            return Err(EntryError::Truncated);
        }
        let (entry, tail) = tail.split_at(len);
        let mut entry = Entry::decode(entry)?;
        entry.time_ms = time_ms;
        entries.push(entry);
        rest = tail;
    }
    Ok(entries)
}

/// What applying a record gave, for the gateway waiting on its ticket.
#[derive(Debug)]
pub enum Outcome {
    /// A login's or resume's session, or why it was refused.
    Session(Result<SessionHandle, ReasonCode>),
    /// The sessions an operation ended.
    Ended(Vec<u64>),
    /// Whether a key operation took effect.
    Done(bool),
    /// Not applied: the run of the gateway that appended it has ended.
    Fenced,
    /// Applied; nothing to report.
    Applied,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_round_trip_and_bad_bytes_are_refused() {
        let entry = Entry {
            from: 7,
            time_ms: 1_700_000_000_000,
            reply: 7 << 32 | 3,
            record: Record::Frame {
                session: 9,
                conn: 4,
                frame: vec![1, 2, 3],
            },
        };
        assert_eq!(Entry::decode(&entry.encode()).expect("decodes"), entry);
        assert!(matches!(
            Entry::decode(&[0xff; 8]),
            Err(EntryError::Undecodable(_))
        ));
        assert!(matches!(
            Entry::decode(&vec![0; MAX_RECORD_LEN + 1]),
            Err(EntryError::TooLarge(_))
        ));
    }

    #[test]
    fn batches_keep_their_entries_in_order_with_the_batch_time_and_bad_batches_are_refused() {
        let entries: Vec<Entry> = (1..=3)
            .map(|n| Entry {
                from: 7,
                time_ms: n,
                reply: n,
                record: Record::Tick,
            })
            .collect();
        let encoded: Vec<Bytes> = entries.iter().map(Entry::encode).collect();
        let batch = encode_batch(42, &encoded);
        let decoded = decode_batch(&batch).expect("decodes");
        assert_eq!(
            decoded.iter().map(|e| e.reply).collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert!(decoded.iter().all(|e| e.time_ms == 42 && e.from == 7));
        let empty = encode_batch(5, &[]);
        assert!(decode_batch(&empty).expect("empty").is_empty());
        assert!(
            matches!(decode_batch(&[]), Err(EntryError::Truncated)),
            "no time"
        );
        let cut = &batch[..batch.len() - 1];
        assert!(matches!(decode_batch(cut), Err(EntryError::Truncated)));
        let with_time = |tail: &[u8]| [&[0u8; BATCH_HEADER][..], tail].concat();
        assert!(matches!(
            decode_batch(&with_time(&[9, 0])),
            Err(EntryError::Truncated)
        ));
        assert!(matches!(
            decode_batch(&with_time(&[0xff, 0xff, 0xff, 0x7f, 1])),
            Err(EntryError::Truncated)
        ));
        assert!(matches!(
            decode_batch(&with_time(&[1, 0, 0, 0, 0xff])),
            Err(EntryError::Undecodable(_))
        ));
        assert!(matches!(
            decode_batch(&vec![0; MAX_RECORD_LEN + 1]),
            Err(EntryError::TooLarge(_))
        ));
    }
}
