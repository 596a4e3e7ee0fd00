//! Reading a configuration file: its bounded text, TOML with every error naming the file,
//! the key and the line (an unknown key with the closest accepted one), and each value
//! converted through its [`Form`](super::settings::Form).

use std::path::Path;

use super::agent::AgentOptions;
use super::hub::HubOptions;
use super::settings::{Form, Options};
use super::{ConfigError, LogOptions};

/// Converts file values, naming the file and key in errors.
pub(super) struct Checker<'a> {
    /// The file, as errors name it.
    pub(super) origin: &'a str,
    /// The file's folder, which relative paths start from.
    pub(super) base: Option<&'a Path>,
}

impl Checker<'_> {
    fn invalid(&self, key: String, message: String) -> ConfigError {
        ConfigError::Invalid {
            origin: self.origin.to_string(),
            key,
            message,
        }
    }

    /// Converts one value of `key`.
    pub(super) fn one<F: Form>(
        &self,
        key: &str,
        value: Option<F::File>,
    ) -> Result<Option<F::Value>, ConfigError> {
        value
            .map(|v| F::read(v, self.base).map_err(|m| self.invalid(key.to_string(), m)))
            .transpose()
    }

    /// Converts a list of `key`; an error names the index (`key[i]`).
    pub(super) fn list<F: Form>(
        &self,
        key: &str,
        values: Option<Vec<F::File>>,
    ) -> Result<Vec<F::Value>, ConfigError> {
        values
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, v)| F::read(v, self.base).map_err(|m| self.invalid(format!("{key}[{i}]"), m)))
            .collect()
    }
}

/// A configuration file's text, read with a size bound.
pub(super) fn read_text(path: &Path) -> Result<String, ConfigError> {
    crate::fsutil::read_text(path, crate::fsutil::MAX_CONFIG_FILE).map_err(|e| ConfigError::Read {
        file: path.display().to_string(),
        cause: e.problem.into(),
    })
}

/// Parses TOML into `T`; errors name the file, the key when there is one, and the line.
pub(super) fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    path: &Path,
) -> Result<(T, String), ConfigError> {
    let origin = path.display().to_string();
    let parsed = toml::from_str(text).map_err(|e| match unknown_key(e.message()) {
        Some((key, message)) => ConfigError::Invalid {
            origin: origin.clone(),
            key,
            message: message + &location(text, e.span()),
        },
        None => match key_at(text, e.span()) {
            // serde names no key for a value of the wrong type: find it by the span.
            Some(key) => ConfigError::Invalid {
                origin: origin.clone(),
                key,
                message: e.message().to_string() + &location(text, e.span()),
            },
            None => ConfigError::Parse {
                file: origin.clone(),
                message: e.message().to_string() + &location(text, e.span()),
            },
        },
    })?;
    Ok((parsed, origin))
}

/// The top-level key whose value holds `span` (the place serde reported an error at).
fn key_at(text: &str, span: Option<std::ops::Range<usize>>) -> Option<String> {
    let span = span?;
    let table = toml::de::DeTable::parse(text).ok()?;
    let found = table.get_ref().iter().find(|(_, value)| {
        let v = value.span();
        v.start <= span.start && span.end <= v.end
    });
    found.map(|(key, _)| key.get_ref().to_string())
}

/// serde's "unknown field `x`, expected one of `a`, `b`" as the key and a short message
/// with the closest accepted key.
fn unknown_key(message: &str) -> Option<(String, String)> {
    let rest = message.strip_prefix("unknown field `")?;
    let (key, rest) = rest.split_once('`')?;
    let expected: Vec<&str> = rest
        .split_once("expected one of ")
        .map(|(_, list)| list.split(", ").map(|k| k.trim_matches('`')).collect())
        .unwrap_or_default();
    let closest = expected
        .iter()
        .map(|k| (strsim::levenshtein(key, k), *k))
        .min()
        .filter(|(d, _)| *d <= (key.len() / 3).max(1));
    let message = match closest {
        Some((_, k)) => format!("unknown key (did you mean `{k}`?)"),
        None => "unknown key".to_string(),
    };
    Some((key.to_string(), message))
}

/// ` (line N)` for a span in `text`.
fn location(text: &str, span: Option<std::ops::Range<usize>>) -> String {
    match span {
        Some(r) => {
            let line = text[..r.start.min(text.len())].matches('\n').count() + 1;
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

/// Parses the text of a hub configuration file, as `--config` reads it: `path` names the
/// file in errors and anchors its relative paths. The `config_files` fuzz target drives it.
pub fn parse_hub_file(text: &str, path: &Path) -> Result<(HubOptions, LogOptions), ConfigError> {
    HubOptions::parse_file(text, path)
}

/// Parses the text of an agent configuration file; see [`parse_hub_file`].
pub fn parse_agent_file(
    text: &str,
    path: &Path,
) -> Result<(AgentOptions, LogOptions), ConfigError> {
    AgentOptions::parse_file(text, path)
}
