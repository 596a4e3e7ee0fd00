//! Enrollment on the hub's own listener: a connection that negotiated `rna-enroll/1` sends one
//! `EnrollRequest` (a join token and a CSR); the hub checks the token, signs the CSR for that
//! agent and tenant, records the certificate, makes the agent's connect token and answers
//! with one `EnrollReply`.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tracing::{info, warn};

use super::admission::HandshakeSlot;
use super::Shared;
use crate::auth::{Scope, TokenStore};
use crate::enroll::wire::{self, ENROLL_DONE, ENROLL_PROTOCOL};
use crate::enroll::{
    csr, AgentIdentity, CertBytes, EnrollError, EnrollReply, EnrollRequest, HubState, Issued,
    IssuedLog, IssuedRecord, RefusalCode, RenewRequest, RevocationList, Signer,
};
use crate::identity::Secret;
use crate::proto::codec;
use crate::transport::session::Session;

/// How long the hub waits for the agent to read the reply and close, before closing itself.
const REPLY_READ_TIME: Duration = Duration::from_secs(5);

/// Signs enrolled agents' certificates with the state folder's CA and keeps its records.
pub(crate) struct Enroller {
    /// Where join tokens, issued certificates and revocations are kept.
    state: HubState,
    /// The CA key and name.
    pub(super) signer: Signer,
    /// The CA certificate (DER) sent back to the agent.
    pub(super) ca_der: Vec<u8>,
    /// The hub's token store, where each enrolled agent's connect token goes.
    tokens: PathBuf,
    /// Lifetime of the certificates signed.
    pub(super) lifetime: Duration,
    /// The state shared with other replicas, when it is kept in Kubernetes: join tokens,
    /// issued certificates, connect tokens and revocations are read and written there.
    pub(super) shared_state: Option<Arc<super::shared_state::SharedState>>,
    /// One enrollment at a time: each reads, changes and writes the join tokens, the log and
    /// the token store, and two at once could spend one single-use token twice.
    lock: Mutex<()>,
    /// The revocation list as last read, and the file's modification time then: `rna certs
    /// revoke` writes the file, and the hub follows it.
    revoked: Mutex<(Option<SystemTime>, Arc<RevocationList>)>,
}

impl std::fmt::Debug for Enroller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enroller")
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

impl Enroller {
    /// Reads the CA certificate and key of `state`.
    pub(crate) fn open(
        state: HubState,
        tokens: PathBuf,
        lifetime: Duration,
    ) -> Result<Enroller, EnrollError> {
        let read = |path: PathBuf| {
            crate::fsutil::read_text(&path, 64 * 1024).map_err(|e| EnrollError::State {
                path,
                message: e.problem.to_string(),
            })
        };
        let (ca_pem, key_pem) = (read(state.ca())?, read(state.ca_key())?);
        let signer = Signer::from_pem(&ca_pem, &key_pem)?;
        let ca_der = crate::certs::parse_certs(&ca_pem)
            .ok()
            .and_then(|certs| certs.into_iter().next())
            .map(|c| c.to_vec())
            .ok_or_else(|| EnrollError::State {
                path: state.ca(),
                message: "no certificate".into(),
            })?;
        Ok(Enroller {
            state,
            signer,
            ca_der,
            tokens,
            lifetime,
            shared_state: None,
            lock: Mutex::new(()),
            revoked: Mutex::new((None, Arc::default())),
        })
    }

