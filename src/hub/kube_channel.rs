//! The hub's end of the Kubernetes command channel: picks the agent's session, opens one
//! stream per command, sends the capped request and reads the agent's answers within the
//! command's timeout; stores the inventory reports agents send.
//!
//! Hub path: admin API → registry → command stream → agent.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tracing::{debug, info};

use super::registry::{AgentSession, KubePick};
use super::Shared;
use crate::auth::Tenant;
use crate::proto::codec::{
    decode_body_limited, encode, encode_limited, read_body_limited, read_frame_limited, CodecError,
};
use crate::proto::kube::{
    AgentStream, Caller, KubeFailure, KubeHeader, KubeReply, KubeRequest, StreamHeader,
    MAX_INVENTORY, MAX_KUBE_REPLY, MAX_KUBE_REQUEST,
};
use crate::proto::StreamCode;
use crate::transport::session::{RecvStream, SendStream, StreamError};

/// Extra time the hub gives a command beyond the agent's own deadline, so the agent's precise
/// timeout answer arrives before the hub gives up.
const MARGIN: Duration = Duration::from_secs(5);

/// Why a command did not produce an answer from Kubernetes.
#[derive(Debug, thiserror::Error)]
pub enum KubeCallError {
    /// No such agent in the caller's tenant (an agent of another tenant looks the same).
    #[error("no agent named {0:?}")]
    NoAgent(String),
    /// The agent was connected before and is not now.
    #[error("agent {agent:?} is offline (last connected {seconds_ago}s ago)")]
    Offline {
        /// The agent.
        agent: String,
        /// Seconds since its last session ended.
        seconds_ago: u64,
    },
    /// The agent is connected without cluster mode.
    #[error(
        "agent {0:?} has no Kubernetes capability (start it with --kubernetes or --kubeconfig)"
    )]
    NoCapability(String),
    /// The hub is shutting down.
    #[error("hub is shutting down")]
    Draining,
    /// The request is larger than the channel carries.
    #[error("request of {len} bytes or more exceeds the {max}-byte limit")]
    TooLarge {
        /// Encoded size.
        len: usize,
        /// The cap.
        max: usize,
    },
    /// No answer within the command's timeout.
    #[error("agent {agent:?} did not answer within {timeout:?}")]
    Timeout {
        /// The agent.
        agent: String,
        /// The time given.
        timeout: Duration,
    },
    /// The stream or the connection failed.
    #[error("command stream to agent {agent:?} failed: {message}")]
    Stream {
        /// The agent.
        agent: String,
        /// What failed.
        message: String,
    },
    /// The agent ran the command and it failed (Kubernetes Status, allow list, …).
    #[error("{0}")]
    Failed(KubeFailure),
}

impl KubeCallError {
    /// The HTTP status for this error.
    pub fn http_status(&self) -> u16 {
        match self {
            KubeCallError::NoAgent(_) => 404,
            KubeCallError::Offline { .. } | KubeCallError::Draining => 503,
            KubeCallError::NoCapability(_) => 409,
            KubeCallError::TooLarge { .. } => 413,
            KubeCallError::Timeout { .. } => 504,
            KubeCallError::Stream { .. } => 502,
            KubeCallError::Failed(f) => {
                if (400..600).contains(&f.code) {
                    f.code
                } else {
                    500
                }
            }
        }
    }

    /// A short stable reason, like a Kubernetes Status reason.
    pub fn reason(&self) -> String {
        match self {
            KubeCallError::NoAgent(_) => "AgentNotFound".into(),
            KubeCallError::Offline { .. } => "AgentOffline".into(),
            KubeCallError::NoCapability(_) => "NoCapability".into(),
            KubeCallError::Draining => "HubDraining".into(),
            KubeCallError::TooLarge { .. } => "RequestTooLarge".into(),
            KubeCallError::Timeout { .. } => "AgentTimeout".into(),
            KubeCallError::Stream { .. } => "AgentStreamFailed".into(),
            KubeCallError::Failed(f) => f.reason.clone(),
        }
    }
}

/// The Kubernetes waits each token has running, so one token cannot hold an agent's command
/// slots ([`super::HubCaps::kube_waits_per_token`]).
#[derive(Debug, Default)]
pub(crate) struct WaitSlots(crate::listen::KeyedSlots<String>);

