//! HTTP proxy egress for the agent (CONNECT).
