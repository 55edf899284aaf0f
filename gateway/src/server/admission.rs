//! Who may start a handshake: the connection limits, and under load only addresses
//! QUIC has validated (a Retry round trip for the others). A connection that has not
//! logged in or resumed yet holds a handshaking slot, bounded in all and per address.

use super::*;

/// What becomes of a new connection attempt.
pub(super) enum Admission {
    /// Served, holding a handshaking slot until it logs in or resumes.
    Accept(HandshakeSlot),
    /// Asked to prove its address first (QUIC Retry).
    Retry,
    /// Refused at the QUIC level, for this reason (logged and counted).
    Refuse(&'static str),
}

/// A connection's handshaking slot, given back when it is dropped.
pub(super) struct HandshakeSlot {
    shared: Arc<Shared>,
    address: IpAddr,
}

impl Drop for HandshakeSlot {
    fn drop(&mut self) {
        self.shared.handshaking.fetch_sub(1, Ordering::AcqRel);
        self.shared
            .handshaking_by_address
            .remove_if_mut(&self.address, |_, count| {
                *count = count.saturating_sub(1);
                *count == 0
            });
    }
}

impl Shared {
    /// Decides what to do with a new connection attempt.
    pub(super) fn admit(
        self: &Arc<Self>,
        endpoint: &quinn::Endpoint,
        incoming: &quinn::Incoming,
    ) -> Admission {
        if endpoint.open_connections() >= self.max_connections {
            return Admission::Refuse("connection_limit");
        }
        let handshaking = self.handshaking.load(Ordering::Acquire);
        if handshaking >= self.max_handshaking / 2 && !incoming.remote_address_validated() {
            // Under load, only addresses that can receive our packets hold slots: a
            // spoofed source never answers the Retry.
            return if incoming.may_retry() {
                Admission::Retry
            } else {
                Admission::Refuse("unvalidated_under_load")
            };
        }
        if handshaking >= self.max_handshaking {
            return Admission::Refuse("handshaking_limit");
        }
        let address = address_key(incoming.remote_address().ip());
        {
            let mut count = self.handshaking_by_address.entry(address).or_insert(0);
            if *count >= self.max_handshaking_per_address {
                return Admission::Refuse("handshaking_per_address_limit");
            }
            *count += 1;
        }
        self.handshaking.fetch_add(1, Ordering::AcqRel);
        Admission::Accept(HandshakeSlot {
            shared: Arc::clone(self),
            address,
        })
    }
}
