//! QUIC endpoints for hub and agent: TLS 1.3 with mutual certificates, ALPN `rna/1`, and every
//! quinn limit set explicitly (quinn's defaults are sized for browsers, not for a hub).

pub mod control;
pub mod outbox;
pub mod proxy;
pub mod relay;
pub mod session;
pub mod tcp;
pub mod tickets;
pub mod tls;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::Duration;

use quinn::{EndpointConfig, IdleTimeout, TransportConfig, VarInt};
use sha2::{Digest, Sha256};

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
    /// The endpoint key in the state folder could not be read or created.
    #[error("endpoint key {path}: {message}")]
    Key {
        /// The key file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}

/// File in the hub's state folder holding the endpoint secret.
pub const ENDPOINT_KEY_FILE: &str = "endpoint.key";

/// The hub's endpoint secret: it keys stateless-reset tokens and connection IDs, so a hub
/// restarted with the same secret recognises the connection IDs its previous run handed out
/// and answers an agent's next packet with a stateless reset the agent accepts. The agent
/// then knows at once that its session is gone and reconnects, instead of waiting out the idle
/// timeout.
#[derive(Clone)]
pub struct EndpointKey([u8; 32]);

impl std::fmt::Debug for EndpointKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EndpointKey(..)")
    }
}

impl EndpointKey {
    /// A fresh random key (used when the hub has no state folder).
    pub fn random() -> Result<EndpointKey, TransportError> {
        let mut k = [0u8; 32];
        random_fill(&mut k)?;
        Ok(EndpointKey(k))
    }

    /// Reads `dir/endpoint.key`, creating the folder and a new random key (mode 0600) when
    /// missing. A file of the wrong size is an error, never silently replaced.
    pub fn load_or_create(dir: &std::path::Path) -> Result<EndpointKey, TransportError> {
        let path = dir.join(ENDPOINT_KEY_FILE);
        let fail = |message: String| TransportError::Key {
            path: path.clone(),
            message,
        };
        // The key is 32 bytes; anything much larger (or a device) is refused unread.
        match crate::fsutil::read_bytes(&path, 1024).map_err(|e| std::io::Error::from(e.problem)) {
            Ok(bytes) => {
                let k: [u8; 32] = bytes.as_slice().try_into().map_err(|_| {
                    fail(format!(
                        "expected 32 bytes, found {}; delete it to make a new one",
                        bytes.len()
                    ))
                })?;
                Ok(EndpointKey(k))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir)
                    .map_err(|e| fail(format!("creating the state folder: {e}")))?;
                let key = EndpointKey::random()?;
                crate::certs::write_private(&path, &key.0, false)
                    .map_err(|e| fail(e.to_string()))?;
                Ok(key)
            }
            Err(e) => Err(fail(e.to_string())),
        }
    }

    /// The stateless-reset token of the hub connection ID `cid`: the first 16 bytes of its
    /// HMAC-SHA256 under this key, the token quinn sends for it (the key is the endpoint's
    /// reset key, [`EndpointKey::endpoint_config`]).
    pub fn reset_token(&self, cid: &[u8]) -> [u8; RESET_TOKEN_LEN] {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let tag = ring::hmac::sign(&key, cid);
        let mut token = [0u8; RESET_TOKEN_LEN];
        token.copy_from_slice(&tag.as_ref()[..RESET_TOKEN_LEN]);
        token
    }

    fn endpoint_config(&self) -> EndpointConfig {
        let reset = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        let mut config = EndpointConfig::new(Arc::new(reset));
        let cid_key: [u8; 32] = Sha256::new()
            .chain_update(b"rna connection id key")
            .chain_update(self.0)
            .finalize()
            .into();
        config.cid_generator(move || {
            Box::new(KeyedCidGenerator { key: cid_key })
                as Box<dyn quinn_proto::ConnectionIdGenerator>
        });
        // A stateless reset for every packet of a connection the hub no longer has. quinn's
        // default sends at most one per 20 ms, 50 a second for the whole endpoint: a hub
        // restarted under 10,000 agents answered that many of their pings, and the rest of the
        // fleet only noticed at the 30 s heartbeat timeout, all at once (S1, performance.md).
        // The limit guards against reset loops with other UDP services; here each reset is
        // smaller than the packet that drew it (quinn), and it is only sent for a connection
        // ID that carries this key's hash, which a stray datagram matches by chance only.
        config.min_reset_interval(Duration::ZERO);
        config
    }
}

