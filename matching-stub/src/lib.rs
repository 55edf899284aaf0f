//! Price-time-priority matching engine (being written).