impl WaitSlots {
    /// One more wait for `token_id`, or `None` when it has `max` running already.
    pub(crate) fn try_take(&self, token_id: &str, max: usize) -> Option<WaitSlot> {
        self.0.take(token_id.to_string(), max).ok()
    }
}

/// One running wait of a token; dropping it frees the slot.
pub(crate) type WaitSlot = crate::listen::Slot<String>;

/// Picks the session a command for (tenant, agent) goes to.
pub(crate) fn pick(
    shared: &Shared,
    tenant: &Tenant,
    agent: &str,
) -> Result<Arc<AgentSession>, KubeCallError> {
    if shared.draining.load(Ordering::SeqCst) {
        return Err(KubeCallError::Draining);
    }
    match shared.registry.pick_kube(tenant, agent) {
        KubePick::Session(s) => Ok(s),
        KubePick::NoCapability => Err(KubeCallError::NoCapability(agent.to_string())),
        KubePick::Offline { last_seen } => Err(KubeCallError::Offline {
            agent: agent.to_string(),
            seconds_ago: SystemTime::now()
                .duration_since(last_seen)
                .map_or(0, |d| d.as_secs()),
        }),
        KubePick::Unknown => Err(KubeCallError::NoAgent(agent.to_string())),
    }
}

/// How long the agent may work on `request`: for a wait, its own timeout plus a little, so
/// the wait's precise timeout answer (with what was last seen) comes first; else the hub's
/// command timeout.
pub(crate) fn timeout_for(shared: &Shared, request: &KubeRequest) -> Duration {
    match request {
        KubeRequest::Wait { timeout_ms, .. } => {
            Duration::from_millis(*timeout_ms) + Duration::from_secs(2)
        }
        _ => shared.config.kube_timeout,
    }
}

/// Runs one command on `session`; progress events go to `progress` as they arrive. The whole
/// exchange is bounded by `timeout` plus a small margin.
pub(crate) async fn call(
    session: &Arc<AgentSession>,
    caller: Caller,
    request: &KubeRequest,
    timeout: Duration,
    progress: Option<mpsc::Sender<String>>,
) -> Result<String, KubeCallError> {
    let agent = session.name.clone();
    let _slot = session.kube_command();
    let header = StreamHeader::Kube(KubeHeader {
        timeout_ms: timeout.as_millis().min(u128::from(u64::MAX)) as u64,
        caller,
    });
    let head = encode(&header).map_err(|e| KubeCallError::Stream {
        agent: agent.clone(),
        message: e.to_string(),
    })?;
    let body = encode_limited(request, MAX_KUBE_REQUEST).map_err(|e| match e {
        crate::proto::codec::CodecError::TooLarge { len, max } => {
            KubeCallError::TooLarge { len, max }
        }
        other => KubeCallError::Stream {
            agent: agent.clone(),
            message: other.to_string(),
        },
    })?;
    let stream_err = |message: String| KubeCallError::Stream {
        agent: agent.clone(),
        message,
    };
    let exchange = async {
        let (mut send, mut recv) = session
            .connection
            .open_bi()
            .await
            .map_err(|e| stream_err(e.to_string()))?;
        // Commands go ahead of bulk tunnel data on a congested connection.
        send.set_priority(1);
        let written = async {
            send.write_all(&head).await?;
            send.write_all(&body).await?;
            send.finish()?;
            Ok::<_, StreamError>(())
        };
        if let Err(e) = written.await {
            recv.stop(StreamCode::Reset.into());
            return Err(stream_err(e.to_string()));
        }
        loop {
            let read = read_frame_limited::<KubeReply, _>(&mut recv, MAX_KUBE_REPLY);
            let reply = match &progress {
                // A caller that went away ends the command even while no progress comes (a
                // stalled wait), so it holds no slot at the hub or the agent. Dropping the
                // read mid-frame is fine: the stream is abandoned.
                Some(tx) => tokio::select! {
                    r = read => r,
                    _ = tx.closed() => {
                        recv.stop(StreamCode::Reset.into());
                        return Err(stream_err("caller went away".into()));
                    }
                },
                None => read.await,
            }
            .map_err(|e| stream_err(e.to_string()))?;
            match reply {
                Some(KubeReply::Progress(event)) => {
                    if let Some(tx) = &progress {
                        // The caller went away: stop reading and let the agent notice.
                        if tx.send(event).await.is_err() {
                            recv.stop(StreamCode::Reset.into());
                            return Err(stream_err("caller went away".into()));
                        }
                    }
                }
                Some(KubeReply::Done(Ok(answer))) => return Ok(answer),
                Some(KubeReply::Done(Err(f))) => return Err(KubeCallError::Failed(f)),
                None => {
                    return Err(stream_err(
                        "agent ended the stream without an answer".into(),
                    ))
                }
            }
        }
    };
    match tokio::time::timeout(timeout + MARGIN, exchange).await {
        Ok(r) => r,
        Err(_) => Err(KubeCallError::Timeout {
            agent,
            timeout: timeout + MARGIN,
        }),
    }
}

