//! Connection ids: the edge assigns them, the core names connections by them.

/// Identifies a connection to the IO layer; assigned by it, never reused. The high
/// half is the gateway run that accepted it ([`run_of`]), the low half counts.
pub type ConnectionId = u64;

/// The gateway run that accepted a connection: the high half of its id (the
/// position of the run's `Started` record; 0 in embedded mode).
pub fn run_of(conn: ConnectionId) -> u64 {
    conn >> 32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_run_of_a_connection_is_the_high_half_of_its_id() {
        assert_eq!(run_of(7 << 32 | 3), 7);
        assert_eq!(run_of(3), 0);
    }
}
