//! The Kubernetes command channel: typed commands the hub sends, the agent's answers, and the
//! inventory the agent reports.
//!
//! Each command travels on its own QUIC bidirectional stream opened by the hub, so a command
//! never waits behind bulk SOCKS data. The stream starts with a [`StreamHeader::Kube`] frame
//! (standard 64 KiB cap), then one [`KubeRequest`] frame capped at [`MAX_KUBE_REQUEST`]. The
//! agent answers with zero or more [`KubeReply::Progress`] frames and one final
//! [`KubeReply::Done`], each capped at [`MAX_KUBE_REPLY`], then finishes the stream.
//!
//! Kubernetes objects cross the wire as JSON text: postcard is not self-describing, and the
//! agent must not reinterpret objects it does not know (custom resources).
//!
//! The agent reports its [`Inventory`] on a bidirectional stream it opens itself, starting with
//! one [`AgentStream::Inventory`] frame capped at [`MAX_INVENTORY`].

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};

use super::{bounds, Open};

/// Largest command request body (the API server's own request limit is 3 MiB; apply bodies
/// with several documents stay below this).
pub const MAX_KUBE_REQUEST: usize = 4 * 1024 * 1024;

/// Largest single reply frame (a list of many objects); larger answers are refused with a
/// `TooLarge` failure that tells the caller to use `limit`.
pub const MAX_KUBE_REPLY: usize = 16 * 1024 * 1024;

/// Largest inventory report.
pub const MAX_INVENTORY: usize = 2 * 1024 * 1024;

/// The reason of a wait the agent refuses because it runs as many waits as it allows: the
/// hub counts these refusals as its own cap.
pub const TOO_MANY_WAITS: &str = "TooManyWaits";

/// Most namespaces one inventory may list.
pub const MAX_NAMESPACES: usize = 16_384;

/// Most API resources one inventory may list (a cluster with several large CRD sets has a
/// few thousand).
pub const MAX_RESOURCES: usize = 4_096;

/// Most verbs or short names of one resource (Kubernetes defines eight standard verbs).
pub const MAX_RESOURCE_WORDS: usize = 16;

/// Longest name in an inventory (namespace, group, version, kind, plural, verb, short name):
/// a DNS subdomain, the longest name Kubernetes allows for these.
pub const MAX_NAME_LEN: usize = 253;

/// Most collection errors one inventory may carry, and the longest of them in bytes.
pub const MAX_INVENTORY_ERRORS: usize = 64;

/// Longest readable text in an inventory or a failure reason (an error, a version string).
pub const MAX_TEXT_LEN: usize = 4_096;

/// Longest message of a [`KubeFailure`], in bytes (a Kubernetes Status message listing
/// many validation errors fits).
pub const MAX_FAILURE_MESSAGE: usize = 64 * 1024;

/// The capability an agent announces in Hello when it can run Kubernetes commands.
pub const CAPABILITY: &str = "kubernetes";

/// The first frame of every stream the hub opens: what the stream is for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StreamHeader {
    /// A tunnel stream for one SOCKS connection; raw bytes follow the agent's `OpenReply`.
    Tunnel(Open),
    /// A Kubernetes command; one capped [`KubeRequest`] frame follows.
    Kube(KubeHeader),
}

/// The header of a Kubernetes command stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeHeader {
    /// The agent abandons the command after this many milliseconds.
    pub timeout_ms: u64,
    /// Who asked, for the agent's audit line (never a secret).
    pub caller: Caller,
}

/// The identity of the admin API caller behind a command, for audit logs on the agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Caller {
    /// The caller's tenant.
    pub tenant: String,
    /// The public id of the caller's token.
    pub token_id: String,
    /// The token's label, if any.
    pub label: Option<String>,
}

/// Identifies one object or one kind of object.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObjectRef {
    /// `v1`, `apps/v1`, `example.com/v1alpha1`.
    pub api_version: String,
    /// The kind (`Deployment`) or the resource's plural, singular or short name (`deployments`,
    /// `deploy`); the agent resolves it through discovery.
    pub kind: String,
    /// Namespace of a namespaced object (`None`: the agent's default for get/delete/wait, all
    /// namespaces for list).
    pub namespace: Option<String>,
    /// Object name (empty for list).
    pub name: String,
}

impl ObjectRef {
    /// Whether this names core Secrets (`v1` and `Secret`, `secret` or `secrets`, in any
    /// case), the kind whose contents are credentials: audit lines mark such commands.
    pub fn is_secret(&self) -> bool {
        is_secret_kind(&self.api_version, &self.kind)
    }
}

