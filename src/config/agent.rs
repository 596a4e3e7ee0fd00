//! The agent's settings: its one list of keys, and their validation into
//! [`AgentSettings`], cluster mode included.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::settings::{at_least_one, frame_size, parse_addr, worker_threads, Form};
use super::{parse_duration, required, to_toml, ConfigError, LogOptions, Sources, TlsFiles};
use crate::agent::kube::{
    in_cluster_detected, KubeAllow, KubeSettings, KubeSource, ResourceRule, SecretRef,
};
use crate::agent::AgentState;
use crate::agent::{AgentConfig, HubTarget, Policy, Rule, TransportMode};
use crate::auth::read_secret_file;
use crate::oidc::{ClientCredentials, TokenEndpoint};
use crate::transport::proxy::ProxySettings;
use crate::transport::{ClientTls, Congestion};

/// A Kubernetes namespace in a file: checked as it is read, so the error names its index.
/// Flags take any text; cluster-mode validation checks those.
struct Namespace;
checked_form!(Namespace => String, parse_namespace);

settings! {
    /// Agent settings from flags and environment (`None` or empty: not given).
    AgentOptions, file AgentFile, in force from settings: AgentSettings, options;
    /// Hub address (host:port, or host for port 4433); repeat for several hubs. Every
    /// address a name resolves to gets its own connection.
    #[arg(long, env = "RNA_HUB", value_delimiter = ',')]
    hub: Vec<HubTarget> => show(Some(settings.config.hubs.clone()));
    /// TLS name to verify the hub as [default: the host of --hub].
    #[arg(long, env = "RNA_SERVER_NAME")]
    server_name: Option<String> => show(settings.config.server_name.clone());
    /// Agent identifier; must equal the certificate's common name [default: the common name
    /// of the state folder's certificate].
    #[arg(long, env = "RNA_NAME")]
    name: Option<String> => show(Some(settings.config.name.clone()));
    /// Folder of what enrollment (--join) stored: key, certificate, CA and connect token, the
    /// defaults of --ca, --cert, --key and --token-file [default with --join: ./rna-agent].
    #[arg(long, env = "RNA_STATE_DIR")]
    state_dir: Option<PathBuf> => show(options.state_dir.clone());
    /// CA to verify the hub with.
    #[arg(long, env = "RNA_CA")]
    ca: Option<PathBuf> => show(options.ca.clone());
    /// Agent certificate (PEM).
    #[arg(long, env = "RNA_CERT")]
    cert: Option<PathBuf> => show(options.cert.clone());
    /// Agent private key (PEM).
    #[arg(long, env = "RNA_KEY")]
    key: Option<PathBuf> => show(options.key.clone());
    /// File holding the agent's token (scope connect:agentHub).
    #[arg(long, env = "RNA_TOKEN_FILE")]
    token_file: Option<PathBuf> => show(options.token_file.clone());
    /// OIDC client credentials instead of --token-file: the issuer's OAuth 2.0 token endpoint
    /// (https), where the agent trades --oidc-client-id and its secret for short-lived JWTs.
    #[arg(long, env = "RNA_OIDC_TOKEN_URL", value_name = "URL")]
    oidc_token_url: Option<String> => show(oidc(settings).and_then(|c| match &c.endpoint {
        TokenEndpoint::Url(url) => Some(url.clone()),
        TokenEndpoint::Issuer(_) => None,
    }));
    /// Instead of --oidc-token-url: the issuer URL, whose discovery document
    /// (/.well-known/openid-configuration) names the token endpoint.
    #[arg(long, env = "RNA_OIDC_ISSUER", value_name = "URL")]
    oidc_issuer: Option<String> => show(oidc(settings).and_then(|c| match &c.endpoint {
        TokenEndpoint::Issuer(url) => Some(url.clone()),
        TokenEndpoint::Url(_) => None,
    }));
    /// OAuth 2.0 client id of this agent at the issuer (client credentials grant).
    #[arg(long, env = "RNA_OIDC_CLIENT_ID")]
    oidc_client_id: Option<String> => show(oidc(settings).map(|c| c.client_id.clone()));
    /// File holding the client secret of --oidc-client-id (one line).
    #[arg(long, env = "RNA_OIDC_CLIENT_SECRET_FILE")]
    oidc_client_secret_file: Option<PathBuf> =>
        show(oidc(settings).and(options.oidc_client_secret_file.clone()));
    /// Scopes asked for, space-separated [default: connect:agentHub].
    #[arg(long, env = "RNA_OIDC_SCOPE")]
    oidc_scope: Option<String> => show(oidc(settings).map(|c| c.scope.clone()));
    /// Audience the hub's issuers file accepts, sent as `audience` and, when it is an
    /// absolute URI, also as the RFC 8707 `resource` [default: the issuer's own default].
    #[arg(long, env = "RNA_OIDC_AUDIENCE")]
    oidc_audience: Option<String> => show(oidc(settings).and_then(|c| c.audience.clone()));
    /// CA (PEM) to verify the token endpoint with [default: the system's roots].
    #[arg(long, env = "RNA_OIDC_CA")]
    oidc_ca: Option<PathBuf> => show(oidc(settings).and_then(|c| c.ca.clone()));
    /// Destinations the agent may dial: CIDR, IP, host or *.domain, optionally :port.
    /// Without any, everything but the default-denied ranges is allowed.
    #[arg(long, env = "RNA_ALLOW", value_delimiter = ',')]
    allow: Vec<Rule> => show(Some(settings.config.policy.allow_rules().to_vec()));
    /// Destinations the agent refuses (checked first).
    #[arg(long, env = "RNA_DENY", value_delimiter = ',')]
    deny: Vec<Rule> => show(Some(settings.config.policy.deny_rules().to_vec()));
    /// Time allowed to resolve and connect one destination [default: 10s].
    #[arg(long, env = "RNA_DIAL_TIMEOUT", value_parser = parse_duration)]
    dial_timeout: Option<Duration> => field(settings.config.dial_timeout);
    /// Time a session must stay up to earn an immediate reconnect when it drops; shorter
    /// sessions back off [default: 1s].
    #[arg(long, env = "RNA_STABLE_SESSION", value_parser = parse_duration)]
    stable_session: Option<Duration> => field(settings.config.stable_session);
    /// Tunnel streams the hub may have open on this agent's connection [default: 16384].
    #[arg(long, env = "RNA_MAX_STREAMS")]
    max_streams: Option<u32> => field(settings.config.limits.tunnel_streams, at_least_one);
    /// Address of the agent's /healthz, /readyz and /metrics, or `off`; the default is skipped
    /// with a warning when its port is taken [default: 127.0.0.1:4434].
    #[arg(long, env = "RNA_METRICS")]
    metrics: Option<String> =>
        show(Some(settings.metrics.addr().map_or_else(|| "off".to_string(), |a| a.to_string())));
    /// Dials in progress at once; more tunnel requests fail at once [default: 256].
    #[arg(long, env = "RNA_MAX_PENDING_DIALS")]
    max_pending_dials: Option<usize> => field(settings.config.max_pending_dials, at_least_one);
    /// Largest protocol frame accepted from a hub, in bytes, 1024 to 65536 [default: 65536].
    #[arg(long, env = "RNA_MAX_FRAME")]
    max_frame: Option<usize> => field(settings.config.max_frame, frame_size);
    /// Congestion controller for data sent to hubs: cubic or bbr [default: cubic].
    #[arg(long, env = "RNA_CONGESTION")]
    congestion: Option<Congestion> => field(settings.config.limits.congestion);
    /// How to reach the hub: quic (UDP), tcp (TLS over TCP, also through --proxy), or auto:
    /// QUIC, falling back to TCP when no QUIC handshake completes within
    /// --quic-fallback-after, and back to QUIC when a probe finds it working [default: auto].
    #[arg(long, env = "RNA_TRANSPORT")]
    transport: Option<TransportMode> => field(settings.config.transport);
    /// With --transport auto: how long a QUIC handshake may take before TCP is tried
    /// [default: 5s].
    #[arg(long, env = "RNA_QUIC_FALLBACK_AFTER", value_parser = parse_duration)]
    quic_fallback_after: Option<Duration> => field(settings.config.quic_fallback_after);
    /// With --transport auto, while on TCP: how often QUIC is tried again; the agent moves
    /// to QUIC without breaking running transfers [default: 10m].
    #[arg(long, env = "RNA_QUIC_PROBE_INTERVAL", value_parser = parse_duration)]
    quic_probe_interval: Option<Duration> => field(settings.config.quic_probe_interval);
    /// HTTP proxy for TCP sessions, http://[USER:PASSWORD@]HOST:PORT (sent CONNECT with
    /// Basic credentials); without it, https_proxy, HTTPS_PROXY, all_proxy and ALL_PROXY
    /// are read, and NO_PROXY (curl's rules) names hubs reached directly. A proxy in effect
    /// makes --transport auto use TCP.
    #[arg(long, env = "RNA_PROXY", value_name = "URL")]
    proxy: Option<String> =>
        show(settings.config.proxy.proxy.as_ref().map(|p| p.to_string()));
    /// Local IP address of the agent's connections to its hubs (the QUIC UDP socket and the
    /// direct TLS/TCP one), on a host with several addresses; the port stays ephemeral. Hub
    /// addresses of the other IP family are not dialed [default: chosen by the kernel's
    /// route].
    #[arg(long, env = "RNA_BIND_ADDRESS")]
    bind_address: Option<IpAddr> => show(settings.config.bind_address);
    /// Worker threads of the runtime, 1 to 1024 [default: 1 with at most two CPUs, else one
    /// per CPU].
    #[arg(long, env = "RNA_WORKER_THREADS")]
    worker_threads: Option<usize> => show(Some(settings.worker_threads));
    /// Cluster mode: run the hub's Kubernetes commands as this agent's ServiceAccount or
    /// kubeconfig identity [default: on when the in-cluster environment is detected or
    /// --kubeconfig is given].
    #[arg(long, env = "RNA_KUBERNETES", num_args = 0..=1, default_missing_value = "true")]
    kubernetes: Option<bool> => show(kubernetes_in_force(settings));
    /// Kubeconfig to act with instead of the in-cluster ServiceAccount (turns cluster mode on).
    #[arg(long, env = "RNA_KUBECONFIG")]
    kubeconfig: Option<PathBuf> =>
        show(kubeconfig_in_force(settings).map(|(path, _)| path.clone()));
    /// Context of --kubeconfig to use [default: its current context].
    #[arg(long, env = "RNA_KUBE_CONTEXT")]
    kube_context: Option<String> =>
        show(kubeconfig_in_force(settings).and_then(|(_, context)| context.clone()));
    /// Namespaces Kubernetes commands may touch; repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_NAMESPACE", value_delimiter = ',')]
    kube_namespace: Vec<String> as Namespace =>
        show(kube(settings).map(|k| k.allow.namespaces.clone()));
    /// Resources Kubernetes commands may touch, as plural[.group] (deployments.apps,
    /// configmaps, *.example.com); repeat [default: all that RBAC allows].
    #[arg(long, env = "RNA_KUBE_RESOURCE", value_delimiter = ',')]
    kube_resource: Vec<ResourceRule> => show(kube(settings).map(|k| k.allow.resources.clone()));
    /// How often the Kubernetes inventory is collected and reported to the hubs [default: 5m].
    #[arg(long, env = "RNA_KUBE_INVENTORY_INTERVAL", value_parser = parse_duration)]
    kube_inventory_interval: Option<Duration> => show(kube(settings).map(|k| k.inventory_interval));
    /// Secrets holding the agent's own credentials, as NAME (in the agent's namespace) or
    /// NAMESPACE/NAME: no Kubernetes command reads or changes them; repeat
    /// [default: rna-agent-tls,rna-agent-token].
    #[arg(long, env = "RNA_KUBE_PROTECTED_SECRET", value_delimiter = ',')]
    kube_protected_secret: Vec<SecretRef> =>
        show(kube(settings).map(|k| k.protected_secrets.clone()));
}

