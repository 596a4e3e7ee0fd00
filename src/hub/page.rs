//! Pages of the agents list (`GET /api/v1/agents` and the status page): `?limit=` and
//! `?continue=`, the way Kubernetes lists page, read and checked here once.
//!
//! A page holds at most `limit` sessions (default [`DEFAULT_LIMIT`], at most [`MAX_LIMIT`]);
//! when more follow, the answer carries a `continue` token, and the same request with
//! `?continue=TOKEN` gives the next page. The token is the sort key of the page's last
//! session, hex-encoded: the next page starts after it, so sessions that come or go between
//! two requests never make another repeat or be skipped. It names only the caller's own
//! tenant's agents, since it comes from a page the caller was shown.

use serde::Deserialize;

use super::api::ApiError;
use super::registry::{AgentInfo, ListCursor};

/// Sessions on a page when the request names no limit. A fleet up to this size gets its
/// whole list in one answer, as before pages existed.
pub(crate) const DEFAULT_LIMIT: usize = 500;

/// The largest page a request may ask for: a page is built while the request holds one of
/// the API's few quick-answer turns, so its cost stays bounded whatever the fleet's size.
pub(crate) const MAX_LIMIT: usize = 5000;

/// Longest `continue` token accepted: a tenant (two parts of up to 63 characters), an agent
/// name (63) and a session id, hex-encoded, fit well within it.
const MAX_CONTINUE: usize = 512;

/// The paging part of a list request's query; other fields (`token`, `tenant`) are other
/// extractors' business.
#[derive(Debug, Default, Deserialize)]
pub(crate) struct PageQuery {
    /// Sessions per page, as text so a bad value gets this module's message.
    limit: Option<String>,
    /// Where the previous page ended.
    #[serde(rename = "continue")]
    cont: Option<String>,
}

/// A checked page request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PageRequest {
    /// Sessions on the page.
    pub(crate) limit: usize,
    /// The previous page's last session, when this is not the first page.
    pub(crate) after: Option<ListCursor>,
    /// Whether the request named its limit (a next-page link repeats it).
    pub(crate) explicit_limit: bool,
}

impl PageQuery {
    /// Checks the query: a limit from 1 to [`MAX_LIMIT`], a `continue` token this hub made.
    pub(crate) fn request(&self) -> Result<PageRequest, ApiError> {
        let limit = match self.limit.as_deref() {
            None | Some("") => DEFAULT_LIMIT,
            Some(text) => text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=MAX_LIMIT).contains(n))
                .ok_or_else(|| {
                    ApiError::BadRequest(format!(
                        "limit {text:?}: expected a whole number from 1 to {MAX_LIMIT}"
                    ))
                })?,
        };
        let after = match self.cont.as_deref() {
            None | Some("") => None,
            Some(token) => Some(decode(token).map_err(|why| {
                ApiError::BadRequest(format!(
                    "continue token is not one this hub gave out ({why}); start again without it"
                ))
            })?),
        };
        Ok(PageRequest {
            limit,
            after,
            explicit_limit: self.limit.as_deref().is_some_and(|l| !l.is_empty()),
        })
    }
}

/// The `continue` token for the page ending with `last`.
pub(crate) fn continue_after(last: &AgentInfo) -> String {
    let raw = format!("{}\n{}\n{}", last.tenant, last.name, last.session_id);
    raw.bytes().map(|b| format!("{b:02x}")).collect()
}

/// Reads a `continue` token back; the message says what was wrong with it.
fn decode(token: &str) -> Result<ListCursor, String> {
    if token.len() > MAX_CONTINUE {
        return Err(format!("longer than {MAX_CONTINUE} characters"));
    }
    if !token.len().is_multiple_of(2) || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("not hexadecimal".into());
    }
    let bytes: Vec<u8> = (0..token.len())
        .step_by(2)
        .filter_map(|i| u8::from_str_radix(&token[i..i + 2], 16).ok())
        .collect();
    let text = String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())?;
    let mut parts = text.split('\n');
    let (Some(tenant), Some(name), Some(id), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err("not three fields".into());
    };
    tenant
        .parse::<crate::auth::Tenant>()
        .map_err(|e| format!("tenant: {e}"))?;
    if !crate::identity::valid_agent_name(name) {
        return Err("agent name".into());
    }
    let session_id = id.parse::<u64>().map_err(|_| "session id".to_string())?;
    Ok(ListCursor {
        tenant: tenant.to_string(),
        name: name.to_string(),
        session_id,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(limit: Option<&str>, cont: Option<&str>) -> PageQuery {
        PageQuery {
            limit: limit.map(str::to_string),
            cont: cont.map(str::to_string),
        }
    }

    fn info(tenant: &str, name: &str, id: u64) -> AgentInfo {
        AgentInfo {
            session_id: id,
            name: name.into(),
            tenant: tenant.into(),
            version: String::new(),
            os: String::new(),
            arch: String::new(),
            capabilities: Vec::new(),
            remote_address: "127.0.0.1:1".parse().unwrap(),
            transport: "quic",
            connected_since_unix: 0,
            last_heartbeat_seconds_ago: 0.0,
            rtt_ms: 0.0,
            heartbeat_interval_ms: 0,
            lost_packets: None,
            path_mtu: None,
            open_streams: 0,
            streams_total: 0,
            bytes_in: 0,
            bytes_out: 0,
            certificate_not_after_unix: None,
        }
    }

    #[test]
    fn a_continue_token_reads_back_as_the_last_session() {
        let token = continue_after(&info("acme/prod", "db-1", 42));
        let req = query(Some("10"), Some(&token)).request().unwrap();
        assert_eq!(req.limit, 10);
        assert!(req.explicit_limit);
        assert_eq!(
            req.after,
            Some(ListCursor {
                tenant: "acme/prod".into(),
                name: "db-1".into(),
                session_id: 42
            })
        );
    }

    #[test]
    fn limits_are_bounded() {
        let default = query(None, None).request().unwrap();
        assert_eq!(
            (default.limit, default.explicit_limit),
            (DEFAULT_LIMIT, false)
        );
        assert_eq!(query(Some("1"), None).request().unwrap().limit, 1);
        let max = MAX_LIMIT.to_string();
        assert_eq!(query(Some(&max), None).request().unwrap().limit, MAX_LIMIT);
        let over = (MAX_LIMIT + 1).to_string();
        for bad in [
            "0",
            "-1",
            "ten",
            "1.5",
            over.as_str(),
            "99999999999999999999999",
        ] {
            let err = query(Some(bad), None).request().unwrap_err().to_string();
            assert!(err.contains("from 1 to 5000"), "{bad}: {err}");
        }
    }

    #[test]
    fn bad_continue_tokens_are_refused_with_the_reason() {
        let hex = |s: &str| s.bytes().map(|b| format!("{b:02x}")).collect::<String>();
        let long = "a".repeat(MAX_CONTINUE + 2);
        for (token, why) in [
            ("xyz", "not hexadecimal"),
            ("abc", "not hexadecimal"),
            (long.as_str(), "longer than"),
            ("ff", "not UTF-8"),
            (&hex("acme/prod\ndb-1"), "not three fields"),
            (&hex("acme/prod\ndb-1\n1\n2"), "not three fields"),
            (&hex("acme\ndb-1\n1"), "tenant"),
            (&hex("acme/prod\ndb 1\n1"), "agent name"),
            (&hex("acme/prod\ndb-1\none"), "session id"),
        ] {
            let err = query(None, Some(token)).request().unwrap_err().to_string();
            assert!(
                err.contains(why) && err.contains("start again without it"),
                "{token}: {err}"
            );
        }
    }
}
