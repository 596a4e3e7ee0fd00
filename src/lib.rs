//! rna: an agent and a hub that carry SOCKS5 connections over one outbound QUIC connection.
//!
//! Data flows one way through the modules: [`proto`] (wire types, no sockets) ←
//! [`transport`] (quinn and rustls) ← [`hub`] and [`agent`]; `main.rs` reads flags, signals
//! and exit codes. Hub and agent never import each other; what both need sits below them
//! (for example [`listen`]: accept loops that back off, HTTP serving with deadlines and caps).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod agent;
pub mod auth;
pub mod certs;
pub mod client;
pub mod config;
pub mod dev;
pub mod duration;
pub mod fsutil;
pub mod hub;
pub mod listen;
pub mod notify;
pub mod proto;
pub mod runtime;
pub mod transport;
