//! Core snapshots (crash-safe mode): the session core's whole state after a given
//! record of the stream, so that a gateway started again restores it and applies
//! only the records after that one, instead of the stream from its beginning; and
//! so that the records before it can be purged from the stream.
//!
//! A snapshot holds what the core is made of: sessions (exactly-once state, rings,
//! order views, tokens' generations, timers), unclaimed events, the token keys (a
//! snapshot is as secret as the key file) and the matching engine's books. The core
//! is deterministic, so a snapshot taken by any gateway that applied the stream up
//! to a position is the same, and restoring it then applying the rest of the stream
//! gives what applying the whole stream gives.

use matching_stub::OrderBookEngine;
use serde::{Deserialize, Serialize};

use crate::external::ExternalImage;
use crate::members::Members;
use crate::registry::RegistryImage;

/// Version of the snapshot encoding; a gateway refuses snapshots of another one.
pub const SNAPSHOT_FORMAT: u32 = 4;

/// The engine's part of a core snapshot.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum EngineImage {
    /// The books of the engine in process.
    Book(OrderBookEngine),
    /// The requests and answers of engines on the log (`engine.mode = "external"`).
    External(ExternalImage),
}

/// The core after the record at `position` was applied.
#[derive(Debug, Serialize, Deserialize)]
pub struct CoreImage {
    /// The stream position of the last record applied.
    pub position: u64,
    /// The live gateway runs, for fencing, and the core's time.
    pub members: Members,
    /// Sessions, timers, token keys.
    pub registry: RegistryImage,
    /// The engine's books, or its requests and answers on the log.
    pub engine: EngineImage,
}

/// Why a snapshot cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Written by a gateway with another snapshot format.
    #[error("snapshot format {found}, this gateway reads format {SNAPSHOT_FORMAT}")]
    Format {
        /// The format found.
        found: u32,
    },
    /// Damaged or not a snapshot.
    #[error("undecodable snapshot: {0}")]
    Undecodable(#[from] postcard::Error),
}

impl CoreImage {
    /// The snapshot's bytes: the format, then the image.
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = postcard::to_stdvec(&SNAPSHOT_FORMAT).unwrap_or_default();
        // Serializing plain data into a vector cannot fail.
        bytes.extend(postcard::to_stdvec(self).unwrap_or_default());
        bytes
    }

    /// Reads a snapshot, refusing another format or damaged bytes.
    pub fn decode(bytes: &[u8]) -> Result<CoreImage, SnapshotError> {
        let (found, rest) = postcard::take_from_bytes::<u32>(bytes)?;
        if found != SNAPSHOT_FORMAT {
            return Err(SnapshotError::Format { found });
        }
        Ok(postcard::from_bytes(rest)?)
    }
}

#[cfg(test)]
mod tests {
    use matching_stub::{EngineConfig, Instrument};

    use super::*;
    use crate::registry::{Registry, RegistryLimits};
    use crate::session::SessionConfig;
    use crate::token::TokenKeyRing;

    fn image() -> CoreImage {
        let keys = TokenKeyRing::new(4, &[1u8; 32]).expect("key");
        let registry = Registry::new(keys, SessionConfig::default(), RegistryLimits::default());
        let instrument = Instrument {
            id: 1,
            tick_size: 1,
            lot_size: 1,
        };
        let mut members = Members::default();
        members.started("edge-1", 40, (3_000, 9), 1_700_000_000_000);
        CoreImage {
            position: 42,
            members,
            registry: registry.image(),
            engine: EngineImage::Book(
                OrderBookEngine::new(EngineConfig::with_instruments(vec![instrument]))
                    .expect("engine"),
            ),
        }
    }

    #[test]
    fn a_snapshot_reads_back_as_written() {
        let bytes = image().encode();
        let read = CoreImage::decode(&bytes).expect("decodes");
        assert_eq!(read.position, 42);
        assert_eq!(read.members.live().collect::<Vec<_>>(), [("edge-1", 40)]);
        assert_eq!(read.members.now().as_millis(), 1_700_000_000_000);
        assert_eq!(read.encode(), bytes);
    }

    #[test]
    fn another_format_and_damaged_bytes_are_refused() {
        let mut bytes = image().encode();
        bytes[0] = 9;
        assert!(matches!(
            CoreImage::decode(&bytes),
            Err(SnapshotError::Format { found: 9 })
        ));
        let mut cut = image().encode();
        cut.truncate(cut.len() / 2);
        assert!(matches!(
            CoreImage::decode(&cut),
            Err(SnapshotError::Undecodable(_))
        ));
        assert!(CoreImage::decode(&[]).is_err());
    }
}
