//! A rogue agent (a valid certificate and token, speaking the protocol by hand) and a
//! greedy tenant: what one of them sends is bounded in decoded size, sessions and inventory
//! reports are capped, each refusal is counted under its own label, and the hub keeps
//! serving everyone else.

use std::time::{Duration, Instant};

use crate::common::*;
use rna::agent::session::{connect, Established};
use rna::agent::SessionError;
use rna::proto::codec::encode_limited;
use rna::proto::kube::{AgentStream, Inventory, MAX_INVENTORY};
use rna::proto::CloseCode;
use rna::transport::session::{Session, StreamError};

const TENANT: &str = "acme/prod";

/// Registers one session of `name` by hand, with `capabilities` in its Hello.
async fn session(
    world: &World,
    name: &str,
    token: &str,
    capabilities: Vec<String>,
) -> Result<Established, SessionError> {
    let mut config = world.agent_config(name, token);
    config.capabilities = capabilities;
    let endpoint = rna::transport::agent_endpoint(world.quic, &config.tls, &config.limits).unwrap();
    within(
        "a session",
        connect(&endpoint, world.quic, "127.0.0.1", &config),
    )
    .await
}

fn rejected(result: Result<Established, SessionError>) -> (CloseCode, String) {
    match result {
        Err(SessionError::Rejected { code, reason }) => (code, reason),
        Err(other) => panic!("expected a typed refusal, got {other:?}"),
        Ok(s) => panic!("expected a refusal, got session {}", s.welcome.session_id),
    }
}

/// Sends one inventory report on a stream of its own; `Ok` once the hub has taken it,
/// `Err(code)` when the hub reset the stream.
async fn report(conn: &Session, inventory: Inventory) -> Result<(), u64> {
    let frame = encode_limited(&AgentStream::Inventory(inventory), MAX_INVENTORY).unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    // The hub may refuse before reading everything: a failed write is its answer too.
    let _ = send.write_all(&frame).await;
    let _ = send.finish();
    match within("the hub's answer to a report", recv.read_to_end(64)).await {
        Ok(_) => Ok(()),
        Err(StreamError::Reset(code)) => Err(code),
        Err(other) => panic!("unexpected end of a report stream: {other:?}"),
    }
}

fn inventory(node_count: u64) -> Inventory {
    Inventory {
        node_count: Some(node_count),
        namespaces: Some(vec!["shop".into(), "default".into()]),
        ..Inventory::default()
    }
}

