//! Which agents are connected: (tenant, agent name) → live sessions, with what the admin API
//! shows about each, and the choice of session for a new stream.

mod agent;
mod reached;

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use crate::auth::Tenant;
use crate::proto::kube::CAPABILITY;
use agent::lock;
pub use agent::{AgentInfo, AgentSession, CommandSlot, InventoryTurn, StreamSlot};
pub use reached::Reached;

/// Agents remembered after they disconnect (so a command says "offline", not "unknown").
const KNOWN_AGENTS: usize = 10_000;

/// Where a Kubernetes command for (tenant, agent) can go.
#[derive(Debug)]
pub enum KubePick {
    /// This live session has cluster mode.
    Session(Arc<AgentSession>),
    /// The agent is connected, but none of its sessions has cluster mode.
    NoCapability,
    /// The agent has been connected to this hub before and is not now.
    Offline {
        /// When its last session ended.
        last_seen: SystemTime,
    },
    /// This hub has never seen the agent (in this tenant).
    Unknown,
}

/// Which session cap refused a new session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SessionCap {
    /// The agent name already holds this many sessions in its tenant.
    #[error("the agent already holds {limit} sessions (--max-sessions-per-agent)")]
    PerAgent {
        /// The cap in force.
        limit: usize,
    },
    /// The token already holds this many sessions.
    #[error("its token already holds {limit} sessions (--max-sessions-per-token)")]
    PerToken {
        /// The cap in force.
        limit: usize,
    },
}

impl SessionCap {
    /// The `cap` label of `rna_cap_refusals_total`.
    pub fn label(self) -> &'static str {
        match self {
            SessionCap::PerAgent { .. } => "sessions_per_agent",
            SessionCap::PerToken { .. } => "sessions_per_token",
        }
    }
}

type Key = (Tenant, String);

/// Where a page of the agents list ends: the sort key of its last session. The next page
/// starts after it, so sessions that come or go between two pages neither repeat nor shift
/// the ones after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    /// Tenant of the last session shown.
    pub tenant: String,
    /// Agent name of the last session shown.
    pub name: String,
    /// Session id of the last session shown.
    pub session_id: u64,
}

/// One page of the agents list.
#[derive(Debug)]
pub struct AgentPage {
    /// The sessions of this page, in (tenant, name, session id) order.
    pub agents: Vec<AgentInfo>,
    /// Whether sessions follow this page.
    pub more: bool,
    /// Sessions visible to the caller in all (every page).
    pub total: usize,
}