/// The agent's health and metrics address when none is given: loopback, port 4434, next to
/// the hub's 4433 and outside Prometheus' own 9090 and its exporter range 9100-9999 (see
/// docs/decisions.md).
pub const DEFAULT_AGENT_METRICS: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 4434);

/// Where the agent serves health and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricsListen {
    /// Not served.
    Off,
    /// Served on this address, which was asked for: failing to bind it stops the agent.
    On(SocketAddr),
    /// Served on [`DEFAULT_AGENT_METRICS`], nobody asked for it: if another program (or a
    /// second agent) holds the port, the agent warns and runs without the endpoint.
    Default(SocketAddr),
}

impl MetricsListen {
    /// The address served, if any.
    pub fn addr(&self) -> Option<SocketAddr> {
        match self {
            MetricsListen::Off => None,
            MetricsListen::On(a) | MetricsListen::Default(a) => Some(*a),
        }
    }
}

/// The agent's validated settings.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The agent's configuration.
    pub config: AgentConfig,
    /// Health and metrics endpoint.
    pub metrics: MetricsListen,
    /// Worker threads of the process's runtime.
    pub worker_threads: usize,
}

/// Validates agent options into the agent's configuration, reading certificates and token.
pub fn agent_settings(o: AgentOptions, sources: &Sources) -> Result<AgentSettings, ConfigError> {
    let invalid = |key: &str, message: String| sources.invalid(key, message);
    // Checked before any file is read, so a bad count is the first line the agent prints.
    let worker_threads = match o.worker_threads {
        Some(n) => worker_threads(n).map_err(|m| invalid("worker_threads", m))?,
        None => crate::runtime::default_worker_threads(),
    };
    if o.hub.is_empty() {
        return Err(ConfigError::Missing {
            key: "hub",
            flag: "hub",
            env: "HUB",
        });
    }
    // Checked before the state folder supplies a token file: a token file named along with
    // client credentials is a conflict, one from the folder is simply not used.
    let oidc = oidc_settings(&o, sources)?;
    // A state folder supplies every file not named explicitly, and the agent's name.
    let mut o = o;
    if let Some(state) = o.state_dir.as_deref().map(AgentState::new) {
        o.ca = o.ca.or_else(|| Some(state.ca()));
        o.cert = o.cert.or_else(|| Some(state.cert()));
        o.key = o.key.or_else(|| Some(state.key()));
        if oidc.is_none() {
            o.token_file = o.token_file.or_else(|| Some(state.token()));
        }
        if o.name.is_none() {
            o.name = crate::certs::load_certs(&state.cert())
                .ok()
                .and_then(|chain| chain.first().cloned())
                .and_then(|cert| crate::certs::common_name(&cert).ok());
        }
    }
    let name = required(&o.name, "name", "name", "NAME")?;
    if !crate::certs::valid_agent_name(&name) {
        return Err(invalid(
            "name",
            format!("{name:?} must match ^[A-Za-z0-9_-]{{1,63}}$"),
        ));
    }
    let files = TlsFiles::required(&o.ca, &o.cert, &o.key)?;
    let token_file = match oidc {
        Some(_) => None,
        None => Some(required(
            &o.token_file,
            "token_file",
            "token-file",
            "TOKEN_FILE",
        )?),
    };
    let tls = files.load(sources, ClientTls::load, ClientTls::check)?;
    let token = match &token_file {
        Some(path) => read_secret_file(path)
            .map_err(|e| invalid("token_file", crate::fsutil::error_chain(&e)))?,
        // Never sent: every Hello carries a JWT from the issuer.
        None => crate::auth::Secret::new(String::new()),
    };
    let mut config = AgentConfig::new(o.hub.clone(), name, tls, token);
    config.token_file = token_file;
    config.oidc = oidc;
    // A certificate and key of the state folder (not named by hand) renew there as they age.
    config.state = o.state_dir.as_deref().map(AgentState::new).filter(|state| {
        o.cert.as_deref() == Some(state.cert().as_path())
            && o.key.as_deref() == Some(state.key().as_path())
    });
    if let Some(name) = o.server_name.clone() {
        crate::transport::tls::server_name(&name)
            .map_err(|e| invalid("server_name", crate::fsutil::error_chain(&e)))?;
        config.server_name = Some(name);
    }
    config.bind_address = o.bind_address;
    config.policy = Policy::new(o.allow.clone(), o.deny.clone());
    config.proxy = ProxySettings::resolve(o.proxy.as_deref(), |name| std::env::var(name).ok())
        .map_err(|e| invalid("proxy", e.to_string()))?;
    let metrics = match o.metrics.as_deref() {
        None => MetricsListen::Default(DEFAULT_AGENT_METRICS),
        Some("off") => MetricsListen::Off,
        Some(addr) => MetricsListen::On(parse_addr(addr).map_err(|e| invalid("metrics", e))?),
    };
    config.kube = kube_settings(
        o.kubernetes,
        o.kubeconfig.clone(),
        o.kube_context.clone(),
        o.kube_namespace.clone(),
        o.kube_resource.clone(),
        o.kube_inventory_interval,
        in_cluster_detected(),
    )
    .map_err(|(key, message)| invalid(key, message))?;
    if let Some(kube) = config.kube.as_mut() {
        if !o.kube_protected_secret.is_empty() {
            kube.protected_secrets = o.kube_protected_secret.clone();
        }
    }
    // Read the kubeconfig now, so a broken one fails here (and in --check-config) with its key.
    if let Some(KubeSource::Kubeconfig { path, .. }) = config.kube.as_ref().map(|k| &k.source) {
        kube::config::Kubeconfig::read_from(path)
            .map_err(|e| invalid("kubeconfig", crate::fsutil::error_chain(&e)))?;
    }
    let mut settings = AgentSettings {
        config,
        metrics,
        worker_threads,
    };
    o.apply(&mut settings, sources)?;
    Ok(settings)
}

