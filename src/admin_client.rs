//! A client of the hub's admin API for `rna kube`: requests with a bearer token, resource
//! type names resolved through the agent's inventory, and the exit code each answer maps to.
//! How objects are printed (table, names, JSON, YAML) is the command line's business, in the
//! binary's `cli::kube_output`.

use std::fmt;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use crate::auth::Secret;
use crate::proto::kube::ResourceInfo;

/// Exit code: success.
pub const EXIT_OK: u8 = 0;
/// Exit code: Kubernetes (or the hub) refused the command; the message is printed.
pub const EXIT_REFUSED: u8 = 1;
/// Exit code: usage error (bad flags, unreadable file, unknown resource type).
pub const EXIT_USAGE: u8 = 2;
/// Exit code: the agent is unavailable (unknown, offline, no cluster mode, unreachable hub).
pub const EXIT_UNAVAILABLE: u8 = 3;

/// Why a request failed before an HTTP answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The API URL is not usable.
    #[error("invalid API URL {0:?}: expected http://host:port or https://host:port")]
    BadUrl(String),
    /// The hub could not be reached.
    #[error("cannot reach the hub API at {url}: {message}")]
    Unreachable {
        /// The API base URL.
        url: String,
        /// The cause.
        message: String,
    },
    /// TLS roots could not be loaded for https.
    #[error("TLS: {0}")]
    Tls(String),
    /// The hub answered 2xx with something that is not what the request asks for.
    #[error("unexpected answer from the hub API: {0}")]
    Unexpected(String),
}

impl ClientError {
    /// The exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::BadUrl(_) => EXIT_USAGE,
            ClientError::Unreachable { .. } | ClientError::Tls(_) | ClientError::Unexpected(_) => {
                EXIT_UNAVAILABLE
            }
        }
    }
}

/// An HTTP answer from the hub.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    /// HTTP status.
    pub status: u16,
    /// Body bytes.
    pub body: Bytes,
}

impl ApiResponse {
    /// The body as JSON (`Null` if it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Whether the status is 2xx.
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// An error answer, as printed and mapped to an exit code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// HTTP status.
    pub status: u16,
    /// `reason` from the body (Kubernetes Status reason or the hub's own).
    pub reason: String,
    /// The class of an agent-side failure (`api`, `bad_request`, `not_allowed`, …), if any.
    pub kind: String,
    /// The message.
    pub message: String,
}

impl Refusal {
    /// Reads an error answer.
    pub fn from_response(r: &ApiResponse) -> Refusal {
        let v = r.json();
        let text = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        Refusal {
            status: r.status,
            reason: text("reason").unwrap_or_default(),
            kind: text("kind").unwrap_or_default(),
            message: text("error")
                .or_else(|| text("message"))
                .unwrap_or_else(|| String::from_utf8_lossy(&r.body).trim().to_string()),
        }
    }

    /// The exit code: 3 when the agent cannot be used, 2 for a request the hub found
    /// malformed, 1 when Kubernetes (or the hub's authorization) refused.
    pub fn exit_code(&self) -> u8 {
        match (self.status, self.reason.as_str()) {
            (_, "AgentNotFound" | "AgentOffline" | "NoCapability" | "HubDraining")
            | (_, "AgentTimeout" | "AgentStreamFailed" | "KubernetesUnreachable") => {
                EXIT_UNAVAILABLE
            }
            (400, "") => EXIT_USAGE,
            _ if self.kind == "bad_request" => EXIT_USAGE,
            _ => EXIT_REFUSED,
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.reason.is_empty() {
            write!(f, "{} (HTTP {})", self.message, self.status)
        } else {
            write!(
                f,
                "{} ({}, HTTP {})",
                self.message, self.reason, self.status
            )
        }
    }
}

type Https = hyper_rustls::HttpsConnector<HttpConnector>;

/// A client of one hub's admin API with one token.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Secret,
    http: Client<Https, Full<Bytes>>,
}

impl fmt::Debug for ApiClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiClient")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// Percent-encodes a query or path component (RFC 3986 unreserved characters stay).
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

