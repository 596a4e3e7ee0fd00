//! rna: an agent and a hub that carry SOCKS5 connections over one outbound QUIC connection.
//!
//! Data flows one way through the modules: [`proto`] (wire types, no sockets) ←
//! [`transport`] (quinn and rustls) ← [`hub`] and [`agent`]; the binary (`main.rs` and
//! `src/cli/`) reads flags, signals and exit codes. Hub and agent never import each other; what both need sits below them
//! (for example [`listen`]: accept loops that back off, HTTP serving with deadlines and caps;
//! [`identity`]: agent names, tenants and the masked token secret; [`metrics`]: the registry
//! both roles export).
//!
//! # Layers
//!
//! Every module sits in one layer, lowest first. A module imports only from layers below its
//! own: never from a layer above, never from another module of its own layer (that is how
//! hub and agent stay apart). `tests/layers.rs` reads this list and fails on any other edge;
//! a new module is added here first. docs/architecture.md draws the same picture.
//!
//! 1. `fsutil`, `runtime`, `notify`, `listen`, `identity`, `clock`, `metrics`, `duration`: leaves that
//!    know nothing of hub or agent
//! 2. `proto`, `auth`, `certs`: wire messages, tokens and their store, certificates
//! 3. `transport`, `enroll`, `oidc`, `state`: QUIC and TLS endpoints, the control stream, the
//!    relay; join tokens, CSRs, the CA pin and the certificate lifecycle of agent enrollment;
//!    JWTs from trusted OIDC issuers and the client-credentials flow; where the hub's shared
//!    state lives (files or a Kubernetes Secret)
//! 4. `hub`, `agent`: the two roles
//! 5. `config`, `admin_client`, `dev`: configuration that builds hub and agent settings, the
//!    admin API client, `rna dev` (its state folder and the hub and agent it runs)
//!
//! The binary, `main.rs` with its modules in `src/cli/` (one per subcommand), sits above all
//! of them.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod admin_client;
pub mod agent;
pub mod auth;
pub mod certs;
pub mod clock;
pub mod config;
pub mod dev;
pub mod duration;
pub mod enroll;
pub mod fsutil;
pub mod hub;
pub mod identity;
pub mod listen;
pub mod metrics;
pub mod notify;
pub mod oidc;
pub mod proto;
pub mod runtime;
pub mod state;
pub mod transport;