/// The OIDC client credentials, when any `oidc_*` key is given: complete (client id, secret
/// file, exactly one of token URL and issuer), https, the secret and CA readable. Errors name
/// the key at fault and what to add or remove.
fn oidc_settings(
    o: &AgentOptions,
    sources: &Sources,
) -> Result<Option<ClientCredentials>, ConfigError> {
    let invalid = |key: &str, message: String| sources.invalid(key, message);
    fn given(v: &Option<String>) -> Option<&str> {
        v.as_deref().filter(|v| !v.trim().is_empty())
    }
    let (token_url, issuer, client_id) = (
        given(&o.oidc_token_url),
        given(&o.oidc_issuer),
        given(&o.oidc_client_id),
    );
    let any = token_url.is_some()
        || issuer.is_some()
        || client_id.is_some()
        || o.oidc_client_secret_file.is_some()
        || given(&o.oidc_scope).is_some()
        || given(&o.oidc_audience).is_some()
        || o.oidc_ca.is_some();
    if !any {
        return Ok(None);
    }
    let Some(client_id) = client_id else {
        return Err(invalid(
            "oidc_client_id",
            "OIDC client credentials need --oidc-client-id (the agent's client at the issuer)"
                .into(),
        ));
    };
    if o.token_file.is_some() {
        return Err(invalid(
            "token_file",
            "--token-file and --oidc-client-id are two ways to authenticate to the hub: give \
             one"
            .into(),
        ));
    }
    let Some(secret_file) = &o.oidc_client_secret_file else {
        return Err(invalid(
            "oidc_client_secret_file",
            "--oidc-client-id needs --oidc-client-secret-file (a file holding its secret)".into(),
        ));
    };
    let endpoint =
        match (token_url, issuer) {
            (Some(_), Some(_)) => return Err(invalid(
                "oidc_token_url",
                "give --oidc-token-url or --oidc-issuer (discovery of the token endpoint), not \
                 both"
                    .into(),
            )),
            (Some(url), None) => {
                crate::oidc::fetch::check_https(url)
                    .map_err(|e| invalid("oidc_token_url", e.to_string()))?;
                TokenEndpoint::Url(url.to_owned())
            }
            (None, Some(url)) => {
                crate::oidc::fetch::check_https(url)
                    .map_err(|e| invalid("oidc_issuer", e.to_string()))?;
                TokenEndpoint::Issuer(url.trim_end_matches('/').to_owned())
            }
            (None, None) => {
                return Err(invalid(
                    "oidc_client_id",
                    "--oidc-client-id needs --oidc-token-url or --oidc-issuer (where tokens are \
                 requested)"
                        .into(),
                ))
            }
        };
    let secret = ClientCredentials::read_secret(secret_file)
        .map_err(|e| invalid("oidc_client_secret_file", e.to_string()))?;
    let mut creds = ClientCredentials::new(endpoint, client_id, secret);
    if let Some(scope) = given(&o.oidc_scope) {
        creds.scope = parse_scope(scope).map_err(|m| invalid("oidc_scope", m))?;
    }
    if let Some(audience) = given(&o.oidc_audience) {
        creds.audience = Some(audience.to_owned());
        // RFC 8707 §2: a resource indicator is an absolute URI; another value can only be
        // meant as the `audience` parameter (Auth0, Okta and others).
        if audience
            .parse::<http::Uri>()
            .is_ok_and(|u| u.scheme().is_some())
        {
            creds.resource = Some(audience.to_owned());
        }
    }
    creds.ca = o.oidc_ca.clone();
    // Reads the CA file now, so a bad one fails here (and in --check-config) with its key.
    creds.fetcher().map_err(|e| {
        let message = match e {
            crate::oidc::ClientError::Fetch(e) => e.to_string(),
            other => other.to_string(),
        };
        invalid("oidc_ca", message)
    })?;
    Ok(Some(creds))
}