/// The connected agents of this hub.
#[derive(Debug)]
pub struct Registry {
    /// Sessions by (tenant, name); several when replicas share a name.
    agents: Mutex<HashMap<Key, Vec<Arc<AgentSession>>>>,
    /// Sessions per token id, for the per-token cap: counting them by walking every session
    /// made each admission O(sessions), 12 % of the hub's CPU in a reconnect storm of
    /// 10,000 agents sharing a token. Locked only while `agents` is held, after it.
    per_token: Mutex<HashMap<String, usize>>,
    /// Bumped on every change, so tests and readiness can wait without polling.
    changes: tokio::sync::watch::Sender<u64>,
    /// Agents seen since the hub started, with when their last session ended.
    known: Mutex<HashMap<Key, SystemTime>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Registry {
            agents: Mutex::new(HashMap::new()),
            per_token: Mutex::new(HashMap::new()),
            changes: tokio::sync::watch::Sender::new(0),
            known: Mutex::new(HashMap::new()),
        }
    }

    /// Stores `session`'s new inventory report (JSON) and forgets the older reports of the
    /// other sessions of its (tenant, name): callers are served the freshest one only, so
    /// one agent name holds one report however many sessions it has.
    pub fn store_inventory(&self, session: &AgentSession, json: Bytes) {
        let key = (session.tenant.clone(), session.name.clone());
        {
            let agents = lock(&self.agents);
            for other in agents.get(&key).into_iter().flatten() {
                if other.id != session.id {
                    *lock(&other.inventory) = None;
                }
            }
            session.set_inventory_json(json);
        }
        self.changed();
    }

    fn changed(&self) {
        self.changes.send_modify(|v| *v += 1);
    }

    /// Adds a session if its agent name and its token are under their caps: at most
    /// `per_agent` sessions of one (tenant, name) and `per_token` of one token. Checked and
    /// inserted under one lock, so concurrent handshakes cannot overshoot.
    pub fn admit(
        &self,
        session: Arc<AgentSession>,
        per_agent: usize,
        per_token: usize,
    ) -> Result<(), SessionCap> {
        let key = (session.tenant.clone(), session.name.clone());
        let mut agents = lock(&self.agents);
        let of_agent = agents.get(&key).map_or(0, Vec::len);
        if of_agent >= per_agent {
            return Err(SessionCap::PerAgent { limit: per_agent });
        }
        let mut tokens = lock(&self.per_token);
        let of_token = tokens.get(&session.token_id).copied().unwrap_or(0);
        if of_token >= per_token {
            return Err(SessionCap::PerToken { limit: per_token });
        }
        *tokens.entry(session.token_id.clone()).or_insert(0) += 1;
        drop(tokens);
        agents.entry(key).or_default().push(session);
        drop(agents);
        self.changed();
        Ok(())
    }

    /// Forgets a session at once (its connection died or was closed).
    pub fn remove(&self, session: &AgentSession) {
        let key = (session.tenant.clone(), session.name.clone());
        {
            let mut known = lock(&self.known);
            if known.len() >= KNOWN_AGENTS && !known.contains_key(&key) {
                // Forget the agent gone longest.
                if let Some(oldest) = known
                    .iter()
                    .min_by_key(|(_, t)| **t)
                    .map(|(k, _)| k.clone())
                {
                    known.remove(&oldest);
                }
            }
            known.insert(key.clone(), SystemTime::now());
        }
        let mut agents = lock(&self.agents);
        if let Some(list) = agents.get_mut(&key) {
            let before = list.len();
            list.retain(|s| s.id != session.id);
            if list.len() < before {
                let mut tokens = lock(&self.per_token);
                if let Some(n) = tokens.get_mut(&session.token_id) {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        tokens.remove(&session.token_id);
                    }
                }
            }
            if list.is_empty() {
                agents.remove(&key);
            }
        }
        drop(agents);
        self.changed();
    }

    /// Picks the live session of (tenant, name) with the fewest open streams (ties: the one
    /// that served fewest streams so far) and reserves a stream slot on it. An agent of
    /// another tenant is invisible here: the lookup is by (tenant, name).
    pub fn pick(&self, tenant: &Tenant, name: &str) -> Option<StreamSlot> {
        self.pick_excluding(tenant, name, &[], Duration::MAX)
    }

    /// Like [`pick`](Self::pick), skipping the sessions in `exclude` (they just failed) and
    /// preferring sessions heard from within `fresh` (a silent one may be dead but not yet
    /// timed out).
    pub fn pick_excluding(
        &self,
        tenant: &Tenant,
        name: &str,
        exclude: &[u64],
        fresh: Duration,
    ) -> Option<StreamSlot> {
        let agents = lock(&self.agents);
        let list = agents.get(&(tenant.clone(), name.to_string()))?;
        let live = list
            .iter()
            .filter(|s| s.takes_new_streams() && !exclude.contains(&s.id))
            .map(|s| {
                let load = Load {
                    stale: lock(&s.last_heartbeat).elapsed() > fresh,
                    open: s.open_streams(),
                    total: s.streams_total(),
                };
                (s, load)
            });
        let session = Arc::clone(least_loaded(live)?);
        session.open_streams.fetch_add(1, Ordering::Relaxed);
        session.streams_total.fetch_add(1, Ordering::Relaxed);
        Some(StreamSlot { session })
    }

    /// Where a Kubernetes command for (tenant, name) goes: the live session with cluster mode
    /// and the fewest commands in flight, or why there is none.
    pub fn pick_kube(&self, tenant: &Tenant, name: &str) -> KubePick {
        let key = (tenant.clone(), name.to_string());
        let agents = lock(&self.agents);
        let live: Vec<&Arc<AgentSession>> = agents
            .get(&key)
            .map(|l| l.iter().filter(|s| s.takes_new_streams()).collect())
            .unwrap_or_default();
        if live.is_empty() {
            drop(agents);
            return match lock(&self.known).get(&key) {
                Some(t) => KubePick::Offline { last_seen: *t },
                None => KubePick::Unknown,
            };
        }
        live.into_iter()
            .filter(|s| s.has_capability(CAPABILITY))
            .min_by_key(|s| (s.kube_commands.load(Ordering::Relaxed), s.id))
            .map_or(KubePick::NoCapability, |s| KubePick::Session(s.clone()))
    }

    /// Sessions of (tenant, name), live ones first.
    pub fn sessions_of(&self, tenant: &Tenant, name: &str) -> Vec<Arc<AgentSession>> {
        lock(&self.agents)
            .get(&(tenant.clone(), name.to_string()))
            .cloned()
            .unwrap_or_default()
    }

    /// The tenants in which an agent of this name is connected or was seen.
    pub fn tenants_of(&self, name: &str) -> Vec<Tenant> {
        let mut tenants: Vec<Tenant> = lock(&self.agents)
            .keys()
            .chain(lock(&self.known).keys())
            .filter(|(_, n)| n == name)
            .map(|(t, _)| t.clone())
            .collect();
        tenants.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        tenants.dedup();
        tenants
    }

    /// Every session, for the admin API and shutdown.
    pub fn sessions(&self) -> Vec<Arc<AgentSession>> {
        lock(&self.agents).values().flatten().cloned().collect()
    }

    /// Sessions visible to a caller: `None` means all tenants (admin).
    pub fn infos(&self, tenant: Option<&Tenant>) -> Vec<AgentInfo> {
        let mut infos: Vec<AgentInfo> = lock(&self.agents)
            .iter()
            .filter(|((t, _), _)| tenant.is_none_or(|want| want == t))
            .flat_map(|(_, list)| list.iter().map(|s| s.info()))
            .collect();
        infos.sort_by(|a, b| {
            (&a.tenant, &a.name, a.session_id).cmp(&(&b.tenant, &b.name, b.session_id))
        });
        infos
    }

    /// One page of the sessions visible to a caller (`None`: all tenants), in the order of
    /// [`infos`](Self::infos): the first `limit` whose (tenant, name, session id) comes after
    /// `after`, whether more follow, and how many are visible in all. Only the page's sessions
    /// are turned into [`AgentInfo`]s, so a page of a large fleet costs a sort of handles, not
    /// a snapshot of every session.
    pub fn page(
        &self,
        tenant: Option<&Tenant>,
        after: Option<&ListCursor>,
        limit: usize,
    ) -> AgentPage {
        // Handles only under the lock; sorting and snapshots after it.
        let mut sessions: Vec<Arc<AgentSession>> = lock(&self.agents)
            .iter()
            .filter(|((t, _), _)| tenant.is_none_or(|want| want == t))
            .flat_map(|(_, list)| list.iter().cloned())
            .collect();
        let total = sessions.len();
        fn key(s: &AgentSession) -> (&str, &str, u64) {
            (s.tenant.as_str(), s.name.as_str(), s.id)
        }
        if let Some(after) = after {
            let after = (after.tenant.as_str(), after.name.as_str(), after.session_id);
            sessions.retain(|s| key(s) > after);
        }
        sessions.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
        let more = sessions.len() > limit;
        sessions.truncate(limit);
        AgentPage {
            agents: sessions.iter().map(|s| s.info()).collect(),
            more,
            total,
        }
    }

    /// Number of live sessions.
    pub fn len(&self) -> usize {
        lock(&self.agents).values().map(Vec::len).sum()
    }

    /// Whether no agent is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sessions of one (tenant, name).
    pub fn count(&self, tenant: &Tenant, name: &str) -> usize {
        lock(&self.agents)
            .get(&(tenant.clone(), name.to_string()))
            .map_or(0, Vec::len)
    }

    /// A number that grows with every session admitted or removed (and inventory stored).
    pub fn generation(&self) -> u64 {
        *self.changes.borrow()
    }

    /// Waits until `pred` holds for the registry (checked on every change). Cancel-safe.
    pub async fn wait_until<F: Fn(&Registry) -> bool>(&self, pred: F) {
        let mut rx = self.changes.subscribe();
        loop {
            if pred(self) {
                return;
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    }
}

/// What the choice of a replica looks at, for one live session of an agent name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Load {
    /// Not heard from within the freshness window: it may be dead but not yet timed out.
    pub(crate) stale: bool,
    /// Streams open on it now.
    pub(crate) open: usize,
    /// Streams it served so far.
    pub(crate) total: u64,
}

