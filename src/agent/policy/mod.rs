//! Which destinations the agent may dial: allow and deny rules of networks, host names and ports.
//!
//! The agent owns its exposure. Rules are checked after DNS resolution, on every address a name
//! resolves to, so a name cannot smuggle a forbidden address: `metadata.evil.example` resolving
//! to 169.254.169.254 is refused exactly like the literal address. Cloud metadata, link-local,
//! the agent's own loopback and the unspecified address are denied unless an allow rule names
//! them. IPv4 carried inside IPv6 (mapped `::ffff:0:0/96`, compatible `::/96`, NAT64
//! `64:ff9b::/96`) is judged as the IPv4 address it carries.

mod net;
mod rule;

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

pub use net::{ends_in_number, judged, legacy_ipv4, Net, RuleError};
use rule::host_matches;
pub use rule::Rule;

/// Why a destination was refused (one readable reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// The address is in a range denied unless an allow rule names it.
    DefaultDenied {
        /// The refused address, as judged (IPv4 carried in IPv6 shown as IPv4).
        addr: IpAddr,
        /// The port asked for.
        port: u16,
        /// "cloud metadata", "link-local", "loopback" or "unspecified".
        what: &'static str,
        /// The allow rule that came closest to opening it, and why it did not.
        near: Option<NearMiss>,
    },
    /// A deny rule covers the destination.
    DenyRule {
        /// The rule, in its text form.
        rule: String,
    },
    /// There is an allow list and no rule of it covers the destination.
    NotAllowed {
        /// The refused address, as judged.
        addr: IpAddr,
        /// The port asked for.
        port: u16,
        /// The allow rule that came closest to covering it, and why it did not.
        near: Option<NearMiss>,
    },
    /// Port 0 cannot be dialed.
    BadPort,
}

/// An allow rule that almost covered a refused destination: what a person reading the
/// refusal needs to fix the rule or the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NearMiss {
    /// The rule covers the address but only on another port.
    OtherPort {
        /// The rule, in its text form.
        rule: String,
        /// The only port it covers.
        port: u16,
    },
    /// A network rule covers the address but is broader than the default-denied range (or,
    /// for a cloud metadata address, is not that exact address), so it does not open it.
    Broader {
        /// The rule, in its text form.
        rule: String,
    },
    /// A host rule matches the name asked for, but host rules never open a default-denied
    /// address: a name may resolve anywhere.
    HostRule {
        /// The rule, in its text form.
        rule: String,
    },
}

impl fmt::Display for Denied {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Denied::DefaultDenied {
                addr,
                port,
                what,
                near: Some(NearMiss::OtherPort { rule, port: only }),
            } => write!(
                f,
                "{addr} is a {what} address and no allow rule covers port {port} of it \
                 (rule {rule} allows only port {only})"
            ),
            Denied::DefaultDenied {
                addr, what, near, ..
            } => {
                let names = if *what == METADATA {
                    "that exact address"
                } else {
                    "its network"
                };
                write!(
                    f,
                    "{addr} is a {what} address, denied unless an allow rule names {names}"
                )?;
                match near {
                    Some(NearMiss::Broader { rule }) => {
                        write!(f, " (rule {rule} is broader and does not open it)")
                    }
                    Some(NearMiss::HostRule { rule }) => write!(
                        f,
                        " (host rule {rule} matches the name, but only a network rule opens it)"
                    ),
                    _ => Ok(()),
                }
            }
            Denied::DenyRule { rule } => write!(f, "denied by rule {rule}"),
            Denied::NotAllowed {
                addr,
                port,
                near: Some(NearMiss::OtherPort { rule, port: only }),
            } => write!(
                f,
                "no allow rule covers port {port} of {addr} (rule {rule} allows only port {only})"
            ),
            Denied::NotAllowed { addr, port, .. } => {
                write!(f, "no allow rule covers {}", SocketAddr::new(*addr, *port))
            }
            Denied::BadPort => f.write_str("port 0 cannot be dialed"),
        }
    }
}

impl std::error::Error for Denied {}

/// What a cloud metadata range is called; only a rule naming the exact address opens one.
const METADATA: &str = "cloud metadata";

/// A range denied unless explicitly allowed, and what to call it in a refusal.
struct DefaultRange {
    net: Net,
    what: &'static str,
}

const fn v4(a: u8, b: u8, c: u8, d: u8, prefix: u8) -> Net {
    Net {
        addr: IpAddr::V4(Ipv4Addr::new(a, b, c, d)),
        prefix,
    }
}

const fn v6(segments: [u16; 8], prefix: u8) -> Net {
    let [a, b, c, d, e, f, g, h] = segments;
    Net {
        addr: IpAddr::V6(Ipv6Addr::new(a, b, c, d, e, f, g, h)),
        prefix,
    }
}

/// Checked in order: the first range containing an address names it, so the single
/// metadata addresses come before the link-local networks that hold some of them.
const DEFAULT_DENIED: [DefaultRange; 11] = [
    // Instance metadata and credentials of AWS, GCP, Azure, Oracle, OpenStack and more.
    DefaultRange {
        net: v4(169, 254, 169, 254, 32),
        what: METADATA,
    },
    // Alibaba Cloud's metadata service, inside the 100.64.0.0/10 range pods often use.
    DefaultRange {
        net: v4(100, 100, 100, 200, 32),
        what: METADATA,
    },
    // Azure's WireServer, which hands out the VM's provisioning data and certificates.
    DefaultRange {
        net: v4(168, 63, 129, 16, 32),
        what: METADATA,
    },
    // AWS's IPv6 instance metadata endpoint.
    DefaultRange {
        net: v6([0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254], 128),
        what: METADATA,
    },
    // GCP's IPv6 metadata server.
    DefaultRange {
        net: v6([0xfd20, 0xce, 0, 0, 0, 0, 0, 0x254], 128),
        what: METADATA,
    },
    // Link-local: cloud DNS, time and metadata helpers live here, never a service to proxy.
    DefaultRange {
        net: v4(169, 254, 0, 0, 16),
        what: "link-local",
    },
    DefaultRange {
        net: v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
        what: "link-local",
    },
    DefaultRange {
        net: v4(127, 0, 0, 0, 8),
        what: "loopback",
    },
    DefaultRange {
        net: v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
        what: "loopback",
    },
    // Linux connects 0.0.0.0 (and ::) to the local host, so they are loopback in disguise.
    DefaultRange {
        net: v4(0, 0, 0, 0, 8),
        what: "unspecified",
    },
    DefaultRange {
        net: v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
        what: "unspecified",
    },
];

