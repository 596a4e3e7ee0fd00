//! The enrollment exchange: one [`EnrollRequest`] from the agent, one [`EnrollReply`] from the
//! hub, each a frame of the project's codec (4-byte length, postcard body, capped at
//! [`MAX_FRAME`](crate::proto::codec::MAX_FRAME)), with every list and string bounded while it
//! is decoded. The request carries a CSR and the join token; there is no field a private key
//! could travel in.

use std::fmt;

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};

use super::csr::MAX_CSR;
use super::join::JOIN_TOKEN_LEN;
use super::{ca_pin, CaPin, EnrollError};
use crate::identity::Secret;
use crate::proto::{bounds, codec};

/// ALPN of the enrollment exchange on the hub's own listener, beside `rna/1`: the hub asks no
/// client certificate of it and answers one request per connection.
pub const ENROLL_ALPN: &[u8] = b"rna-enroll/1";
/// Version of the enrollment messages, first in every request.
pub const ENROLL_PROTOCOL: u16 = 1;
/// The largest certificate in a reply (a P-256 agent certificate is about 600 bytes).
pub const MAX_CERT: usize = 8 * 1024;
/// The most certificates in a reply's chain.
pub const MAX_CHAIN: usize = 4;
/// The longest refusal message, connect token or serial text.
pub const MAX_TEXT: usize = 1024;

/// The first QUIC close code of enrollment refusals ([`RefusalCode::close_code`]).
pub const ENROLL_CLOSE_BASE: u32 = 0x30;

/// The close code of a successful enrollment: the hub is done once the reply is read.
pub const ENROLL_DONE: u32 = 0x00;

/// Why the hub refused an enrollment. The wire value is the variant's index (postcard), so
/// variants are only ever appended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RefusalCode {
    /// The join token, request or certificate is not well formed.
    Malformed,
    /// No join token with this id and secret exists.
    Unknown,
    /// The join token has expired.
    Expired,
    /// The join token has no uses left.
    Spent,
    /// The join token (or certificate) belongs to another tenant, or a certificate carries no
    /// tenant.
    TenantMismatch,
    /// The join token does not allow this agent name.
    NameNotAllowed,
    /// The CSR (or a certificate) was refused: malformed, badly signed, unsupported key.
    BadRequest,
    /// The agent's certificate has been revoked.
    Revoked,
    /// The hub could not issue now (its state folder cannot be written); try again later.
    Unavailable,
}

impl RefusalCode {
    /// Every code, in wire order.
    pub const ALL: [RefusalCode; 9] = [
        RefusalCode::Malformed,
        RefusalCode::Unknown,
        RefusalCode::Expired,
        RefusalCode::Spent,
        RefusalCode::TenantMismatch,
        RefusalCode::NameNotAllowed,
        RefusalCode::BadRequest,
        RefusalCode::Revoked,
        RefusalCode::Unavailable,
    ];

    /// The QUIC application error code an enrollment connection is closed with after this
    /// refusal: `0x30` plus the code's index, a range of its own beside the agent session's
    /// close codes, so a packet capture or a client that missed the reply still sees why.
    pub fn close_code(self) -> u32 {
        let index = RefusalCode::ALL
            .iter()
            .position(|c| *c == self)
            .unwrap_or_default();
        ENROLL_CLOSE_BASE + index as u32
    }

    /// The refusal a close code names, if it is one.
    pub fn from_close_code(code: u64) -> Option<RefusalCode> {
        let index = code.checked_sub(u64::from(ENROLL_CLOSE_BASE))?;
        RefusalCode::ALL.get(usize::try_from(index).ok()?).copied()
    }

