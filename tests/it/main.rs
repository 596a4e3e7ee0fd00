//! The integration tests, in one binary so that the helpers in `common` and the fake
//! Kubernetes API in `fake_kube` are compiled and linked once. Each module is what used to
//! be one test file; run one with `cargo test --test it MODULE::`.
//!
//! Three tests keep binaries of their own: `tests/handshake_log.rs`, `tests/secrets.rs` and
//! `tests/cert_expiry_log.rs` each install the process-wide log subscriber (at their own
//! level) and judge every line it captures, which the tests of other modules, running in the
//! same process, would add to.

mod common;
mod fake_kube;

mod api_authz;
mod api_limits;
mod bind_address;
mod caps;
mod config;
mod dev;
mod early_reply;
mod enroll;
mod enroll_flow;
mod fallback;
mod fast_path;
mod faults;
mod files;
mod handshake;
mod kube;
mod kube_access;
mod layers;
mod loss_recovery;
mod metrics;
mod netns;
mod oidc;
mod oidc_flow;
mod oidc_refusals;
mod pace;
mod pages;
mod process;
mod proxy;
mod quic_flood;
mod readme;
mod replicas;
mod resumption;
mod rogue;
mod rogue_process;
mod security;
mod ship;
mod signals;
mod socks_input;
mod socks_logs;
mod status_page;
mod storm;
mod stream_window;
mod systemd;
mod transport_session;
mod tunnel;
