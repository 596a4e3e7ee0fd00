//! The compact JWS serialization (RFC 7515 §7.1) of a JWT: splitting, base64url decoding,
//! the header, the claims, and the algorithm allowlist. Pure: no keys are fetched here.

use std::fmt;
use std::str::FromStr;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use crate::auth::Scope;

/// The longest token accepted, in bytes. Real access tokens are 1-2 KiB; the cap bounds the
/// work a stranger can cause before any signature is checked.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWT was refused. Each variant has its own message so one log line says which check
/// failed; no message ever contains the token text (only the issuer, which is public, and
/// short, escaped excerpts of untrusted header fields).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The text is not a well-formed JWS/JWT (what is wrong is a fixed phrase).
    #[error("JWT is malformed: {0}")]
    Malformed(&'static str),
    /// The header names an algorithm outside the allowlist (`none`, any HMAC, or one the
    /// issuer does not accept).
    #[error("JWT algorithm {0:?} is refused")]
    AlgRefused(String),
    /// The `iss` claim names no trusted issuer.
    #[error("JWT issuer {0:?} is not trusted")]
    UnknownIssuer(String),
    /// No key of the issuer has the header's `kid` (also after a refresh, when one was allowed).
    #[error("JWT key id {kid:?} is not among the keys of issuer {issuer}")]
    UnknownKid {
        /// The trusted issuer's URL.
        issuer: String,
        /// The key id from the header (escaped when shown).
        kid: String,
    },
    /// The issuer's keys could not be fetched yet, so nothing can be checked.
    #[error("keys of issuer {0} are not available")]
    KeysUnavailable(String),
    /// The signature does not verify with the issuer's key for this algorithm.
    #[error("JWT signature does not verify with the keys of issuer {0}")]
    BadSignature(String),
    /// `exp` plus the leeway has passed.
    #[error("JWT from issuer {0} has expired")]
    Expired(String),
    /// `nbf` (or `iat`) minus the leeway is still in the future.
    #[error("JWT from issuer {0} is not valid yet")]
    NotYetValid(String),
    /// No accepted audience is in `aud`.
    #[error("JWT audience is not accepted by issuer {0}")]
    WrongAudience(String),
    /// A claim the issuer requires is missing or has another value.
    #[error("JWT from issuer {issuer} lacks required claim {claim:?}")]
    MissingClaim {
        /// The trusted issuer's URL.
        issuer: String,
        /// The claim's name.
        claim: String,
    },
    /// The tenant claim is missing or not an `organization/environment` pair.
    #[error("JWT from issuer {0} carries no valid tenant")]
    BadTenant(String),
    /// The token is valid but lacks the scope the operation needs.
    #[error("JWT lacks scope {0}")]
    MissingScope(Scope),
}

/// A signature algorithm rna accepts (RFC 7518 §3.1 names; EdDSA from RFC 8037 §3.1).
/// `none` and the HMAC family are not representable: a public key used as an HMAC secret is
/// the classic key-confusion attack, and rna never holds an issuer's symmetric secret.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Alg {
    /// RSASSA-PKCS1-v1_5 with SHA-256; keys of 2048 to 8192 bits.
    RS256,
    /// RSASSA-PSS with SHA-256 and MGF1 with SHA-256; keys of 2048 to 8192 bits.
    PS256,
    /// ECDSA with P-256 and SHA-256, the signature as the fixed 64-byte `r || s`.
    ES256,
    /// Ed25519.
    EdDSA,
}

impl Alg {
    /// Every accepted algorithm, the default allowlist of an issuer.
    pub const ALL: [Alg; 4] = [Alg::RS256, Alg::PS256, Alg::ES256, Alg::EdDSA];

    /// The header name of the algorithm.
    pub fn as_str(self) -> &'static str {
        match self {
            Alg::RS256 => "RS256",
            Alg::PS256 => "PS256",
            Alg::ES256 => "ES256",
            Alg::EdDSA => "EdDSA",
        }
    }
}

impl fmt::Display for Alg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Alg {
    type Err = VerifyError;

    /// Exact, case-sensitive names only (RFC 7515 §4.1.1): `none`, `HS256` and anything
    /// unlisted are refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Alg::ALL
            .into_iter()
            .find(|alg| alg.as_str() == s)
            .ok_or_else(|| VerifyError::AlgRefused(excerpt(s)))
    }
}

/// At most 64 characters of untrusted text, for error messages.
pub(crate) fn excerpt(s: &str) -> String {
    s.chars().take(64).collect()
}

/// The JOSE header fields rna reads. Unknown fields are ignored (RFC 7515 §4), except that
/// `crit` is refused: rna understands no extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// The algorithm, already checked against the global allowlist.
    pub alg: Alg,
    /// The key id, which selects the issuer's key.
    pub kid: Option<String>,
}

/// The claims of a token, as JSON, with typed accessors for the registered ones.
#[derive(Debug, Clone, PartialEq)]
pub struct Claims(pub Map<String, Value>);

impl Claims {
    /// A string claim.
    pub fn str(&self, name: &str) -> Option<&str> {
        self.0.get(name).and_then(Value::as_str)
    }