fn default_range(ip: IpAddr) -> Option<&'static DefaultRange> {
    DEFAULT_DENIED.iter().find(|range| range.net.contains(ip))
}

/// The ranges denied unless explicitly allowed: the cloud metadata addresses
/// 169.254.169.254, 100.100.100.200, 168.63.129.16, fd00:ec2::254 and fd20:ce::254 (opened
/// only by a rule naming that exact address), link-local 169.254.0.0/16 and fe80::/10,
/// loopback 127.0.0.0/8 and ::1, unspecified 0.0.0.0/8 and :: (Linux connects 0.0.0.0 to the
/// local host). Returns what the range is called, for `ip` as [`judged`].
pub fn default_denied(ip: IpAddr) -> Option<&'static str> {
    default_range(ip).map(|range| range.what)
}

/// The agent's policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// If non-empty, only destinations some rule covers may be dialed.
    allow: Vec<Rule>,
    /// Destinations no allow rule can reopen.
    deny: Vec<Rule>,
    /// Set by `allow_loopback`: the loopback ranges pass without widening or narrowing `allow`.
    loopback: bool,
}

impl Policy {
    /// A policy from allow and deny rules. No allow rules means every destination that is not
    /// denied (by a rule or by default) may be dialed.
    pub fn new(allow: Vec<Rule>, deny: Vec<Rule>) -> Self {
        Policy {
            allow,
            deny,
            loopback: false,
        }
    }

    /// A policy that additionally allows the agent's own loopback (for `rna dev`):
    /// 127.0.0.0/8 and ::1 pass as if named by an allow rule, deny rules still apply, and an
    /// empty allow list stays "everything else not denied".
    pub fn allow_loopback(mut self) -> Self {
        self.loopback = true;
        self
    }

    /// Checks one resolved destination. `host` is the name the client asked for (None when it
    /// asked for an IP literal). The address is judged as [`judged`] says (IPv4 carried in
    /// IPv6 as that IPv4 address). In order: port 0 is refused; any matching deny rule
    /// refuses; a default-denied address passes only through an allow rule of a network
    /// inside its range (for cloud metadata: naming exactly that address; never a host rule);
    /// then, if there is an allow list, some rule must cover the destination. A refusal names
    /// the allow rule that came closest and why it did not apply.
    pub fn check(&self, host: Option<&str>, addr: SocketAddr) -> Result<(), Denied> {
        let ip = judged(addr.ip());
        let port = addr.port();
        if port == 0 {
            return Err(Denied::BadPort);
        }
        if let Some(rule) = self.deny.iter().find(|rule| rule.matches(host, ip, port)) {
            return Err(Denied::DenyRule {
                rule: rule.to_string(),
            });
        }
        if let Some(range) = default_range(ip) {
            if self.loopback && range.what == "loopback" {
                return Ok(());
            }
            let opens = |rule: &Rule| match rule {
                Rule::Net { net, .. } => range.net.contains_net(net) && net.contains(ip),
                Rule::Host { .. } => false,
            };
            if self
                .allow
                .iter()
                .any(|rule| opens(rule) && rule.matches(None, ip, port))
            {
                return Ok(());
            }
            let near = self
                .other_port(|rule| opens(rule))
                .or_else(|| {
                    self.allow.iter().find_map(|rule| match rule {
                        Rule::Net { net, .. } if net.contains(ip) => Some(NearMiss::Broader {
                            rule: rule.to_string(),
                        }),
                        _ => None,
                    })
                })
                .or_else(|| {
                    self.allow.iter().find_map(|rule| match rule {
                        Rule::Host { .. } if rule.matches(host, ip, port) => {
                            Some(NearMiss::HostRule {
                                rule: rule.to_string(),
                            })
                        }
                        _ => None,
                    })
                });
            return Err(Denied::DefaultDenied {
                addr: ip,
                port,
                what: range.what,
                near,
            });
        }
        if self.allow.is_empty() || self.allow.iter().any(|rule| rule.matches(host, ip, port)) {
            return Ok(());
        }
        let near = self.other_port(|rule| match rule {
            Rule::Net { net, .. } => net.contains(ip),
            Rule::Host { pattern, .. } => host.is_some_and(|h| host_matches(pattern, h)),
        });
        Err(Denied::NotAllowed {
            addr: ip,
            port,
            near,
        })
    }

    /// The first allow rule with a port for which `covers` holds: it would have matched but
    /// for the port.
    fn other_port(&self, covers: impl Fn(&Rule) -> bool) -> Option<NearMiss> {
        self.allow.iter().find_map(|rule| match rule {
            Rule::Net { port: Some(p), .. } | Rule::Host { port: Some(p), .. } if covers(rule) => {
                Some(NearMiss::OtherPort {
                    rule: rule.to_string(),
                    port: *p,
                })
            }
            _ => None,
        })
    }

