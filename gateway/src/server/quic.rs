//! QUIC and TLS settings of the gateway's endpoint, and its UDP socket.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::ReasonCode;
use quinn::crypto::rustls::QuicServerConfig;
use quinn::VarInt;
use tracing::{info, warn};

use super::StartError;
use crate::config::Config;
use crate::dev::TlsIdentity;
use crate::token::TokenKeyRing;

/// QUIC endpoint settings whose keys outlive the process (derived from the token
/// key): a restarted gateway recognises its predecessor's connection ids and answers
/// their packets with stateless resets the clients accept, so they know at once that
/// their connection is gone and resume, instead of waiting for their idle timeout.
pub(super) fn lasting_endpoint_config(token_keys: &TokenKeyRing) -> quinn::EndpointConfig {
    let reset_key = token_keys.derive_key(b"quic stateless reset");
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let cid_key = ring::hmac::sign(&token_keys.derive_key(b"quic connection ids"), b"");
    let mut cid_key_bytes = [0u8; 8];
    cid_key_bytes.copy_from_slice(&cid_key.as_ref()[..8]);
    let cid_key = u64::from_le_bytes(cid_key_bytes);
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    // After a restart every client needs one: 500 a second at most, not quinn's 50.
    // The hashed ids keep stray packets from drawing them; each is smaller than the
    // packet it answers.
    config.min_reset_interval(Duration::from_millis(2));
    config
}

/// A UDP socket bound to `addr` with send and receive buffers of about `buffer_bytes`.
pub fn bind_udp(addr: SocketAddr, buffer_bytes: usize) -> std::io::Result<std::net::UdpSocket> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        socket.set_only_v6(false)?;
    }
    // The kernel caps these (net.core.rmem_max, wmem_max); a smaller buffer than
    // asked is not an error, but worth telling: bursts then drop packets.
    let _ = socket.set_recv_buffer_size(buffer_bytes);
    let _ = socket.set_send_buffer_size(buffer_bytes);
    let granted = (socket.recv_buffer_size(), socket.send_buffer_size());
    if let (Ok(receive), Ok(send)) = granted {
        // Linux reports twice what it grants (the doubling covers its bookkeeping).
        if receive.min(send) / 2 < buffer_bytes {
            warn!(
                asked = buffer_bytes,
                receive, send,
                "UDP socket buffers smaller than transport.socket_buffer_bytes; raise net.core.rmem_max and wmem_max (see DEPLOYMENT.md)"
            );
        } else {
            info!(receive, send, "UDP socket buffers");
        }
    }
    socket.bind(&addr.into())?;
    let socket: std::net::UdpSocket = socket.into();
    // Batching in the kernel: one send call for several packets (GSO), one receive
    // for several (GRO). Without them every packet costs a system call.
    if let Ok(state) = quinn::udp::UdpSocketState::new((&socket).into()) {
        info!(
            gso_segments = state.max_gso_segments(),
            gro_segments = state.gro_segments(),
            "UDP offloads (1 means none)"
        );
    }
    Ok(socket)
}

/// QUIC application error code for a reason.
pub fn close_code(reason: ReasonCode) -> VarInt {
    VarInt::from_u32(u32::from(reason.to_wire()))
}