/// Fills `buf` from the system's random source.
fn random_fill(buf: &mut [u8]) -> Result<(), TransportError> {
    use ring::rand::SecureRandom;
    ring::rand::SystemRandom::new()
        .fill(buf)
        .map_err(|_| TransportError::Key {
            path: "(random)".into(),
            message: "the system random source failed".into(),
        })
}

/// Bytes of a stateless-reset token (RFC 9000, section 10.3).
pub const RESET_TOKEN_LEN: usize = 16;

/// Random bytes before the token in a stateless reset: the packet looks like a short-header
/// packet with a connection ID of up to 20 bytes (RFC 9000 recommends at least 5 + 20).
const RESET_PADDING: usize = 25 + 16;

/// A stateless reset datagram carrying `token` (RFC 9000, section 10.3): a short-header
/// first byte, unpredictable bytes, then the token. A peer holding a connection whose reset
/// token this is ends it at once (`reset by peer`), whatever connection ID it shows.
pub fn stateless_reset(token: &[u8; RESET_TOKEN_LEN]) -> Result<Vec<u8>, TransportError> {
    let mut packet = vec![0u8; RESET_PADDING + RESET_TOKEN_LEN];
    random_fill(&mut packet[..RESET_PADDING])?;
    // Fixed bit set, long-header bit clear: a short header.
    packet[0] = 0b0100_0000 | (packet[0] >> 2);
    packet[RESET_PADDING..].copy_from_slice(token);
    Ok(packet)
}

/// The hub's connection IDs: [`CID_NONCE`] random bytes and [`CID_SIGNATURE`] bytes of a
/// keyed hash of them, so a packet whose ID the hub no longer knows draws a stateless reset
/// only if the ID is one the hub (this run or an earlier one with the same key) made.
///
/// Why not quinn's `HashedConnectionIdGenerator`: its IDs are 8 bytes with a 3-byte nonce,
/// 16.7 million IDs. quinn makes sure a new ID is not one a live connection holds, but it
/// cannot know the IDs of the hub's previous run. After a restart under 10,000 agents, the
/// new hub held tens of thousands of IDs (about five per connection) while agents of the old
/// hub were still pinging theirs: each of those agents had a chance of about one in a
/// thousand that its ID was now a new connection's. Its packets then went to that connection,
/// failed to decrypt and were dropped without a reset, and the agent sat on a dead session
/// until its 30 s idle timeout: the 2–11 agents of S1's tail (docs/performance.md). With a
/// 64-bit nonce the chance is about one in 10^10 per restart.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KeyedCidGenerator {
    key: [u8; 32],
}

/// Random bytes of a hub connection ID.
const CID_NONCE: usize = 8;
/// Bytes of the keyed hash that follow them.
const CID_SIGNATURE: usize = 4;

impl KeyedCidGenerator {
    fn signature(&self, nonce: &[u8]) -> [u8; CID_SIGNATURE] {
        let digest = Sha256::new()
            .chain_update(self.key)
            .chain_update(nonce)
            .finalize();
        let mut out = [0u8; CID_SIGNATURE];
        out.copy_from_slice(&digest[..CID_SIGNATURE]);
        out
    }
}