impl ApiClient {
    /// A client for `base` (`http://127.0.0.1:8080`); https uses the system's roots.
    pub fn new(base: &str, token: Secret) -> Result<ApiClient, ClientError> {
        let base = base.trim_end_matches('/').to_string();
        let uri: http::Uri = base
            .parse()
            .map_err(|_| ClientError::BadUrl(base.clone()))?;
        if !matches!(uri.scheme_str(), Some("http") | Some("https")) || uri.host().is_none() {
            return Err(ClientError::BadUrl(base));
        }
        crate::transport::tls::install_provider();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| ClientError::Tls(e.to_string()))?
            .https_or_http()
            .enable_http1()
            .build();
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(ApiClient { base, token, http })
    }

    /// The base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, ClientError> {
        let unreachable = |message: String| ClientError::Unreachable {
            url: self.base.clone(),
            message,
        };
        let mut req = hyper::Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header(
                http::header::AUTHORIZATION,
                format!("Bearer {}", self.token.expose()),
            );
        let payload = match body {
            Some((content_type, bytes)) => {
                req = req.header(http::header::CONTENT_TYPE, content_type);
                bytes
            }
            None => Bytes::new(),
        };
        let req = req
            .body(Full::new(payload))
            .map_err(|e| ClientError::BadUrl(e.to_string()))?;
        self.http.request(req).await.map_err(|e| {
            // The error chain names the real cause (connection refused, DNS).
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text = format!("{text}: {s}");
                source = s.source();
            }
            unreachable(text)
        })
    }

    /// Every agent connection the token may see: `GET /api/v1/agents` page by page
    /// (`?limit=page_size`, then `&continue=` with the token of each answer until one carries
    /// none). The first refusal (`Err` inside) ends the listing with the hub's answer.
    pub async fn list_agents(
        &self,
        page_size: u32,
    ) -> Result<Result<Vec<Value>, ApiResponse>, ClientError> {
        let mut agents = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let path = match &next {
                None => format!("/api/v1/agents?limit={page_size}"),
                Some(token) => {
                    format!(
                        "/api/v1/agents?limit={page_size}&continue={}",
                        encode(token)
                    )
                }
            };
            let answer = self.request(http::Method::GET, &path, None).await?;
            if !answer.ok() {
                return Ok(Err(answer));
            }
            let mut page = answer.json();
            let Some(list) = page.get_mut("agents").and_then(Value::as_array_mut) else {
                return Err(ClientError::Unexpected(format!(
                    "GET {path}: no \"agents\" list in the answer"
                )));
            };
            agents.append(list);
            match page.get("continue").and_then(Value::as_str) {
                // A hub that hands back the token it was given would page forever.
                Some(token) if next.as_deref() == Some(token) => {
                    return Err(ClientError::Unexpected(format!(
                        "GET {path}: the same continue token again"
                    )))
                }
                Some(token) => next = Some(token.to_string()),
                None => return Ok(Ok(agents)),
            }
        }
    }

    /// Sends a request and reads the whole answer.
    pub async fn request(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, Bytes)>,
    ) -> Result<ApiResponse, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                message: e.to_string(),
            })?
            .to_bytes();
        Ok(ApiResponse { status, body })
    }

    /// Sends a request whose answer is newline-delimited JSON; `line` sees each line as it
    /// arrives. A non-2xx answer is returned whole instead.
    pub async fn stream_lines(
        &self,
        method: http::Method,
        path: &str,
        body: Option<(&str, Bytes)>,
        mut line: impl FnMut(&str),
    ) -> Result<ApiResponse, ClientError> {
        let resp = self.send(method, path, body).await?;
        let status = resp.status().as_u16();
        let mut body = resp.into_body();
        let mut all = Vec::new();
        let mut pending = Vec::new();
        let ok = (200..300).contains(&status);
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| ClientError::Unreachable {
                url: self.base.clone(),
                message: e.to_string(),
            })?;
            let Ok(data) = frame.into_data() else {
                continue;
            };
            all.extend_from_slice(&data);
            if !ok {
                continue;
            }
            pending.extend_from_slice(&data);
            while let Some(pos) = pending.iter().position(|b| *b == b'\n') {
                let text: Vec<u8> = pending.drain(..=pos).collect();
                let text = String::from_utf8_lossy(&text);
                let text = text.trim();
                if !text.is_empty() {
                    line(text);
                }
            }
        }
        if ok && !pending.is_empty() {
            line(String::from_utf8_lossy(&pending).trim());
        }
        Ok(ApiResponse {
            status,
            body: Bytes::from(all),
        })
    }
}

