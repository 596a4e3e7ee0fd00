//! One allow or deny rule of the policy and its text forms.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use super::net::{ends_in_number, legacy_ipv4, Net, RuleError};

/// One allow or deny rule.
///
/// Text forms: `10.0.0.0/8`, `10.0.0.0/8:443`, `10.1.2.3`, `10.1.2.3:22`, `fd00::/8`,
/// `[fd00::/8]:443`, `[::1]:22`, `jenkins.internal:8080`, `*.svc.cluster.local`. An IPv6 rule
/// takes a port only inside brackets: a bare `fd00::1:443` is the address `fd00::1:443`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Rule {
    /// Destinations whose resolved address lies in `net`, on `port` or on any port.
    Net {
        /// The network.
        net: Net,
        /// The only port this rule covers, or every port.
        port: Option<u16>,
    },
    /// Destinations the client asked for by name, on `port` or on any port.
    Host {
        /// Lowercase, without a trailing dot: an exact name, or `*.suffix` matching any
        /// subdomain of `suffix` (but not `suffix` itself).
        pattern: String,
        /// The only port this rule covers, or every port.
        port: Option<u16>,
    },
}

impl Rule {
    /// Whether the rule covers the destination `ip:port` that the client asked for as `host`
    /// (`None` when it asked for an IP literal; host rules never match then).
    pub fn matches(&self, host: Option<&str>, ip: IpAddr, port: u16) -> bool {
        match self {
            Rule::Net { net, port: p } => p.is_none_or(|p| p == port) && net.contains(ip),
            Rule::Host { pattern, port: p } => {
                p.is_none_or(|p| p == port) && host.is_some_and(|h| host_matches(pattern, h))
            }
        }
    }
}

/// Case-insensitive match of a requested name against a normalized pattern, ignoring one
/// trailing dot of the name.
pub(super) fn host_matches(pattern: &str, host: &str) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).as_bytes();
    match pattern.strip_prefix('*') {
        // `suffix` keeps its leading dot, so "*.example.com" never matches "example.com" or
        // "badexample.com".
        Some(suffix) => {
            let suffix = suffix.as_bytes();
            host.len() > suffix.len()
                && host
                    .get(host.len() - suffix.len()..)
                    .is_some_and(|tail| tail.eq_ignore_ascii_case(suffix))
        }
        None => host.eq_ignore_ascii_case(pattern.as_bytes()),
    }
}

impl FromStr for Rule {
    type Err = RuleError;

    fn from_str(s: &str) -> Result<Rule, RuleError> {
        let fail = |reason: String| RuleError::rule(s, reason);
        if s.is_empty() {
            return Err(fail("empty rule".into()));
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(fail("contains whitespace".into()));
        }
        if let Some(rest) = s.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| fail("missing ']' after the IPv6 network".into()))?;
            if !inside.contains(':') {
                return Err(fail(format!(
                    "brackets are only for IPv6; write {inside}{after}"
                )));
            }
            let net = Net::parse(inside).map_err(fail)?;
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(port) => Some(parse_port(port).map_err(fail)?),
                    None => return Err(fail(format!("unexpected {after:?} after ']'"))),
                },
            };
            return Ok(Rule::Net { net, port });
        }
        if s.matches(':').count() >= 2 {
            // Bare IPv6: no port, since the last group could not be told from a port.
            let net = Net::parse(s).map_err(|reason| {
                fail(format!(
                    "{reason} (an IPv6 rule with a port needs brackets, as in [fd00::/8]:443)"
                ))
            })?;
            return Ok(Rule::Net { net, port: None });
        }
        let (target, port) = match s.rsplit_once(':') {
            Some((target, port)) => (target, Some(parse_port(port).map_err(fail)?)),
            None => (s, None),
        };
        if target.is_empty() {
            return Err(fail("missing network or host name before the port".into()));
        }
        // Digits, dots and a slash can only be meant as an IPv4 network: refusing them as host
        // names keeps forms like "127.1" or "10.0.0.0/33" from silently becoming name rules.
        if target
            .bytes()
            .all(|b| b.is_ascii_digit() || b == b'.' || b == b'/')
        {
            let net = Net::parse(target).map_err(fail)?;
            return Ok(Rule::Net { net, port });
        }
        let pattern = parse_host_pattern(target).map_err(fail)?;
        Ok(Rule::Host { pattern, port })
    }
}

fn parse_port(text: &str) -> Result<u16, String> {
    if text.is_empty() {
        return Err("missing port after ':'".into());
    }
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("port {text:?} is not a number"));
    }
    match text.parse::<u16>() {
        Ok(0) => Err("port 0 is not a valid port".into()),
        Ok(port) => Ok(port),
        Err(_) => Err(format!("port {text} is larger than 65535")),
    }
}

/// Checks a host name or `*.suffix` pattern and returns it lowercase without a trailing dot.
fn parse_host_pattern(text: &str) -> Result<String, String> {
    if !text.is_ascii() {
        return Err("host names must be ASCII; use the punycode (xn--) form".into());
    }
    let lower = text.to_ascii_lowercase();
    let lower = lower.strip_suffix('.').unwrap_or(&lower);
    let (wildcard, name) = match lower.strip_prefix("*.") {
        Some(name) => (true, name),
        None => (false, lower),
    };
    if name.contains('*') {
        return Err("'*' is only allowed as a whole first label, as in *.example.com".into());
    }
    if name.is_empty() {
        return Err("missing host name".into());
    }
    if name.len() > 253 {
        return Err("host name is longer than 253 characters".into());
    }
    if ends_in_number(name) {
        // "0x7f.1" or "*.1" would match only that spelling, never the address it stands for.
        return Err(match legacy_ipv4(name) {
            Some(ip) if !wildcard => {
                format!("{text} is an IPv4 address in a non-standard form; write it as {ip}")
            }
            _ => "the last label of a host name cannot be a number".into(),
        });
    }
    for label in name.split('.') {
        if label.is_empty() {
            return Err("host name has an empty label".into());
        }
        if label.len() > 63 {
            return Err(format!("label {label:?} is longer than 63 characters"));
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(format!("invalid character {c:?} in host name"));
        }
    }
    Ok(if wildcard {
        format!("*.{name}")
    } else {
        name.to_string()
    })
}

impl fmt::Display for Rule {
    /// The text form, which parses back to the same rule.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Net { net, port: None } => write!(f, "{net}"),
            Rule::Net {
                net,
                port: Some(port),
            } if net.addr.is_ipv6() => write!(f, "[{net}]:{port}"),
            Rule::Net {
                net,
                port: Some(port),
            } => write!(f, "{net}:{port}"),
            Rule::Host {
                pattern,
                port: None,
            } => f.write_str(pattern),
            Rule::Host {
                pattern,
                port: Some(port),
            } => write!(f, "{pattern}:{port}"),
        }
    }
}

impl TryFrom<String> for Rule {
    type Error = RuleError;

    fn try_from(text: String) -> Result<Rule, RuleError> {
        text.parse()
    }
}

impl From<Rule> for String {
    fn from(rule: Rule) -> String {
        rule.to_string()
    }
}
