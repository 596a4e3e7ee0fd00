//! QUIC endpoints for hub and agent: TLS 1.3 with mutual certificates, ALPN `rna/1`, and every
//! quinn limit set explicitly (quinn's defaults are sized for browsers, not for a hub).

pub mod control;
pub mod relay;
pub mod tls;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};

pub use tls::{ClientTls, ServerTls, TlsError};

/// Errors creating an endpoint.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Binding or configuring the UDP socket failed.
    #[error("binding UDP {addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
    /// The TLS configuration was refused by quinn.
    #[error("TLS configuration: {0}")]
    Tls(#[from] TlsError),
    /// A limit is out of range.
    #[error("invalid transport limit: {0}")]
    Limit(String),
}

/// The congestion controller of a side's sending direction.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Congestion {
    /// CUBIC (RFC 9438): quinn's default, backs off on every loss.
    #[default]
    Cubic,
    /// BBR: paces by measured bandwidth and round trip, so random loss (Wi-Fi, lossy
    /// uplinks) costs far less throughput; quinn marks its BBR experimental.
    Bbr,
}

impl std::str::FromStr for Congestion {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "cubic" => Ok(Congestion::Cubic),
            "bbr" => Ok(Congestion::Bbr),
            _ => Err(format!(
                "invalid congestion controller {s:?}: expected cubic or bbr"
            )),
        }
    }
}

/// Every transport limit of an agent connection, named so operators and tests can see them.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Tunnel streams the hub may have open to one agent at once (the agent grants this).
    pub tunnel_streams: u32,
    /// Streams an agent may open towards the hub (control stream and spares).
    pub agent_streams: u32,
    /// Flow-control window of one stream: how much a slow reader can leave unread.
    pub stream_window: u32,
    /// Flow-control window of a whole connection, shared by its streams.
    pub connection_window: u32,
    /// Bytes a connection may have in flight unacknowledged.
    pub send_window: u64,
    /// QUIC PING interval that keeps NAT bindings and the idle timer alive.
    pub keep_alive: Duration,
    /// A connection silent for this long is dead.
    pub idle_timeout: Duration,
    /// Time allowed for the QUIC and TLS handshake.
    pub handshake_timeout: Duration,
    /// QUIC handshakes the hub keeps in progress at once; more are refused before work.
    pub max_incoming: usize,
    /// Congestion controller for what this side sends.
    pub congestion: Congestion,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tunnel_streams: 16_384,
            agent_streams: 8,
            stream_window: 4 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            send_window: 32 * 1024 * 1024,
            keep_alive: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_incoming: 1024,
            congestion: Congestion::Cubic,
        }
    }
}

impl Limits {
    /// The transport config a side uses; `incoming_bidi` is how many bidirectional streams the
    /// peer may open towards us.
    fn transport(&self, incoming_bidi: u32) -> Result<TransportConfig, TransportError> {
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Limit(format!("idle timeout {:?}", self.idle_timeout)))?;
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(self.keep_alive))
            .max_idle_timeout(Some(idle))
            // Datagrams are not used yet (UDP ASSOCIATE will use them); refuse them for now.
            .datagram_receive_buffer_size(None)
            .enable_segmentation_offload(true);
        if self.congestion == Congestion::Bbr {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        Ok(t)
    }
}

/// Creates a UDP socket with large kernel buffers (best effort: the kernel caps them at
/// `net.core.rmem_max`/`wmem_max`).
fn udp_socket(addr: SocketAddr) -> Result<UdpSocket, TransportError> {
    let bind_err = |source| TransportError::Bind { addr, source };
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .map_err(bind_err)?;
    if addr.is_ipv6() {
        // Accept IPv4-mapped traffic too when bound to [::].
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(8 * 1024 * 1024);
    let _ = socket.set_send_buffer_size(8 * 1024 * 1024);
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

/// Binds the hub's QUIC endpoint: client certificates required, `limits` applied.
pub fn hub_endpoint(
    addr: SocketAddr,
    tls: &ServerTls,
    limits: &Limits,
) -> Result<quinn::Endpoint, TransportError> {
    let crypto = tls.quic_config()?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(limits.transport(limits.agent_streams)?))
        .max_incoming(limits.max_incoming)
        // An agent whose address changes (NAT rebinding, pod IP change) keeps its session.
        .migration(true);
    let socket = udp_socket(addr)?;
    quinn::Endpoint::new(
        EndpointConfig::default(),
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })
}

/// Moves an agent endpoint to a fresh UDP socket on a new ephemeral port of the same family
/// (what a NAT rebinding or a changed pod address looks like to the hub). Its connections
/// migrate to the new address and keep their sessions.
pub fn rebind_agent_endpoint(endpoint: &quinn::Endpoint) -> Result<SocketAddr, TransportError> {
    let old = endpoint
        .local_addr()
        .map_err(|source| TransportError::Bind {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            source,
        })?;
    let local = SocketAddr::new(old.ip(), 0);
    let socket = udp_socket(local)?;
    endpoint
        .rebind(socket)
        .map_err(|source| TransportError::Bind {
            addr: local,
            source,
        })?;
    endpoint
        .local_addr()
        .map_err(|source| TransportError::Bind {
            addr: local,
            source,
        })
}

/// Binds an agent's client endpoint on an ephemeral port of the hub address's family.
pub fn agent_endpoint(
    hub: SocketAddr,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<quinn::Endpoint, TransportError> {
    let local: SocketAddr = if hub.is_ipv6() {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    };
    let socket = udp_socket(local)?;
    let mut endpoint = quinn::Endpoint::new(
        EndpointConfig::default(),
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind {
        addr: local,
        source,
    })?;
    let mut client = quinn::ClientConfig::new(Arc::new(tls.quic_config()?));
    client.transport_config(Arc::new(limits.transport(limits.tunnel_streams)?));
    endpoint.set_default_client_config(client);
    Ok(endpoint)
}
