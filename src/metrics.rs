//! The Prometheus registry both roles start from, and its exposition text. A leaf below hub
//! and agent, so each exports the same `rna_build_info` and serves the same format without
//! importing the other.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// The `Content-Type` of the exposition text [`render`] writes (OpenMetrics 1.0).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// An `rna_`-prefixed registry holding `rna_build_info{version, role}` = 1; the hub and the
/// agent both start from it.
pub fn registry_with_build_info(role: &str) -> Registry {
    let mut registry = Registry::with_prefix("rna");
    let build_info = Family::<Vec<(&'static str, String)>, Gauge>::default();
    build_info
        .get_or_create(&vec![
            ("version", env!("CARGO_PKG_VERSION").to_string()),
            ("role", role.to_string()),
        ])
        .set(1);
    registry.register("build_info", "Build of this process", build_info);
    registry
}

/// The exposition text of `registry`, as served at `/metrics`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, registry);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn build_info_names_version_and_role() {
        for role in ["hub", "agent"] {
            let text = render(&registry_with_build_info(role));
            let line = format!(
                "rna_build_info{{version=\"{}\",role=\"{role}\"}} 1",
                env!("CARGO_PKG_VERSION")
            );
            assert!(text.contains(&line), "{text}");
            assert!(text.ends_with("# EOF\n"), "{text}");
        }
    }
}
