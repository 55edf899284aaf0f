//! Session gateway library (being written).