    /// A NumericDate claim (RFC 7519 §2) in whole seconds; a non-number is malformed.
    pub fn time(&self, name: &'static str) -> Result<Option<i64>, VerifyError> {
        match self.0.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_i64()
                .or_else(|| v.as_f64().filter(|f| f.is_finite()).map(|f| f as i64))
                .map(Some)
                .ok_or(VerifyError::Malformed("a time claim is not a number")),
        }
    }

    /// The `aud` claim: one string or an array of strings (RFC 7519 §4.1.3).
    pub fn audiences(&self) -> Result<Vec<&str>, VerifyError> {
        match self.0.get("aud") {
            None => Ok(Vec::new()),
            Some(Value::String(s)) => Ok(vec![s.as_str()]),
            Some(Value::Array(items)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or(VerifyError::Malformed("aud is not a string"))
                })
                .collect(),
            Some(_) => Err(VerifyError::Malformed("aud is not a string or an array")),
        }
    }
}

/// A token split into its parts, not yet verified.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The decoded header.
    pub header: Header,
    /// The decoded claims (untrusted until the signature verifies).
    pub claims: Claims,
    /// `base64url(header) . base64url(payload)`, the bytes the signature covers.
    pub signing_input: Vec<u8>,
    /// The decoded signature.
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS. Refuses `none`/HMAC before looking at the claims.
pub fn parse(token: &str) -> Result<Parsed, VerifyError> {
    if token.len() > MAX_TOKEN_LEN {
        return Err(VerifyError::Malformed("token is too long"));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(VerifyError::Malformed("not three dot-separated parts"));
    };
    let header = parse_header(&b64(h, "header is not base64url")?)?;
    let claims = parse_claims(&b64(p, "payload is not base64url")?)?;
    let signature = b64(s, "signature is not base64url")?;
    if signature.is_empty() {
        return Err(VerifyError::Malformed("signature is empty"));
    }
    let signing_input = token.as_bytes()[..h.len() + 1 + p.len()].to_vec();
    Ok(Parsed {
        header,
        claims,
        signing_input,
        signature,
    })
}

/// Decodes unpadded base64url (RFC 7515 §2); padding and other alphabets are malformed.
pub(crate) fn b64(s: &str, what: &'static str) -> Result<Vec<u8>, VerifyError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| VerifyError::Malformed(what))
}

/// Parses a JOSE header: a JSON object with a string `alg` from the allowlist.
pub fn parse_header(bytes: &[u8]) -> Result<Header, VerifyError> {
    let Ok(Value::Object(map)) = serde_json::from_slice::<Value>(bytes) else {
        return Err(VerifyError::Malformed("header is not a JSON object"));
    };
    if map.contains_key("crit") {
        return Err(VerifyError::Malformed("header has critical extensions"));
    }
    let alg = match map.get("alg") {
        Some(Value::String(alg)) => alg.parse::<Alg>()?,
        Some(_) => return Err(VerifyError::Malformed("alg is not a string")),
        None => return Err(VerifyError::Malformed("header has no alg")),
    };
    let kid = match map.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.clone()),
        Some(_) => return Err(VerifyError::Malformed("kid is not a string")),
    };
    Ok(Header { alg, kid })
}

/// Parses the claims: a JSON object.
pub fn parse_claims(bytes: &[u8]) -> Result<Claims, VerifyError> {
    match serde_json::from_slice::<Value>(bytes) {
        Ok(Value::Object(map)) => Ok(Claims(map)),
        _ => Err(VerifyError::Malformed("claims are not a JSON object")),
    }
}