/// Turns for admin API reads that send large answers (inventories), per tenant: one
/// tenant's parallel readers wait for each other, never for another tenant's, and together
/// they are sent at most a set number of bytes per second, so one tenant's readers cannot
/// keep the hub's worker threads busy copying megabytes while other tenants wait.
#[derive(Debug)]
pub(crate) struct HeavyRequests {
    /// Requests served at once per tenant ([`HubCaps::heavy_requests_per_tenant`](super::HubCaps::heavy_requests_per_tenant)).
    per_tenant: usize,
    /// Bytes per second per tenant ([`HubCaps::heavy_bytes_per_second`](super::HubCaps::heavy_bytes_per_second)).
    rate: u64,
    /// Per tenant that asked; tenants come from valid tokens only.
    tenants: std::sync::Mutex<HashMap<Tenant, Arc<TenantTurns>>>,
}

/// One tenant's share of [`HeavyRequests`].
#[derive(Debug)]
struct TenantTurns {
    /// One permit per request served at once.
    semaphore: Arc<Semaphore>,
    /// When the tenant's byte budget lets the next slice go out.
    next_send: std::sync::Mutex<tokio::time::Instant>,
}

/// A turn of one tenant: held while its answer is sent.
#[derive(Debug)]
pub(crate) struct HeavyTurn {
    _permit: OwnedSemaphorePermit,
    tenant: Arc<TenantTurns>,
    rate: u64,
}

impl HeavyTurn {
    /// Waits until the tenant's byte budget allows sending `bytes` more. Cancel-safe (a
    /// cancelled wait keeps its reservation, which only slows the tenant).
    pub(crate) async fn pace(&self, bytes: usize) {
        let cost = Duration::from_secs_f64(bytes as f64 / self.rate as f64);
        let start = {
            let mut next = self
                .tenant
                .next_send
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            let start = (*next).max(tokio::time::Instant::now());
            *next = start + cost;
            start
        };
        tokio::time::sleep_until(start).await;
    }
}

impl HeavyRequests {
    /// Turns for `per_tenant` requests at once per tenant, sent at `rate` bytes per second
    /// per tenant.
    pub(crate) fn new(per_tenant: usize, rate: u64) -> Self {
        HeavyRequests {
            per_tenant: per_tenant.clamp(1, Semaphore::MAX_PERMITS),
            rate: rate.max(1),
            tenants: std::sync::Mutex::new(HashMap::new()),
        }
    }

    /// Waits up to `wait` for a turn of `tenant`; `None` if none came.
    pub(crate) async fn turn(&self, tenant: &Tenant, wait: Duration) -> Option<HeavyTurn> {
        let turns = {
            let mut tenants = self
                .tenants
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            tenants
                .entry(tenant.clone())
                .or_insert_with(|| {
                    Arc::new(TenantTurns {
                        semaphore: Arc::new(Semaphore::new(self.per_tenant)),
                        next_send: std::sync::Mutex::new(tokio::time::Instant::now()),
                    })
                })
                .clone()
        };
        let permit = tokio::time::timeout(wait, turns.semaphore.clone().acquire_owned())
            .await
            .ok()?
            .ok()?;
        Some(HeavyTurn {
            _permit: permit,
            tenant: turns,
            rate: self.rate,
        })
    }
}

/// Inventory reports decoded at once, hub-wide (every hub in the process shares them).
static DECODING: Semaphore = Semaphore::const_new(2);

/// How long an agent may take to send a whole inventory report once its turn came.
const INVENTORY_READ: Duration = Duration::from_secs(30);