/// Whether `api_version` and `kind` (a kind or a resource name, in any case, as the agent's
/// discovery resolves them) name core Secrets.
pub fn is_secret_kind(api_version: &str, kind: &str) -> bool {
    api_version == "v1"
        && (kind.eq_ignore_ascii_case("secret") || kind.eq_ignore_ascii_case("secrets"))
}

/// What an apply's audit line says about its documents, on the hub and on the agent alike:
/// their kinds and names joined by commas (`?` where one is missing), of at most `max`
/// documents, and whether any of them is a core Secret. Never their contents.
pub fn apply_summary(docs: &[serde_json::Value], max: usize) -> (String, String, bool) {
    let text = |d: &serde_json::Value, path: &str| {
        d.pointer(path)
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?")
            .to_string()
    };
    let joined = |path: &str| {
        let parts: Vec<String> = docs.iter().take(max).map(|d| text(d, path)).collect();
        parts.join(",")
    };
    let secret = docs
        .iter()
        .any(|d| is_secret_kind(&text(d, "/apiVersion"), &text(d, "/kind")));
    (joined("/kind"), joined("/metadata/name"), secret)
}

/// What to wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WaitFor {
    /// A Deployment, StatefulSet or DaemonSet rollout is complete.
    Rollout,
    /// `status.conditions[type=<type>].status == <status>`.
    Condition {
        /// Condition type, e.g. `Ready`.
        type_: String,
        /// Wanted status, e.g. `True`.
        status: String,
    },
    /// The object no longer exists.
    Deleted,
}

impl std::str::FromStr for WaitFor {
    type Err = String;

    /// `rollout`, `delete` (or `deleted`), `condition=Type` (status `True`) or
    /// `condition=Type=Status`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "rollout" => return Ok(WaitFor::Rollout),
            "delete" | "deleted" => return Ok(WaitFor::Deleted),
            _ => {}
        }
        let bad = || {
            format!("invalid condition {s:?}: expected rollout, delete, condition=TYPE or condition=TYPE=STATUS")
        };
        let rest = s.strip_prefix("condition=").ok_or_else(bad)?;
        let (type_, status) = rest.split_once('=').unwrap_or((rest, "True"));
        if type_.is_empty() || status.is_empty() {
            return Err(bad());
        }
        Ok(WaitFor::Condition {
            type_: type_.to_string(),
            status: status.to_string(),
        })
    }
}

/// A Kubernetes command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KubeRequest {
    /// Server-side apply of every object, in order, with field manager `rna`.
    Apply {
        /// The objects, as one JSON array.
        objects: String,
        /// Namespace for namespaced objects that name none.
        namespace: Option<String>,
        /// Ask the server to validate without persisting (`dryRun=All`).
        dry_run: bool,
        /// Take ownership of fields other managers own instead of failing with 409.
        force: bool,
    },
    /// Read one object.
    Get(ObjectRef),
    /// List objects of a kind.
    List {
        /// Kind and namespace (`name` is ignored).
        target: ObjectRef,
        /// `labelSelector`.
        label_selector: Option<String>,
        /// `fieldSelector`.
        field_selector: Option<String>,
        /// Page size.
        limit: Option<u32>,
        /// Continue token of the previous page.
        continue_token: Option<String>,
    },
    /// Delete one object.
    Delete {
        /// The object.
        target: ObjectRef,
        /// `Foreground`, `Background` or `Orphan`.
        propagation: Option<String>,
        /// `dryRun=All`.
        dry_run: bool,
    },
    /// Wait until an object meets a condition, reporting progress.
    Wait {
        /// The object.
        target: ObjectRef,
        /// The condition.
        condition: WaitFor,
        /// Give up after this many milliseconds.
        timeout_ms: u64,
    },
}

impl KubeRequest {
    /// The verb, for logs and metrics.
    pub fn verb(&self) -> &'static str {
        match self {
            KubeRequest::Apply { .. } => "apply",
            KubeRequest::Get(_) => "get",
            KubeRequest::List { .. } => "list",
            KubeRequest::Delete { .. } => "delete",
            KubeRequest::Wait { .. } => "wait",
        }
    }

    /// The object or kind the command is about (`None` for apply, which names its objects
    /// in its documents).
    pub fn target(&self) -> Option<&ObjectRef> {
        match self {
            KubeRequest::Apply { .. } => None,
            KubeRequest::Get(t) => Some(t),
            KubeRequest::List { target, .. }
            | KubeRequest::Delete { target, .. }
            | KubeRequest::Wait { target, .. } => Some(target),
        }
    }
}