    /// The allow rules, in the order given.
    pub fn allow_rules(&self) -> &[Rule] {
        &self.allow
    }
    /// The deny rules, in the order given.
    pub fn deny_rules(&self) -> &[Rule] {
        &self.deny
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(text: &str) -> Rule {
        text.parse().unwrap()
    }

    fn rules(texts: &[&str]) -> Vec<Rule> {
        texts.iter().map(|t| rule(t)).collect()
    }

    fn net(text: &str) -> Net {
        text.parse().unwrap()
    }

    fn sock(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn parses_valid_rules() {
        let n = |text: &str, port| Rule::Net {
            net: net(text),
            port,
        };
        let h = |pattern: &str, port| Rule::Host {
            pattern: pattern.to_string(),
            port,
        };
        let table = [
            ("10.0.0.0/8", n("10.0.0.0/8", None), "10.0.0.0/8"),
            (
                "10.0.0.0/8:443",
                n("10.0.0.0/8", Some(443)),
                "10.0.0.0/8:443",
            ),
            ("10.1.2.3", n("10.1.2.3/32", None), "10.1.2.3/32"),
            ("10.1.2.3:22", n("10.1.2.3/32", Some(22)), "10.1.2.3/32:22"),
            ("0.0.0.0/0", n("0.0.0.0/0", None), "0.0.0.0/0"),
            ("fd00::/8", n("fd00::/8", None), "fd00::/8"),
            ("::1", n("::1/128", None), "::1/128"),
            ("[fd00::/8]:443", n("fd00::/8", Some(443)), "[fd00::/8]:443"),
            ("[::1]:22", n("::1/128", Some(22)), "[::1/128]:22"),
            ("[::1]", n("::1/128", None), "::1/128"),
            // The last group is part of the address: bare IPv6 never has a port.
            ("fd00::1:443", n("fd00::1:443/128", None), "fd00::1:443/128"),
            ("::ffff:10.0.0.0/104", n("10.0.0.0/8", None), "10.0.0.0/8"),
            (
                "[::ffff:127.0.0.1]:80",
                n("127.0.0.1/32", Some(80)),
                "127.0.0.1/32:80",
            ),
            (
                "jenkins.internal:8080",
                h("jenkins.internal", Some(8080)),
                "jenkins.internal:8080",
            ),
            (
                "Jenkins.Internal.",
                h("jenkins.internal", None),
                "jenkins.internal",
            ),
            (
                "*.svc.cluster.local",
                h("*.svc.cluster.local", None),
                "*.svc.cluster.local",
            ),
            (
                "*.example.com:65535",
                h("*.example.com", Some(65535)),
                "*.example.com:65535",
            ),
            ("host", h("host", None), "host"),
            ("_svc-1.lan:1", h("_svc-1.lan", Some(1)), "_svc-1.lan:1"),
        ];
        for (text, want, shown) in table {
            let got: Rule = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got, want, "{text}");
            assert_eq!(got.to_string(), shown, "{text}");
            assert_eq!(
                shown.parse::<Rule>().unwrap(),
                want,
                "round trip of {shown}"
            );
        }
    }

    #[test]
    fn refuses_invalid_rules_precisely() {
        let table = [
            ("", "empty rule"),
            (" 10.0.0.0/8", "contains whitespace"),
            ("10.0.0.0/33", "prefix length /33 is longer than 32 bits"),
            ("10.0.0.0/999", "prefix length /999 is longer than 32 bits"),
            ("10.0.0.0/", "prefix length \"\" is not a number"),
            ("10.0.0.0/x8", "invalid character '/' in host name"),
            ("10.0.0.0/-1", "invalid character '/' in host name"),
            ("10.1.2.3/8", "did you mean 10.0.0.0/8?"),
            ("127.1", "\"127.1\" is not an IP address"),
            ("010.0.0.1", "\"010.0.0.1\" is not an IP address"),
            ("256.0.0.0/8", "\"256.0.0.0\" is not an IP address"),
            ("10.0.0.0/8:0", "port 0 is not a valid port"),
            ("10.0.0.0/8:", "missing port after ':'"),
            ("10.0.0.0/8:http", "port \"http\" is not a number"),
            ("10.0.0.0/8:65536", "port 65536 is larger than 65535"),
            ("10.0.0.0/8:+1", "port \"+1\" is not a number"),
            (":443", "missing network or host name before the port"),
            ("fd00::/129", "prefix length /129 is longer than 128 bits"),
            ("fd00::/8:443", "needs brackets, as in [fd00::/8]:443"),
            ("fd00::1/64", "did you mean fd00::/64?"),
            ("[fd00::/8", "missing ']'"),
            ("[fd00::/8]443", "unexpected \"443\" after ']'"),
            ("[fd00::/8]:0", "port 0 is not a valid port"),
            (
                "[10.0.0.0/8]:443",
                "brackets are only for IPv6; write 10.0.0.0/8:443",
            ),
            ("[zz::]:1", "\"zz::\" is not an IP address"),
            ("*", "'*' is only allowed as a whole first label"),
            ("*..", "missing host name"),
            ("a.*.com", "'*' is only allowed as a whole first label"),
            ("*foo.com", "'*' is only allowed as a whole first label"),
            ("a..b", "empty label"),
            ("a/b", "invalid character '/' in host name"),
            ("héllo.com", "must be ASCII"),
            ("host:22:33", "is not an IP address"),
        ];
        for (text, want) in table {
            let err = text.parse::<Rule>().unwrap_err().to_string();
            assert!(
                err.starts_with(&format!("invalid rule {text:?}: ")),
                "{text}: {err}"
            );
            assert!(err.contains(want), "{text}: {err} (wanted {want:?})");
        }
        let long = format!("{}.com", "a".repeat(64));
        assert!(long
            .parse::<Rule>()
            .unwrap_err()
            .to_string()
            .contains("longer than 63"));
        let err = "10.0.0.0/40".parse::<Net>().unwrap_err().to_string();
        assert_eq!(
            err,
            "invalid network \"10.0.0.0/40\": prefix length /40 is longer than 32 bits"
        );
    }

    #[test]
    fn net_contains() {
        let table = [
            ("10.0.0.0/8", "10.255.1.2", true),
            ("10.0.0.0/8", "11.0.0.0", false),
            ("10.0.0.0/8", "::ffff:10.1.2.3", true),
            ("10.0.0.0/8", "fd00::1", false),
            ("0.0.0.0/0", "203.0.113.9", true),
            ("0.0.0.0/0", "2001:db8::1", false),
            ("169.254.0.0/16", "::ffff:169.254.169.254", true),
            ("192.168.1.7", "192.168.1.7", true),
            ("192.168.1.7", "192.168.1.8", false),
            ("fd00::/8", "fd12:3456::1", true),
            ("fd00::/8", "fe80::1", false),
            ("fd00::/8", "10.0.0.1", false),
            ("::/0", "2001:db8::1", true),
            ("::/0", "::ffff:10.0.0.1", false),
            ("::1", "::1", true),
            ("::1", "::2", false),
            ("2001:db8::/127", "2001:db8::1", true),
            ("2001:db8::/127", "2001:db8::2", false),
        ];
        for (n, ip, want) in table {
            assert_eq!(
                net(n).contains(ip.parse().unwrap()),
                want,
                "{n} contains {ip}"
            );
        }
        assert!(net("127.0.0.0/8").contains_net(&net("127.0.0.1/32")));
        assert!(!net("127.0.0.0/8").contains_net(&net("0.0.0.0/0")));
        assert!(!net("127.0.0.0/8").contains_net(&net("::1")));
        assert_eq!(Net::new("10.1.0.0".parse().unwrap(), 8), None);
        assert_eq!(Net::new("10.0.0.0".parse().unwrap(), 33), None);
        assert_eq!(
            Net::new("10.0.0.0".parse().unwrap(), 8),
            Some(net("10.0.0.0/8"))
        );
    }

    #[test]
    fn default_denied_ranges() {
        let table = [
            ("169.254.169.254", Some("cloud metadata")),
            ("::ffff:169.254.169.254", Some("cloud metadata")),
            ("169.254.1.1", Some("link-local")),
            ("169.254.169.253", Some("link-local")),
            ("fd00:ec2::254", Some("cloud metadata")),
            ("fd00:ec2::253", None),
            ("100.100.100.200", Some("cloud metadata")),
            ("100.100.100.201", None),
            ("168.63.129.16", Some("cloud metadata")),
            ("fd20:ce::254", Some("cloud metadata")),
            ("fe80::1", Some("link-local")),
            ("febf:ffff::1", Some("link-local")),
            ("fec0::1", None),
            // IPv4 carried in IPv6: mapped, compatible and NAT64 forms are the IPv4 address.
            ("64:ff9b::a9fe:a9fe", Some("cloud metadata")),
            ("64:ff9b::169.254.169.254", Some("cloud metadata")),
            ("64:ff9b::6464:64c8", Some("cloud metadata")),
            ("::a9fe:a9fe", Some("cloud metadata")),
            ("::ffff:168.63.129.16", Some("cloud metadata")),
            ("::7f00:1", Some("loopback")),
            ("64:ff9b::7f00:1", Some("loopback")),
            ("::0.0.0.2", Some("unspecified")),
            ("64:ff9b::a00:1", None),
            ("64:ff9b:1::a9fe:a9fe", None),
            ("127.0.0.1", Some("loopback")),
            ("127.255.255.254", Some("loopback")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::1", Some("loopback")),
            ("0.0.0.0", Some("unspecified")),
            ("0.1.2.3", Some("unspecified")),
            ("::", Some("unspecified")),
            ("10.0.0.1", None),
            ("1.0.0.1", None),
            ("128.0.0.1", None),
            ("2001:db8::1", None),
        ];
        for (ip, want) in table {
            assert_eq!(default_denied(ip.parse().unwrap()), want, "{ip}");
        }
    }

    /// One `check` case: allow rules, deny rules, requested host, resolved address, verdict.
    type Case = (
        &'static [&'static str],
        &'static [&'static str],
        Option<&'static str>,
        &'static str,
        Result<(), Denied>,
    );

