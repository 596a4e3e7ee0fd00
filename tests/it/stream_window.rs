//! The agent grants the hub a small tunnel-stream window on a new QUIC connection and grows
//! it towards `max_streams` as the hub opens streams: more streams than the first grant stay
//! open at once, each served.

use std::time::Duration;

use rna::agent::TransportMode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;

const TENANT: &str = "acme/prod";

/// 300 tunnels held open at once through one agent connection, past the first grant of
/// [`rna::transport::INITIAL_TUNNEL_WINDOW`] (256): without the window growing, the 257th
/// open waits for a stream to close and the hub answers it with a failure at its open
/// timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn more_tunnels_than_the_first_grant_stay_open_at_once() {
    const TUNNELS: usize = 300;
    assert!(TUNNELS > rna::transport::INITIAL_TUNNEL_WINDOW as usize);
    let world = World::start_with(|c| c.open_timeout = Duration::from_secs(10)).await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "wide", &token, 1, TransportMode::Quic)
        .await;
    // An echo server: every tunnel stays open until the test drops it.
    let echo = tcp_server(|mut s| async move {
        let mut buf = [0u8; 64];
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
    })
    .await;
    let mut held = Vec::with_capacity(TUNNELS);
    for i in 0..TUNNELS {
        let s = within(
            &format!("tunnel {i}"),
            socks_connect(world.socks, "wide", &token, Dest::Ip(echo)),
        )
        .await
        .unwrap_or_else(|code| panic!("tunnel {i} of {TUNNELS} refused with 0x{code:02x}"));
        held.push(s);
    }
    // The hub counts a stream open once its relay starts, which may be just after the client
    // read the SOCKS reply.
    eventually("every tunnel counted open", || {
        world.hub.metrics().streams_open().get() as usize == TUNNELS
    })
    .await;
    assert_eq!(world.hub.metrics().streams_open().get() as usize, TUNNELS);
    // Every one of them carries bytes, the first and the last included.
    for (i, s) in held.iter_mut().enumerate() {
        let msg = format!("tunnel {i}");
        s.write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        within("the echo", s.read_exact(&mut back)).await.unwrap();
        assert_eq!(back, msg.as_bytes());
    }
    drop(held);
    world.stop().await;
}
