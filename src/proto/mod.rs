//! The messages hub and agent exchange, and the codes they close streams and connections with.
//!
//! Wire types only: no sockets here. Every message travels as one length-prefixed postcard
//! frame (see [`codec`]). The control stream carries [`Control`] frames both ways. Every
//! stream the hub opens starts with a [`kube::StreamHeader`]: a tunnel stream's is
//! `Tunnel(Open)`, answered by one [`OpenReply`] from the agent, then raw bytes; a
//! Kubernetes command stream's is `Kube(..)` (see [`kube`]).

pub mod bounds;
pub mod codec;
pub mod kube;

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Deserializer, Serialize};

use crate::identity::Secret;

/// The protocol version this build speaks; carried in [`Hello`].
pub const PROTOCOL_VERSION: u16 = 1;

/// ALPN identifier of the hub–agent protocol.
pub const ALPN: &[u8] = b"rna/1";

/// The hub's QUIC port when none is given: where `rna hub` listens by default and where an
/// agent's `--hub host` (no port) dials. Here, below hub and agent, so the two cannot differ.
pub const DEFAULT_HUB_PORT: u16 = 4433;

/// Most capabilities one [`Hello`] may announce; the hub keeps them for the session's life
/// and shows them in every agents list, so a frame full of empty ones must not be accepted.
pub const MAX_CAPABILITIES: usize = 32;

/// The capability of an agent that takes the hub's QUIC acknowledgement of its `Ping` as the
/// hub's sign of life: the hub sends no `Pong` to it on a QUIC session (docs/protocol.md,
/// "Heartbeats"). Over TCP, which shows no acknowledgements, the hub still answers.
pub const ACK_LIVENESS: &str = "ack-liveness";

/// Longest capability name in a [`Hello`], in bytes.
pub const MAX_CAPABILITY_LEN: usize = 64;

/// Longest agent version in a [`Hello`], in bytes (a semver with build metadata fits).
pub const MAX_VERSION_LEN: usize = 128;

/// Longest `os` or `arch` in a [`Hello`], in bytes.
pub const MAX_PLATFORM_LEN: usize = 32;

/// The first message of a session, sent by the agent on the control stream.
#[derive(Clone, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the agent speaks; the hub refuses versions it does not know.
    pub protocol: u16,
    /// Agent identifier; must equal the common name of the agent's certificate.
    pub name: String,
    /// The agent's build version, shown on the hub (at most [`MAX_VERSION_LEN`] bytes).
    #[serde(deserialize_with = "hello_version")]
    pub version: String,
    /// Operating system (`std::env::consts::OS`, at most [`MAX_PLATFORM_LEN`] bytes).
    #[serde(deserialize_with = "hello_os")]
    pub os: String,
    /// CPU architecture (`std::env::consts::ARCH`, at most [`MAX_PLATFORM_LEN`] bytes).
    #[serde(deserialize_with = "hello_arch")]
    pub arch: String,
    /// What the agent can do beyond TCP relaying (e.g. `kubernetes`); at most
    /// [`MAX_CAPABILITIES`] of at most [`MAX_CAPABILITY_LEN`] bytes each.
    #[serde(deserialize_with = "hello_capabilities")]
    pub capabilities: Vec<String>,
    /// The agent's machine credential; needs scope `connect:agentHub`.
    pub token: Secret,
}

fn hello_version<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "Hello version", MAX_VERSION_LEN)
}

fn hello_os<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "Hello os", MAX_PLATFORM_LEN)
}

fn hello_arch<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "Hello arch", MAX_PLATFORM_LEN)
}

fn hello_capabilities<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounds::strings(
        d,
        "Hello capabilities",
        MAX_CAPABILITIES,
        MAX_CAPABILITY_LEN,
    )
}

impl fmt::Debug for Hello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hello")
            .field("protocol", &self.protocol)
            .field("name", &self.name)
            .field("version", &self.version)
            .field("os", &self.os)
            .field("arch", &self.arch)
            .field("capabilities", &self.capabilities)
            .field("token", &self.token)
            .finish()
    }
}