/// The rogue report of the issue: a 2 MiB frame of empty namespace names, which decoded to
/// about 48 MiB before the bounds.
fn empty_strings_inventory() -> Inventory {
    Inventory {
        namespaces: Some(vec![String::new(); MAX_INVENTORY - 16]),
        ..Inventory::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_are_capped_per_agent_name_and_per_token() {
    let world = World::start_with(|c| {
        c.caps.sessions_per_agent = 3;
        c.caps.sessions_per_token = 5;
    })
    .await;
    let token = world.agent_token(TENANT);
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(session(&world, "rogue", &token, vec![]).await.unwrap());
    }
    // The fourth session of one certificate and token is refused with its own code.
    let (code, reason) = rejected(session(&world, "rogue", &token, vec![]).await);
    assert_eq!(code, CloseCode::TooManySessions, "{reason}");
    assert!(reason.contains("3 sessions"), "{reason}");
    assert_eq!(world.hub.metrics().cap_refusals("sessions_per_agent"), 1);
    // The same token under other names: two more fit, then the token's cap refuses.
    for name in ["other-1", "other-2"] {
        held.push(session(&world, name, &token, vec![]).await.unwrap());
    }
    let (code, reason) = rejected(session(&world, "other-3", &token, vec![]).await);
    assert_eq!(code, CloseCode::TooManySessions, "{reason}");
    assert!(reason.contains("token"), "{reason}");
    assert_eq!(world.hub.metrics().cap_refusals("sessions_per_token"), 1);
    // The agent's log line for it names the cap and the code.
    let line = SessionError::Rejected { code, reason }.to_string();
    assert!(
        line.contains("--max-sessions-per-token") && line.contains("too_many_sessions (0x23)"),
        "{line}"
    );
    // Another tenant's agent is not affected.
    let other = world.agent_token("globex/prod");
    let _fine = session(&world, "rogue", &other, vec![]).await.unwrap();
    // A session that ends frees its slot.
    let first = held.remove(0);
    first.connection.close(0, "test: done");
    world.wait_sessions(TENANT, "rogue", 2).await;
    held.push(session(&world, "rogue", &token, vec![]).await.unwrap());
    assert_eq!(world.hub.registry().len(), 6);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_fields_over_their_bounds_are_refused() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    // The rogue Hello: a 64 KiB frame of empty capabilities.
    let (code, reason) =
        rejected(session(&world, "rogue", &token, vec![String::new(); 65_000]).await);
    assert_eq!(code, CloseCode::Protocol, "{reason}");
    assert!(
        reason.contains("Hello capabilities: 65000 entries, at most 32"),
        "{reason}"
    );
    let (code, reason) = rejected(session(&world, "rogue", &token, vec!["k".repeat(65)]).await);
    assert_eq!(code, CloseCode::Protocol, "{reason}");
    assert!(reason.contains("a string of 65 bytes"), "{reason}");
    assert_eq!(world.hub.metrics().cap_refusals("decoded_size"), 2);
    assert_eq!(world.hub.registry().len(), 0);
    // Within the bounds, the agent registers and is listed with its capabilities.
    let caps: Vec<String> = (0..32).map(|i| format!("cap-{i}")).collect();
    let _ok = session(&world, "rogue", &token, caps.clone())
        .await
        .unwrap();
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    let listed = world.hub.registry().sessions_of(&tenant, "rogue");
    assert_eq!(listed[0].capabilities, caps);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inventory_reports_are_bounded_and_taken_once_per_interval() {
    let interval = Duration::from_millis(1500);
    let world = World::start_with(|c| c.caps.inventory_interval = interval).await;
    let token = world.agent_token(TENANT);
    let rogue = session(&world, "rogue", &token, vec!["kubernetes".into()])
        .await
        .unwrap();
    let conn = rogue.connection.clone();
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    let stored = || {
        world.hub.registry().sessions_of(&tenant, "rogue")[0]
            .inventory()
            .map(|(inv, _)| inv.node_count)
    };

    // The empty-strings report is refused from its announced length; the session stays.
    assert_eq!(report(&conn, empty_strings_inventory()).await, Err(0x101));
    assert_eq!(world.hub.metrics().cap_refusals("decoded_size"), 1);
    assert_eq!(stored(), None);

    // A good report is taken once its turn comes.
    report(&conn, inventory(1)).await.unwrap();
    let taken = Instant::now();
    assert_eq!(stored(), Some(Some(1)));

    // Two more at once: one waits for the interval, the other is refused meanwhile.
    let (a, b) = tokio::join!(report(&conn, inventory(2)), report(&conn, inventory(3)));
    let waited = taken.elapsed();
    let (kept, refused) = match (a, b) {
        (Ok(()), Err(code)) => (2, code),
        (Err(code), Ok(())) => (3, code),
        other => panic!("expected one taken and one refused, got {other:?}"),
    };
    assert_eq!(refused, 0x102);
    assert_eq!(world.hub.metrics().cap_refusals("inventory_interval"), 1);
    assert_eq!(stored(), Some(Some(kept)));
    // The refused frame took a turn too, so the good one waited two intervals at most and
    // at least one (less the time the first report took to be acknowledged).
    assert!(
        waited >= interval.mul_f64(0.8),
        "taken after {waited:?}, interval {interval:?}"
    );
    assert_eq!(world.hub.registry().count(&tenant, "rogue"), 1);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_agent_name_keeps_one_inventory_however_many_sessions() {
    let world = World::start_with(|c| c.caps.inventory_interval = Duration::ZERO).await;
    let token = world.agent_token(TENANT);
    let a = session(&world, "twin", &token, vec!["kubernetes".into()])
        .await
        .unwrap();
    let b = session(&world, "twin", &token, vec!["kubernetes".into()])
        .await
        .unwrap();
    report(&a.connection, inventory(1)).await.unwrap();
    report(&b.connection, inventory(2)).await.unwrap();
    let tenant: rna::auth::Tenant = TENANT.parse().unwrap();
    let held: Vec<Option<u64>> = world
        .hub
        .registry()
        .sessions_of(&tenant, "twin")
        .iter()
        .map(|s| s.inventory().and_then(|(inv, _)| inv.node_count))
        .collect();
    assert_eq!(held.iter().filter(|h| h.is_some()).count(), 1, "{held:?}");
    assert!(held.contains(&Some(2)), "{held:?}");
    world.stop().await;
}