    /// Re-reads the revocation list if its file changed; `true` when it did. A list that
    /// cannot be read keeps the previous one (and says so), as the token store does.
    pub(crate) fn refresh_revocations(&self) -> bool {
        let path = self.state.revoked();
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).ok();
        let mut current = self.revoked.lock().unwrap_or_else(|e| e.into_inner());
        if modified.is_some() && current.0 == modified {
            return false;
        }
        match RevocationList::load(&path) {
            Ok(list) => {
                let changed = *current.1 != list;
                *current = (modified, Arc::new(list));
                changed
            }
            Err(e) => {
                warn!("keeping the previous revocation list: {e}");
                false
            }
        }
    }

    /// The revocation list in force (refreshed first).
    pub(crate) fn revocations(&self) -> Arc<RevocationList> {
        self.refresh_revocations();
        self.revoked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .1
            .clone()
    }

    /// Checks the request's join token for the agent its CSR names, signs the CSR, spends
    /// one use of the token and records everything. Blocking (file I/O): run off the I/O
    /// threads. A refusal spends nothing.
    ///
    /// `presented` is the identity of the certificate the agent presented, if any (an agent
    /// enrolling again): a join token of another tenant is refused, and the connect token
    /// that went with that certificate is revoked, since the new one replaces it.
    fn enroll(
        &self,
        request: &EnrollRequest,
        presented: Option<&AgentIdentity>,
        now: SystemTime,
    ) -> Result<Issued, EnrollError> {
        let tenant = presented.map(|identity| &identity.tenant);
        if request.protocol != ENROLL_PROTOCOL {
            return Err(refused(
                RefusalCode::Malformed,
                format!(
                    "enrollment protocol {} is not {ENROLL_PROTOCOL}",
                    request.protocol
                ),
            ));
        }
        let agent = csr::requested_agent(&request.csr_der)?;
        if let Some(state) = &self.shared_state {
            return super::shared_state::enroll(self, state, request, &agent, presented, now);
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        // Read afresh each time: `rna token create --join` adds tokens while the hub runs.
        let mut book = self.state.load_join_tokens()?;
        // The use is spent in memory, and saved only once the certificate is signed.
        let admission = book.redeem(request.join_token.expose(), &agent, tenant, now)?;
        // A join token made before the agent's certificate was revoked cannot bring it back.
        let created = book.get(&admission.token_id).map_or(0, |r| r.created);
        let revoked = RevocationList::load(&self.state.revoked())?;
        refuse_if_revoked_since(&revoked, &admission, created)?;
        let signed = self
            .signer
            .sign(&request.csr_der, &admission, self.lifetime, now)?;
        self.state.save_join_tokens(&book)?;
        let mut log = IssuedLog::load(&self.state.issued())?;
        let replaced = presented
            .and_then(|identity| log.by_serial(&identity.serial))
            .and_then(|record| record.connect_token.clone());
        let mut store = TokenStore::load_or_empty(&self.tokens).map_err(unavailable)?;
        // The token lives as long as the certificate: renewals move its end with the
        // certificate's, so a lapsed agent's token lapses too and is pruned.
        let ttl = Duration::from_secs(
            signed
                .not_after
                .saturating_sub(crate::auth::unix_now(now))
                .max(1),
        );
        let (connect_token, record) = store
            .create(
                admission.tenant.clone(),
                vec![Scope::ConnectAgentHub],
                Some(ttl),
                Some(format!("agent {agent} {ENROLLED_LABEL}")),
                now,
            )
            .map_err(unavailable)?;
        if let Some(old) = &replaced {
            // Gone already when it was pruned or removed by hand: nothing to revoke then.
            let _ = store.revoke(old);
        }
        prune_enrolled_tokens(&mut store, now);
        let mut issued = IssuedRecord::of(&signed, Some(admission.token_id.clone()));
        issued.connect_token = Some(record.id.clone());
        log.add(issued)?;
        log.save(&self.state.issued())?;
        store.save(&self.tokens).map_err(unavailable)?;
        info!(agent = %agent, tenant = %admission.tenant, serial = %signed.serial,
            join_token = %admission.token_id, not_after = signed.not_after, "agent enrolled");
        Ok(Issued {
            chain: vec![CertBytes(signed.cert_der)],
            ca: CertBytes(self.ca_der.clone()),
            connect_token: Secret::new(connect_token.expose().to_owned()),
            serial: signed.serial,
            not_after: signed.not_after,
        })
    }
}

/// The end of the label of every connect token made by enrollment, by which expired ones
/// are found and pruned.
pub(super) const ENROLLED_LABEL: &str = "(enrolled)";