/// The hub's acceptance of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Identifier of this session on this hub, for logs on both sides.
    pub session_id: u64,
    /// How often the agent pings (its liveness probe), in milliseconds; the hub answers,
    /// and pings itself only after this long and a half of silence.
    pub heartbeat_interval_ms: u64,
    /// Silence longer than this (milliseconds) closes the connection.
    pub heartbeat_timeout_ms: u64,
    /// The tenant the agent was placed in (from its token).
    pub tenant: String,
}

/// Messages of the control stream, in both directions.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Control {
    /// Agent → hub, first frame.
    Hello(Hello),
    /// Hub → agent: the session is established.
    Welcome(Welcome),
    /// Hub → agent: the session is refused; the hub then closes the connection with `code`.
    Rejected {
        /// The close code the hub is about to use.
        code: CloseCode,
        /// A human-readable reason (never contains secrets).
        reason: String,
    },
    /// A heartbeat; the peer answers with [`Control::Pong`] carrying the same sequence.
    Ping {
        /// Sequence number, echoed in the answer.
        seq: u64,
    },
    /// The answer to a [`Control::Ping`].
    Pong {
        /// The sequence number of the ping answered.
        seq: u64,
    },
    /// Agent → hub: open no new stream on this session; the agent has a newer one to the
    /// same hub (it moved from the TCP fallback back to QUIC) and closes this one once its
    /// streams in flight have finished.
    GoingAway,
    /// Agent → hub: a renewed credential for this live session (a fresh JWT from the same
    /// OIDC client), so the session outlives the token it registered with. The hub checks it
    /// like Hello's and closes the session with the matching code when it fails or names
    /// another identity or tenant. Appended last: variants are encoded by index.
    Reauthenticate {
        /// The new token; needs `connect:agentHub`.
        token: Secret,
    },
    /// Hub → agent: the agent's connect token was rotated by an administrator. The agent
    /// stores the new token where it keeps its token, makes a new session with it and moves
    /// off this one (`GoingAway`), which is its acknowledgement; the hub revokes the old
    /// token once no session uses it any more. Appended last: variants are encoded by index.
    RotateToken {
        /// The new connect token (`connect:agentHub`, the same tenant).
        token: Secret,
    },
    /// Hub → agent: from now on ping every `heartbeat_interval_ms` and give up after
    /// `heartbeat_timeout_ms` of silence. The hub paces its fleet's pings by their number
    /// (more agents, a longer interval), so a session is told when the fleet grew or shrank
    /// enough since its `Welcome` or last `Pace`. Appended last: variants are encoded by index.
    Pace {
        /// The new ping interval, milliseconds.
        heartbeat_interval_ms: u64,
        /// The new silence limit, milliseconds.
        heartbeat_timeout_ms: u64,
    },
}

/// Where a tunnel stream should lead. Names are resolved by the agent, never by the hub.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Host {
    /// A literal address.
    Ip(IpAddr),
    /// A DNS name, resolved inside the private network.
    Domain(String),
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Host::Ip(IpAddr::V6(ip)) => write!(f, "[{ip}]"),
            Host::Ip(ip) => write!(f, "{ip}"),
            Host::Domain(name) => f.write_str(name),
        }
    }
}

/// The header of a tunnel stream, hub → agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Open {
    /// Destination host.
    pub host: Host,
    /// Destination TCP port (never 0).
    pub port: u16,
}

/// The agent's answer to [`Open`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum OpenReply {
    /// Connected; raw bytes follow in both directions.
    Opened {
        /// The local address of the agent's TCP connection (SOCKS BND.ADDR).
        bound: SocketAddr,
    },
    /// Not connected; the stream ends after this frame.
    Failed {
        /// Why, as a code the hub maps to a SOCKS5 reply.
        code: DialFailure,
        /// A readable detail for logs (no secrets).
        message: String,
    },
}

