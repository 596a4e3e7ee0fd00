//! Networks and addresses as the policy judges them: CIDR networks, the IPv4 address carried
//! inside IPv6, and the legacy IPv4 spellings a resolver would accept.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a rule or network could not be parsed; names the input and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} {input:?}: {reason}")]
pub struct RuleError {
    /// "rule" or "network".
    what: &'static str,
    /// The text as given.
    input: String,
    /// What is wrong, in words a person can act on.
    reason: String,
}

impl RuleError {
    pub(super) fn rule(input: &str, reason: impl Into<String>) -> Self {
        RuleError {
            what: "rule",
            input: input.to_string(),
            reason: reason.into(),
        }
    }
}

/// A network in CIDR form: an address and a prefix length. IPv6 networks and addresses that
/// carry an IPv4 address (see [`judged`]) are converted to IPv4 before any check, so an IPv4
/// rule also covers the IPv6 forms a client may ask for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    /// The network's base address, with no host bits set.
    pub(super) addr: IpAddr,
    /// Leading bits that must match: 0..=32 for IPv4, 0..=128 for IPv6.
    pub(super) prefix: u8,
}

impl Net {
    /// The network `addr/prefix`, or `None` if the prefix is longer than the address or `addr`
    /// has bits set beyond the prefix.
    pub fn new(addr: IpAddr, prefix: u8) -> Option<Net> {
        let (addr, prefix) = canonical_net(addr, prefix)?;
        if mask(addr, prefix) != addr {
            return None;
        }
        Some(Net { addr, prefix })
    }

    /// The base address.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether `ip` (after [`judged`]) lies in this network. An IPv4 network never
    /// contains an IPv6 address and the other way round.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = judged(ip);
        match (self.addr, ip) {
            (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                mask(ip, self.prefix) == self.addr
            }
            _ => false,
        }
    }

    /// Whether every address of `other` lies in this network.
    pub fn contains_net(&self, other: &Net) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }

    /// `addr/prefix` parsed without naming a whole rule in errors.
    pub(super) fn parse(s: &str) -> Result<Net, String> {
        let (addr_text, prefix_text) = match s.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix)),
            None => (s, None),
        };
        let addr: IpAddr = addr_text
            .parse()
            .map_err(|_| format!("{addr_text:?} is not an IP address"))?;
        let max = max_prefix(addr);
        let prefix = match prefix_text {
            None => max,
            Some(p) if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) => {
                return Err(format!("prefix length {p:?} is not a number"));
            }
            Some(p) => match p.parse::<u8>() {
                Ok(n) if n <= max => n,
                _ => return Err(format!("prefix length /{p} is longer than {max} bits")),
            },
        };
        Net::new(addr, prefix).ok_or_else(|| {
            let (base, prefix) = canonical_net(addr, prefix).unwrap_or((addr, prefix));
            format!(
                "address bits are set beyond the /{prefix} prefix; did you mean {}/{prefix}?",
                mask(base, prefix)
            )
        })
    }
}

impl FromStr for Net {
    type Err = RuleError;