/// A space-separated scope list (RFC 6749 §3.3: each scope printable ASCII without `"` or
/// `\`), normalised to single spaces.
fn parse_scope(text: &str) -> Result<String, String> {
    let scopes: Vec<&str> = text.split_ascii_whitespace().collect();
    for scope in &scopes {
        if let Some(c) = scope
            .chars()
            .find(|&c| !c.is_ascii_graphic() || c == '"' || c == '\\')
        {
            return Err(format!(
                "scope {scope:?} holds {c:?}: scopes are printable ASCII without \" or \\ \
                 (RFC 6749 section 3.3), separated by spaces"
            ));
        }
    }
    Ok(scopes.join(" "))
}

/// The OIDC client credentials in force, if any.
fn oidc(settings: &AgentSettings) -> Option<&ClientCredentials> {
    settings.config.oidc.as_ref()
}

/// A namespace name (RFC 1123 label).
pub(super) fn parse_namespace(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(s.to_string())
    } else {
        Err(format!(
            "invalid namespace {s:?}: expected a DNS label (lowercase letters, digits, -)"
        ))
    }
}

/// Decides cluster mode: explicit `kubernetes` wins; otherwise a kubeconfig or a detected
/// in-cluster environment turns it on. Errors name the key at fault.
pub fn kube_settings(
    kubernetes: Option<bool>,
    kubeconfig: Option<PathBuf>,
    context: Option<String>,
    namespaces: Vec<String>,
    resources: Vec<ResourceRule>,
    inventory_interval: Option<Duration>,
    in_cluster: bool,
) -> Result<Option<KubeSettings>, (&'static str, String)> {
    for ns in &namespaces {
        parse_namespace(ns).map_err(|e| ("kube_namespace", e))?;
    }
    let on = kubernetes.unwrap_or(kubeconfig.is_some() || in_cluster);
    if !on {
        if kubernetes == Some(false) || (namespaces.is_empty() && resources.is_empty()) {
            return Ok(None);
        }
        return Err((
            "kube_namespace",
            "an allow list for Kubernetes commands was given but cluster mode is off: give \
             --kubeconfig, run in a cluster, or set --kubernetes"
                .into(),
        ));
    }
    if context.is_some() && kubeconfig.is_none() {
        return Err(("kube_context", "needs --kubeconfig".into()));
    }
    let source = match kubeconfig {
        Some(path) => KubeSource::Kubeconfig { path, context },
        None if in_cluster => KubeSource::InCluster,
        None => {
            return Err((
                "kubernetes",
                "cluster mode needs --kubeconfig outside a Kubernetes pod (no in-cluster \
                 ServiceAccount found)"
                    .into(),
            ))
        }
    };
    let mut settings = KubeSettings::new(source);
    settings.allow = KubeAllow {
        namespaces,
        resources,
    };
    if let Some(i) = inventory_interval {
        settings.inventory_interval = i;
    }
    // Asked for explicitly (flag or kubeconfig): a broken identity stops the agent. Only
    // detected: it turns cluster mode off with a warning.
    settings.required = kubernetes == Some(true) || settings.source != KubeSource::InCluster;
    Ok(Some(settings))
}

/// Cluster mode as printed: off and asked-for are written out; only detected is left out, so
/// the printed file detects it the same way.
fn kubernetes_in_force(settings: &AgentSettings) -> Option<bool> {
    match kube(settings) {
        None => Some(false),
        Some(k) if k.required => Some(true),
        Some(_) => None,
    }
}

/// Cluster mode's settings, if it is on.
fn kube(settings: &AgentSettings) -> Option<&KubeSettings> {
    settings.config.kube.as_ref()
}

/// The kubeconfig and context cluster mode acts with, if it uses a kubeconfig.
fn kubeconfig_in_force(settings: &AgentSettings) -> Option<(&PathBuf, &Option<String>)> {
    match kube(settings).map(|k| &k.source) {
        Some(KubeSource::Kubeconfig { path, context }) => Some((path, context)),
        _ => None,
    }
}

/// The agent configuration in force (defaults included) as the keys of its configuration
/// file, for `--check-config`: pasted into a file, it gives the same configuration. The token
/// appears only as the path of its file; paths are absolute.
pub fn agent_file_text(
    options: &AgentOptions,
    settings: &AgentSettings,
    log: &LogOptions,
) -> Result<String, ConfigError> {
    to_toml(&options.in_force(settings, log))
}
