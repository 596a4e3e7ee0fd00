//! TLS session resumption across a hub restart (`transport::tickets`): a hub started again
//! with the same key, certificate and CA set reads the tickets its previous run gave, so its
//! agents reconnect without exchanging certificates; a changed CA set ends every ticket; and
//! what TLS no longer checks on a resumed session (the certificate's validity period) the
//! hub checks after the handshake. Real `rna` processes.

use std::time::{Duration, SystemTime};

use rna::agent::TransportMode;

use crate::common::{
    on_both_transports, restartable_hub_and_agent_with, spawn_logged, wait_line, RestartableHub,
};

/// The hub's `agent connected` line for the agent's next session.
async fn connected_line(log: &mut tokio::sync::mpsc::UnboundedReceiver<String>) -> String {
    wait_line(log, "agent connected").await
}

/// `hub_args` with `--ca` pointing at `ca` instead.
fn with_ca(hub_args: &[String], ca: &str) -> Vec<String> {
    let mut args = hub_args.to_vec();
    let at = args
        .iter()
        .position(|a| a == "--ca")
        .expect("the hub is given --ca");
    args[at + 1] = ca.to_string();
    args
}

on_both_transports!(a_restarted_hub_resumes_its_agents_tls_sessions_until_its_ca_set_changes);
async fn a_restarted_hub_resumes_its_agents_tls_sessions_until_its_ca_set_changes(
    transport: TransportMode,
) {
    let tmp = tempfile::tempdir().unwrap();
    let RestartableHub {
        mut hub,
        mut hub_log,
        hub_args,
        agent,
        ..
    } = restartable_hub_and_agent_with(tmp.path(), &["--transport", transport.as_str()], |_| {})
        .await;
    let mut agent = agent;
    let first = connected_line(&mut hub_log).await;
    assert!(first.contains("tls=full"), "{first}");
    assert!(first.contains(&format!("transport={transport}")), "{first}");

    // The same hub again: the agent's ticket from the first run opens.
    hub.kill().await.unwrap();
    let (mut hub, mut hub_log) = spawn_logged(&hub_args);
    wait_line(&mut hub_log, "hub serving").await;
    let resumed = connected_line(&mut hub_log).await;
    assert!(resumed.contains("tls=resumed"), "{resumed}");
    agent.wait_line("connected to hub").await;

    // A CA added to the hub's trust (as when CAs are rotated): the ticket keys change, so the
    // next session is a full handshake again, and still succeeds.
    let certs = tmp.path().join("certs");
    let other = rna::certs::Ca::generate("another CA").unwrap();
    let bundle = tmp.path().join("ca-bundle.pem");
    let ca = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    std::fs::write(&bundle, format!("{ca}{}", other.cert_pem())).unwrap();
    hub.kill().await.unwrap();
    let (_hub, mut hub_log) = spawn_logged(&with_ca(&hub_args, &bundle.display().to_string()));
    wait_line(&mut hub_log, "hub serving").await;
    let full = connected_line(&mut hub_log).await;
    assert!(full.contains("tls=full"), "{full}");
    agent.wait_line("connected to hub").await;
}

/// An agent certificate that expires while the agent holds a ticket made under it: the
/// restarted hub resumes the TLS session (no certificate check in the handshake) and then
/// refuses the session `certificate_expired`, as a full handshake would have refused it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_resumed_session_of_an_expired_certificate_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // Valid for a few seconds from now: long enough to connect once.
    let not_after = SystemTime::now() + Duration::from_secs(6);
    let RestartableHub {
        mut hub,
        mut hub_log,
        hub_args,
        mut agent,
        ..
    } = restartable_hub_and_agent_with(tmp.path(), &[], |certs| {
        let ca = rna::certs::Ca::from_pem(
            &std::fs::read_to_string(certs.join("ca.pem")).unwrap(),
            &std::fs::read_to_string(certs.join("ca-key.pem")).unwrap(),
        )
        .unwrap();
        let not_before = SystemTime::now() - Duration::from_secs(60);
        let issued = ca
            .issue_agent_with_validity("edge", not_before, not_after)
            .unwrap();
        std::fs::write(certs.join("agent-edge.pem"), &issued.cert_pem).unwrap();
        std::fs::write(certs.join("agent-edge-key.pem"), &issued.key_pem).unwrap();
    })
    .await;
    let first = connected_line(&mut hub_log).await;
    assert!(first.contains("tls=full"), "{first}");

    hub.kill().await.unwrap();
    // The condition waited for is the clock itself: the certificate's end has passed.
    let left = not_after
        .duration_since(SystemTime::now())
        .unwrap_or_default();
    tokio::time::sleep(left + Duration::from_secs(2)).await;
    let (_hub, mut hub_log) = spawn_logged(&hub_args);
    wait_line(&mut hub_log, "hub serving").await;
    let refused = wait_line(&mut hub_log, "certificate_expired").await;
    assert!(refused.contains("expired"), "{refused}");
    let told = agent.wait_line("certificate_expired").await;
    assert!(told.contains("issue a new one"), "{told}");
}