    /// Parses `10.0.0.0/8`, `10.1.2.3` (= /32), `fd00::/8` or `::1` (= /128).
    fn from_str(s: &str) -> Result<Net, RuleError> {
        Net::parse(s).map_err(|reason| RuleError {
            what: "network",
            input: s.to_string(),
            reason,
        })
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    match addr {
        IpAddr::V4(_) => 32,
        IpAddr::V6(_) => 128,
    }
}

/// Converts an IPv6 network of prefix >= 96 that carries IPv4 (see [`judged`]) to IPv4;
/// `None` if the prefix is too long.
fn canonical_net(addr: IpAddr, prefix: u8) -> Option<(IpAddr, u8)> {
    if prefix > max_prefix(addr) {
        return None;
    }
    match (addr, judged(addr)) {
        (IpAddr::V6(_), v4 @ IpAddr::V4(_)) if prefix >= 96 => Some((v4, prefix - 96)),
        _ => Some((addr, prefix)),
    }
}

/// The address the policy judges `ip` as: the IPv4 address an IPv6 address carries in its
/// last 32 bits when it is IPv4-mapped (`::ffff:0:0/96`), IPv4-compatible (`::/96`, except
/// `::` and `::1`, which are IPv6's own unspecified and loopback) or NAT64 (`64:ff9b::/96`,
/// RFC 6052), and `ip` itself otherwise.
///
/// Each of these forms reaches the IPv4 host on some network (a dual-stack socket, an old
/// stack, a NAT64 gateway), so `64:ff9b::a9fe:a9fe` must be refused exactly like
/// 169.254.169.254 and a deny rule of an IPv4 network must cover them too.
pub fn judged(ip: IpAddr) -> IpAddr {
    let IpAddr::V6(v6) = ip else {
        return ip;
    };
    let bits = u128::from(v6);
    let high = bits >> 32;
    let carries_v4 = high == 0xffff // ::ffff:a.b.c.d
        || high == 0x0064_ff9b_0000_0000_0000_0000 // 64:ff9b::a.b.c.d
        || (high == 0 && bits > 1); // ::a.b.c.d, but not :: or ::1
    if carries_v4 {
        // Truncation keeps exactly the low 32 bits, the embedded IPv4 address.
        IpAddr::V4(Ipv4Addr::from(bits as u32))
    } else {
        ip
    }
}

/// `addr` with every bit after the first `prefix` cleared.
fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let keep = u32::MAX
                .checked_shl(32 - u32::from(prefix.min(32)))
                .unwrap_or(0);
            IpAddr::V4(Ipv4Addr::from(bits & keep))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u128::MAX
                .checked_shl(128 - u32::from(prefix.min(128)))
                .unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(bits & keep))
        }
    }
}

/// Parses the IPv4 literal forms that `inet_aton`, and so most resolvers, accept besides
/// dotted decimal: one to four dot-separated numbers, each decimal, octal (leading `0`) or hex
/// (`0x`), the last one filling the remaining bytes; one trailing dot is ignored. `127.1`,
/// `2130706433`, `0177.0.0.1` and `0x7f.1` are all 127.0.0.1.
///
/// The dialer reads such names itself instead of leaving them to the resolver, so the address
/// the policy judges never depends on which C library the agent runs on.
pub fn legacy_ipv4(name: &str) -> Option<Ipv4Addr> {
    let name = name.strip_suffix('.').unwrap_or(name);
    if name.is_empty() || name.len() > 64 {
        return None;
    }
    let parts: Vec<&str> = name.split('.').collect();
    if parts.len() > 4 {
        return None;
    }
    let mut numbers = Vec::with_capacity(parts.len());
    for part in &parts {
        let (digits, radix) =
            if let Some(hex) = part.strip_prefix("0x").or_else(|| part.strip_prefix("0X")) {
                (hex, 16)
            } else if part.len() > 1 && part.starts_with('0') {
                (&part[1..], 8)
            } else {
                (*part, 10)
            };
        if part.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
            return None;
        }
        let value = if digits.is_empty() {
            0
        } else {
            u64::from_str_radix(digits, radix).ok()?
        };
        numbers.push(value);
    }
    let (last, leading) = numbers.split_last()?;
    if leading.iter().any(|&n| n > 255) {
        return None;
    }
    let room = 8 * (5 - numbers.len() as u32);
    if *last >= 1u64 << room {
        return None;
    }
    let mut value = *last;
    for (i, &n) in leading.iter().enumerate() {
        value |= n << (24 - 8 * i as u32);
    }
    u32::try_from(value).ok().map(Ipv4Addr::from)
}

/// Whether the last label of `name` is a number (decimal, or hex with `0x`): such a name is
/// meant as an IPv4 address (the WHATWG URL standard's "ends in a number"), never a DNS name.
pub fn ends_in_number(name: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name);
    let last = name.rsplit('.').next().unwrap_or(name);
    if let Some(hex) = last.strip_prefix("0x").or_else(|| last.strip_prefix("0X")) {
        return hex.bytes().all(|b| b.is_ascii_hexdigit());
    }
    !last.is_empty() && last.bytes().all(|b| b.is_ascii_digit())
}
