//! Malformed SOCKS5 input: each gets a clear close or reply, and the hub keeps serving a valid
//! client at the same time.

use std::time::Duration;

use crate::common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const TENANT: &str = "acme/prod";

/// Sends `bytes`, optionally closes our write side, and returns everything the hub answered
/// before it closed the connection.
async fn exchange(socks: std::net::SocketAddr, bytes: &[u8], close_write: bool) -> Vec<u8> {
    let mut s = TcpStream::connect(socks).await.unwrap();
    s.write_all(bytes).await.unwrap();
    if close_write {
        s.shutdown().await.unwrap();
    }
    let mut answer = Vec::new();
    // The hub must close the connection (EOF or reset), not leave it hanging.
    let _ = within(
        "the hub to close a malformed connection",
        s.read_to_end(&mut answer),
    )
    .await;
    answer
}

/// The bytes of a complete, valid greeting and authentication.
fn greeting_and_auth(user: &str, token: &str) -> Vec<u8> {
    let mut b = vec![5, 1, 2, 1, user.len() as u8];
    b.extend_from_slice(user.as_bytes());
    b.push(token.len() as u8);
    b.extend_from_slice(token.as_bytes());
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_greetings_are_closed_while_valid_clients_are_served() {
    let world =
        World::start_with(|c| c.socks_limits.greeting_timeout = Duration::from_millis(700)).await;
    let token = world.agent_token(TENANT);
    let _agent = world.connect_agent(TENANT, "prod-cluster", &token, 1).await;
    let http = http_server().await;

    // A client that says nothing holds a connection open during the whole test…
    let mut silent = TcpStream::connect(world.socks).await.unwrap();

    // …while a valid client is served.
    let valid = {
        let socks = world.socks;
        let token = token.clone();
        tokio::spawn(async move {
            let mut s = socks_connect(socks, "prod-cluster", &token, Dest::Ip(http))
                .await
                .unwrap();
            s.write_all(b"GET /bytes/100000 HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut body = Vec::new();
            s.read_to_end(&mut body).await.unwrap();
            body
        })
    };

    // Raw garbage (an HTTP request sent to the SOCKS port): closed, nothing answered.
    let answer = exchange(
        world.socks,
        b"GET / HTTP/1.1\r\nHost: example\r\n\r\n",
        false,
    )
    .await;
    assert!(answer.is_empty(), "{answer:?}");
    // A truncated greeting.
    assert!(exchange(world.socks, &[5], true).await.is_empty());
    assert!(exchange(world.socks, &[5, 3, 0], true).await.is_empty());
    // A wrong version byte (SOCKS4).
    assert!(
        exchange(world.socks, &[4, 1, 0, 80, 127, 0, 0, 1, 0], false)
            .await
            .is_empty()
    );
    // Only "no authentication" offered: the hub answers "no acceptable methods" (0xFF).
    assert_eq!(
        exchange(world.socks, &[5, 1, 0], false).await,
        vec![5, 0xff]
    );
    // RFC 1929 with a wrong sub-negotiation version.
    assert_eq!(
        exchange(world.socks, &[5, 1, 2, 9, 1, b'a', 1, b'b'], false).await,
        vec![5, 2]
    );
    // Authenticated, then a truncated request.
    let mut req = greeting_and_auth("prod-cluster", &token);
    req.extend_from_slice(&[5, 1, 0, 3, 200, b'x']);
    let answer = exchange(world.socks, &req, true).await;
    assert_eq!(&answer[..4], &[5, 2, 1, 0]);
    // Nothing is routed: at most a failure reply follows before the close.
    assert!(answer.len() == 4 || answer[5] != 0, "{answer:?}");
    // A 255-byte domain: not a DNS name, answered "host unreachable".
    let mut req = greeting_and_auth("prod-cluster", &token);
    req.extend_from_slice(&[5, 1, 0, 3, 255]);
    req.extend_from_slice(&[b'a'; 255]);
    req.extend_from_slice(&80u16.to_be_bytes());
    let answer = exchange(world.socks, &req, false).await;
    assert_eq!(&answer[..4], &[5, 2, 1, 0]);
    assert_eq!(answer[5], 0x04, "{answer:?}");
    // Port 0: not a destination.
    let mut req = greeting_and_auth("prod-cluster", &token);
    req.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1, 0, 0]);
    let answer = exchange(world.socks, &req, false).await;
    assert_eq!(answer[5], 0x02, "{answer:?}");
    // An unknown address type.
    let mut req = greeting_and_auth("prod-cluster", &token);
    req.extend_from_slice(&[5, 1, 0, 9, 1, 2, 3, 4, 0, 80]);
    let answer = exchange(world.socks, &req, false).await;
    assert_eq!(answer[5], 0x08, "{answer:?}");
    // An empty user name.
    assert_eq!(
        exchange(world.socks, &[5, 1, 2, 1, 0, 1, b'x'], false).await,
        vec![5, 2]
    );

    let body = within("the valid client", valid).await.unwrap();
    assert!(
        body.ends_with(&pattern(100_000)),
        "valid client got {} bytes",
        body.len()
    );

    // The silent client is dropped at the greeting deadline.
    let mut buf = Vec::new();
    let _ = within("the greeting deadline", silent.read_to_end(&mut buf)).await;
    assert!(buf.is_empty());
    assert!(world.hub.metrics().socks_refusals("greeting_timeout") >= 1);
    assert!(world.hub.metrics().socks_refusals("bad_greeting") >= 5);
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_open_connections_per_client_are_capped() {
    let world = World::start_with(|c| {
        c.socks_limits.half_open_per_ip = 4;
        c.socks_limits.greeting_timeout = Duration::from_secs(30);
    })
    .await;
    let token = world.agent_token(TENANT);
    let _agent = world.connect_agent(TENANT, "prod-cluster", &token, 1).await;
    let http = http_server().await;

    // Four clients that stall in the greeting use up this IP's allowance.
    let mut stalled = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(world.socks).await.unwrap();
        s.write_all(&[5, 1, 2]).await.unwrap();
        let mut choice = [0u8; 2];
        s.read_exact(&mut choice).await.unwrap();
        stalled.push(s);
    }
    // A fifth is closed at once, without an answer.
    let mut fifth = TcpStream::connect(world.socks).await.unwrap();
    let _ = fifth.write_all(&[5, 1, 2]).await;
    let mut buf = Vec::new();
    let _ = within(
        "the capped connection to close",
        fifth.read_to_end(&mut buf),
    )
    .await;
    assert!(buf.is_empty());
    assert_eq!(world.hub.metrics().socks_refusals("half_open_per_ip"), 1);

    // A stalled client that completes its greeting leaves the half-open set before its reply
    // is written, so once it has the reply, a new client of the same IP is admitted.
    let mut rest = vec![1, 12];
    rest.extend_from_slice(b"prod-cluster");
    rest.push(token.len() as u8);
    rest.extend_from_slice(token.as_bytes());
    rest.extend_from_slice(&[5, 1, 0, 1, 127, 0, 0, 1]);
    rest.extend_from_slice(&http.port().to_be_bytes());
    let mut first = stalled.remove(0);
    first.write_all(&rest).await.unwrap();
    let mut reply = [0u8; 12];
    within("the completed greeting", first.read_exact(&mut reply))
        .await
        .unwrap();
    assert_eq!(&reply[..4], &[1, 0, 5, 0]);
    assert!(
        socks_connect(world.socks, "prod-cluster", &token, Dest::Ip(http))
            .await
            .is_ok()
    );
    drop(stalled);
    drop(first);
    world.stop().await;
}