impl quinn_proto::ConnectionIdGenerator for KeyedCidGenerator {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        let mut bytes = [0u8; CID_NONCE + CID_SIGNATURE];
        let random = ring::rand::SystemRandom::new();
        if ring::rand::SecureRandom::fill(&random, &mut bytes[..CID_NONCE]).is_err() {
            // The system's random source failing is not something to go on without: quinn
            // checks a new ID against the live ones, but a constant would collide at once.
            panic!("the system random number generator failed");
        }
        let signature = self.signature(&bytes[..CID_NONCE]);
        bytes[CID_NONCE..].copy_from_slice(&signature);
        quinn_proto::ConnectionId::new(&bytes)
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if cid.len() != CID_NONCE + CID_SIGNATURE {
            return Err(quinn_proto::InvalidCid);
        }
        let (nonce, signature) = cid.split_at(CID_NONCE);
        if self.signature(nonce) == signature {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        CID_NONCE + CID_SIGNATURE
    }

    fn cid_lifetime(&self) -> Option<Duration> {
        None
    }
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
    /// QUIC PING interval of the hub on a connection it sent nothing on for this long: a
    /// fallback only, below the idle timeout. The hub answers every agent ping with a pong,
    /// which resets quinn's keep-alive timer, so on a live session this never fires.
    pub keep_alive: Duration,
    /// The agent's QUIC PING interval, a fallback as on the hub. How fast an agent notices a
    /// restarted hub is set by its heartbeat pings instead, at the interval the hub paces
    /// (250 ms for a fleet of up to 500 by default): the next ping draws a stateless reset.
    /// The same pings keep NAT bindings, being always more frequent than this.
    pub agent_keep_alive: Duration,
    /// A connection silent for this long is dead.
    pub idle_timeout: Duration,
    /// Time the agent allows for its whole handshake (QUIC, TLS, Hello, Welcome). The hub
    /// has its own, separate deadlines for TLS and for Hello (`HubCaps`).
    pub handshake_timeout: Duration,
    /// QUIC handshakes the hub keeps in progress at once; more are refused before work.
    pub max_incoming: usize,
    /// Congestion controller for what this side sends.
    pub congestion: Congestion,
    /// Largest UDP payload MTU discovery may reach. Connections start at 1200 bytes and probe
    /// upwards; a path that drops big probes keeps the largest size that got through, so a
    /// high bound costs nothing on a 1500-byte path and cuts per-packet work several-fold on
    /// jumbo-frame networks (9001 in AWS VPCs) and loopback. At most 6550 (see the default).
    pub max_udp_payload: u16,
    /// The longest each side asks its peer to hold back an acknowledgement (QUIC ACK
    /// frequency extension, `max_ack_delay`). A sender's probe timeout waits this long on top
    /// of the round trip before it resends a lost packet that nothing followed (the last
    /// packet of a request, an `Open` header), so it bounds how long one loss stalls a small
    /// request. quinn's default, RFC 9000's 25 ms, made that stall ~27 ms on a fast path.
    pub max_ack_delay: Duration,
}

/// Tunnel streams an agent grants the hub on a new connection, before the window grows
/// towards [`Limits::tunnel_streams`] with the streams the hub really opens.
///
/// Why not the whole limit at once: quinn makes an entry for every stream id the peer may
/// open as soon as it grants them (`StreamsState::ensure_remote_streams`), so a grant of
/// 16,384 cost each agent connection about 1 MB (estimated) and tens of thousands of inserts
/// into hash tables in its handshake, on every connect and reconnect, for streams almost
/// never open at once.
pub const INITIAL_TUNNEL_WINDOW: u32 = 256;

impl Limits {
    /// The tunnel streams an agent grants when a QUIC connection starts: at most
    /// [`INITIAL_TUNNEL_WINDOW`], never more than `tunnel_streams`.
    pub fn initial_tunnel_window(&self) -> u32 {
        self.tunnel_streams.min(INITIAL_TUNNEL_WINDOW)
    }
}