/// One frame of the agent's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum KubeReply {
    /// A progress event (JSON object), for wait.
    Progress(String),
    /// The final answer: a JSON document, or why the command failed.
    Done(Result<String, KubeFailure>),
}

/// Why a command failed, as the hub reports it to the caller.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeFailure {
    /// The class of failure.
    pub kind: FailureKind,
    /// The HTTP status to answer with (the Kubernetes Status code for API errors).
    pub code: u16,
    /// Machine-readable reason (`NotFound`, `Conflict`, `Forbidden`, …).
    #[serde(deserialize_with = "failure_reason")]
    pub reason: String,
    /// Readable message (at most [`MAX_FAILURE_MESSAGE`] bytes).
    #[serde(deserialize_with = "failure_message")]
    pub message: String,
    /// Extra JSON (the Kubernetes Status `details`, partial apply results), if any.
    pub details: Option<String>,
}

fn failure_reason<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "failure reason", MAX_TEXT_LEN)
}

fn failure_message<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::string(d, "failure message", MAX_FAILURE_MESSAGE)
}

impl fmt::Display for KubeFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.reason, self.code, self.message)
    }
}

/// Classes of command failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FailureKind {
    /// The Kubernetes API answered with a Status error; `code` and `reason` are its own.
    Api,
    /// The agent's allow list (`--kube-namespace`, `--kube-resource`) refuses the command.
    NotAllowed,
    /// The command is malformed (bad document, unknown kind, missing name).
    BadRequest,
    /// The agent has no Kubernetes access.
    NoCapability,
    /// The command or the wait did not finish in time.
    Timeout,
    /// The answer would exceed [`MAX_KUBE_REPLY`].
    TooLarge,
    /// The API server could not be reached or answered nonsense.
    Unavailable,
}

impl FailureKind {
    /// A short stable name for logs and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            FailureKind::Api => "api",
            FailureKind::NotAllowed => "not_allowed",
            FailureKind::BadRequest => "bad_request",
            FailureKind::NoCapability => "no_capability",
            FailureKind::Timeout => "timeout",
            FailureKind::TooLarge => "too_large",
            FailureKind::Unavailable => "unavailable",
        }
    }
}

/// The first (and only) frame of a stream the agent opens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AgentStream {
    /// A fresh inventory report.
    Inventory(Inventory),
}

/// What the agent knows about its cluster, reported on connect and periodically.
///
/// Every list and string is bounded while decoding (`MAX_*` constants here), so a report
/// within the 2 MiB frame cap decodes to a few MiB at most, whatever its contents.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Inventory {
    /// Kubernetes server version (`gitVersion`), if readable.
    #[serde(deserialize_with = "inv_text")]
    pub server_version: Option<String>,
    /// Server platform (`linux/amd64`).
    #[serde(deserialize_with = "inv_text")]
    pub platform: Option<String>,
    /// Number of nodes, if the ServiceAccount may list them.
    pub node_count: Option<u64>,
    /// Namespaces the agent may act in (listed, then filtered by its allow list); at most
    /// [`MAX_NAMESPACES`].
    #[serde(deserialize_with = "inv_namespaces")]
    pub namespaces: Option<Vec<String>>,
    /// API resources the agent may act on (after its allow list); at most
    /// [`MAX_RESOURCES`].
    #[serde(deserialize_with = "inv_resources")]
    pub resources: Vec<ResourceInfo>,
    /// What could not be collected, and why (e.g. nodes are forbidden); at most
    /// [`MAX_INVENTORY_ERRORS`] of [`MAX_TEXT_LEN`] bytes.
    #[serde(deserialize_with = "inv_errors")]
    pub errors: Vec<String>,
    /// When the agent collected it, unix seconds.
    pub collected_unix: u64,
}

fn inv_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    bounds::opt_string(d, "inventory version or platform", MAX_TEXT_LEN)
}

fn inv_namespaces<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    bounds::opt_names(d, "inventory namespaces", MAX_NAMESPACES, MAX_NAME_LEN)
}

fn inv_resources<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<ResourceInfo>, D::Error> {
    bounds::list(d, "inventory resources", MAX_RESOURCES)
}

fn inv_errors<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounds::strings(d, "inventory errors", MAX_INVENTORY_ERRORS, MAX_TEXT_LEN)
}

fn res_name<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    bounds::name(d, "resource name", MAX_NAME_LEN)
}

fn res_words<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    bounds::names(
        d,
        "resource verbs or short names",
        MAX_RESOURCE_WORDS,
        MAX_NAME_LEN,
    )
}

