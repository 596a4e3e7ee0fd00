//! JWT and JWKS parsing on arbitrary bytes: the compact JWS splitter with its header and
//! claims decoders, the scope and audience readers, JWK Set documents (every parsed key tried
//! against every algorithm, so `ring` sees arbitrary RSA moduli and curve points), and token
//! endpoint answers. None may panic; a parsed header never names `none` or an HMAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use rna::oidc::client::parse_response;
use rna::oidc::jwks::{verify_signature, KeySet};
use rna::oidc::jwt::{self, Alg};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    match mode % 3 {
        0 => {
            let Ok(text) = std::str::from_utf8(rest) else {
                return;
            };
            if let Ok(parsed) = jwt::parse(text) {
                assert!(Alg::ALL.contains(&parsed.header.alg));
                let _ = jwt::scopes(&parsed.claims, "scope");
                let _ = jwt::scopes(&parsed.claims, "scp");
                let _ = parsed.claims.audiences();
                for claim in ["exp", "nbf", "iat"] {
                    let _ = parsed.claims.time(claim);
                }
                // A token of arbitrary bytes never verifies against an empty key set.
                let none = KeySet::default();
                assert!(verify_signature(
                    &none,
                    parsed.header.alg,
                    parsed.header.kid.as_deref(),
                    &parsed.signing_input,
                    &parsed.signature,
                    "fuzz"
                )
                .is_err());
            }
        }
        1 => {
            if let Ok(set) = KeySet::parse(rest) {
                for key in &set.keys {
                    for alg in Alg::ALL {
                        let _ = key.verify(alg, b"header.payload", rest);
                    }
                }
                let _ = set.has_kid("k");
            }
        }
        _ => {
            let _ = parse_response("https://issuer.example/token", rest);
        }
    }
});