/// The gateway's TLS settings for QUIC: TLS 1.3 only, ring provider, ALPN `sgw/1`,
/// AES-128-GCM preferred (the cheapest suite on CPUs with AES instructions), and
/// stateful session resumption with 0-RTT from a cache of `resumption_cache` tickets
/// (0: neither). Shared with the load tester's bare-QUIC baseline so that both pay
/// the same handshake.
///
/// The gateway acts on 0-RTT data at once, so a `Resume` is answered (with the
/// replay) in the server's first flight, one round trip after the client started.
/// 0-RTT data can be captured and replayed; here that gains nothing:
/// - tickets are single use (taken from the cache), so a replayed flight gets a full
///   handshake and its early data is discarded unread;
/// - resumption always adds a fresh key exchange (rustls offers only PSK-DHE), so
///   whoever sent the flight without the client's ephemeral key cannot read answers;
/// - the first frames are idempotent anyway: a `Login` carries a single-use nonce, a
///   `Resume` only re-attaches a session and re-sends what it had not acknowledged.
pub fn quic_crypto(
    (certs, key): TlsIdentity,
    resumption_cache: usize,
) -> Result<QuicServerConfig, StartError> {
    let tls_error = |e: &dyn std::fmt::Display| StartError::Tls(e.to_string());
    let ring = rustls::crypto::ring::default_provider();
    let mut cipher_suites = ring.cipher_suites.clone();
    cipher_suites
        .sort_by_key(|suite| suite.suite() != rustls::CipherSuite::TLS13_AES_128_GCM_SHA256);
    let provider = rustls::crypto::CryptoProvider {
        cipher_suites,
        ..ring
    };
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| tls_error(&e))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| tls_error(&e))?;
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    tls.ignore_client_order = true;
    if resumption_cache == 0 {
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        tls.send_tls13_tickets = 0;
        tls.max_early_data_size = 0;
    } else {
        tls.session_storage = rustls::server::ServerSessionMemoryCache::new(resumption_cache);
        // quinn takes all or nothing: stream flow control limits 0-RTT data instead.
        tls.max_early_data_size = u32::MAX;
    }
    QuicServerConfig::try_from(tls).map_err(|e| tls_error(&e))
}

pub(super) fn server_config(
    config: &Config,
    identity: TlsIdentity,
) -> Result<quinn::ServerConfig, StartError> {
    let tls_error = |e: &dyn std::fmt::Display| StartError::Tls(e.to_string());
    let crypto = quic_crypto(identity, config.tls.resumption_cache)?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    let idle =
        quinn::IdleTimeout::try_from(Duration::from_millis(config.transport.idle_timeout_ms))
            .map_err(|e| tls_error(&e))?;
    transport
        .max_idle_timeout(Some(idle))
        .keep_alive_interval(
            (config.transport.keep_alive_ms > 0)
                .then(|| Duration::from_millis(config.transport.keep_alive_ms)),
        )
        // One session stream, plus room for a client's extra stream to be opened and
        // refused with `UnexpectedFrame` rather than left waiting for credit.
        .max_concurrent_bidi_streams(VarInt::from_u32(2))
        .max_concurrent_uni_streams(VarInt::from_u32(0))
        .initial_rtt(Duration::from_millis(config.transport.initial_rtt_ms))
        .ack_frequency_config(ack_frequency(config.transport.ack_eliciting_threshold));
    server.transport_config(Arc::new(transport));
    Ok(server)
}

/// Longest a peer asked to acknowledge less often may hold an acknowledgement back.
pub const ACK_DELAY: Duration = Duration::from_millis(2);

/// What a QUIC endpoint asks of its peer through the acknowledgement-frequency
/// extension: an acknowledgement after more than `threshold` packets carrying data,
/// or [`ACK_DELAY`] after the first, and at once for a packet out of order (a loss
/// is then noticed as soon as without the extension: the draft's default of waiting
/// for a second one cost 2 ms at the p90 over a path losing 2%). `None` (threshold 1)
/// leaves QUIC's own rule. Orders and their answers flow both ways at once, so the
/// acknowledgements then ride on them instead of taking packets (a system call and a
/// wake-up each) of their own.
pub fn ack_frequency(threshold: u32) -> Option<quinn::AckFrequencyConfig> {
    (threshold > 1).then(|| {
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.ack_eliciting_threshold(VarInt::from_u32(threshold))
            .max_ack_delay(Some(ACK_DELAY))
            .reordering_threshold(VarInt::from_u32(1));
        ack
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_threshold_of_one_leaves_quic_its_own_acknowledgement_rule() {
        assert!(ack_frequency(1).is_none());
        assert!(ack_frequency(8).is_some());
    }
}
