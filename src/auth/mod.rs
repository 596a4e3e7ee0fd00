//! Machine credentials: tokens that carry a tenant, scopes and an expiry, stored hashed and
//! compared in constant time.
//!
//! A token is `rna_<id>_<secret>`: the 12-hex-digit id is public (it names the token in
//! `token list` and in logs), the 48-hex-digit secret is shown once at creation. The store
//! file keeps only the SHA-256 of the whole token text, so reading the file does not reveal
//! a usable token.

mod mask;
mod reload;
mod store;
mod time;
mod token;

pub use mask::{mask_tokens, Masked};
pub use reload::{ReloadingStore, StoreWatch};
pub use store::{load_secret_file, read_secret_file, StoreError, TokenRecord, TokenStore};
pub use time::{parse_ttl, unix_now};
// Token listings print expiry instants; the formatting itself is a leaf helper.
pub use crate::clock::format_rfc3339;
pub(crate) use token::{hex, is_lower_hex};
pub use token::{token_id, AuthError, Grant, ParseScopeError, Scope};
// The identity rules live in a leaf below `proto`; tokens speak of them all the time, so
// they are named here too.
pub use crate::identity::{ParseTenantError, Secret, Tenant};
