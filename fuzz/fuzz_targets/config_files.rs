//! The hub and agent configuration file parsers on arbitrary text: errors, never panics.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use rna::config::{parse_agent_file, parse_hub_file};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_hub_file(text, Path::new("/etc/rna/hub.toml"));
    let _ = parse_agent_file(text, Path::new("/etc/rna/agent.toml"));
});