    /// The name used in logs and the admin API.
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::Malformed => "malformed",
            RefusalCode::Unknown => "unknown",
            RefusalCode::Expired => "expired",
            RefusalCode::Spent => "spent",
            RefusalCode::TenantMismatch => "tenant_mismatch",
            RefusalCode::NameNotAllowed => "name_not_allowed",
            RefusalCode::BadRequest => "bad_request",
            RefusalCode::Revoked => "revoked",
            RefusalCode::Unavailable => "unavailable",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a fresh agent sends: the join token (only after the hub's CA matched its pin) and a
/// CSR for the key it made. `Debug` masks the token.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EnrollRequest {
    /// [`ENROLL_PROTOCOL`].
    pub protocol: u16,
    /// The whole join token text.
    #[serde(deserialize_with = "join_token")]
    pub join_token: Secret,
    /// The DER CSR, at most [`MAX_CSR`] bytes.
    #[serde(deserialize_with = "csr_bytes")]
    pub csr_der: Vec<u8>,
}

/// What the hub sends back.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum EnrollReply {
    /// The certificate was issued.
    Issued(Issued),
    /// The request was refused; `message` is one readable line.
    Refused {
        /// Why, as a code.
        code: RefusalCode,
        /// Why, in words.
        #[serde(deserialize_with = "text")]
        message: String,
    },
}

/// A certificate the hub issued, with what the agent needs to connect from then on.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Issued {
    /// DER certificates, the agent's first, then any intermediates.
    #[serde(deserialize_with = "chain")]
    pub chain: Vec<CertBytes>,
    /// The DER CA certificate the agent trusts the hub with from now on.
    pub ca: CertBytes,
    /// The connect token (`connect:agentHub` in the certificate's tenant) for the session
    /// handshake. Empty in the reply to a [`RenewRequest`]: the agent keeps its connect
    /// token, whose expiry the hub moved to the new certificate's end.
    #[serde(deserialize_with = "secret_text")]
    pub connect_token: Secret,
    /// Lowercase hex of the certificate's serial.
    #[serde(deserialize_with = "text")]
    pub serial: String,
    /// End of validity, unix seconds.
    pub not_after: u64,
}

impl Issued {
    /// Checks the reply against the join token's pin: the CA sent must be the pinned one, so a
    /// reply cannot swap the CA the agent will trust afterwards.
    pub fn check_ca(&self, pin: CaPin) -> Result<(), EnrollError> {
        if ca_pin(&self.ca.0)? == pin {
            Ok(())
        } else {
            Err(EnrollError::refused(
                super::RefusalCode::Malformed,
                "the hub's reply names a CA that does not match the join token's CA pin",
            ))
        }
    }
}

/// One DER certificate, at most [`MAX_CERT`] bytes.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBytes(#[serde(deserialize_with = "cert_bytes")] pub Vec<u8>);

impl fmt::Debug for CertBytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CertBytes({} bytes)", self.0.len())
    }
}

fn join_token<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    bounds::string(d, "join_token", JOIN_TOKEN_LEN).map(Secret::new)
}

fn secret_text<'de, D: Deserializer<'de>>(d: D) -> Result<Secret, D::Error> {
    bounds::string(d, "connect_token", MAX_TEXT).map(Secret::new)
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "text", MAX_TEXT)
}

fn csr_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounds::list(d, "csr_der", MAX_CSR)
}

fn cert_bytes<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
    bounds::list(d, "certificate", MAX_CERT)
}

fn chain<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<CertBytes>, D::Error> {
    bounds::list(d, "chain", MAX_CHAIN)
}

/// Encodes a request as one frame.
pub fn encode_request(request: &EnrollRequest) -> Result<Bytes, EnrollError> {
    Ok(codec::encode(request)?)
}

/// Decodes a request from a frame body (read with [`codec::read_body_limited`]).
pub fn decode_request(body: &[u8]) -> Result<EnrollRequest, EnrollError> {
    Ok(codec::decode_body(body)?)
}

/// Encodes a reply as one frame.
pub fn encode_reply(reply: &EnrollReply) -> Result<Bytes, EnrollError> {
    Ok(codec::encode(reply)?)
}

/// Decodes a reply from a frame body.
pub fn decode_reply(body: &[u8]) -> Result<EnrollReply, EnrollError> {
    Ok(codec::decode_body(body)?)
}

/// ALPN of the renewal exchange on the hub's own listener: an enrolled agent presents its
/// current certificate (required and checked by TLS against the CA and its validity) and
/// sends one [`RenewRequest`]; the hub answers with one [`EnrollReply`]. A protocol of its
/// own rather than a variant of [`EnrollRequest`], so each message has one meaning and the
/// enrollment messages stay as they are.
pub const RENEW_ALPN: &[u8] = b"rna-renew/1";