/// One API resource from discovery. Names are at most [`MAX_NAME_LEN`] bytes, verbs and
/// short names at most [`MAX_RESOURCE_WORDS`] each.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourceInfo {
    /// API group (`""` for core).
    #[serde(deserialize_with = "res_name")]
    pub group: String,
    /// Version (the group's preferred version).
    #[serde(deserialize_with = "res_name")]
    pub version: String,
    /// Kind.
    #[serde(deserialize_with = "res_name")]
    pub kind: String,
    /// Plural resource name.
    #[serde(deserialize_with = "res_name")]
    pub plural: String,
    /// Singular name.
    #[serde(deserialize_with = "res_name")]
    pub singular: String,
    /// Whether objects live in namespaces.
    pub namespaced: bool,
    /// Verbs the API supports on it.
    #[serde(deserialize_with = "res_words")]
    pub verbs: Vec<String>,
    /// Short names (`deploy`).
    #[serde(deserialize_with = "res_words")]
    pub short_names: Vec<String>,
}

impl ResourceInfo {
    /// `apps/v1`, or `v1` for the core group.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::codec::{encode, encode_limited, read_frame, read_frame_limited};
    use crate::proto::Host;

    #[test]
    fn apply_summaries_name_kinds_and_names_only() {
        let docs = [
            serde_json::json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "a"}, "data": {"k": "v"}}),
            serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s"}}),
            serde_json::json!({"apiVersion": "apps/v1", "kind": 7, "metadata": {}}),
        ];
        let table = [
            (usize::MAX, ("ConfigMap,Secret,?", "a,s,?", true)),
            (1, ("ConfigMap", "a", true)),
            (0, ("", "", true)),
        ];
        for (max, (kinds, names, secret)) in table {
            let got = apply_summary(&docs, max);
            assert_eq!(
                (got.0.as_str(), got.1.as_str(), got.2),
                (kinds, names, secret),
                "{max}"
            );
        }
        let plain = apply_summary(&docs[..1], 20);
        assert!(!plain.2);
        let not_core = [serde_json::json!({"apiVersion": "example.com/v1", "kind": "Secret"})];
        assert!(!apply_summary(&not_core, 20).2);
    }

    #[tokio::test]
    async fn headers_tell_tunnel_and_command_streams_apart() {
        let headers = [
            StreamHeader::Tunnel(Open {
                host: Host::Domain("db".into()),
                port: 5432,
            }),
            StreamHeader::Kube(KubeHeader {
                timeout_ms: 1000,
                caller: Caller {
                    tenant: "acme/prod".into(),
                    token_id: "0123456789ab".into(),
                    label: None,
                },
            }),
        ];
        for h in headers {
            let frame = encode(&h).unwrap();
            let got: StreamHeader = read_frame(&mut &frame[..]).await.unwrap().unwrap();
            assert_eq!(got, h);
        }
    }

    #[test]
    fn secrets_are_told_by_core_version_and_any_spelling() {
        for kind in ["Secret", "secret", "secrets", "SECRETS"] {
            assert!(is_secret_kind("v1", kind), "{kind}");
        }
        for (v, kind) in [
            ("v1", "ConfigMap"),
            ("example.com/v1", "Secret"),
            ("v1", "secretz"),
        ] {
            assert!(!is_secret_kind(v, kind), "{v} {kind}");
        }
    }

    #[test]
    fn wait_conditions_parse() {
        let ok = [
            ("rollout", WaitFor::Rollout),
            ("delete", WaitFor::Deleted),
            (
                "condition=Ready",
                WaitFor::Condition {
                    type_: "Ready".into(),
                    status: "True".into(),
                },
            ),
            (
                "condition=Available=False",
                WaitFor::Condition {
                    type_: "Available".into(),
                    status: "False".into(),
                },
            ),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<WaitFor>().unwrap(), want, "{s}");
        }
        for bad in [
            "",
            "ready",
            "condition=",
            "condition=Ready=",
            "jsonpath={.x}",
        ] {
            assert!(bad.parse::<WaitFor>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn command_frames_have_their_own_caps() {
        let big = KubeRequest::Apply {
            objects: "x".repeat(MAX_KUBE_REQUEST + 1),
            namespace: None,
            dry_run: false,
            force: false,
        };
        assert!(encode_limited(&big, MAX_KUBE_REQUEST).is_err());
        let fits = KubeRequest::Apply {
            objects: "x".repeat(200 * 1024),
            namespace: None,
            dry_run: false,
            force: false,
        };
        // Larger than a control frame, within the command cap.
        assert!(encode(&fits).is_err());
        let frame = encode_limited(&fits, MAX_KUBE_REQUEST).unwrap();
        let got: KubeRequest = read_frame_limited(&mut &frame[..], MAX_KUBE_REQUEST)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, fits);
        // A reader with a smaller cap refuses the announced length before allocating.
        assert!(read_frame_limited::<KubeRequest, _>(&mut &frame[..], 1024)
            .await
            .is_err());
    }

    fn resource(words: usize, name_len: usize) -> ResourceInfo {
        ResourceInfo {
            group: "g".repeat(name_len),
            version: "v1".into(),
            kind: "Thing".into(),
            plural: "things".into(),
            singular: "thing".into(),
            namespaced: true,
            verbs: vec!["get".into(); words],
            short_names: vec![],
        }
    }

    /// Decodes `inv` as the hub does (frame cap `MAX_INVENTORY`), returning the refusal.
    fn refusal(inv: Inventory) -> Option<String> {
        let body = postcard::to_stdvec(&AgentStream::Inventory(inv)).unwrap();
        assert!(body.len() <= MAX_INVENTORY, "{} bytes", body.len());
        match crate::proto::codec::decode_body_limited::<AgentStream>(&body, MAX_INVENTORY) {
            Ok(_) => None,
            Err(e) => {
                assert!(e.is_over_bound(), "{e}");
                Some(e.to_string())
            }
        }
    }

    #[test]
    fn inventory_lists_and_names_are_bounded_while_decoding() {
        let ok = Inventory {
            namespaces: Some(vec!["n".repeat(MAX_NAME_LEN); 1000]),
            resources: vec![resource(MAX_RESOURCE_WORDS, MAX_NAME_LEN); 1000],
            errors: vec!["e".repeat(MAX_TEXT_LEN); MAX_INVENTORY_ERRORS],
            ..Inventory::default()
        };
        assert_eq!(refusal(ok), None);
        // The rogue report: a 2 MiB frame of empty namespace names (about 48 MiB decoded).
        let rogue = Inventory {
            namespaces: Some(vec![String::new(); MAX_INVENTORY - 16]),
            ..Inventory::default()
        };
        let cases = [
            (rogue, "inventory namespaces: 2097136 entries"),
            (
                Inventory {
                    namespaces: Some(vec!["n".repeat(MAX_NAME_LEN + 1)]),
                    ..Inventory::default()
                },
                "inventory namespaces: a string of 254 bytes",
            ),
            (
                Inventory {
                    resources: vec![resource(0, 1); MAX_RESOURCES + 1],
                    ..Inventory::default()
                },
                "inventory resources: 4097 entries",
            ),
            (
                Inventory {
                    resources: vec![resource(MAX_RESOURCE_WORDS + 1, 1)],
                    ..Inventory::default()
                },
                "resource verbs or short names: 17 entries",
            ),
            (
                Inventory {
                    resources: vec![resource(1, MAX_NAME_LEN + 1)],
                    ..Inventory::default()
                },
                "resource name: a string of 254 bytes",
            ),
            (
                Inventory {
                    namespaces: Some(vec!["\u{1}".repeat(10)]),
                    ..Inventory::default()
                },
                "inventory namespaces: a name with a control character",
            ),
            (
                Inventory {
                    errors: vec![String::new(); MAX_INVENTORY_ERRORS + 1],
                    ..Inventory::default()
                },
                "inventory errors: 65 entries",
            ),
            (
                Inventory {
                    server_version: Some("v".repeat(MAX_TEXT_LEN + 1)),
                    ..Inventory::default()
                },
                "inventory version or platform",
            ),
        ];
        for (inv, want) in cases {
            let got = refusal(inv).unwrap_or_default();
            assert!(got.contains(want), "{got} / {want}");
        }
    }

    #[test]
    fn failure_texts_are_bounded_while_decoding() {
        let failure = |message: usize| {
            KubeReply::Done(Err(KubeFailure {
                kind: FailureKind::Api,
                code: 422,
                reason: "Invalid".into(),
                message: "m".repeat(message),
                details: None,
            }))
        };
        let fits = postcard::to_stdvec(&failure(MAX_FAILURE_MESSAGE)).unwrap();
        assert!(
            crate::proto::codec::decode_body_limited::<KubeReply>(&fits, MAX_KUBE_REPLY).is_ok()
        );
        let over = postcard::to_stdvec(&failure(MAX_FAILURE_MESSAGE + 1)).unwrap();
        let err = crate::proto::codec::decode_body_limited::<KubeReply>(&over, MAX_KUBE_REPLY)
            .unwrap_err();
        assert!(err.to_string().contains("failure message"), "{err}");
    }
}
