//! A small https client for issuer documents and token requests: https only, the system's
//! roots or one configured CA, a deadline over the whole exchange and a cap on the body, and
//! optionally an [`Egress`] that carries some connections through a proxy tunnel.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The largest CA file read, in bytes.
const MAX_CA_FILE: u64 = 1024 * 1024;

/// Why an https exchange with an issuer failed. Messages name the URL (never a secret or a
/// token) so one log line says which endpoint failed and how.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    /// The URL is not `https://host/...` (or cannot be parsed).
    #[error("{0:?} is not an https URL")]
    NotHttps(String),
    /// The CA file cannot be read or holds no certificate.
    #[error("CA file {path}: {message}")]
    Ca {
        /// The file.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// Connecting, TLS or HTTP failed.
    #[error("{url}: {message}")]
    Unreachable {
        /// The endpoint.
        url: String,
        /// The cause chain.
        message: String,
    },
    /// No whole answer within the deadline.
    #[error("{url}: no answer within {deadline:?}")]
    Timeout {
        /// The endpoint.
        url: String,
        /// The deadline that passed.
        deadline: Duration,
    },
    /// The answer's status was not 2xx.
    #[error("{url}: HTTP {status}")]
    Status {
        /// The endpoint.
        url: String,
        /// The status code.
        status: u16,
        /// The body, capped; kept for error details of token endpoints (RFC 6749 §5.2).
        body: String,
    },
    /// The body was larger than the cap.
    #[error("{url}: answer is larger than {cap} bytes")]
    TooLarge {
        /// The endpoint.
        url: String,
        /// The cap.
        cap: usize,
    },
    /// The body is not the JSON document expected.
    #[error("{url}: {message}")]
    BadDocument {
        /// The endpoint.
        url: String,
        /// What was wrong.
        message: String,
    },
}

type Https = hyper_rustls::HttpsConnector<Connector>;

/// A TCP connection being opened, boxed so the caller's proxy code needs no type of ours.
pub type Dialing = Pin<Box<dyn Future<Output = std::io::Result<tokio::net::TcpStream>> + Send>>;

/// How connections to a host leave this process: `route(host, port)` answers a connection
/// being opened through a tunnel (an HTTP proxy's `CONNECT`), or `None` to connect directly.
/// The agent builds one from its proxy settings; this module has no proxy code of its own, so
/// token requests use the same proxy, credentials and `NO_PROXY` rules as the hub sessions.
#[derive(Clone)]
pub struct Egress(Arc<Route>);

/// The function behind an [`Egress`].
type Route = dyn Fn(&str, u16) -> Option<Dialing> + Send + Sync;

impl Egress {
    /// An egress that tunnels what `route` answers for and connects the rest directly.
    pub fn new(route: impl Fn(&str, u16) -> Option<Dialing> + Send + Sync + 'static) -> Self {
        Egress(Arc::new(route))
    }
}

impl std::fmt::Debug for Egress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Egress")
    }
}

/// The TCP side of the https client: straight to the host, or through the [`Egress`] tunnel
/// when it answers for the host. TLS runs inside either (hyper-rustls wraps this).
#[derive(Clone)]
struct Connector {
    direct: HttpConnector,
    egress: Option<Egress>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<http::Uri> for Connector {
    type Response = hyper_util::rt::TokioIo<tokio::net::TcpStream>;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.direct.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let host = uri.host().unwrap_or_default();
        // `http::Uri` keeps an IPv6 literal's brackets; proxies and NO_PROXY want the address.
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(443);
        if let Some(tunnel) = self.egress.as_ref().and_then(|e| (e.0)(host, port)) {
            return Box::pin(async move {
                let tcp = tunnel.await?;
                let _ = tcp.set_nodelay(true);
                Ok(hyper_util::rt::TokioIo::new(tcp))
            });
        }
        let direct = self.direct.call(uri);
        Box::pin(async move { Ok(direct.await?) })
    }
}

/// An https client with one trust setting, a deadline and a body cap. Cheap to clone.
#[derive(Clone)]
pub struct Fetcher {
    http: Client<Https, Full<Bytes>>,
    /// Bounds connect, TLS, request and the whole body, so a stalled issuer cannot hold a
    /// refresh (or an agent's start) forever.
    deadline: Duration,
    /// Bounds the memory one answer can take.
    cap: usize,
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("deadline", &self.deadline)
            .field("cap", &self.cap)
            .finish_non_exhaustive()
    }
}

impl Fetcher {
    /// A client that trusts `ca` (a PEM file) if given, the system's roots otherwise, and
    /// connects directly.
    pub fn new(ca: Option<&Path>, deadline: Duration, cap: usize) -> Result<Fetcher, FetchError> {
        Self::with_egress(ca, deadline, cap, None)
    }