/// The next tunnel-stream window of an agent connection with `open` streams open under a
/// window of `window`, limit `limit`: doubled (up to the limit) once three quarters are in
/// use, so a burst of streams waits at most one round trip per doubling; `None` while it is
/// large enough.
pub fn grown_tunnel_window(open: usize, window: u32, limit: u32) -> Option<u32> {
    let busy = open.saturating_mul(4) >= (window as usize).saturating_mul(3);
    (busy && window < limit).then(|| window.saturating_mul(2).min(limit))
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            tunnel_streams: 16_384,
            agent_streams: 8,
            stream_window: 4 * 1024 * 1024,
            connection_window: 32 * 1024 * 1024,
            send_window: 32 * 1024 * 1024,
            keep_alive: Duration::from_secs(15),
            agent_keep_alive: Duration::from_secs(15),
            idle_timeout: Duration::from_secs(30),
            handshake_timeout: Duration::from_secs(10),
            max_incoming: 1024,
            congestion: Congestion::Cubic,
            // quinn hands the kernel up to 10 packets per GSO send, and one send must fit a
            // single UDP datagram (65,507 bytes): bigger packets would make every full batch
            // fail, read as loss, and MTU discovery's black-hole detector would fall back to
            // 1200 bytes. 6550 × 10 fits, and fits a 9000-byte jumbo frame.
            max_udp_payload: 6550,
            // Measured with benches' H1 (docs/performance.md); why in docs/decisions.md.
            max_ack_delay: Duration::from_millis(2),
        }
    }
}