/// The rna scopes a token carries: from `scope` (RFC 8693 §4.2, a space-separated string)
/// or `scp` (an array, as Okta and Azure write it), whichever `claim` names. Scopes rna
/// does not know (`openid`, an issuer's own) are ignored; a claim of the wrong JSON type is
/// malformed.
pub fn scopes(claims: &Claims, claim: &str) -> Result<Vec<Scope>, VerifyError> {
    let names: Vec<&str> = match claims.0.get(claim) {
        None => Vec::new(),
        Some(Value::String(s)) => s.split(' ').filter(|s| !s.is_empty()).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or(VerifyError::Malformed("a scope is not a string"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => {
            return Err(VerifyError::Malformed(
                "scope claim is not a string or array",
            ))
        }
    };
    let mut scopes: Vec<Scope> = names.into_iter().filter_map(|n| n.parse().ok()).collect();
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc(v: &str) -> String {
        URL_SAFE_NO_PAD.encode(v)
    }

    fn token(header: &str, claims: &str) -> String {
        format!("{}.{}.{}", enc(header), enc(claims), enc("sig"))
    }

    #[test]
    fn alg_allowlist_table() {
        let table: &[(&str, Option<Alg>)] = &[
            ("RS256", Some(Alg::RS256)),
            ("PS256", Some(Alg::PS256)),
            ("ES256", Some(Alg::ES256)),
            ("EdDSA", Some(Alg::EdDSA)),
            ("none", None),
            ("None", None),
            ("NONE", None),
            ("HS256", None),
            ("HS384", None),
            ("HS512", None),
            ("rs256", None),
            ("ES384", None),
            ("", None),
        ];
        for (name, want) in table {
            let got = name.parse::<Alg>();
            match want {
                Some(alg) => assert_eq!(got, Ok(*alg), "{name}"),
                None => assert_eq!(
                    got,
                    Err(VerifyError::AlgRefused(name.to_string())),
                    "{name}"
                ),
            }
        }
    }

    #[test]
    fn parse_accepts_a_well_formed_token() {
        let t = token(
            r#"{"alg":"ES256","kid":"k1","typ":"JWT"}"#,
            r#"{"iss":"x"}"#,
        );
        let p = parse(&t).unwrap();
        assert_eq!(p.header.alg, Alg::ES256);
        assert_eq!(p.header.kid.as_deref(), Some("k1"));
        assert_eq!(p.claims.str("iss"), Some("x"));
        assert_eq!(p.signature, b"sig");
        let dot = t.rfind('.').unwrap();
        assert_eq!(p.signing_input, t.as_bytes()[..dot]);
    }

    #[test]
    fn parse_refuses_malformed_input() {
        let good_h = enc(r#"{"alg":"RS256"}"#);
        let good_c = enc("{}");
        let table: Vec<(String, VerifyError)> = vec![
            (
                "".into(),
                VerifyError::Malformed("not three dot-separated parts"),
            ),
            (
                "a.b".into(),
                VerifyError::Malformed("not three dot-separated parts"),
            ),
            (
                "a.b.c.d".into(),
                VerifyError::Malformed("not three dot-separated parts"),
            ),
            (
                format!("{good_h}.{good_c}."),
                VerifyError::Malformed("signature is empty"),
            ),
            (
                format!("*.{good_c}.AA"),
                VerifyError::Malformed("header is not base64url"),
            ),
            (
                format!("{good_h}=.{good_c}.AA"),
                VerifyError::Malformed("header is not base64url"),
            ),
            (
                format!("{good_h}.{}.AA", enc("[]")),
                VerifyError::Malformed("claims are not a JSON object"),
            ),
            (
                format!("{}.{good_c}.AA", enc("[1]")),
                VerifyError::Malformed("header is not a JSON object"),
            ),
            (
                format!("{}.{good_c}.AA", enc("{}")),
                VerifyError::Malformed("header has no alg"),
            ),
            (
                format!("{}.{good_c}.AA", enc(r#"{"alg":1}"#)),
                VerifyError::Malformed("alg is not a string"),
            ),
            (
                format!("{}.{good_c}.AA", enc(r#"{"alg":"RS256","kid":1}"#)),
                VerifyError::Malformed("kid is not a string"),
            ),
            (
                format!("{}.{good_c}.AA", enc(r#"{"alg":"RS256","crit":["b64"]}"#)),
                VerifyError::Malformed("header has critical extensions"),
            ),
            (
                format!("{}.{good_c}.AA", enc(r#"{"alg":"none"}"#)),
                VerifyError::AlgRefused("none".into()),
            ),
            (
                format!("{}.{good_c}.AA", enc(r#"{"alg":"HS256"}"#)),
                VerifyError::AlgRefused("HS256".into()),
            ),
            (
                "a".repeat(MAX_TOKEN_LEN + 1),
                VerifyError::Malformed("token is too long"),
            ),
        ];
        for (text, want) in table {
            assert_eq!(parse(&text).unwrap_err(), want, "{:.60}", text);
        }
    }

    #[test]
    fn audiences_and_times() {
        let c = parse_claims(br#"{"aud":"a","exp":10,"nbf":1.5,"iat":"x"}"#).unwrap();
        assert_eq!(c.audiences().unwrap(), vec!["a"]);
        assert_eq!(c.time("exp").unwrap(), Some(10));
        assert_eq!(c.time("nbf").unwrap(), Some(1));
        assert!(c.time("iat").is_err());
        assert_eq!(c.time("missing").unwrap(), None);
        let c = parse_claims(br#"{"aud":["a","b"]}"#).unwrap();
        assert_eq!(c.audiences().unwrap(), vec!["a", "b"]);
        let c = parse_claims(br#"{"aud":[1]}"#).unwrap();
        assert!(c.audiences().is_err());
        let c = parse_claims(br#"{"aud":{}}"#).unwrap();
        assert!(c.audiences().is_err());
    }

    #[test]
    fn scopes_from_string_or_array() {
        let c = parse_claims(
            br#"{"scope":"openid connect:agentHub  proxy connect:agentHub","scp":["read:infra:data","x"],"bad":3}"#,
        )
        .unwrap();
        assert_eq!(
            scopes(&c, "scope").unwrap(),
            vec![Scope::ConnectAgentHub, Scope::Proxy]
        );
        assert_eq!(scopes(&c, "scp").unwrap(), vec![Scope::ReadInfraData]);
        assert_eq!(scopes(&c, "none").unwrap(), vec![]);
        assert!(scopes(&c, "bad").is_err());
    }
}