    /// Like [`Fetcher::new`], with connections leaving through `egress` when given.
    pub fn with_egress(
        ca: Option<&Path>,
        deadline: Duration,
        cap: usize,
        egress: Option<Egress>,
    ) -> Result<Fetcher, FetchError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = hyper_rustls::HttpsConnectorBuilder::new();
        let builder = match ca {
            Some(path) => {
                let fail = |message: String| FetchError::Ca {
                    path: path.to_owned(),
                    message,
                };
                let pem = crate::fsutil::read_bytes(path, MAX_CA_FILE)
                    .map_err(|e| fail(e.to_string()))?;
                let mut roots = rustls::RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| fail(format!("not PEM: {e}")))?;
                    roots
                        .add(cert)
                        .map_err(|e| fail(format!("not a CA certificate: {e}")))?;
                }
                if roots.is_empty() {
                    return Err(fail("holds no certificate".into()));
                }
                let config = rustls::ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map_err(|e| fail(e.to_string()))?
                    .with_root_certificates(roots)
                    .with_no_client_auth();
                builder.with_tls_config(config)
            }
            None => builder
                .with_provider_and_native_roots(provider)
                .map_err(|e| FetchError::Ca {
                    path: PathBuf::from("(system roots)"),
                    message: e.to_string(),
                })?,
        };
        let mut direct = HttpConnector::new();
        // The https connector around it insists on https; this one carries TCP only.
        direct.enforce_http(false);
        let connector = builder
            .https_only()
            .enable_http1()
            .wrap_connector(Connector { direct, egress });
        let http = Client::builder(TokioExecutor::new()).build(connector);
        Ok(Fetcher {
            http,
            deadline,
            cap,
        })
    }

    /// GETs `url` and parses the body as JSON.
    pub async fn get_json(&self, url: &str) -> Result<serde_json::Value, FetchError> {
        let req = hyper::Request::get(check_https(url)?)
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::NotHttps(format!("{url}: {e}")))?;
        let body = self.exchange(url, req).await?;
        json(url, &body)
    }

    /// GETs `url` and returns the body.
    pub async fn get(&self, url: &str) -> Result<Bytes, FetchError> {
        let req = hyper::Request::get(check_https(url)?)
            .body(Full::new(Bytes::new()))
            .map_err(|e| FetchError::NotHttps(format!("{url}: {e}")))?;
        self.exchange(url, req).await
    }

    /// POSTs an `application/x-www-form-urlencoded` body with optional Basic credentials and
    /// returns the answer's body (2xx) or [`FetchError::Status`] with the body.
    pub async fn post_form(
        &self,
        url: &str,
        form: String,
        basic: Option<String>,
    ) -> Result<Bytes, FetchError> {
        let mut req = hyper::Request::post(check_https(url)?)
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .header(http::header::ACCEPT, "application/json");
        if let Some(basic) = basic {
            req = req.header(http::header::AUTHORIZATION, format!("Basic {basic}"));
        }
        let req = req
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| FetchError::NotHttps(format!("{url}: {e}")))?;
        self.exchange(url, req).await
    }

    async fn exchange(
        &self,
        url: &str,
        req: hyper::Request<Full<Bytes>>,
    ) -> Result<Bytes, FetchError> {
        let work = async {
            let resp = self
                .http
                .request(req)
                .await
                .map_err(|e| FetchError::Unreachable {
                    url: url.to_owned(),
                    message: crate::fsutil::error_chain(&e),
                })?;
            let status = resp.status();
            let body = Limited::new(resp.into_body(), self.cap)
                .collect()
                .await
                .map_err(|e| {
                    if e.is::<http_body_util::LengthLimitError>() {
                        FetchError::TooLarge {
                            url: url.to_owned(),
                            cap: self.cap,
                        }
                    } else {
                        FetchError::Unreachable {
                            url: url.to_owned(),
                            message: e.to_string(),
                        }
                    }
                })?
                .to_bytes();
            if !status.is_success() {
                return Err(FetchError::Status {
                    url: url.to_owned(),
                    status: status.as_u16(),
                    body: String::from_utf8_lossy(&body).chars().take(512).collect(),
                });
            }
            Ok(body)
        };
        tokio::time::timeout(self.deadline, work)
            .await
            .map_err(|_| FetchError::Timeout {
                url: url.to_owned(),
                deadline: self.deadline,
            })?
    }
}

/// Parses `url` and insists on `https` with a host: keys and tokens never travel in clear.
pub fn check_https(url: &str) -> Result<http::Uri, FetchError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| FetchError::NotHttps(url.to_owned()))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none() {
        return Err(FetchError::NotHttps(url.to_owned()));
    }
    Ok(uri)
}

/// A JSON body, or a [`FetchError::BadDocument`] naming `url`.
pub fn json(url: &str, body: &[u8]) -> Result<serde_json::Value, FetchError> {
    serde_json::from_slice(body).map_err(|e| FetchError::BadDocument {
        url: url.to_owned(),
        message: format!("not JSON: {e}"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_https_urls() {
        assert!(check_https("https://issuer.example/x").is_ok());
        for bad in [
            "http://issuer.example",
            "ftp://x",
            "https://",
            "/relative",
            "",
            "x y",
        ] {
            assert!(
                matches!(check_https(bad), Err(FetchError::NotHttps(_))),
                "{bad}"
            );
        }
    }
}