/// Why the agent could not connect a tunnel stream. Each maps to one SOCKS5 reply (RFC 1928 §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DialFailure {
    /// The agent's policy refuses the destination: reply 0x02.
    NotAllowed,
    /// No route to the network: reply 0x03.
    NetworkUnreachable,
    /// The host cannot be reached or its name does not resolve: reply 0x04.
    HostUnreachable,
    /// The destination refused the connection: reply 0x05.
    Refused,
    /// The dial did not complete in time: reply 0x06.
    TimedOut,
    /// Anything else: reply 0x01.
    General,
}

impl DialFailure {
    /// The SOCKS5 reply code (RFC 1928 §6) for this failure.
    pub fn socks_reply(self) -> u8 {
        match self {
            DialFailure::General => 0x01,
            DialFailure::NotAllowed => 0x02,
            DialFailure::NetworkUnreachable => 0x03,
            DialFailure::HostUnreachable => 0x04,
            DialFailure::Refused => 0x05,
            DialFailure::TimedOut => 0x06,
        }
    }
}

/// QUIC application error codes used to close agent connections.
///
/// They convert to and from `quinn::VarInt`, so the agent learns exactly why it was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CloseCode {
    /// Orderly end of a session.
    Normal,
    /// The peer broke the protocol (bad frame, unexpected message).
    Protocol,
    /// The agent speaks a protocol version the hub does not.
    VersionMismatch,
    /// The name in Hello is not a valid agent identifier.
    BadName,
    /// The name in Hello differs from the certificate's subject.
    CertificateMismatch,
    /// The token is malformed or unknown.
    BadToken,
    /// The token was revoked.
    TokenRevoked,
    /// The token has expired.
    TokenExpired,
    /// The token lacks scope `connect:agentHub`.
    MissingScope,
    /// No heartbeat within the limit.
    HeartbeatTimeout,
    /// The hub is shutting down; connect to another hub.
    GoingAway,
    /// The handshake did not complete in time.
    HandshakeTimeout,
    /// The agent's name (in its tenant) or its token already holds as many sessions as the
    /// hub allows; one of them must end first.
    TooManySessions,
    /// The tenant bound into the agent's certificate (its `rna://tenant/…` URI) is not the
    /// tenant of its token.
    TenantMismatch,
    /// The agent's certificate was revoked on the hub (`rna certs revoke`).
    CertificateRevoked,
    /// The agent's certificate is outside its validity period. A full TLS handshake refuses
    /// such a certificate itself; a resumed session, whose certificate comes from its ticket,
    /// is refused with this code after the handshake.
    CertificateExpired,
}

impl CloseCode {
    /// Every code, for tests and documentation.
    pub const ALL: [CloseCode; 16] = [
        CloseCode::Normal,
        CloseCode::Protocol,
        CloseCode::VersionMismatch,
        CloseCode::BadName,
        CloseCode::CertificateMismatch,
        CloseCode::BadToken,
        CloseCode::TokenRevoked,
        CloseCode::TokenExpired,
        CloseCode::MissingScope,
        CloseCode::HeartbeatTimeout,
        CloseCode::GoingAway,
        CloseCode::HandshakeTimeout,
        CloseCode::TooManySessions,
        CloseCode::TenantMismatch,
        CloseCode::CertificateRevoked,
        CloseCode::CertificateExpired,
    ];

    /// The numeric QUIC application error code.
    pub fn code(self) -> u32 {
        match self {
            CloseCode::Normal => 0x00,
            CloseCode::Protocol => 0x01,
            CloseCode::VersionMismatch => 0x02,
            CloseCode::BadName => 0x03,
            CloseCode::CertificateMismatch => 0x04,
            CloseCode::BadToken => 0x10,
            CloseCode::TokenRevoked => 0x11,
            CloseCode::TokenExpired => 0x12,
            CloseCode::MissingScope => 0x13,
            CloseCode::HeartbeatTimeout => 0x20,
            CloseCode::GoingAway => 0x21,
            CloseCode::HandshakeTimeout => 0x22,
            CloseCode::TooManySessions => 0x23,
            CloseCode::TenantMismatch => 0x05,
            CloseCode::CertificateRevoked => 0x06,
            CloseCode::CertificateExpired => 0x07,
        }
    }

