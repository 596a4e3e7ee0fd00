//! `--socks-early-reply`: a SOCKS request for a destination the agent reached within the
//! window is answered before the agent's answer, its bytes follow the `Open` at once, and a
//! destination that went down since resets the client once, after which the exact reply code
//! is back. Off by default. Each body runs on QUIC and on TLS over TCP.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::*;
use rna::agent::TransportMode;
use rna::hub::EarlyReply;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const TENANT: &str = "acme/prod";

/// A SOCKS5 CONNECT to the IPv4 `dest` with user/password: the reply code, the bound
/// address the reply names, and the stream.
async fn connect(
    socks: SocketAddr,
    user: &str,
    password: &str,
    dest: SocketAddr,
) -> (u8, SocketAddr, TcpStream) {
    let SocketAddr::V4(dest) = dest else {
        panic!("IPv4 destinations only")
    };
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(&[5, 1, 2]).await.unwrap();
    let mut two = [0u8; 2];
    s.read_exact(&mut two).await.unwrap();
    assert_eq!(two, [5, 2]);
    let mut auth = vec![1, user.len() as u8];
    auth.extend_from_slice(user.as_bytes());
    auth.push(password.len() as u8);
    auth.extend_from_slice(password.as_bytes());
    s.write_all(&auth).await.unwrap();
    s.read_exact(&mut two).await.unwrap();
    assert_eq!(two, [1, 0], "authentication");
    let mut req = vec![5, 1, 0, 1];
    req.extend_from_slice(&dest.ip().octets());
    req.extend_from_slice(&dest.port().to_be_bytes());
    s.write_all(&req).await.unwrap();
    let mut reply = [0u8; 10];
    s.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply[..4], [5, reply[1], 0, 1], "an IPv4 reply");
    let ip = std::net::Ipv4Addr::new(reply[4], reply[5], reply[6], reply[7]);
    let port = u16::from_be_bytes([reply[8], reply[9]]);
    (reply[1], SocketAddr::from((ip, port)), s)
}

/// A destination that reads one line per connection and answers `size` bytes of the test
/// pattern, then closes; dropping it closes the port.
async fn pattern_server(size: usize) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut line = Vec::new();
                let mut b = [0u8; 1];
                while s.read_exact(&mut b).await.is_ok() && b[0] != b'\n' {
                    line.push(b[0]);
                }
                if line == b"GET" {
                    let _ = s.write_all(&pattern(size)).await;
                }
            });
        }
    });
    (addr, task)
}

/// Sends `GET\n` and reads the answer to its end: byte-exact or the read error.
async fn fetch(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    s.write_all(b"GET\n").await?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).await?;
    Ok(got)
}

on_both_transports!(a_destination_reached_lately_is_answered_early_and_a_lost_one_resets_once);
async fn a_destination_reached_lately_is_answered_early_and_a_lost_one_resets_once(
    transport: TransportMode,
) {
    let logs = process_logs();
    let world = World::start_with(|c| {
        c.socks_early_reply = EarlyReply::Within(Duration::from_secs(60));
    })
    .await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "edge", &token, 1, transport)
        .await;
    let size = 1 << 20;
    let (dest, server) = pattern_server(size).await;
    let metrics = world.hub.metrics().clone();

    // First contact: the hub waits for the agent, whose reply names its local address.
    let (code, bound, mut s) = connect(world.socks, "edge", &token, dest).await;
    assert_eq!(code, 0);
    assert!(bound.ip().is_loopback() && bound.port() != 0, "{bound}");
    assert_eq!(
        sha256_hex(&fetch(&mut s).await.unwrap()),
        sha256_hex(&pattern(size))
    );
    assert_eq!(metrics.socks_early_replies("opened"), 0);

    // Reached within the window: answered before the agent, naming no address, and the
    // bytes sent right behind the reply arrive whole.
    for _ in 0..3 {
        let (code, bound, mut s) = connect(world.socks, "edge", &token, dest).await;
        assert_eq!((code, bound), (0, SocketAddr::from(([0, 0, 0, 0], 0))));
        assert_eq!(
            sha256_hex(&fetch(&mut s).await.unwrap()),
            sha256_hex(&pattern(size))
        );
    }
    eventually("three early replies the agent opened", || {
        metrics.socks_early_replies("opened") == 3
    })
    .await;

    // The destination goes down: the next request is still answered early, then reset (an
    // RST, never the clean end that would pass for an empty answer), and logged.
    server.abort();
    let _ = server.await;
    let refused = TcpStream::connect(dest).await;
    assert!(refused.is_err(), "the destination's port is closed");
    // The client sends a large body right behind the reply, so the agent's refusal of the
    // stream may reach the hub's sending side before its answer is read: either way the
    // client is reset and the guess counted as failed once.
    let (code, bound, mut s) = connect(world.socks, "edge", &token, dest).await;
    assert_eq!((code, bound), (0, SocketAddr::from(([0, 0, 0, 0], 0))));
    let exchange = async {
        s.write_all(b"GET\n").await?;
        s.write_all(&pattern(8 << 20)).await?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.map(|_| got)
    };
    let err = exchange
        .await
        .expect_err("a lost destination must reset the client");
    assert!(
        matches!(
            err.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
        "{err}"
    );
    eventually("the failed guess counted", || {
        metrics.socks_early_replies("failed") == 1
    })
    .await;
    assert_eq!(metrics.socks_early_replies("failed"), 1);
    let line = format!("destination={dest}");
    eventually("the early reply's failure logged", || {
        logs.text()
            .lines()
            .any(|l| l.contains(&line) && l.contains("SOCKS request answered early, then failed"))
    })
    .await;

    // Once: the next request waits for the agent and gets the exact code (refused).
    let (code, _, _) = connect(world.socks, "edge", &token, dest).await;
    assert_eq!(code, 0x05);
    assert_eq!(metrics.socks_early_replies("failed"), 1);
    assert_eq!(metrics.socks_early_replies("opened"), 3);
}

on_both_transports!(without_the_setting_every_request_waits_for_the_agent);
async fn without_the_setting_every_request_waits_for_the_agent(transport: TransportMode) {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent_over(TENANT, "edge", &token, 1, transport)
        .await;
    let (dest, server) = pattern_server(1024).await;
    for _ in 0..3 {
        let (code, bound, mut s) = connect(world.socks, "edge", &token, dest).await;
        assert_eq!(code, 0);
        assert!(bound.port() != 0, "the agent's own address: {bound}");
        assert_eq!(fetch(&mut s).await.unwrap(), pattern(1024));
    }
    server.abort();
    let _ = server.await;
    let (code, _, _) = connect(world.socks, "edge", &token, dest).await;
    assert_eq!(
        code, 0x05,
        "a destination that went down is refused exactly"
    );
    assert_eq!(world.hub.metrics().socks_early_replies("opened"), 0);
    assert_eq!(world.hub.metrics().socks_early_replies("failed"), 0);
}