    fn run(table: &[Case]) {
        for (allow, deny, host, addr, want) in table {
            let policy = Policy::new(rules(allow), rules(deny));
            let addr = sock(addr);
            let got = policy.check(*host, addr);
            // The tables leave out the port (and, for `NotAllowed`, the address) of a refusal:
            // they are the case's own, as judged.
            let want = match want.clone() {
                Err(Denied::DefaultDenied {
                    addr: ip,
                    what,
                    near,
                    ..
                }) => Err(Denied::DefaultDenied {
                    addr: ip,
                    port: addr.port(),
                    what,
                    near,
                }),
                Err(Denied::NotAllowed { near, .. }) => Err(Denied::NotAllowed {
                    addr: judged(addr.ip()),
                    port: addr.port(),
                    near,
                }),
                other => other,
            };
            assert_eq!(got, want, "allow {allow:?} deny {deny:?}: {host:?} {addr}");
        }
    }

    fn default_denied_err(addr: &str, what: &'static str) -> Result<(), Denied> {
        Err(Denied::DefaultDenied {
            addr: addr.parse().unwrap(),
            port: 0,
            what,
            near: None,
        })
    }

    /// `want` with the near miss `near`.
    fn near(want: Result<(), Denied>, near: NearMiss) -> Result<(), Denied> {
        match want {
            Err(Denied::DefaultDenied {
                addr, port, what, ..
            }) => Err(Denied::DefaultDenied {
                addr,
                port,
                what,
                near: Some(near),
            }),
            Err(Denied::NotAllowed { addr, port, .. }) => Err(Denied::NotAllowed {
                addr,
                port,
                near: Some(near),
            }),
            other => other,
        }
    }

    fn other_port(rule: &str, port: u16) -> NearMiss {
        NearMiss::OtherPort {
            rule: rule.into(),
            port,
        }
    }

