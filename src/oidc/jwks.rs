//! JWK Set documents (RFC 7517 §5) and the public keys in them, and signature verification
//! with `ring`. A key is bound to the algorithms its type allows: an RSA key only verifies
//! RS256/PS256, a P-256 key only ES256, an Ed25519 key only EdDSA, so a token cannot choose
//! how its key is interpreted (key confusion).

use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::Value;

use super::jwt::{b64, Alg, VerifyError};

/// The largest JWK Set document read, in bytes: issuers publish a few keys of ~1 KiB each.
pub const MAX_JWKS_LEN: usize = 256 * 1024;
/// The most keys kept from one document; a longer set is cut, not refused, so one odd key
/// publishing mistake does not take an issuer down.
pub const MAX_KEYS: usize = 64;

/// Why a JWK Set document was refused as a whole. Single unusable keys are skipped instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwksError {
    /// The document is larger than [`MAX_JWKS_LEN`].
    #[error("JWK set is larger than {MAX_JWKS_LEN} bytes")]
    TooLarge,
    /// The document is not a JSON object with a `keys` array.
    #[error("JWK set is not a JSON object with a keys array")]
    Malformed,
}

/// The material of one public key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublicKey {
    /// `kty: RSA`: big-endian modulus and exponent.
    Rsa {
        /// Modulus `n`.
        n: Vec<u8>,
        /// Public exponent `e`.
        e: Vec<u8>,
    },
    /// `kty: EC, crv: P-256`: the uncompressed point `0x04 || x || y`.
    P256(Vec<u8>),
    /// `kty: OKP, crv: Ed25519`: the 32-byte public key.
    Ed25519(Vec<u8>),
}

/// One usable key of a set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    /// The key id tokens select it by.
    pub kid: Option<String>,
    /// The `alg` the key is published for, if the issuer says; a token must then use it.
    pub alg: Option<Alg>,
    /// The key material.
    pub key: PublicKey,
}

impl Key {
    /// Whether this key may verify `alg`: the key type decides, and a published `alg` must
    /// match exactly.
    pub fn allows(&self, alg: Alg) -> bool {
        let type_fits = matches!(
            (&self.key, alg),
            (PublicKey::Rsa { .. }, Alg::RS256 | Alg::PS256)
                | (PublicKey::P256(_), Alg::ES256)
                | (PublicKey::Ed25519(_), Alg::EdDSA)
        );
        type_fits && self.alg.is_none_or(|a| a == alg)
    }

    /// Verifies `signature` over `message` with this key under `alg`.
    pub fn verify(&self, alg: Alg, message: &[u8], sig: &[u8]) -> bool {
        if !self.allows(alg) {
            return false;
        }
        match (&self.key, alg) {
            (PublicKey::Rsa { n, e }, Alg::RS256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PKCS1_2048_8192_SHA256, message, sig)
                .is_ok(),
            (PublicKey::Rsa { n, e }, Alg::PS256) => RsaPublicKeyComponents { n, e }
                .verify(&signature::RSA_PSS_2048_8192_SHA256, message, sig)
                .is_ok(),
            (PublicKey::P256(point), Alg::ES256) => {
                UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(message, sig)
                    .is_ok()
            }
            (PublicKey::Ed25519(x), Alg::EdDSA) => UnparsedPublicKey::new(&signature::ED25519, x)
                .verify(message, sig)
                .is_ok(),
            _ => false,
        }
    }
}

/// The usable keys of one issuer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeySet {
    /// Keys in document order.
    pub keys: Vec<Key>,
}

impl KeySet {
    /// Parses a JWK Set document. Keys rna cannot use are skipped: symmetric (`oct`) keys,
    /// other curves, encryption keys (`use: enc`), private keys, unknown `alg`, bad base64.
    pub fn parse(bytes: &[u8]) -> Result<KeySet, JwksError> {
        if bytes.len() > MAX_JWKS_LEN {
            return Err(JwksError::TooLarge);
        }
        let Ok(Value::Object(doc)) = serde_json::from_slice::<Value>(bytes) else {
            return Err(JwksError::Malformed);
        };
        let Some(Value::Array(items)) = doc.get("keys") else {
            return Err(JwksError::Malformed);
        };
        let keys = items.iter().filter_map(parse_key).take(MAX_KEYS).collect();
        Ok(KeySet { keys })
    }

    /// The keys that may verify `alg` under `kid`. A token without `kid` may use any key of
    /// the right type (issuers with one key often omit it).
    pub fn candidates<'a>(
        &'a self,
        kid: Option<&'a str>,
        alg: Alg,
    ) -> impl Iterator<Item = &'a Key> + 'a {
        self.keys
            .iter()
            .filter(move |k| kid.is_none_or(|kid| k.kid.as_deref() == Some(kid)) && k.allows(alg))
    }

    /// Whether any key has `kid`.
    pub fn has_kid(&self, kid: &str) -> bool {
        self.keys.iter().any(|k| k.kid.as_deref() == Some(kid))
    }
}