impl Limits {
    /// The transport config a side uses; `incoming_bidi` is how many bidirectional streams the
    /// peer may open towards us.
    fn transport(
        &self,
        incoming_bidi: u32,
        keep_alive: Duration,
    ) -> Result<TransportConfig, TransportError> {
        let idle = IdleTimeout::try_from(self.idle_timeout)
            .map_err(|_| TransportError::Limit(format!("idle timeout {:?}", self.idle_timeout)))?;
        let mut t = TransportConfig::default();
        t.max_concurrent_bidi_streams(VarInt::from_u32(incoming_bidi))
            .max_concurrent_uni_streams(VarInt::from_u32(0))
            .stream_receive_window(VarInt::from_u32(self.stream_window))
            .receive_window(VarInt::from_u32(self.connection_window))
            .send_window(self.send_window)
            .keep_alive_interval(Some(keep_alive))
            .max_idle_timeout(Some(idle))
            // Datagrams are not used yet (UDP ASSOCIATE will use them); refuse them for now.
            .datagram_receive_buffer_size(None)
            .enable_segmentation_offload(true);
        if self.congestion == Congestion::Bbr {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        // Both sides ask for prompt ACKs; the peer's own minimum (1 ms in quinn) still holds.
        // Every other ack-eliciting packet is acknowledged at once, as without the extension,
        // and any reordering too (threshold 1), so only the delay for a lone packet changes.
        let mut ack = quinn::AckFrequencyConfig::default();
        ack.max_ack_delay(Some(self.max_ack_delay))
            .reordering_threshold(VarInt::from_u32(1));
        t.ack_frequency_config(Some(ack));
        // The bound is probed first (the vendored quinn-proto's addition): a path that
        // carries it (loopback, jumbo frames) is done after one probe instead of about ten,
        // which a reconnecting fleet pays on both sides of every connection; a 1500-byte
        // path loses that probe three times, then searches below it as before.
        let mut mtu = quinn::MtuDiscoveryConfig::default();
        mtu.upper_bound(self.max_udp_payload)
            .probe_upper_bound_first(true);
        t.mtu_discovery_config(Some(mtu));
        Ok(t)
    }

    /// Endpoint settings shared by hub and agent: accept datagrams as large as we may send.
    fn endpoint_config(
        &self,
        mut config: EndpointConfig,
    ) -> Result<EndpointConfig, TransportError> {
        config
            .max_udp_payload_size(self.max_udp_payload)
            .map_err(|e| {
                TransportError::Limit(format!("max UDP payload {}: {e}", self.max_udp_payload))
            })?;
        Ok(config)
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
    key: &EndpointKey,
) -> Result<quinn::Endpoint, TransportError> {
    hub_endpoint_and_socket(addr, tls, limits, key).map(|(endpoint, _)| endpoint)
}

/// [`hub_endpoint`], and a second handle of its UDP socket for datagrams the hub sends
/// outside quinn (the stateless resets of [`crate::hub::recall`]). Never read from it: every
/// datagram that arrives belongs to quinn.
pub fn hub_endpoint_and_socket(
    addr: SocketAddr,
    tls: &ServerTls,
    limits: &Limits,
    key: &EndpointKey,
) -> Result<(quinn::Endpoint, UdpSocket), TransportError> {
    let crypto = tls.quic_config()?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    server
        .transport_config(Arc::new(
            limits.transport(limits.agent_streams, limits.keep_alive)?,
        ))
        .max_incoming(limits.max_incoming)
        // Packets after the first of an attempt not yet accepted (one waiting for a handshake
        // slot): an agent's resent Initials, 1,200 bytes each, a few per second of waiting.
        // quinn's defaults (10 MiB each, 100 MiB in all) are sized for 0-RTT data, which the
        // hub never takes.
        .incoming_buffer_size(64 * 1024)
        .incoming_buffer_size_total(16 * 1024 * 1024)
        // An agent whose address changes (NAT rebinding, pod IP change) keeps its session.
        .migration(true);
    let socket = udp_socket(addr)?;
    let sender = socket
        .try_clone()
        .map_err(|source| TransportError::Bind { addr, source })?;
    let endpoint = quinn::Endpoint::new(
        limits.endpoint_config(key.endpoint_config())?,
        Some(server),
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind { addr, source })?;
    Ok((endpoint, sender))
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

/// The local address an agent's socket to `hub` binds: port 0 of `bind` when given, else of
/// the unspecified address of the hub's family. A `bind` of the other family than the hub's
/// is refused by the kernel when the socket connects or sends, which names both addresses.
pub fn local_address(hub: SocketAddr, bind: Option<IpAddr>) -> SocketAddr {
    match bind {
        Some(ip) => SocketAddr::new(ip, 0),
        None if hub.is_ipv6() => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        None => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
    }
}

/// Binds an agent's client endpoint on an ephemeral port of the hub address's family; its
/// connections grant the hub all of `limits.tunnel_streams` at once (for callers that do not
/// grow the grant themselves, as tests of the transport).
pub fn agent_endpoint(
    hub: SocketAddr,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<quinn::Endpoint, TransportError> {
    let local = local_address(hub, None);
    let mut endpoint = client_endpoint(local, limits)?;
    endpoint.set_default_client_config(client_config(tls, limits, limits.tunnel_streams)?);
    Ok(endpoint)
}

/// The agent's endpoint: on an ephemeral port of `bind` when given (`--bind-address`), else
/// of the unspecified address of the hub address's family; its connections grant the hub
/// [`Limits::initial_tunnel_window`] streams first, which the agent's session grows towards
/// `limits.tunnel_streams` with [`Session::grant_streams`](session::Session::grant_streams).
pub fn agent_endpoint_from(
    hub: SocketAddr,
    bind: Option<IpAddr>,
    tls: &ClientTls,
    limits: &Limits,
) -> Result<quinn::Endpoint, TransportError> {
    let local = local_address(hub, bind);
    let mut endpoint = client_endpoint(local, limits)?;
    endpoint.set_default_client_config(agent_client_config(tls, limits)?);
    Ok(endpoint)
}

/// A client-only QUIC endpoint on `local`.
fn client_endpoint(local: SocketAddr, limits: &Limits) -> Result<quinn::Endpoint, TransportError> {
    let socket = udp_socket(local)?;
    quinn::Endpoint::new(
        limits.endpoint_config(EndpointConfig::default())?,
        None,
        socket,
        Arc::new(quinn::TokioRuntime),
    )
    .map_err(|source| TransportError::Bind {
        addr: local,
        source,
    })
}

/// The QUIC client configuration of the agent's endpoint for `tls`, as
/// [`agent_endpoint_from`] sets it: an agent whose certificate was renewed sets it again on
/// its endpoint.
pub fn agent_client_config(
    tls: &ClientTls,
    limits: &Limits,
) -> Result<quinn::ClientConfig, TransportError> {
    client_config(tls, limits, limits.initial_tunnel_window())
}

/// A QUIC client configuration granting the hub `tunnel_streams` streams.
fn client_config(
    tls: &ClientTls,
    limits: &Limits,
    tunnel_streams: u32,
) -> Result<quinn::ClientConfig, TransportError> {
    let mut client = quinn::ClientConfig::new(Arc::new(tls.quic_config()?));
    client.transport_config(Arc::new(
        limits.transport(tunnel_streams, limits.agent_keep_alive)?,
    ));
    Ok(client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_connection_ids_are_twelve_bytes_that_only_their_key_validates() {
        use quinn_proto::ConnectionIdGenerator;
        let mut generator = KeyedCidGenerator { key: [7; 32] };
        let other = KeyedCidGenerator { key: [8; 32] };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..1000 {
            let cid = generator.generate_cid();
            assert_eq!(cid.len(), 12);
            assert!(generator.validate(&cid).is_ok());
            // The same run's key after a restart validates it too; another key does not.
            assert!(KeyedCidGenerator { key: [7; 32] }.validate(&cid).is_ok());
            assert!(other.validate(&cid).is_err());
            let mut bent = cid.to_vec();
            bent[0] ^= 1;
            assert!(generator
                .validate(&quinn_proto::ConnectionId::new(&bent))
                .is_err());
            assert!(seen.insert(cid.to_vec()), "a repeated connection ID");
        }
        // quinn's own 8-byte IDs (a hub of an earlier version) are not taken for ours.
        assert!(generator
            .validate(&quinn_proto::ConnectionId::new(&[0; 8]))
            .is_err());
    }

    #[test]
    fn the_tunnel_window_starts_small_and_doubles_at_three_quarters_up_to_the_limit() {
        let limits = Limits::default();
        assert_eq!(limits.initial_tunnel_window(), 256);
        let small = Limits {
            tunnel_streams: 10,
            ..Limits::default()
        };
        assert_eq!(small.initial_tunnel_window(), 10);
        // (open, window, limit, next)
        let table: [(usize, u32, u32, Option<u32>); 7] = [
            (0, 256, 16_384, None),
            (191, 256, 16_384, None),
            (192, 256, 16_384, Some(512)),
            (384, 512, 16_384, Some(1_024)),
            (12_300, 16_000, 16_384, Some(16_384)),
            (16_384, 16_384, 16_384, None),
            (10, 10, 10, None),
        ];
        for (open, window, limit, next) in table {
            assert_eq!(
                grown_tunnel_window(open, window, limit),
                next,
                "{open} open of {window} (limit {limit})"
            );
        }
    }

    #[test]
    fn endpoint_key_is_created_once_and_reused() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("state");
        let first = EndpointKey::load_or_create(&dir).unwrap();
        let again = EndpointKey::load_or_create(&dir).unwrap();
        assert_eq!(first.0, again.0);
        assert_ne!(first.0, [0u8; 32]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(ENDPOINT_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }

    #[test]
    fn a_damaged_endpoint_key_is_an_error_and_is_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join(ENDPOINT_KEY_FILE);
        std::fs::write(&path, b"short").unwrap();
        let err = EndpointKey::load_or_create(tmp.path()).unwrap_err();
        assert!(
            err.to_string().contains("expected 32 bytes, found 5"),
            "{err}"
        );
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
    }
}
