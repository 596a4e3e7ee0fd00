//! The Prometheus registry both roles start from, and its exposition text. A leaf below hub
//! and agent, so each exports the same `rna_build_info` and serves the same format without
//! importing the other.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
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

/// The label set of every labelled metric of both roles: names fixed in code, values few.
pub type Labels = Vec<(&'static str, String)>;

/// A counter family with one label, the shape of every "refused by reason" metric.
pub type CounterBy = Family<Labels, Counter>;

/// Counts one event whose label `name` is `value` in `family`.
pub fn count_by(family: &CounterBy, name: &'static str, value: &str) {
    family.get_or_create(&vec![(name, value.to_string())]).inc();
}

/// Events counted so far with label `name` = `value` (0 before the first); tests and the
/// status page read the counters this way.
pub fn counted_by(family: &CounterBy, name: &'static str, value: &str) -> u64 {
    family
        .get(&vec![(name, value.to_string())])
        .map_or(0, |c| c.get())
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

    #[test]
    fn counters_by_label_count_each_value_apart_and_start_at_zero() {
        let family = CounterBy::default();
        assert_eq!(counted_by(&family, "cap", "streams"), 0);
        count_by(&family, "cap", "streams");
        count_by(&family, "cap", "streams");
        count_by(&family, "cap", "handshakes");
        assert_eq!(counted_by(&family, "cap", "streams"), 2);
        assert_eq!(counted_by(&family, "cap", "handshakes"), 1);
        assert_eq!(counted_by(&family, "reason", "streams"), 0);
        let mut registry = Registry::with_prefix("rna");
        registry.register("refusals", "Refusals", family);
        let text = render(&registry);
        assert!(
            text.contains("rna_refusals_total{cap=\"streams\"} 2"),
            "{text}"
        );
    }
}