/// One JWK, or `None` when rna cannot or must not use it.
fn parse_key(v: &Value) -> Option<Key> {
    let o = v.as_object()?;
    let s = |name: &str| o.get(name).and_then(Value::as_str);
    let bytes = |name: &str| s(name).and_then(|t| b64(t, "").ok());
    if s("use").is_some_and(|u| u != "sig") || o.contains_key("d") {
        return None;
    }
    let alg = match s("alg") {
        None => None,
        Some(a) => Some(a.parse::<Alg>().ok()?),
    };
    let key = match (s("kty")?, s("crv")) {
        ("RSA", _) => PublicKey::Rsa {
            n: bytes("n")?,
            e: bytes("e")?,
        },
        ("EC", Some("P-256")) => {
            let (x, y) = (bytes("x")?, bytes("y")?);
            if x.len() != 32 || y.len() != 32 {
                return None;
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            PublicKey::P256(point)
        }
        ("OKP", Some("Ed25519")) => {
            let x = bytes("x")?;
            if x.len() != 32 {
                return None;
            }
            PublicKey::Ed25519(x)
        }
        _ => return None,
    };
    let kid = s("kid").map(str::to_owned);
    Some(Key { kid, alg, key })
}

/// Verifies a parsed token's signature against `keys`: some candidate key must verify it.
pub fn verify_signature(
    keys: &KeySet,
    alg: Alg,
    kid: Option<&str>,
    message: &[u8],
    sig: &[u8],
    issuer: &str,
) -> Result<(), VerifyError> {
    if keys
        .candidates(kid, alg)
        .any(|k| k.verify(alg, message, sig))
    {
        Ok(())
    } else {
        Err(VerifyError::BadSignature(issuer.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine as _;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair};

    fn enc(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    /// An ES256 key pair and its JWK.
    fn p256() -> (EcdsaKeyPair, String) {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
            .unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            pkcs8.as_ref(),
            &rng,
        )
        .unwrap();
        let point = pair.public_key().as_ref();
        let jwk = format!(
            r#"{{"kty":"EC","crv":"P-256","kid":"ec1","x":"{}","y":"{}"}}"#,
            enc(&point[1..33]),
            enc(&point[33..])
        );
        (pair, jwk)
    }

    #[test]
    fn es256_and_eddsa_verify_and_refuse_other_algs() {
        let rng = SystemRandom::new();
        let (ec, ec_jwk) = p256();
        let ed_pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(ed_pkcs8.as_ref()).unwrap();
        let ed_jwk = format!(
            r#"{{"kty":"OKP","crv":"Ed25519","kid":"ed1","x":"{}"}}"#,
            enc(ed.public_key().as_ref())
        );
        let doc = format!(r#"{{"keys":[{ec_jwk},{ed_jwk}]}}"#);
        let set = KeySet::parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 2);
        let msg = b"header.payload";
        let ec_sig = ec.sign(&rng, msg).unwrap();
        let ed_sig = ed.sign(msg);
        let ok = |alg, kid, sig: &[u8]| verify_signature(&set, alg, kid, msg, sig, "i").is_ok();
        assert!(ok(Alg::ES256, Some("ec1"), ec_sig.as_ref()));
        assert!(ok(Alg::ES256, None, ec_sig.as_ref()));
        assert!(ok(Alg::EdDSA, Some("ed1"), ed_sig.as_ref()));
        // The right signature under another kid, alg or message fails.
        assert!(!ok(Alg::ES256, Some("ed1"), ec_sig.as_ref()));
        assert!(!ok(Alg::EdDSA, Some("ec1"), ed_sig.as_ref()));
        assert!(!ok(Alg::RS256, Some("ec1"), ec_sig.as_ref()));
        assert!(verify_signature(&set, Alg::ES256, None, b"other", ec_sig.as_ref(), "i").is_err());
    }

    #[test]
    fn key_type_and_published_alg_bind_the_algorithm() {
        let rsa = Key {
            kid: None,
            alg: None,
            key: PublicKey::Rsa {
                n: vec![1],
                e: vec![1],
            },
        };
        assert!(rsa.allows(Alg::RS256) && rsa.allows(Alg::PS256));
        assert!(!rsa.allows(Alg::ES256) && !rsa.allows(Alg::EdDSA));
        let pinned = Key {
            alg: Some(Alg::PS256),
            ..rsa
        };
        assert!(!pinned.allows(Alg::RS256) && pinned.allows(Alg::PS256));
        let ec = Key {
            kid: None,
            alg: None,
            key: PublicKey::P256(vec![4; 65]),
        };
        assert!(ec.allows(Alg::ES256) && !ec.allows(Alg::RS256) && !ec.allows(Alg::EdDSA));
    }

    #[test]
    fn unusable_keys_are_skipped_and_bad_documents_refused() {
        let (_, ec) = p256();
        let skipped = [
            r#"{"kty":"oct","k":"c2VjcmV0","kid":"h"}"#.to_string(),
            r#"{"kty":"EC","crv":"P-384","x":"AA","y":"AA"}"#.to_string(),
            r#"{"kty":"EC","crv":"P-256","x":"AA","y":"AA"}"#.to_string(),
            r#"{"kty":"OKP","crv":"X25519","x":"AA"}"#.to_string(),
            r#"{"kty":"RSA","n":"*","e":"AQAB"}"#.to_string(),
            r#"{"kty":"RSA","e":"AQAB"}"#.to_string(),
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","use":"enc"}"#.to_string(),
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","alg":"HS256"}"#.to_string(),
            r#"{"kty":"RSA","n":"AQAB","e":"AQAB","d":"AQAB"}"#.to_string(),
            r#""string""#.to_string(),
            r#"{}"#.to_string(),
        ];
        let doc = format!(r#"{{"keys":[{},{ec}]}}"#, skipped.join(","));
        let set = KeySet::parse(doc.as_bytes()).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert!(set.has_kid("ec1") && !set.has_kid("h"));
        for bad in [&b"[]"[..], b"{}", br#"{"keys":{}}"#, b"\xff", b""] {
            assert_eq!(KeySet::parse(bad), Err(JwksError::Malformed));
        }
        let big = vec![b' '; MAX_JWKS_LEN + 1];
        assert_eq!(KeySet::parse(&big), Err(JwksError::TooLarge));
        let many = format!(r#"{{"keys":[{}]}}"#, vec![ec; MAX_KEYS + 5].join(","));
        assert_eq!(KeySet::parse(many.as_bytes()).unwrap().keys.len(), MAX_KEYS);
    }
}