/// Removes the connect tokens made by enrollment that have expired: their certificate ended
/// without a renewal, or a newer enrollment replaced them. Without this, every enrollment of
/// a fleet (a Kubernetes pod enrolls at each start) would leave a token behind forever.
pub(super) fn prune_enrolled_tokens(store: &mut TokenStore, now: SystemTime) {
    let now = crate::auth::unix_now(now);
    let pruned = store.remove_where(|record| {
        record
            .label
            .as_deref()
            .is_some_and(|label| label.ends_with(ENROLLED_LABEL))
            && record.expires.is_some_and(|expires| expires <= now)
    });
    if pruned > 0 {
        info!(pruned, "expired connect tokens of enrolled agents removed");
    }
}

impl Enroller {
    /// Renews the certificate the agent presented (`presented`, checked by TLS against the CA
    /// and its validity): signs the CSR for the same agent and tenant, logs the new
    /// certificate with the connect token of the old one and moves that token's expiry to the
    /// new certificate's end. Refused when no enrolled certificate was presented, when it is
    /// revoked, or when the CSR names another agent. Blocking (file I/O).
    fn renew(
        &self,
        request: &RenewRequest,
        presented: Option<&AgentIdentity>,
        now: SystemTime,
    ) -> Result<Issued, EnrollError> {
        if request.protocol != ENROLL_PROTOCOL {
            return Err(refused(
                RefusalCode::Malformed,
                format!(
                    "renewal protocol {} is not {ENROLL_PROTOCOL}",
                    request.protocol
                ),
            ));
        }
        let Some(identity) = presented else {
            return Err(refused(
                RefusalCode::BadRequest,
                "a renewal needs the agent's current enrolled certificate; enroll with a join \
                 token instead"
                    .into(),
            ));
        };
        if let Some(state) = &self.shared_state {
            return super::shared_state::renew(self, state, request, identity, now);
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let revoked = RevocationList::load(&self.state.revoked())?;
        if revoked.is_revoked(&identity.serial) {
            return Err(refused(
                RefusalCode::Revoked,
                format!(
                    "certificate {} of agent {:?} is revoked; enroll again with a new join token",
                    identity.serial, identity.agent
                ),
            ));
        }
        let admission = crate::enroll::Admission {
            token_id: format!("renewal of {}", identity.serial),
            tenant: identity.tenant.clone(),
            agent: identity.agent.clone(),
        };
        let signed = self
            .signer
            .sign(&request.csr_der, &admission, self.lifetime, now)?;
        let mut log = IssuedLog::load(&self.state.issued())?;
        let connect_token = log
            .by_serial(&identity.serial)
            .and_then(|record| record.connect_token.clone());
        let mut record = IssuedRecord::of(&signed, None);
        record.connect_token = connect_token.clone();
        log.add(record)?;
        if let Some(id) = &connect_token {
            let mut store = TokenStore::load_or_empty(&self.tokens).map_err(unavailable)?;
            match store.set_expires(id, Some(signed.not_after)) {
                Ok(()) => store.save(&self.tokens).map_err(unavailable)?,
                // Removed by hand: the agent's next Hello says so; the certificate is fine.
                Err(e) => warn!(agent = %identity.agent, token_id = %id,
                    "renewal: the agent's connect token is not in the store: {e}"),
            }
        }
        log.save(&self.state.issued())?;
        info!(agent = %identity.agent, tenant = %identity.tenant, serial = %signed.serial,
            previous = %identity.serial, not_after = signed.not_after, "agent certificate renewed");
        Ok(Issued {
            chain: vec![CertBytes(signed.cert_der)],
            ca: CertBytes(self.ca_der.clone()),
            connect_token: Secret::new(String::new()),
            serial: signed.serial,
            not_after: signed.not_after,
        })
    }
}

/// Refuses an enrollment whose agent was revoked after its join token was made (`created`):
/// a join token made before a revocation cannot bring the agent back.
pub(super) fn refuse_if_revoked_since(
    revoked: &RevocationList,
    admission: &crate::enroll::Admission,
    created: u64,
) -> Result<(), EnrollError> {
    if revoked.entries().any(|r| {
        r.agent == admission.agent && r.tenant == admission.tenant && r.revoked_at >= created
    }) {
        return Err(refused(
            RefusalCode::Revoked,
            format!(
                "agent {:?} of {} was revoked after join token {} was made; make a new join \
                 token",
                admission.agent, admission.tenant, admission.token_id
            ),
        ));
    }
    Ok(())
}

/// The metric and log-budget label of an enrollment refusal.
fn enroll_label(code: RefusalCode) -> &'static str {
    match code {
        RefusalCode::Malformed => "enroll_malformed",
        RefusalCode::Unknown => "enroll_unknown",
        RefusalCode::Expired => "enroll_expired",
        RefusalCode::Spent => "enroll_spent",
        RefusalCode::TenantMismatch => "enroll_tenant_mismatch",
        RefusalCode::NameNotAllowed => "enroll_name_not_allowed",
        RefusalCode::BadRequest => "enroll_bad_request",
        RefusalCode::Revoked => "enroll_revoked",
        RefusalCode::Unavailable => "enroll_unavailable",
    }
}