    /// The code for a numeric value, if known.
    pub fn from_code(code: u64) -> Option<CloseCode> {
        CloseCode::ALL
            .into_iter()
            .find(|c| u64::from(c.code()) == code)
    }

    /// A short stable name, used in logs and metric labels.
    pub fn as_str(self) -> &'static str {
        match self {
            CloseCode::Normal => "normal",
            CloseCode::Protocol => "protocol_error",
            CloseCode::VersionMismatch => "version_mismatch",
            CloseCode::BadName => "bad_name",
            CloseCode::CertificateMismatch => "certificate_mismatch",
            CloseCode::BadToken => "bad_token",
            CloseCode::TokenRevoked => "token_revoked",
            CloseCode::TokenExpired => "token_expired",
            CloseCode::MissingScope => "missing_scope",
            CloseCode::HeartbeatTimeout => "heartbeat_timeout",
            CloseCode::GoingAway => "going_away",
            CloseCode::HandshakeTimeout => "handshake_timeout",
            CloseCode::TooManySessions => "too_many_sessions",
            CloseCode::TenantMismatch => "tenant_mismatch",
            CloseCode::CertificateRevoked => "certificate_revoked",
            CloseCode::CertificateExpired => "certificate_expired",
        }
    }

    /// Whether an agent closed with this code should wait long before trying again: the
    /// hub will refuse it the same way until an operator changes something.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            CloseCode::VersionMismatch
                | CloseCode::BadName
                | CloseCode::CertificateMismatch
                | CloseCode::TenantMismatch
                | CloseCode::CertificateRevoked
                | CloseCode::CertificateExpired
                | CloseCode::BadToken
                | CloseCode::TokenRevoked
                | CloseCode::TokenExpired
                | CloseCode::MissingScope
        )
    }
}

impl fmt::Display for CloseCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (0x{:02x})", self.as_str(), self.code())
    }
}

impl From<CloseCode> for u32 {
    fn from(code: CloseCode) -> Self {
        code.code()
    }
}

impl From<CloseCode> for quinn::VarInt {
    fn from(code: CloseCode) -> Self {
        quinn::VarInt::from_u32(code.code())
    }
}

/// QUIC application error codes used to reset or stop one tunnel stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCode {
    /// The TCP side failed or was reset; the peer should reset its TCP side too.
    Reset = 0x100,
    /// The stream header was malformed.
    BadHeader = 0x101,
    /// An agent-opened stream came sooner than the hub accepts another (an inventory
    /// report while the previous one is still waiting for its turn).
    TooSoon = 0x102,
}

impl From<StreamCode> for u32 {
    fn from(code: StreamCode) -> Self {
        code as u32
    }
}

