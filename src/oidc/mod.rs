//! OIDC identities: JWT access tokens from an organisation's own issuer, checked against that
//! issuer's published keys, and the client-credentials flow an agent uses to obtain them.
//!
//! Signatures are verified with `ring` directly (docs/decisions.md: no `rsa` crate, no second
//! crypto library). The parts, lowest first:
//! - [`jwt`]: the compact JWS text, its header and claims, the algorithm allowlist;
//! - [`jwks`]: JWK Set documents and the public keys in them;
//! - [`fetch`]: a small https client with a body cap and a deadline;
//! - [`keys`]: the per-issuer key cache (refresh on unknown `kid`, rate-limited, and periodic);
//! - [`issuer`]: trusted-issuer settings and the [`issuer::Verifier`] that maps a token to a
//!   [`crate::auth::Grant`];
//! - [`client`]: OAuth 2.0 client credentials (RFC 6749 §4.4) and the token refresher.
//!
//! Layer: above `auth` and `identity`, beside `transport`; hub and agent wire it in.

pub mod client;
pub mod fetch;
pub mod issuer;
pub mod jwks;
pub mod jwt;
pub mod keys;

pub use client::{
    ClientCredentials, ClientError, CurrentToken, TokenAuth, TokenEndpoint, TokenResponse,
};
pub use fetch::FetchError;
pub use issuer::{
    IssuerConfig, IssuerConfigError, KeySource, OidcGrant, Reloaded, ScopeClaim, Tuning, Verifier,
};
pub use jwt::{Alg, VerifyError};