    fn broader(rule: &str) -> NearMiss {
        NearMiss::Broader { rule: rule.into() }
    }

    fn host_rule(rule: &str) -> NearMiss {
        NearMiss::HostRule { rule: rule.into() }
    }

    /// `NotAllowed` of the case's own address and port, with no near miss.
    fn not_allowed() -> Result<(), Denied> {
        Err(Denied::NotAllowed {
            addr: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            port: 0,
            near: None,
        })
    }

    #[test]
    fn default_deny_applies_to_every_spelling() {
        run(&[
            (
                &[],
                &[],
                None,
                "169.254.169.254:80",
                default_denied_err("169.254.169.254", "cloud metadata"),
            ),
            // The mapped form is reported and judged as the IPv4 address it is.
            (
                &[],
                &[],
                None,
                "[::ffff:169.254.169.254]:80",
                default_denied_err("169.254.169.254", "cloud metadata"),
            ),
            (
                &[],
                &[],
                Some("metadata.google.internal"),
                "169.254.169.254:80",
                default_denied_err("169.254.169.254", "cloud metadata"),
            ),
            (
                &[],
                &[],
                None,
                "[fd00:ec2::254]:80",
                default_denied_err("fd00:ec2::254", "cloud metadata"),
            ),
            (
                &[],
                &[],
                None,
                "0.0.0.0:22",
                default_denied_err("0.0.0.0", "unspecified"),
            ),
            (
                &[],
                &[],
                None,
                "[::]:22",
                default_denied_err("::", "unspecified"),
            ),
            // "127.1" is what a client may type; the resolver hands the agent 127.0.0.1.
            (
                &[],
                &[],
                Some("127.1"),
                "127.0.0.1:22",
                default_denied_err("127.0.0.1", "loopback"),
            ),
            (
                &[],
                &[],
                Some("localhost"),
                "[::1]:22",
                default_denied_err("::1", "loopback"),
            ),
            (&[], &[], None, "10.0.0.1:80", Ok(())),
            (&[], &[], Some("example.com"), "93.184.215.14:443", Ok(())),
        ]);
    }

    #[test]
    fn only_network_rules_inside_the_range_unlock_it() {
        run(&[
            (&["127.0.0.0/8"], &[], None, "127.0.0.1:22", Ok(())),
            (
                &["127.0.0.0/8"],
                &[],
                Some("localhost"),
                "127.0.0.1:22",
                Ok(()),
            ),
            (
                &["127.0.0.1"],
                &[],
                None,
                "127.0.0.2:22",
                default_denied_err("127.0.0.2", "loopback"),
            ),
            (&["127.0.0.1:22"], &[], None, "127.0.0.1:22", Ok(())),
            (
                &["127.0.0.1:22"],
                &[],
                None,
                "127.0.0.1:23",
                near(
                    default_denied_err("127.0.0.1", "loopback"),
                    other_port("127.0.0.1/32:22", 22),
                ),
            ),
            (
                &["0.0.0.0/0"],
                &[],
                None,
                "127.0.0.1:22",
                near(
                    default_denied_err("127.0.0.1", "loopback"),
                    broader("0.0.0.0/0"),
                ),
            ),
            (
                &["0.0.0.0/0"],
                &[],
                None,
                "169.254.169.254:80",
                near(
                    default_denied_err("169.254.169.254", "cloud metadata"),
                    broader("0.0.0.0/0"),
                ),
            ),
            (&["0.0.0.0/0"], &[], None, "10.0.0.1:80", Ok(())),
            (
                &["::/0"],
                &[],
                None,
                "[::1]:22",
                near(default_denied_err("::1", "loopback"), broader("::/0")),
            ),
            (
                &["localhost"],
                &[],
                Some("localhost"),
                "127.0.0.1:22",
                near(
                    default_denied_err("127.0.0.1", "loopback"),
                    host_rule("localhost"),
                ),
            ),
            (
                &["*.internal"],
                &[],
                Some("metadata.google.internal"),
                "169.254.169.254:80",
                near(
                    default_denied_err("169.254.169.254", "cloud metadata"),
                    host_rule("*.internal"),
                ),
            ),
            (&["::1"], &[], None, "[::1]:22", Ok(())),
            (
                &["169.254.169.254:80"],
                &[],
                None,
                "[::ffff:169.254.169.254]:80",
                Ok(()),
            ),
            (
                &["[fd00:ec2::254]:80"],
                &[],
                None,
                "[fd00:ec2::254]:80",
                Ok(()),
            ),
            // Unlocking one range does not unlock another, nor the rest of the world.
            (
                &["127.0.0.0/8"],
                &[],
                None,
                "0.0.0.0:22",
                default_denied_err("0.0.0.0", "unspecified"),
            ),
            (&["127.0.0.0/8"], &[], None, "10.0.0.1:22", not_allowed()),
        ]);
    }

    #[test]
    fn deny_beats_allow() {
        let denied = |rule: &str| {
            Err(Denied::DenyRule {
                rule: rule.to_string(),
            })
        };
        run(&[
            (
                &["10.0.0.0/8"],
                &["10.9.0.0/16"],
                None,
                "10.1.0.1:80",
                Ok(()),
            ),
            (
                &["10.0.0.0/8"],
                &["10.9.0.0/16"],
                None,
                "10.9.3.4:80",
                denied("10.9.0.0/16"),
            ),
            (
                &["10.0.0.0/8"],
                &["10.9.0.0/16"],
                Some("db.lan"),
                "10.9.3.4:80",
                denied("10.9.0.0/16"),
            ),
            (
                &["127.0.0.0/8"],
                &["127.0.0.1:22"],
                None,
                "127.0.0.1:22",
                denied("127.0.0.1/32:22"),
            ),
            (
                &["127.0.0.0/8"],
                &["127.0.0.1:22"],
                None,
                "127.0.0.1:80",
                Ok(()),
            ),
            (
                &[],
                &["secrets.lan"],
                Some("SECRETS.lan."),
                "10.0.0.5:443",
                denied("secrets.lan"),
            ),
            (&[], &["secrets.lan"], None, "10.0.0.5:443", Ok(())),
            (
                &[],
                &["*.corp"],
                Some("a.b.corp"),
                "10.0.0.5:443",
                denied("*.corp"),
            ),
            (
                &[],
                &["[fd00::/8]:22"],
                None,
                "[fd12::1]:22",
                denied("[fd00::/8]:22"),
            ),
            (&[], &["[fd00::/8]:22"], None, "[fd12::1]:23", Ok(())),
            (&[], &[], None, "10.0.0.5:0", Err(Denied::BadPort)),
        ]);
    }