fn refused(code: RefusalCode, message: String) -> EnrollError {
    EnrollError::Refused { code, message }
}

fn unavailable(e: crate::auth::StoreError) -> EnrollError {
    EnrollError::State {
        path: PathBuf::from("token store"),
        message: crate::fsutil::error_chain(&e),
    }
}

/// Which exchange a connection to the hub's listener asked for by its ALPN.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exchange {
    /// `rna-enroll/1`: a join token and a CSR.
    Enroll,
    /// `rna-renew/1`: the current certificate and a CSR.
    Renew,
}

impl Exchange {
    /// The exchange an ALPN names, if it names one.
    pub(crate) fn of_alpn(alpn: &[u8]) -> Option<Exchange> {
        if alpn == crate::enroll::ENROLL_ALPN {
            Some(Exchange::Enroll)
        } else if alpn == crate::enroll::RENEW_ALPN {
            Some(Exchange::Renew)
        } else {
            None
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Exchange::Enroll => "enrollment",
            Exchange::Renew => "renewal",
        }
    }
}

/// A decoded request of either exchange.
enum Request {
    Enroll(EnrollRequest),
    Renew(RenewRequest),
}

/// Serves one enrollment connection: one request, one reply, then the connection is closed
/// with [`ENROLL_DONE`] or the refusal's own close code.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    enroller: Arc<Enroller>,
    connection: Session,
    slot: HandshakeSlot,
    exchange_kind: Exchange,
) {
    let remote = connection.remote_address();
    let deadline = tokio::time::Instant::now() + shared.config.caps.hello_timeout;
    let exchange = async {
        let (send, mut recv) = connection
            .accept_bi()
            .await
            .map_err(|e| format!("no request: {e}"))?;
        let body = codec::read_body_limited(&mut recv, codec::MAX_FRAME)
            .await
            .map_err(|e| format!("bad request frame: {e}"))?
            .ok_or("the request stream ended before the request")?;
        Ok::<_, String>((send, body))
    };
    let (mut send, body) = match tokio::time::timeout_at(deadline, exchange).await {
        Ok(Ok(got)) => got,
        Ok(Err(why)) => {
            shared.metrics.handshake_failed("enroll_malformed");
            shared.failure_log.failed(
                "enroll_malformed",
                format_args!("enrollment from {remote} failed: {why}"),
            );
            connection.close(RefusalCode::Malformed.close_code(), &why);
            return;
        }
        Err(_) => {
            shared.metrics.handshake_failed("enroll_timeout");
            shared.failure_log.failed(
                "enroll_timeout",
                format_args!("enrollment from {remote} failed: no request in time"),
            );
            connection.close(
                crate::proto::CloseCode::HandshakeTimeout.code(),
                "no enrollment request in time",
            );
            return;
        }
    };
    // The handshake is over: the request is read whole.
    drop(slot);
    // A certificate presented was checked against the CA by TLS, and its validity by TLS or,
    // on a resumed session, here; its tenant binds the agent, and it is the identity a
    // renewal renews.
    let presented = connection
        .peer_certificates()
        .filter(|chain| crate::certs::chain_valid_at(chain, SystemTime::now()).is_ok())
        .and_then(|chain| chain.into_iter().next())
        .and_then(|cert| crate::enroll::agent_identity(cert.as_ref()).ok());
    let outcome = match exchange_kind {
        Exchange::Enroll => wire::decode_request(&body).map(Request::Enroll),
        Exchange::Renew => wire::decode_renewal(&body).map(Request::Renew),
    };
    let outcome = match outcome {
        Ok(request) => {
            let enroller = enroller.clone();
            tokio::task::spawn_blocking(move || {
                let now = SystemTime::now();
                match request {
                    Request::Enroll(r) => enroller.enroll(&r, presented.as_ref(), now),
                    Request::Renew(r) => enroller.renew(&r, presented.as_ref(), now),
                }
            })
            .await
            .unwrap_or_else(|e| {
                Err(EnrollError::CannotCreate {
                    what: "agent certificate",
                    message: e.to_string(),
                })
            })
        }
        Err(e) => Err(refused(
            RefusalCode::Malformed,
            format!("{} request: {e}", exchange_kind.as_str()),
        )),
    };
    let (reply, code, reason) = match outcome {
        Ok(issued) => {
            // The connect token is live before the reply leaves, so the agent's first Hello
            // finds it without waiting for the store's file watch.
            let _ = shared.reload_tokens(true);
            (EnrollReply::Issued(issued), ENROLL_DONE, "enrolled".into())
        }
        Err(e) => {
            let (code, message) = match e.code() {
                Some(code) => (code, e.to_string()),
                None => {
                    // The detail (a path, a file system error) stays in the hub's log.
                    warn!("enrollment from {remote} could not be completed: {e}");
                    (
                        RefusalCode::Unavailable,
                        "the hub could not record the certificate; try again".into(),
                    )
                }
            };
            // Refusals go through the hub's rate limit of failure lines, as failed agent
            // handshakes do: a flood of bad join tokens must not become a flood of log lines.
            let label = enroll_label(code);
            shared.metrics.handshake_failed(label);
            shared.failure_log.failed(
                label,
                format_args!(
                    "{} from {remote} refused ({code}): {message}",
                    exchange_kind.as_str()
                ),
            );
            let reply = EnrollReply::Refused {
                code,
                message: message.clone(),
            };
            (reply, code.close_code(), message)
        }
    };
    if let Ok(frame) = wire::encode_reply(&reply) {
        let _ = send.write_all(&frame).await;
        let _ = send.finish();
    }
    // The agent closes once it has read the reply; a close now could discard it in flight.
    let _ = tokio::time::timeout(REPLY_READ_TIME, connection.closed()).await;
    connection.close(code, &reason);
}