/// A token revoked while a client sits in its greeting is refused: at authentication when it
/// was revoked before the credentials came, and at the request when it was revoked after
/// them. Another token's client is served meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_token_revoked_during_the_greeting_is_refused() {
    let world =
        World::start_with(|c| c.socks_limits.greeting_timeout = Duration::from_secs(30)).await;
    let agent_token = world.agent_token(TENANT);
    let _agent = world
        .connect_agent(TENANT, "prod-cluster", &agent_token, 1)
        .await;
    let http = http_server().await;
    let proxy = world.token(TENANT, &[rna::auth::Scope::Proxy]);
    let request = {
        let mut r = vec![5, 1, 0, 1, 127, 0, 0, 1];
        r.extend_from_slice(&http.port().to_be_bytes());
        r
    };

    // Authenticated, then revoked before the request: the request is refused, 0x02.
    let mut authed = TcpStream::connect(world.socks).await.unwrap();
    authed
        .write_all(&greeting_and_auth("prod-cluster", &proxy))
        .await
        .unwrap();
    let mut reply = [0u8; 4];
    authed.read_exact(&mut reply).await.unwrap();
    assert_eq!(reply, [5, 2, 1, 0], "authenticated");
    // Opened, method chosen, credentials not yet sent.
    let mut early = TcpStream::connect(world.socks).await.unwrap();
    early.write_all(&[5, 1, 2]).await.unwrap();
    let mut choice = [0u8; 2];
    early.read_exact(&mut choice).await.unwrap();
    assert_eq!(choice, [5, 2]);

    world.revoke(&proxy);

    authed.write_all(&request).await.unwrap();
    let mut answer = Vec::new();
    let _ = within("the refused request", authed.read_to_end(&mut answer)).await;
    assert_eq!(
        answer.get(..2),
        Some(&[5u8, 0x02][..]),
        "not allowed: {answer:?}"
    );

    let mut auth = greeting_and_auth("prod-cluster", &proxy);
    auth.drain(..3);
    early.write_all(&auth).await.unwrap();
    let mut status = [0u8; 2];
    within("the authentication answer", early.read_exact(&mut status))
        .await
        .unwrap();
    assert_eq!(status, [1, 1], "authentication refused");

    // Others are not affected.
    assert!(
        socks_connect(world.socks, "prod-cluster", &agent_token, Dest::Ip(http))
            .await
            .is_ok()
    );
    world.stop().await;
}