    #[test]
    fn allow_list_limits_ports_and_names() {
        let allow: &[&str] = &[
            "10.0.0.0/8:443",
            "jenkins.internal:8080",
            "*.svc.cluster.local",
            "[fd00::/8]:443",
        ];
        run(&[
            (allow, &[], None, "10.1.1.1:443", Ok(())),
            (
                allow,
                &[],
                None,
                "10.1.1.1:80",
                near(not_allowed(), other_port("10.0.0.0/8:443", 443)),
            ),
            (allow, &[], None, "192.168.0.1:443", not_allowed()),
            (
                allow,
                &[],
                Some("jenkins.internal"),
                "192.168.0.9:8080",
                Ok(()),
            ),
            (
                allow,
                &[],
                Some("Jenkins.Internal."),
                "192.168.0.9:8080",
                Ok(()),
            ),
            (
                allow,
                &[],
                Some("jenkins.internal"),
                "192.168.0.9:22",
                near(not_allowed(), other_port("jenkins.internal:8080", 8080)),
            ),
            (allow, &[], None, "192.168.0.9:8080", not_allowed()),
            (
                allow,
                &[],
                Some("api.svc.cluster.local"),
                "172.20.0.1:6443",
                Ok(()),
            ),
            (
                allow,
                &[],
                Some("a.b.svc.cluster.local"),
                "172.20.0.1:80",
                Ok(()),
            ),
            (
                allow,
                &[],
                Some("svc.cluster.local"),
                "172.20.0.1:80",
                not_allowed(),
            ),
            (
                allow,
                &[],
                Some("evilsvc.cluster.local"),
                "172.20.0.1:80",
                not_allowed(),
            ),
            (
                allow,
                &[],
                Some("svc.cluster.local.evil.com"),
                "172.20.0.1:80",
                not_allowed(),
            ),
            (allow, &[], None, "[fd12::1]:443", Ok(())),
            (
                allow,
                &[],
                None,
                "[fd12::1]:444",
                near(not_allowed(), other_port("[fd00::/8]:443", 443)),
            ),
        ]);
    }

    #[test]
    fn legacy_ipv4_literals_are_read_like_inet_aton() {
        let table = [
            ("127.0.0.1", Some("127.0.0.1")),
            ("127.1", Some("127.0.0.1")),
            ("127.0.1", Some("127.0.0.1")),
            ("2130706433", Some("127.0.0.1")),
            ("0177.0.0.1", Some("127.0.0.1")),
            ("017700000001", Some("127.0.0.1")),
            ("0x7f.1", Some("127.0.0.1")),
            ("0x7F000001", Some("127.0.0.1")),
            ("0xa9.0xfe.0xa9.0xfe", Some("169.254.169.254")),
            ("2852039166", Some("169.254.169.254")),
            ("0251.0376.0251.0376", Some("169.254.169.254")),
            ("169.254.43518", Some("169.254.169.254")),
            ("0", Some("0.0.0.0")),
            ("0x", Some("0.0.0.0")),
            ("10.0.0.1.", Some("10.0.0.1")),
            ("256.0.0.1", None),
            ("1.2.3.4.5", None),
            ("4294967296", None),
            ("08.0.0.1", None),
            ("1..1", None),
            ("", None),
            ("example.com", None),
            ("1.example", None),
            ("0x1g", None),
            ("127.0.0.256", None),
            ("127.0.65536", None),
        ];
        for (name, want) in table {
            let want = want.map(|w| w.parse::<Ipv4Addr>().unwrap());
            assert_eq!(legacy_ipv4(name), want, "{name}");
        }
        for (name, want) in [
            ("127.1", true),
            ("a.b.1", true),
            ("a.0x1f", true),
            ("1.2.3.4.5", true),
            ("example.com", false),
            ("1.example", false),
            ("a.0x1g", false),
            ("a1", false),
        ] {
            assert_eq!(ends_in_number(name), want, "{name}");
        }
    }

    #[test]
    fn numeric_host_rules_are_refused() {
        for (text, want) in [
            ("0x7f.1", "write it as 127.0.0.1"),
            ("0x7f000001:22", "write it as 127.0.0.1"),
            ("*.1", "cannot be a number"),
            ("a.b.123", "cannot be a number"),
            ("host.0x10", "cannot be a number"),
        ] {
            let err = text.parse::<Rule>().unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
        }
    }