/// A resource type resolved for the API path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedType {
    /// `apps/v1`.
    pub api_version: String,
    /// `Deployment` (or the name as given when `--api-version` bypassed the inventory).
    pub kind: String,
    /// Whether it is namespaced, when known.
    pub namespaced: Option<bool>,
}

/// Resolves a type name as kubectl does (`deployments`, `deployment`, `Deployment`, `deploy`,
/// `deployments.apps`) against the agent's inventory.
pub fn resolve_type(resources: &[ResourceInfo], name: &str) -> Result<ResolvedType, String> {
    let (base, group) = match name.split_once('.') {
        Some((b, g)) => (b, Some(g)),
        None => (name, None),
    };
    let matches = |r: &ResourceInfo| {
        group.is_none_or(|g| r.group == g)
            && (r.plural.eq_ignore_ascii_case(base)
                || r.singular.eq_ignore_ascii_case(base)
                || r.kind.eq_ignore_ascii_case(base)
                || r.short_names.iter().any(|s| s.eq_ignore_ascii_case(base)))
    };
    let found: Vec<&ResourceInfo> = resources.iter().filter(|r| matches(r)).collect();
    // Core and well-known groups first, like kubectl's priority for ambiguous names.
    let best = found
        .iter()
        .min_by_key(|r| (!r.group.is_empty(), r.group.contains('.'), r.group.clone()))
        .ok_or_else(|| {
            format!(
                "unknown resource type {name:?}: not in the agent's inventory (give \
                 --api-version and the kind to bypass it)"
            )
        })?;
    Ok(ResolvedType {
        api_version: best.api_version(),
        kind: best.kind.clone(),
        namespaced: Some(best.namespaced),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(group: &str, kind: &str, plural: &str, short: &[&str]) -> ResourceInfo {
        ResourceInfo {
            group: group.into(),
            version: "v1".into(),
            kind: kind.into(),
            plural: plural.into(),
            singular: kind.to_lowercase(),
            namespaced: true,
            verbs: vec![],
            short_names: short.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn types_resolve_like_kubectl() {
        let inv = vec![
            r("apps", "Deployment", "deployments", &["deploy"]),
            r("", "Event", "events", &["ev"]),
            r("events.k8s.io", "Event", "events", &[]),
            r("example.com", "Widget", "widgets", &["wd"]),
        ];
        let table = [
            ("deployments", "apps/v1", "Deployment"),
            ("deploy", "apps/v1", "Deployment"),
            ("Deployment", "apps/v1", "Deployment"),
            ("deployments.apps", "apps/v1", "Deployment"),
            ("events", "v1", "Event"),
            ("events.events.k8s.io", "events.k8s.io/v1", "Event"),
            ("wd", "example.com/v1", "Widget"),
        ];
        for (name, v, k) in table {
            let got = resolve_type(&inv, name).unwrap();
            assert_eq!(
                (got.api_version.as_str(), got.kind.as_str()),
                (v, k),
                "{name}"
            );
        }
        assert!(resolve_type(&inv, "pods").is_err());
        assert!(resolve_type(&inv, "deployments.batch").is_err());
    }

    #[test]
    fn exit_codes_and_encoding() {
        let refusal = |status, reason: &str| Refusal {
            status,
            reason: reason.into(),
            kind: String::new(),
            message: String::new(),
        };
        let table = [
            (refusal(404, "NotFound"), EXIT_REFUSED),
            (refusal(409, "Conflict"), EXIT_REFUSED),
            (refusal(403, ""), EXIT_REFUSED),
            (refusal(404, "AgentNotFound"), EXIT_UNAVAILABLE),
            (refusal(409, "NoCapability"), EXIT_UNAVAILABLE),
            (refusal(503, "AgentOffline"), EXIT_UNAVAILABLE),
            (refusal(400, ""), EXIT_USAGE),
            (refusal(400, "BadRequest"), EXIT_REFUSED),
            (
                Refusal {
                    kind: "bad_request".into(),
                    ..refusal(404, "NotFound")
                },
                EXIT_USAGE,
            ),
        ];
        for (r, code) in table {
            assert_eq!(r.exit_code(), code, "{r:?}");
        }
        assert_eq!(
            encode("app=web,tier in (a)"),
            "app%3Dweb%2Ctier%20in%20%28a%29"
        );
    }
}
