//! The machinery that turns one list of keys into a command's flags, variables, file keys,
//! merge and printed form: the [`settings!`] macro, the [`Form`] of each value type, and the
//! checks keys of both commands share.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{format_duration, parse_duration, ConfigError, LogFormat, LogOptions};
use crate::agent::kube::{ResourceRule, SecretRef};
use crate::agent::{HubTarget, Rule, TransportMode};
use crate::hub::{EarlyReply, TcpListen};
use crate::state::StateLocation;
use crate::transport::Congestion;

/// A duration as a file writes it: a string with a unit (`"10s"`) or an integer number of
/// seconds, as flags accept a bare number. Kept as text and checked by [`parse_duration`], so
/// both spellings get the same errors.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct FileDuration(String);

impl<'de> Deserialize<'de> for FileDuration {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = FileDuration;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration: a number of seconds or a string such as \"10s\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<FileDuration, E> {
                Ok(FileDuration(v.to_string()))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<FileDuration, E> {
                Ok(FileDuration(v.to_string()))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<FileDuration, E> {
                // Negative: parse_duration refuses it with its usual message.
                Ok(FileDuration(v.to_string()))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl Serialize for FileDuration {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

/// How one key's value is written in a file: the type serde reads and writes, and the two
/// conversions. Text values are read through `FromStr` (or the key's own check) after serde,
/// so a bad value is reported as `file: key[i]: message`, while a value of the wrong TOML type
/// keeps serde's message and line.
pub(super) trait Form {
    /// The value as the options hold it.
    type Value;
    /// The value as the file holds it.
    type File: Serialize + serde::de::DeserializeOwned + fmt::Debug;
    /// Reads a file value; `base` is the file's folder, which relative paths start from.
    fn read(file: Self::File, base: Option<&Path>) -> Result<Self::Value, String>;
    /// Writes a value in force the way [`Form::read`] reads it back.
    fn show(value: &Self::Value) -> Self::File;
}

/// Numbers and booleans are TOML's own types: a string where a number belongs gets serde's
/// "invalid type" message with its line.
macro_rules! native_form {
    ($($t:ty),*) => {$(
        impl Form for $t {
            type Value = $t;
            type File = $t;
            fn read(file: $t, _: Option<&Path>) -> Result<$t, String> {
                Ok(file)
            }
            fn show(value: &$t) -> $t {
                *value
            }
        }
    )*};
}
native_form!(usize, u32, bool);

/// Values written as text, read through `FromStr` and printed through `Display`.
macro_rules! text_form {
    ($($t:ty),*) => {$(
        impl Form for $t {
            type Value = $t;
            type File = String;
            fn read(file: String, _: Option<&Path>) -> Result<$t, String> {
                file.parse().map_err(|e| format!("{e}"))
            }
            fn show(value: &$t) -> String {
                value.to_string()
            }
        }
    )*};
}
text_form!(
    String,
    IpAddr,
    HubTarget,
    Rule,
    ResourceRule,
    SecretRef,
    TcpListen,
    EarlyReply,
    StateLocation
);

/// Values written as text and read through a check of the key's own instead of `FromStr`
/// (`$form` may be a marker type whose value is `$value`); printed through `Display`.
macro_rules! checked_form {
    ($form:ty => $value:ty, $check:path) => {
        impl Form for $form {
            type Value = $value;
            type File = String;
            fn read(file: String, _: Option<&Path>) -> Result<$value, String> {
                $check(&file)
            }
            fn show(value: &$value) -> String {
                value.to_string()
            }
        }
    };
}
checked_form!(SocketAddr => SocketAddr, parse_addr);

/// Choices written by their command-line names: read through `FromStr`, printed through
/// clap's `ValueEnum` name, so a printed file and a flag spell a choice alike.
macro_rules! choice_form {
    ($($t:ty),*) => {$(
        impl Form for $t {
            type Value = $t;
            type File = String;
            fn read(file: String, _: Option<&Path>) -> Result<$t, String> {
                <$t>::from_str(&file)
            }
            fn show(value: &$t) -> String {
                clap::ValueEnum::to_possible_value(value)
                    .map(|v| v.get_name().to_string())
                    .unwrap_or_default()
            }
        }
    )*};
}
choice_form!(Congestion, LogFormat, TransportMode);

impl Form for Duration {
    type Value = Duration;
    type File = FileDuration;
    fn read(file: FileDuration, _: Option<&Path>) -> Result<Duration, String> {
        parse_duration(&file.0)
    }
    fn show(value: &Duration) -> FileDuration {
        FileDuration(format_duration(*value))
    }
}

/// A duration that may be zero (`handshake_wait = "0s"`), read by
/// [`parse_duration_or_zero`](crate::duration::parse_duration_or_zero) and written like any
/// duration (zero as `0ms`).
pub(super) struct ZeroOrDuration;

impl Form for ZeroOrDuration {
    type Value = Duration;
    type File = FileDuration;
    fn read(file: FileDuration, _: Option<&Path>) -> Result<Duration, String> {
        crate::duration::parse_duration_or_zero(&file.0)
    }
    fn show(value: &Duration) -> FileDuration {
        FileDuration(format_duration(*value))
    }
}

impl Form for PathBuf {
    type Value = PathBuf;
    type File = PathBuf;
    /// Relative paths in a file are relative to the file's folder.
    fn read(file: PathBuf, base: Option<&Path>) -> Result<PathBuf, String> {
        Ok(match base {
            Some(base) if file.is_relative() => base.join(file),
            _ => file,
        })
    }
    /// Absolute, so the printed file reads the same files from any folder.
    fn show(value: &PathBuf) -> PathBuf {
        std::path::absolute(value).unwrap_or_else(|_| value.clone())
    }
}

/// The pieces of code that differ between a key holding one value (`Option<T>`: `None` when
/// not given) and a key holding a list (`Vec<T>`: empty when not given; a list is taken whole
/// from one source).
macro_rules! slot {
    (file Option $f:ty) => { Option<<$f as $crate::config::settings::Form>::File> };
    (file Vec $f:ty) => { Option<Vec<<$f as $crate::config::settings::Form>::File>> };
    (given Option $v:expr) => { $v.is_some() };
    (given Vec $v:expr) => { !$v.is_empty() };
    (or Option $high:expr, $low:expr) => { $high.or($low) };
    (or Vec $high:expr, $low:expr) => { $crate::config::settings::or_vec($high, $low) };
    (read Option $c:ident, $key:expr, $v:expr, $f:ty) => { $c.one::<$f>($key, $v)? };
    (read Vec $c:ident, $key:expr, $v:expr, $f:ty) => { $c.list::<$f>($key, $v)? };
    (show Option $v:expr, $f:ty) => { $v.as_ref().map(<$f as $crate::config::settings::Form>::show) };
    (show Vec $v:expr, $f:ty) => {
        $v.map(|list| list.iter().map(<$f as $crate::config::settings::Form>::show).collect::<Vec<_>>())
    };
}

/// Where a key's value in force is: `field(place)` or `field(place, check)` is a field of
/// the validated configuration that the key sets (through `check`, a `fn(T) -> Result<T,
/// String>`) and prints from; `show(expression)` is printed from `expression` (an `Option`)
/// and validated by hand, because the key has rules of its own.
macro_rules! in_force {
    (field($place:expr $(, $check:expr)?)) => {
        Some($place)
    };
    (show($show:expr)) => {
        $show
    };
}

/// Sets a `field` key's place from the options, when given; `show` keys are set by hand.
macro_rules! apply {
    ($o:ident, $sources:ident, $key:ident, field($place:expr)) => {
        if let Some(value) = $o.$key {
            $place = value;
        }
    };
    ($o:ident, $sources:ident, $key:ident, field($place:expr, $check:expr)) => {
        if let Some(value) = $o.$key {
            $place = $check(value).map_err(|m| $sources.invalid(stringify!($key), m))?;
        }
    };
    ($o:ident, $sources:ident, $key:ident, show($show:expr)) => {};
}

/// The form of a key: its own type unless the entry names another with `as`.
macro_rules! form {
    ($ty:ty) => {
        $ty
    };
    ($ty:ty, $form:ty) => {
        $form
    };
}

/// One command's settings, each key written once: its doc comment (the `--help` text), its
/// clap attributes, its type (`Option<T>` or `Vec<T>`, optionally `as` another [`Form`]) and
/// where its value in force is (`=> field(...)` or `=> show(...)`, see [`in_force!`]). From
/// this list come the clap options struct, the file struct (with `deny_unknown_fields` and
/// the log keys), reading a file into options, merging, setting the `field` keys into the
/// validated configuration, and printing.
macro_rules! settings {
    (
        $(#[doc = $sdoc:literal])*
        $options:ident, file $file:ident, in force from $c:ident: $config:ty, $o:ident;
        $(
            $(#[doc = $doc:literal])*
            #[arg($($arg:tt)*)]
            $key:ident: $kind:ident<$ty:ty> $(as $form:ty)? => $how:ident($($place:tt)*);
        )*
    ) => {
        $(#[doc = $sdoc])*
        #[derive(Debug, Clone, Default, clap::Args)]
        pub struct $options {
            $(
                $(#[doc = $doc])*
                #[arg($($arg)*)]
                pub $key: $kind<$ty>,
            )*
        }

        /// The command's TOML file, as written: the same keys and the log keys. Values are
        /// checked as they become options; `--check-config` prints the configuration in force
        /// in this form.
        #[derive(Debug, Default, serde::Deserialize, serde::Serialize)]
        #[serde(default, deny_unknown_fields)]
        pub(super) struct $file {
            $(
                $(#[doc = $doc])*
                $key: slot!(file $kind form!($ty $(, $form)?)),
            )*
            log_format: Option<<$crate::config::LogFormat as $crate::config::settings::Form>::File>,
            log_level: Option<String>,
        }

        impl $crate::config::settings::Options for $options {
            fn given(&self) -> Vec<&'static str> {
                let mut keys = Vec::new();
                $(if slot!(given $kind self.$key) {
                    keys.push(stringify!($key));
                })*
                keys
            }

            fn or(self, lower: $options) -> $options {
                $options {
                    $($key: slot!(or $kind self.$key, lower.$key),)*
                }
            }

            fn parse_file(
                text: &str,
                path: &std::path::Path,
            ) -> Result<($options, $crate::config::LogOptions), $crate::config::ConfigError> {
                let (file, origin): ($file, String) = $crate::config::file::parse_toml(text, path)?;
                let checker = $crate::config::file::Checker {
                    origin: &origin,
                    base: path.parent(),
                };
                let options = $options {
                    $($key: slot!(
                        read $kind checker, stringify!($key), file.$key, form!($ty $(, $form)?)
                    ),)*
                };
                let log = $crate::config::LogOptions {
                    log_format: checker.one::<$crate::config::LogFormat>("log_format", file.log_format)?,
                    log_level: file.log_level,
                };
                Ok((options, log))
            }
        }

        impl $options {
            /// Checks the `field` keys that were given and writes them into `$c`, whose
            /// defaults they replace; an error names the key and where it came from.
            pub(super) fn apply(
                &self,
                $c: &mut $config,
                sources: &$crate::config::Sources,
            ) -> Result<(), $crate::config::ConfigError> {
                $(apply!(self, sources, $key, $how($($place)*));)*
                Ok(())
            }

            /// The values in force, read from the validated `$c`, as the file's keys.
            pub(super) fn in_force(&self, $c: &$config, log: &$crate::config::LogOptions) -> $file {
                let $o = self;
                $file {
                    $($key: slot!(
                        show $kind (in_force!($how($($place)*))), form!($ty $(, $form)?)
                    ),)*
                    log_format: log.log_format.as_ref().map(<$crate::config::LogFormat as $crate::config::settings::Form>::show),
                    log_level: log.log_level.clone(),
                }
            }
        }
    };
}

/// What [`merge`](super::merge) needs of an options type; [`settings!`] implements it.
pub(super) trait Options: Sized {
    /// The keys this holds a value for.
    fn given(&self) -> Vec<&'static str>;
    /// `self` where given, else `lower`. Lists are taken whole from one source.
    fn or(self, lower: Self) -> Self;
    /// Parses the text of a file; `path` names it in errors and anchors relative paths.
    fn parse_file(text: &str, path: &Path) -> Result<(Self, LogOptions), ConfigError>;
    /// Reads a file into options (and its log settings).
    fn read_file(path: &Path) -> Result<(Self, LogOptions), ConfigError> {
        Self::parse_file(&super::file::read_text(path)?, path)
    }
}

/// `high` unless it is empty: a list is taken whole from one source.
pub(super) fn or_vec<T>(high: Vec<T>, low: Vec<T>) -> Vec<T> {
    if high.is_empty() {
        low
    } else {
        high
    }
}

/// A count or size that must not be zero.
pub(super) fn at_least_one<T: Default + PartialEq>(n: T) -> Result<T, String> {
    if n == T::default() {
        return Err("must be at least 1".into());
    }
    Ok(n)
}

/// The smallest frame cap: Hello with a long name, token and capabilities fits well below.
pub(super) const MIN_FRAME: usize = 1024;

/// A frame cap: at least [`MIN_FRAME`], at most what the codec reads.
pub(super) fn frame_size(n: usize) -> Result<usize, String> {
    bytes_from_frame_to(n, crate::proto::codec::MAX_FRAME)
}

/// A size in bytes from [`MIN_FRAME`] to `max`.
pub(super) fn bytes_from_frame_to(n: usize, max: usize) -> Result<usize, String> {
    if !(MIN_FRAME..=max).contains(&n) {
        return Err(format!("{n} must be between {MIN_FRAME} and {max} bytes"));
    }
    Ok(n)
}

/// A worker thread count, 1 to [`crate::runtime::MAX_WORKER_THREADS`].
pub(super) fn worker_threads(n: usize) -> Result<usize, String> {
    let max = crate::runtime::MAX_WORKER_THREADS;
    if (1..=max).contains(&n) {
        Ok(n)
    } else {
        Err(format!("{n} must be between 1 and {max}"))
    }
}

/// A socket address as `ip:port`.
pub(super) fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("invalid address {s:?}: expected ip:port"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every choice a file holds reads back as itself, spelled as its flag spells it.
    fn reads_back<T: Form<Value = T, File = String> + clap::ValueEnum + PartialEq + fmt::Debug>(
        names: &[&str],
    ) {
        let shown: Vec<String> = T::value_variants().iter().map(T::show).collect();
        assert_eq!(shown, names);
        for (value, name) in T::value_variants().iter().zip(names) {
            assert_eq!(T::read(name.to_string(), None).as_ref(), Ok(value));
        }
    }

    #[test]
    fn choices_are_printed_as_their_flags_spell_them_and_read_back() {
        reads_back::<Congestion>(&["cubic", "bbr"]);
        reads_back::<LogFormat>(&["text", "json"]);
        assert!(LogFormat::read("xml".into(), None)
            .unwrap_err()
            .contains("expected text or json"));
        assert_eq!(
            SocketAddr::read("127.0.0.1:80".into(), None).map(|a| SocketAddr::show(&a)),
            Ok("127.0.0.1:80".to_string())
        );
    }
}