    #[test]
    fn host_patterns() {
        let table = [
            ("example.com", "example.com", true),
            ("example.com", "EXAMPLE.com.", true),
            ("example.com", "example.com..", false),
            ("example.com", "www.example.com", false),
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "A.Example.COM.", true),
            ("*.example.com", "example.com", false),
            ("*.example.com", ".example.com", false),
            ("*.example.com", "badexample.com", false),
            ("*.example.com", "", false),
        ];
        for (pattern, host, want) in table {
            assert_eq!(host_matches(pattern, host), want, "{pattern} vs {host}");
        }
    }

    #[test]
    fn allow_loopback_adds_without_narrowing() {
        let open = Policy::default().allow_loopback();
        assert_eq!(open.check(None, sock("127.0.0.1:8080")), Ok(()));
        assert_eq!(open.check(None, sock("[::1]:8080")), Ok(()));
        assert_eq!(open.check(None, sock("10.0.0.1:80")), Ok(()));
        assert!(matches!(
            open.check(None, sock("169.254.169.254:80")),
            Err(Denied::DefaultDenied { .. })
        ));
        assert!(matches!(
            open.check(None, sock("0.0.0.0:80")),
            Err(Denied::DefaultDenied { .. })
        ));
        assert!(open.allow_rules().is_empty());

        let narrow = Policy::new(rules(&["10.0.0.0/8"]), rules(&["127.0.0.1:22"])).allow_loopback();
        assert_eq!(narrow.check(None, sock("127.0.0.1:8080")), Ok(()));
        assert!(matches!(
            narrow.check(None, sock("192.168.0.1:80")),
            Err(Denied::NotAllowed { near: None, .. })
        ));
        assert!(matches!(
            narrow.check(None, sock("127.0.0.1:22")),
            Err(Denied::DenyRule { .. })
        ));
        assert_eq!(narrow.allow_rules(), rules(&["10.0.0.0/8"]).as_slice());
        assert_eq!(narrow.deny_rules(), rules(&["127.0.0.1:22"]).as_slice());
    }

    #[test]
    fn denial_messages_read_well() {
        let policy = Policy::new(vec![], rules(&["10.9.0.0/16"]));
        let table = [
            (
                "169.254.169.254:80",
                concat!(
                    "169.254.169.254 is a cloud metadata address, ",
                    "denied unless an allow rule names that exact address"
                ),
            ),
            (
                "169.254.1.1:80",
                concat!(
                    "169.254.1.1 is a link-local address, ",
                    "denied unless an allow rule names its network"
                ),
            ),
            (
                "[64:ff9b::a9fe:a9fe]:80",
                concat!(
                    "169.254.169.254 is a cloud metadata address, ",
                    "denied unless an allow rule names that exact address"
                ),
            ),
            ("10.9.0.1:80", "denied by rule 10.9.0.0/16"),
            ("10.0.0.1:0", "port 0 cannot be dialed"),
        ];
        for (addr, want) in table {
            assert_eq!(
                policy.check(None, sock(addr)).unwrap_err().to_string(),
                want
            );
        }
    }

    /// A refusal names what kept each allow rule from matching: the port, a rule broader than
    /// a default-denied range, or a host rule where only a network rule opens the address.
    #[test]
    fn refusals_name_why_no_rule_matched() {
        let table: &[(&[&str], Option<&str>, &str, &str)] = &[
            (
                &["127.0.0.1:8000"],
                None,
                "127.0.0.1:8001",
                concat!(
                    "127.0.0.1 is a loopback address and no allow rule covers port 8001 of it ",
                    "(rule 127.0.0.1/32:8000 allows only port 8000)"
                ),
            ),
            (
                &["10.0.0.0/8:443", "127.0.0.0/8:5432"],
                None,
                "127.0.0.1:22",
                concat!(
                    "127.0.0.1 is a loopback address and no allow rule covers port 22 of it ",
                    "(rule 127.0.0.0/8:5432 allows only port 5432)"
                ),
            ),
            (
                &["0.0.0.0/0"],
                None,
                "127.0.0.1:22",
                concat!(
                    "127.0.0.1 is a loopback address, denied unless an allow rule names its ",
                    "network (rule 0.0.0.0/0 is broader and does not open it)"
                ),
            ),
            (
                &["100.64.0.0/10"],
                None,
                "100.100.100.200:80",
                concat!(
                    "100.100.100.200 is a cloud metadata address, denied unless an allow rule ",
                    "names that exact address (rule 100.64.0.0/10 is broader and does not open it)"
                ),
            ),
            (
                &["169.254.0.0/16"],
                None,
                "169.254.169.254:80",
                concat!(
                    "169.254.169.254 is a cloud metadata address, denied unless an allow rule ",
                    "names that exact address (rule 169.254.0.0/16 is broader and does not open it)"
                ),
            ),
            (
                &["localhost"],
                Some("localhost"),
                "127.0.0.1:22",
                concat!(
                    "127.0.0.1 is a loopback address, denied unless an allow rule names its ",
                    "network (host rule localhost matches the name, but only a network rule ",
                    "opens it)"
                ),
            ),
            (
                &["10.0.0.0/8:443"],
                None,
                "10.1.1.1:80",
                "no allow rule covers port 80 of 10.1.1.1 (rule 10.0.0.0/8:443 allows only port 443)",
            ),
            (
                &["jenkins.internal:8080"],
                Some("jenkins.internal"),
                "192.168.0.9:22",
                concat!(
                    "no allow rule covers port 22 of 192.168.0.9 ",
                    "(rule jenkins.internal:8080 allows only port 8080)"
                ),
            ),
            (
                &["10.0.0.0/8:443"],
                None,
                "192.168.0.1:443",
                "no allow rule covers 192.168.0.1:443",
            ),
            (
                &["[fd00::/8]:443"],
                None,
                "[2001:db8::1]:443",
                "no allow rule covers [2001:db8::1]:443",
            ),
            (
                &["[fd00::/8]:443"],
                None,
                "[fd12::1]:444",
                "no allow rule covers port 444 of fd12::1 (rule [fd00::/8]:443 allows only port 443)",
            ),
        ];
        for (allow, host, addr, want) in table {
            let policy = Policy::new(rules(allow), vec![]);
            let got = policy.check(*host, sock(addr)).unwrap_err().to_string();
            assert_eq!(&got, want, "allow {allow:?}: {host:?} {addr}");
        }
    }

    /// Metadata addresses, link-local and every IPv6 form that carries a forbidden IPv4
    /// address are refused by default; broad rules do not open metadata, exact ones do; IPv4
    /// rules (allow and deny) apply to the IPv6 forms of their addresses.
    #[test]
    fn metadata_and_embedded_ipv4_are_judged_as_ipv4() {
        let md = |addr: &str| default_denied_err(addr, METADATA);
        let link = |addr: &str| default_denied_err(addr, "link-local");
        run(&[
            (&[], &[], None, "100.100.100.200:80", md("100.100.100.200")),
            (&[], &[], None, "168.63.129.16:80", md("168.63.129.16")),
            (&[], &[], None, "[fd20:ce::254]:80", md("fd20:ce::254")),
            (
                &[],
                &[],
                None,
                "[64:ff9b::a9fe:a9fe]:80",
                md("169.254.169.254"),
            ),
            (&[], &[], None, "[::a9fe:a9fe]:80", md("169.254.169.254")),
            (
                &[],
                &[],
                None,
                "[::ffff:a9fe:a9fe]:80",
                md("169.254.169.254"),
            ),
            (
                &[],
                &[],
                None,
                "[64:ff9b::6464:64c8]:80",
                md("100.100.100.200"),
            ),
            (
                &[],
                &[],
                None,
                "[::7f00:1]:22",
                default_denied_err("127.0.0.1", "loopback"),
            ),
            (
                &[],
                &[],
                None,
                "[64:ff9b::7f00:1]:22",
                default_denied_err("127.0.0.1", "loopback"),
            ),
            (&[], &[], None, "[fe80::1]:22", link("fe80::1")),
            (&[], &[], None, "[fe80::1%2]:22", link("fe80::1")),
            (&[], &[], None, "169.254.1.1:22", link("169.254.1.1")),
            (&[], &[], None, "[64:ff9b::a00:1]:80", Ok(())),
            (&[], &[], None, "100.64.0.1:80", Ok(())),
            // A broad rule opens its range but not the metadata address inside it.
            (&["100.64.0.0/10"], &[], None, "100.100.0.1:80", Ok(())),
            (
                &["100.64.0.0/10"],
                &[],
                None,
                "100.100.100.200:80",
                Err(Denied::DefaultDenied {
                    addr: "100.100.100.200".parse().unwrap(),
                    port: 0,
                    what: METADATA,
                    near: Some(NearMiss::Broader {
                        rule: "100.64.0.0/10".into(),
                    }),
                }),
            ),
            (&["169.254.0.0/16"], &[], None, "169.254.1.1:80", Ok(())),
            (
                &["169.254.0.0/16"],
                &[],
                None,
                "169.254.169.254:80",
                Err(Denied::DefaultDenied {
                    addr: "169.254.169.254".parse().unwrap(),
                    port: 0,
                    what: METADATA,
                    near: Some(NearMiss::Broader {
                        rule: "169.254.0.0/16".into(),
                    }),
                }),
            ),
            (&["fe80::/64"], &[], None, "[fe80::1]:22", Ok(())),
            // Only a rule naming the exact address opens it, in any of its forms.
            (
                &["100.100.100.200"],
                &[],
                None,
                "100.100.100.200:80",
                Ok(()),
            ),
            (
                &["168.63.129.16:80"],
                &[],
                None,
                "[::ffff:168.63.129.16]:80",
                Ok(()),
            ),
            (
                &["169.254.169.254"],
                &[],
                None,
                "[64:ff9b::a9fe:a9fe]:80",
                Ok(()),
            ),
            (
                &["[fd20:ce::254]:80"],
                &[],
                None,
                "[fd20:ce::254]:80",
                Ok(()),
            ),
            // IPv4 rules cover the IPv6 forms of their addresses, for allow and deny alike.
            (&["10.0.0.0/8"], &[], None, "[64:ff9b::a00:1]:80", Ok(())),
            (&["10.0.0.0/8"], &[], None, "[::a00:1]:80", Ok(())),
            (
                &[],
                &["10.9.0.0/16"],
                None,
                "[64:ff9b::a09:1]:80",
                Err(Denied::DenyRule {
                    rule: "10.9.0.0/16".into(),
                }),
            ),
            (
                &["10.0.0.0/8"],
                &[],
                None,
                "[64:ff9b::b00:1]:80",
                not_allowed(),
            ),
            // An IPv6 rule of a NAT64 or compatible network is read as its IPv4 network.
            (
                &["[64:ff9b::a00:0/104]:80"],
                &[],
                None,
                "10.1.2.3:80",
                Ok(()),
            ),
            (&["::1"], &[], None, "[::1]:22", Ok(())),
        ]);
        assert_eq!(
            rule("64:ff9b::a00:0/104").to_string(),
            "10.0.0.0/8",
            "a NAT64 network is shown as the IPv4 network it carries"
        );
        assert_eq!(
            judged("::".parse().unwrap()),
            "::".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            judged("::1".parse().unwrap()),
            "::1".parse::<IpAddr>().unwrap()
        );
        assert_eq!(
            judged("::2".parse().unwrap()),
            "0.0.0.2".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn rules_deserialize_from_strings() {
        #[derive(serde::Deserialize)]
        struct Doc {
            allow: Vec<Rule>,
        }
        let doc: Doc = toml::from_str(r#"allow = ["10.0.0.0/8:443", "*.lan"]"#).unwrap();
        assert_eq!(doc.allow, rules(&["10.0.0.0/8:443", "*.lan"]));
        let err = toml::from_str::<Doc>(r#"allow = ["10.0.0.0/33"]"#)
            .err()
            .unwrap()
            .to_string();
        assert!(
            err.contains("prefix length /33 is longer than 32 bits"),
            "{err}"
        );
        assert_eq!(
            serde_json::to_string(&rule("[::1]:22")).unwrap(),
            r#""[::1/128]:22""#
        );
    }
}
