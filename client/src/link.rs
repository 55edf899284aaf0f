//! One QUIC connection to the gateway with its session stream open: the endpoint, the
//! TLS settings (the pinned certificate, ALPN, 0-RTT resumption) and the first frame.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use proto::Frame;
use quinn::crypto::rustls::QuicClientConfig;
use tracing::debug;

use crate::{ClientConfig, ClientError};

/// One QUIC connection to the gateway with its session stream open, and nothing
/// sent yet: for tools and tests that speak the protocol frame by frame.
pub struct Link {
    /// The endpoint; it must live as long as the connection.
    pub endpoint: quinn::Endpoint,
    /// The connection.
    pub connection: quinn::Connection,
    /// The session stream, client to gateway.
    pub send: quinn::SendStream,
    /// The session stream, gateway to client.
    pub recv: quinn::RecvStream,
    /// Whether the first frame went as 0-RTT data and the gateway took it.
    pub early_data_accepted: bool,
}

/// Opens a connection (its own UDP socket) and the session stream.
pub async fn open(config: &ClientConfig) -> Result<Link, ClientError> {
    open_on(client_endpoint(config)?, config).await
}

/// A client endpoint (one UDP socket) set up to reach the gateway in `config`; many
/// connections can share it.
pub fn client_endpoint(config: &ClientConfig) -> Result<quinn::Endpoint, ClientError> {
    endpoint_with(config, quic_config(config)?)
}

/// The QUIC and TLS settings for `config`. Connections made with clones of one of
/// these share its TLS session cache, so reconnects resume the TLS session instead of
/// repeating the certificate exchange, and may send their first frame as 0-RTT data
/// (see [`open_sending`]).
pub fn quic_config(config: &ClientConfig) -> Result<quinn::ClientConfig, ClientError> {
    let error = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in &config.trusted_certs {
        roots.add(cert.clone()).map_err(|e| error(&e))?;
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| error(&e))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![proto::ALPN.to_vec()];
    tls.enable_early_data = true;
    let mut quic = quinn::ClientConfig::new(Arc::new(
        QuicClientConfig::try_from(tls).map_err(|e| error(&e))?,
    ));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(config.idle_timeout).map_err(|e| error(&e))?,
        ))
        .keep_alive_interval(Some(config.keep_alive))
        .initial_rtt(config.initial_rtt)
        .ack_frequency_config((config.ack_eliciting_threshold > 1).then(|| {
            let mut ack = quinn::AckFrequencyConfig::default();
            ack.ack_eliciting_threshold(quinn::VarInt::from_u32(config.ack_eliciting_threshold))
                .max_ack_delay(Some(Duration::from_millis(2)))
                .reordering_threshold(quinn::VarInt::from_u32(1));
            ack
        }));
    quic.transport_config(Arc::new(transport));
    Ok(quic)
}

/// A new client endpoint (UDP socket) using `quic`.
pub fn endpoint_with(
    config: &ClientConfig,
    quic: quinn::ClientConfig,
) -> Result<quinn::Endpoint, ClientError> {
    let runtime = quinn::default_runtime()
        .ok_or_else(|| ClientError::Connection("no async runtime".into()))?;
    let mut endpoint = quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        fresh_socket(config).map_err(|e| ClientError::Connection(e.to_string()))?,
        runtime,
    )
    .map_err(|e| ClientError::Connection(e.to_string()))?;
    endpoint.set_default_client_config(quic);
    Ok(endpoint)
}

/// A UDP socket on an ephemeral port, of the gateway address's family.
pub(crate) fn fresh_socket(config: &ClientConfig) -> std::io::Result<std::net::UdpSocket> {
    let bind: SocketAddr = if config.server.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    std::net::UdpSocket::bind(bind)
}

/// Opens a connection and the session stream on an existing endpoint.
pub async fn open_on(
    endpoint: quinn::Endpoint,
    config: &ClientConfig,
) -> Result<Link, ClientError> {
    let error = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
    let connection = endpoint
        .connect(config.server, &config.server_name)
        .map_err(|e| error(&e))?
        .await
        .map_err(|e| error(&e))?;
    open_stream(endpoint, connection).await
}

/// Opens the session stream on an established connection.
async fn open_stream(
    endpoint: quinn::Endpoint,
    connection: quinn::Connection,
) -> Result<Link, ClientError> {
    let (send, recv) = connection
        .open_bi()
        .await
        .map_err(|e| ClientError::Connection(e.to_string()))?;
    Ok(Link {
        endpoint,
        connection,
        send,
        recv,
        early_data_accepted: false,
    })
}

/// Opens a connection and the session stream, and sends `first` (the `Login` or
/// `Resume`).
///
/// When the endpoint holds a TLS session ticket from an earlier connection to the
/// gateway, `first` travels as 0-RTT data in the handshake's first flight and the
/// gateway answers in its own, so a resume takes one round trip instead of two (see
/// `PROTOCOL.md` for why that is replay-safe). If the gateway declines the early
/// data, `first` is sent again once the handshake is done.
pub async fn open_sending(
    endpoint: quinn::Endpoint,
    config: &ClientConfig,
    first: &Frame,
) -> Result<Link, ClientError> {
    let error = |e: &dyn std::fmt::Display| ClientError::Connection(e.to_string());
    let bytes = first.to_bytes();
    let connecting = endpoint
        .connect(config.server, &config.server_name)
        .map_err(|e| error(&e))?;
    let connection = match connecting.into_0rtt() {
        Ok((connection, accepted)) => {
            let early = async {
                let (mut send, recv) = connection.open_bi().await.ok()?;
                send.write_all(&bytes).await.ok()?;
                Some((send, recv))
            }
            .await;
            match (accepted.await, early) {
                (true, Some((send, recv))) => {
                    return Ok(Link {
                        endpoint,
                        connection,
                        send,
                        recv,
                        early_data_accepted: true,
                    })
                }
                (true, None) => {
                    return Err(ClientError::Connection(
                        "the session stream failed in 0-RTT".into(),
                    ))
                }
                // Declined (or the handshake failed): start over on 1-RTT keys.
                (false, _) => {
                    debug!("the gateway declined 0-RTT data");
                    connection
                }
            }
        }
        Err(connecting) => connecting.await.map_err(|e| error(&e))?,
    };
    let mut link = open_stream(endpoint, connection).await?;
    link.send.write_all(&bytes).await.map_err(|e| error(&e))?;
    Ok(link)
}
