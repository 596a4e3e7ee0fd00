//! rna: an agent and a hub that carry SOCKS5 connections over one outbound QUIC connection.
#![forbid(unsafe_code)]