/// Accepts the streams an agent opens (inventory reports) until its connection ends.
///
/// One report per session is read at a time, and no sooner than
/// [`HubCaps::inventory_interval`](super::HubCaps::inventory_interval) after the previous
/// one: a sooner report waits for its turn (quinn's flow control holds its bytes), and a
/// report opened while another waits is refused with [`StreamCode::TooSoon`]. Decoding and
/// the JSON the admin API serves are made once, off the I/O threads.
pub(crate) async fn accept_agent_streams(shared: Arc<Shared>, session: Arc<AgentSession>) {
    loop {
        let (send, recv) = match session.connection.accept_bi().await {
            Ok(s) => s,
            Err(_) => return,
        };
        let shared = shared.clone();
        let session = session.clone();
        tokio::spawn(take_inventory(shared, session, send, recv));
    }
}

/// Why an inventory stream was not stored.
#[derive(Debug, thiserror::Error)]
enum InventoryError {
    /// The frame could not be read or decoded (too large, over a bound, malformed).
    #[error("{0}")]
    Codec(#[from] CodecError),
    /// The agent did not send the whole report in time.
    #[error("not sent within {0:?}")]
    Timeout(Duration),
    /// The decoding task failed.
    #[error("decoding failed: {0}")]
    Task(String),
}

async fn take_inventory(
    shared: Arc<Shared>,
    session: Arc<AgentSession>,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let refuse = |send: &mut SendStream, recv: &mut RecvStream, code: StreamCode| {
        send.reset(code.into());
        recv.stop(code.into());
    };
    let Some(mut turn) = session.inventory_turn() else {
        shared.metrics.cap_refused("inventory_interval");
        info!(agent = %session.name, "inventory report refused: another one is waiting for its turn");
        refuse(&mut send, &mut recv, StreamCode::TooSoon);
        return;
    };
    let interval = shared.config.caps.inventory_interval;
    if let Some(due) = turn.due(interval) {
        tokio::select! {
            _ = tokio::time::sleep_until(due.into()) => {}
            _ = session.connection.closed() => return,
        }
    }
    turn.taken();
    let stored = async {
        let body =
            match tokio::time::timeout(INVENTORY_READ, read_body_limited(&mut recv, MAX_INVENTORY))
                .await
            {
                Err(_) => return Err(InventoryError::Timeout(INVENTORY_READ)),
                Ok(Err(e)) => return Err(e.into()),
                Ok(Ok(None)) => return Ok(None),
                Ok(Ok(Some(body))) => body,
            };
        // Decoding up to 2 MiB and writing its JSON take milliseconds of CPU: not on the
        // threads that move every tenant's bytes, and a few at a time hub-wide, so many
        // agents reporting at once neither take every CPU nor hold many decoded copies.
        let _decoding = DECODING
            .acquire()
            .await
            .map_err(|e| InventoryError::Task(e.to_string()))?;
        let made = tokio::task::spawn_blocking(move || {
            let AgentStream::Inventory(inventory) =
                decode_body_limited::<AgentStream>(&body, MAX_INVENTORY)?;
            let json =
                serde_json::to_vec(&inventory).map_err(|e| InventoryError::Task(e.to_string()))?;
            Ok::<_, InventoryError>((
                Bytes::from(json),
                inventory.resources.len(),
                inventory.namespaces.as_ref().map_or(0, Vec::len),
            ))
        })
        .await
        .map_err(|e| InventoryError::Task(e.to_string()))??;
        Ok(Some(made))
    };
    match stored.await {
        Ok(Some((json, resources, namespaces))) => {
            debug!(
                resources,
                namespaces,
                json_bytes = json.len(),
                "inventory received"
            );
            shared.registry.store_inventory(&session, json);
            let _ = send.finish();
        }
        Ok(None) => {
            let _ = send.finish();
        }
        Err(e) => {
            if let InventoryError::Codec(c) = &e {
                if c.is_too_large() {
                    shared.metrics.cap_refused("frame_size");
                } else if c.is_over_bound() {
                    shared.metrics.cap_refused("decoded_size");
                }
            }
            info!(agent = %session.name, "inventory report refused: {e}");
            refuse(&mut send, &mut recv, StreamCode::BadHeader);
        }
    }
}