/// The replica a new stream goes to: a fresh one before a stale one, then the fewest open
/// streams, then the fewest served so far (so new replicas catch up), the first of equals.
/// `None` when there is none. Takes an iterator so the pick on every SOCKS request allocates
/// nothing.
pub(crate) fn least_loaded<T>(replicas: impl IntoIterator<Item = (T, Load)>) -> Option<T> {
    replicas
        .into_iter()
        .min_by_key(|(_, l)| (l.stale, l.open, l.total))
        .map(|(replica, _)| replica)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(stale: bool, open: usize, total: u64) -> Load {
        Load { stale, open, total }
    }

    #[test]
    fn least_loaded_prefers_fresh_then_fewest_open_then_fewest_served() {
        let table: &[(&[Load], Option<usize>)] = &[
            (&[], None),
            (&[load(false, 3, 10)], Some(0)),
            // Fewest open streams wins.
            (&[load(false, 3, 10), load(false, 1, 50)], Some(1)),
            // Equal open streams: fewest served so far.
            (&[load(false, 2, 50), load(false, 2, 10)], Some(1)),
            // A stale replica loses even when idle.
            (&[load(true, 0, 0), load(false, 9, 900)], Some(1)),
            // Only stale ones: the least loaded of them.
            (&[load(true, 4, 1), load(true, 2, 1)], Some(1)),
            // Complete ties: the first.
            (
                &[load(false, 1, 1), load(false, 1, 1), load(false, 1, 1)],
                Some(0),
            ),
        ];
        for (loads, want) in table {
            let indexed = loads.iter().copied().enumerate();
            assert_eq!(least_loaded(indexed), *want, "{loads:?}");
        }
    }
}