impl From<StreamCode> for quinn::VarInt {
    fn from(code: StreamCode) -> Self {
        quinn::VarInt::from_u32(code as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn close_codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for code in CloseCode::ALL {
            assert!(seen.insert(code.code()), "duplicate code {code}");
            assert_eq!(CloseCode::from_code(u64::from(code.code())), Some(code));
        }
        assert_eq!(CloseCode::from_code(0xffff), None);
    }

    #[test]
    fn dial_failures_map_to_rfc1928_replies() {
        let table = [
            (DialFailure::General, 0x01),
            (DialFailure::NotAllowed, 0x02),
            (DialFailure::NetworkUnreachable, 0x03),
            (DialFailure::HostUnreachable, 0x04),
            (DialFailure::Refused, 0x05),
            (DialFailure::TimedOut, 0x06),
        ];
        for (failure, reply) in table {
            assert_eq!(failure.socks_reply(), reply, "{failure:?}");
        }
    }

    #[test]
    fn reauthenticate_is_the_seventh_control_variant_and_masks_its_token() {
        let msg = Control::Reauthenticate {
            token: Secret::new("eyJhbGciOiJFUzI1NiJ9.e30.c2ln".into()),
        };
        // postcard writes the variant index first: 0..=5 are the older messages.
        let bytes = postcard::to_allocvec(&msg).unwrap();
        assert_eq!(bytes[0], 6);
        match postcard::from_bytes::<Control>(&bytes).unwrap() {
            Control::Reauthenticate { token } => {
                assert_eq!(token.expose(), "eyJhbGciOiJFUzI1NiJ9.e30.c2ln")
            }
            other => panic!("decoded as {other:?}"),
        }
        assert!(!format!("{msg:?}").contains("eyJ"));
    }

    #[test]
    fn pace_is_the_ninth_control_variant_and_round_trips() {
        let msg = Control::Pace {
            heartbeat_interval_ms: 5_000,
            heartbeat_timeout_ms: 30_000,
        };
        // Appended after RotateToken (7): the older variants keep their indices.
        let bytes = postcard::to_allocvec(&msg).unwrap();
        assert_eq!(bytes[0], 8);
        let ping = postcard::to_allocvec(&Control::Ping { seq: 1 }).unwrap();
        assert_eq!(ping[0], 3);
        match postcard::from_bytes::<Control>(&bytes).unwrap() {
            Control::Pace {
                heartbeat_interval_ms,
                heartbeat_timeout_ms,
            } => assert_eq!(
                (heartbeat_interval_ms, heartbeat_timeout_ms),
                (5_000, 30_000)
            ),
            other => panic!("decoded as {other:?}"),
        }
    }

    #[test]
    fn hello_debug_masks_the_token() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            name: "a".into(),
            version: "1".into(),
            os: "linux".into(),
            arch: "x86_64".into(),
            capabilities: vec![],
            token: Secret::new("rna_supersecret".into()),
        };
        let text = format!("{hello:?}");
        assert!(!text.contains("supersecret"), "{text}");
    }

    #[test]
    fn hello_fields_are_bounded_while_decoding() {
        let hello = |caps: Vec<String>, version: usize, os: usize, arch: usize| {
            Control::Hello(Hello {
                protocol: PROTOCOL_VERSION,
                name: "edge".into(),
                version: "1".repeat(version),
                os: "o".repeat(os),
                arch: "a".repeat(arch),
                capabilities: caps,
                token: Secret::new("rna_x".into()),
            })
        };
        let decode = |msg: Control| {
            let frame = codec::encode(&msg).unwrap();
            codec::decode_body::<Control>(&frame[4..])
        };
        let full = vec!["c".repeat(MAX_CAPABILITY_LEN); MAX_CAPABILITIES];
        assert!(decode(hello(
            full,
            MAX_VERSION_LEN,
            MAX_PLATFORM_LEN,
            MAX_PLATFORM_LEN
        ))
        .is_ok());
        let cases = [
            // The rogue Hello: a 64 KiB frame of empty capabilities.
            (
                hello(vec![String::new(); 65_000], 1, 1, 1),
                "Hello capabilities: 65000 entries, at most 32",
            ),
            (
                hello(vec![String::new(); MAX_CAPABILITIES + 1], 1, 1, 1),
                "Hello capabilities: 33 entries",
            ),
            (
                hello(vec!["c".repeat(MAX_CAPABILITY_LEN + 1)], 1, 1, 1),
                "Hello capabilities: a string of 65 bytes",
            ),
            (hello(vec![], MAX_VERSION_LEN + 1, 1, 1), "Hello version"),
            (hello(vec![], 1, MAX_PLATFORM_LEN + 1, 1), "Hello os"),
            (hello(vec![], 1, 1, MAX_PLATFORM_LEN + 1), "Hello arch"),
        ];
        for (msg, want) in cases {
            let err = decode(msg).unwrap_err();
            assert!(err.is_over_bound(), "{err}");
            assert!(err.to_string().contains(want), "{err} / {want}");
        }
    }
}