/// `POST /api/v1/agents/{agent}/revoke` (an `admin` token; `?tenant=` when several tenants
/// have the name): revokes every enrolled certificate of that agent in that tenant, as `rna
/// certs revoke` does, and closes its sessions at once. 404 when nothing was issued to it,
/// 409 when this hub does not enroll agents.
pub(crate) async fn revoke(
    axum::extract::State(shared): axum::extract::State<Arc<Shared>>,
    axum::extract::Path(agent): axum::extract::Path<String>,
    auth: super::api::Authorized<super::api::AdminOnly>,
) -> Result<axum::Json<serde_json::Value>, super::api::ApiError> {
    use super::api::ApiError;
    let enroller = shared.enroller.clone().ok_or_else(|| {
        ApiError::Status(
            axum::http::StatusCode::CONFLICT,
            "this hub does not enroll agents (no CA key in its state folder)".into(),
        )
    })?;
    let tenant = auth.tenant.clone();
    let revoked = tokio::task::spawn_blocking(move || enroller.revoke(&agent, &tenant))
        .await
        .map_err(|e| {
            ApiError::Status(axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
        })?;
    let revoked = revoked.map_err(|e| match e {
        EnrollError::NotFound(message) => {
            ApiError::Status(axum::http::StatusCode::NOT_FOUND, message)
        }
        other => {
            warn!("revocation through the admin API failed: {other}");
            ApiError::Status(
                axum::http::StatusCode::SERVICE_UNAVAILABLE,
                "the revocation list could not be written".into(),
            )
        }
    })?;
    if let Some(enroller) = &shared.enroller {
        enroller.refresh_revocations();
    }
    shared.close_revoked_sessions();
    info!(token_id = %auth.grant.token_id, count = revoked.len(), "certificates revoked through the admin API");
    Ok(axum::Json(serde_json::json!({ "revoked": revoked })))
}

impl Enroller {
    /// Holds the lock under which the state folder and the token store are changed.
    pub(crate) fn lock_state(&self) -> std::sync::MutexGuard<'_, ()> {
        self.lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Points every issued certificate whose connect token is `old` at `new` (a rotation),
    /// so renewals move the new token's expiry. The caller holds [`Enroller::lock_state`].
    /// Blocking (file I/O).
    pub(crate) fn relink_connect_token(&self, old: &str, new: &str) -> Result<(), String> {
        let path = self.state.issued();
        let mut log = IssuedLog::load(&path).map_err(|e| e.to_string())?;
        if log.replace_connect_token(old, new) > 0 {
            log.save(&path).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Revokes every certificate issued to `agent` in `tenant` and saves the list; the newly
    /// revoked entries. Blocking (file I/O).
    fn revoke(
        &self,
        agent: &str,
        tenant: &crate::auth::Tenant,
    ) -> Result<Vec<crate::enroll::Revoked>, EnrollError> {
        if let Some(state) = &self.shared_state {
            return super::shared_state::revoke(state, agent, tenant);
        }
        let _one_at_a_time = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let log = IssuedLog::load(&self.state.issued())?;
        let mut list = RevocationList::load(&self.state.revoked())?;
        let now = crate::auth::unix_now(SystemTime::now());
        let added = list.revoke(&log, agent, Some(tenant), now)?;
        list.save(&self.state.revoked())?;
        Ok(added)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::enroll::{agent_identity, make_csr, Admission};

    const DAY: Duration = Duration::from_secs(24 * 60 * 60);

    /// An enroller over a fresh state folder, and the identity of a certificate it signed for
    /// `edge` whose connect token (`token_id`) is in the store.
    fn enrolled(dir: &std::path::Path) -> (Enroller, AgentIdentity, String) {
        let state = HubState::new(dir);
        state
            .prepare(&["hub.example.com".into()], true, true)
            .unwrap();
        let enroller = Enroller::open(state.clone(), state.tokens(), 30 * DAY).unwrap();
        let now = SystemTime::now();
        let admission = Admission {
            token_id: "0123456789ab".into(),
            tenant: "acme/prod".parse().unwrap(),
            agent: "edge".into(),
        };
        let csr = make_csr("edge").unwrap();
        let signed = enroller
            .signer
            .sign(&csr.csr_der, &admission, 30 * DAY, now)
            .unwrap();
        let mut store = TokenStore::load_or_empty(&state.tokens()).unwrap();
        let (_, token) = store
            .create(
                admission.tenant.clone(),
                vec![Scope::ConnectAgentHub],
                Some(DAY),
                Some(format!("agent edge {ENROLLED_LABEL}")),
                now,
            )
            .unwrap();
        store.save(&state.tokens()).unwrap();
        let mut log = IssuedLog::default();
        let mut record = IssuedRecord::of(&signed, Some(admission.token_id.clone()));
        record.connect_token = Some(token.id.clone());
        log.add(record).unwrap();
        log.save(&state.issued()).unwrap();
        let identity = agent_identity(&signed.cert_der).unwrap();
        (enroller, identity, token.id)
    }

    fn renewal(agent: &str) -> RenewRequest {
        RenewRequest {
            protocol: ENROLL_PROTOCOL,
            csr_der: make_csr(agent).unwrap().csr_der,
        }
    }

    #[test]
    fn a_renewal_keeps_agent_tenant_and_token_and_moves_the_token_expiry() {
        let dir = tempfile::tempdir().unwrap();
        let (enroller, identity, token_id) = enrolled(dir.path());
        let now = SystemTime::now();
        let issued = enroller
            .renew(&renewal("edge"), Some(&identity), now)
            .unwrap();
        assert_ne!(issued.serial, identity.serial);
        assert!(issued.connect_token.expose().is_empty());
        let renewed = agent_identity(&issued.chain[0].0).unwrap();
        assert_eq!(
            (renewed.agent.as_str(), &renewed.tenant),
            ("edge", &identity.tenant)
        );
        let log = IssuedLog::load(&enroller.state.issued()).unwrap();
        let record = log.by_serial(&issued.serial).unwrap();
        assert_eq!(record.connect_token.as_deref(), Some(token_id.as_str()));
        assert_eq!(record.join_token, None);
        // The token that went with the old certificate now lasts as long as the new one.
        let store = TokenStore::load(&enroller.tokens).unwrap();
        assert_eq!(
            store.get(&token_id).unwrap().expires,
            Some(issued.not_after)
        );
    }

    #[test]
    fn renewals_without_a_certificate_for_another_name_or_of_a_revoked_one_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (enroller, identity, _) = enrolled(dir.path());
        let now = SystemTime::now();
        let code = |r: Result<Issued, EnrollError>| r.unwrap_err().code();
        assert_eq!(
            code(enroller.renew(&renewal("edge"), None, now)),
            Some(RefusalCode::BadRequest)
        );
        assert_eq!(
            code(enroller.renew(&renewal("other"), Some(&identity), now)),
            Some(RefusalCode::NameNotAllowed)
        );
        let old = RenewRequest {
            protocol: 9,
            ..renewal("edge")
        };
        assert_eq!(
            code(enroller.renew(&old, Some(&identity), now)),
            Some(RefusalCode::Malformed)
        );
        enroller.revoke("edge", &identity.tenant).unwrap();
        assert_eq!(
            code(enroller.renew(&renewal("edge"), Some(&identity), now)),
            Some(RefusalCode::Revoked)
        );
        // Nothing was issued by the refusals.
        assert_eq!(IssuedLog::load(&enroller.state.issued()).unwrap().len(), 1);
    }

    #[test]
    fn enrolling_again_with_the_current_certificate_replaces_its_connect_token() {
        let dir = tempfile::tempdir().unwrap();
        let (enroller, identity, old_token) = enrolled(dir.path());
        let now = SystemTime::now();
        let pin = crate::enroll::ca_pin(&enroller.ca_der).unwrap();
        let mut new = crate::enroll::NewJoin::new(
            identity.tenant.clone(),
            crate::enroll::NameRule::Exact("edge".into()),
        );
        new.uses = 1;
        let (line, record) =
            crate::enroll::join::create(new, pin, "hub.example.com:4433", now).unwrap();
        let mut book = enroller.state.load_join_tokens().unwrap();
        book.insert(record);
        enroller.state.save_join_tokens(&book).unwrap();
        let request = EnrollRequest {
            protocol: ENROLL_PROTOCOL,
            join_token: line.token.clone(),
            csr_der: make_csr("edge").unwrap().csr_der,
        };
        let issued = enroller.enroll(&request, Some(&identity), now).unwrap();
        let store = TokenStore::load(&enroller.tokens).unwrap();
        // The old certificate's token is revoked; the new one ends with the new certificate.
        assert!(store.get(&old_token).unwrap().revoked);
        let new_id = crate::auth::token_id(issued.connect_token.expose())
            .unwrap()
            .to_owned();
        assert_eq!(store.get(&new_id).unwrap().expires, Some(issued.not_after));
        let log = IssuedLog::load(&enroller.state.issued()).unwrap();
        assert_eq!(
            log.by_serial(&issued.serial)
                .unwrap()
                .connect_token
                .as_deref(),
            Some(new_id.as_str())
        );
    }

    #[test]
    fn only_expired_connect_tokens_of_enrolled_agents_are_pruned() {
        let mut store = TokenStore::default();
        let tenant: crate::auth::Tenant = "acme/prod".parse().unwrap();
        let then = SystemTime::now() - 10 * DAY;
        let mut make = |ttl: Option<Duration>, label: &str| {
            store
                .create(
                    tenant.clone(),
                    vec![Scope::ConnectAgentHub],
                    ttl,
                    Some(label.to_owned()),
                    then,
                )
                .unwrap()
                .1
                .id
        };
        let lapsed = make(Some(DAY), "agent edge (enrolled)");
        let live = make(Some(30 * DAY), "agent core (enrolled)");
        let forever = make(None, "agent old (enrolled)");
        let by_hand = make(Some(DAY), "ci pipeline");
        prune_enrolled_tokens(&mut store, SystemTime::now());
        assert!(store.get(&lapsed).is_none());
        for kept in [live, forever, by_hand] {
            assert!(store.get(&kept).is_some(), "{kept}");
        }
    }
}