/// What an enrolled agent sends to renew: a CSR for a key it made, for the same agent name
/// as its current certificate. Its identity is the certificate it presented, so the request
/// carries no secret.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RenewRequest {
    /// [`ENROLL_PROTOCOL`].
    pub protocol: u16,
    /// The DER CSR, at most [`MAX_CSR`] bytes.
    #[serde(deserialize_with = "csr_bytes")]
    pub csr_der: Vec<u8>,
}

/// Encodes a renewal request as one frame.
pub fn encode_renewal(request: &RenewRequest) -> Result<Bytes, EnrollError> {
    Ok(codec::encode(request)?)
}

/// Decodes a renewal request from a frame body (read with [`codec::read_body_limited`]).
pub fn decode_renewal(body: &[u8]) -> Result<RenewRequest, EnrollError> {
    Ok(codec::decode_body(body)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Ca;
    use crate::enroll::{make_csr, RefusalCode};
    use crate::proto::codec::CodecError;

    fn token_text() -> String {
        format!(
            "rna_join_0123456789ab.{}.{}",
            "c".repeat(48),
            "d".repeat(64)
        )
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[tokio::test]
    async fn a_request_carries_the_csr_and_never_the_private_key() {
        let csr = make_csr("edge").unwrap();
        let request = EnrollRequest {
            protocol: ENROLL_PROTOCOL,
            join_token: Secret::new(token_text()),
            csr_der: csr.csr_der.clone(),
        };
        let frame = encode_request(&request).unwrap();
        let key_der = crate::certs::parse_key(csr.key_pem.expose()).unwrap();
        let key_der = key_der.secret_der();
        assert!(key_der.len() > 32);
        assert!(!contains(&frame, key_der), "the key's DER is on the wire");
        assert!(!contains(&frame, csr.key_pem.expose().as_bytes()));
        // Not even the bare private scalar (the PKCS#8 body's first 32 bytes after its
        // header differ per key; check every 16-byte window of the key).
        for window in key_der.chunks(16).filter(|c| c.len() == 16) {
            assert!(!contains(&frame, window) || contains(&csr.csr_der, window));
        }
        assert!(contains(&frame, &csr.csr_der));
        // The frame reads back through the shared codec.
        let mut reader = &frame[..];
        let body = codec::read_body_limited(&mut reader, codec::MAX_FRAME)
            .await
            .unwrap()
            .unwrap();
        let back = decode_request(&body).unwrap();
        assert_eq!(back.csr_der, csr.csr_der);
        assert_eq!(back.join_token.expose(), token_text());
        assert!(!format!("{back:?}").contains(&"c".repeat(48)));
    }

    #[test]
    fn refusal_close_codes_are_their_own_range_and_read_back() {
        let mut seen = std::collections::HashSet::new();
        for (i, code) in RefusalCode::ALL.into_iter().enumerate() {
            let close = code.close_code();
            assert_eq!(close, 0x30 + i as u32, "{code}");
            assert!(seen.insert(close));
            assert_eq!(RefusalCode::from_close_code(u64::from(close)), Some(code));
            // The wire value of a refusal is its index too.
            assert_eq!(postcard::to_stdvec(&code).unwrap(), vec![i as u8]);
        }
        assert_eq!(RefusalCode::Spent.close_code(), 0x33);
        for other in [0u64, 0x05, 0x2f, 0x39, u64::MAX] {
            assert_eq!(RefusalCode::from_close_code(other), None, "{other:#x}");
        }
    }

    #[test]
    fn replies_round_trip_and_check_their_ca() {
        let ca = Ca::generate("rna test CA").unwrap();
        let pin = ca_pin(&ca.cert_der()).unwrap();
        let issued = Issued {
            chain: vec![CertBytes(vec![1, 2, 3])],
            ca: CertBytes(ca.cert_der()),
            connect_token: Secret::new(format!("rna_0123456789ab_{}", "e".repeat(48))),
            serial: "7f".repeat(16),
            not_after: 1_800_000_000,
        };
        let frame = encode_reply(&EnrollReply::Issued(issued)).unwrap();
        let EnrollReply::Issued(back) = decode_reply(&frame[4..]).unwrap() else {
            panic!("not issued");
        };
        assert_eq!(back.chain, vec![CertBytes(vec![1, 2, 3])]);
        back.check_ca(pin).unwrap();
        let other = Ca::generate("rna test CA").unwrap();
        let err = back
            .check_ca(ca_pin(&other.cert_der()).unwrap())
            .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");

        let refused = EnrollReply::Refused {
            code: RefusalCode::Spent,
            message: "join token 0123456789ab has already been used".into(),
        };
        let frame = encode_reply(&refused).unwrap();
        match decode_reply(&frame[4..]).unwrap() {
            EnrollReply::Refused { code, message } => {
                assert_eq!(code, RefusalCode::Spent);
                assert!(message.contains("already been used"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn renewal_requests_round_trip_and_refuse_malformed_bytes() {
        let csr = make_csr("edge").unwrap();
        let request = RenewRequest {
            protocol: ENROLL_PROTOCOL,
            csr_der: csr.csr_der.clone(),
        };
        let frame = encode_renewal(&request).unwrap();
        // A CSR and nothing secret: not the key, and no join token field at all.
        let key_der = crate::certs::parse_key(csr.key_pem.expose()).unwrap();
        assert!(!contains(&frame, key_der.secret_der()));
        let back = decode_renewal(&frame[4..]).unwrap();
        assert_eq!(back.csr_der, csr.csr_der);
        assert_eq!(back.protocol, ENROLL_PROTOCOL);
        let body = &frame[4..];
        let over_csr = postcard::to_stdvec(&(1u16, vec![0u8; MAX_CSR + 1])).unwrap();
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "malformed"),
            (body[..body.len() - 1].to_vec(), "malformed"),
            ([body, &[0]].concat(), "malformed"),
            (over_csr, "csr_der"),
        ];
        for (bytes, want) in cases {
            let err = decode_renewal(&bytes).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        let err = decode_renewal(&vec![0u8; codec::MAX_FRAME + 1]).unwrap_err();
        assert!(
            matches!(err, EnrollError::Codec(CodecError::TooLarge { .. })),
            "{err}"
        );
    }

    #[test]
    fn malformed_and_oversized_messages_are_refused() {
        let good = encode_request(&EnrollRequest {
            protocol: ENROLL_PROTOCOL,
            join_token: Secret::new(token_text()),
            csr_der: vec![7; 100],
        })
        .unwrap();
        let body = &good[4..];
        let over_csr = postcard::to_stdvec(&(1u16, token_text(), vec![0u8; MAX_CSR + 1])).unwrap();
        let long_token =
            postcard::to_stdvec(&(1u16, "a".repeat(JOIN_TOKEN_LEN + 1), vec![0u8])).unwrap();
        let long_chain = postcard::to_stdvec(&(
            0u32,
            vec![vec![0u8]; MAX_CHAIN + 1],
            vec![0u8],
            "t",
            "s",
            1u64,
        ))
        .unwrap();
        let big_cert = postcard::to_stdvec(&(
            0u32,
            vec![vec![0u8; MAX_CERT + 1]],
            vec![0u8],
            "t",
            "s",
            1u64,
        ))
        .unwrap();
        let long_message = postcard::to_stdvec(&(1u32, 0u32, "m".repeat(MAX_TEXT + 1))).unwrap();
        let bad_code = postcard::to_stdvec(&(1u32, 99u32, "m")).unwrap();
        let request_cases: Vec<(Vec<u8>, &str)> = vec![
            (Vec::new(), "malformed"),
            (body[..body.len() - 1].to_vec(), "malformed"),
            ([body, &[0]].concat(), "malformed"),
            (over_csr, "csr_der"),
            (long_token, "join_token"),
            (vec![0xff; 10], "malformed"),
        ];
        for (bytes, want) in request_cases {
            let err = decode_request(&bytes).unwrap_err();
            assert!(matches!(err, EnrollError::Codec(_)), "{err}");
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        let reply_cases: Vec<(Vec<u8>, &str)> = vec![
            (long_chain, "chain"),
            (big_cert, "certificate"),
            (long_message, "text"),
            (bad_code, "malformed"),
            (vec![2], "malformed"),
        ];
        for (bytes, want) in reply_cases {
            let err = decode_reply(&bytes).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
        // Over the frame cap: refused before decoding.
        let err = decode_request(&vec![0u8; codec::MAX_FRAME + 1]).unwrap_err();
        assert!(
            matches!(err, EnrollError::Codec(CodecError::TooLarge { .. })),
            "{err}"
        );
    }
}
