//! HTTP proxy egress against a real proxy: tinyproxy (Debian's package) with Basic auth,
//! started here on a free loopback port with a config in a temporary folder, carrying a
//! TLS/TCP session from agent to hub; and the errors a proxy can cause, each told apart.

use std::net::SocketAddr;
use std::time::Duration;

use crate::common::Tinyproxy;

use rna::certs::Ca;
use rna::transport::proxy::{self, ProxyError, ProxyUrl};
use rna::transport::session::Session;
use rna::transport::tcp::{self, TcpServer};
use rna::transport::{ClientTls, Limits, ServerTls};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

const USER: &str = "edge";
const PASSWORD: &str = "pr0xy-s3cret";
const BOUND: Duration = Duration::from_secs(60);

/// A hub listening for TLS/TCP sessions on 127.0.0.1:0, and an agent's TLS material.
async fn hub() -> (TcpServer, SocketAddr, ClientTls) {
    rna::transport::tls::install_provider();
    let ca = Ca::generate("rna test CA").unwrap();
    let hub = ca.issue_hub(&["localhost".to_string()]).unwrap();
    let agent = ca.issue_agent("edge-1").unwrap();
    let server_tls = ServerTls::from_pem(&ca.cert_pem(), &hub.cert_pem, &hub.key_pem).unwrap();
    let client_tls = ClientTls::from_pem(&ca.cert_pem(), &agent.cert_pem, &agent.key_pem).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = TcpServer::new(listener, &server_tls, &Limits::default()).unwrap();
    let addr = server.local_addr().unwrap();
    (server, addr, client_tls)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_runs_through_an_authenticating_proxy() {
    let (server, hub_addr, agent_tls) = hub().await;
    let tinyproxy = Tinyproxy::start(USER, PASSWORD, hub_addr.port()).await;
    let accepted = tokio::spawn(async move {
        let (tcp, remote) = server.accept().await.unwrap();
        server.handshake(tcp, remote).await.map(Session::from)
    });
    let tunnel = proxy::connect(
        &tinyproxy.url(PASSWORD),
        "127.0.0.1",
        hub_addr.port(),
        BOUND,
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tinyproxy.log()));
    let agent = tcp::connect_over(
        tunnel,
        hub_addr,
        "localhost",
        &agent_tls,
        &Limits::default(),
    )
    .await
    .map(Session::from)
    .unwrap();
    let hub = accepted.await.unwrap().unwrap();

    // Bytes both ways through the proxy, on a hub-opened stream.
    let (mut send, mut recv) = hub.open_bi().await.unwrap();
    let payload: Vec<u8> = (0..1_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    send.write_all(&payload).await.unwrap();
    send.finish().unwrap();
    let (mut a_send, mut a_recv) = agent.accept_bi().await.unwrap();
    let got = tokio::time::timeout(BOUND, a_recv.read_to_end(4 << 20))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(got, payload);
    a_send.write_all(b"pong").await.unwrap();
    a_send.finish().unwrap();
    assert_eq!(recv.read_to_end(16).await.unwrap(), b"pong");

    // The proxy really carried it: its log has the CONNECT.
    let log = tinyproxy.log();
    assert!(
        log.contains(&format!("CONNECT 127.0.0.1:{}", hub_addr.port())),
        "tinyproxy's log does not show the CONNECT:\n{log}"
    );
    assert!(
        !log.contains(PASSWORD),
        "the password reached the proxy's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_failures_are_told_apart() {
    let (_server, hub_addr, _) = hub().await;
    let tinyproxy = Tinyproxy::start(USER, PASSWORD, hub_addr.port()).await;

    // A wrong password: refused credentials (tinyproxy answers CONNECT with 401 where most
    // proxies send 407; both read the same), and the password is not shown.
    let err = proxy::connect(&tinyproxy.url("wrong"), "127.0.0.1", hub_addr.port(), BOUND)
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Auth { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("refused the credentials (40"), "{text}");
    assert!(!text.contains("wrong"), "{text}");

    // No credentials at all: the same status, with what to do.
    let bare = ProxyUrl::parse(&format!("http://127.0.0.1:{}", tinyproxy.port)).unwrap();
    let err = proxy::connect(&bare, "127.0.0.1", hub_addr.port(), BOUND)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("USER:PASSWORD@"), "{err}");

    // Another status is named: tinyproxy refuses CONNECT to a port it does not allow.
    let err = proxy::connect(
        &tinyproxy.url(PASSWORD),
        "127.0.0.1",
        hub_addr.port().wrapping_add(1).max(1),
        BOUND,
    )
    .await
    .unwrap_err();
    match &err {
        ProxyError::Status { status, .. } => assert!(status.starts_with("403"), "{err}"),
        other => panic!("expected a named status, got {other:?}"),
    }

    // An unreachable proxy is not an unreachable hub.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let gone = ProxyUrl::parse(&format!("http://127.0.0.1:{closed}")).unwrap();
    let err = proxy::connect(&gone, "127.0.0.1", hub_addr.port(), BOUND)
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Unreachable { .. }), "{err:?}");
    assert!(err
        .to_string()
        .starts_with(&format!("proxy 127.0.0.1:{closed} unreachable")));
}

/// A proxy that answers 407 (the status RFC 9110 §15.5.8 gives a proxy) is read as refused
/// credentials, with the status named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_407_means_refused_credentials() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let fake = tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut request = Vec::new();
        let mut buf = [0u8; 1024];
        while !request.ends_with(b"\r\n\r\n") {
            let n = tcp.read(&mut buf).await.unwrap();
            assert!(n > 0, "the client closed before finishing its request");
            request.extend_from_slice(&buf[..n]);
        }
        tcp.write_all(b"HTTP/1.1 407 Proxy Authentication Required\r\nProxy-Authenticate: Basic realm=\"corp\"\r\n\r\n")
            .await
            .unwrap();
        String::from_utf8(request).unwrap()
    });
    let url = ProxyUrl::parse(&format!("http://me:letmein@127.0.0.1:{port}")).unwrap();
    let err = proxy::connect(&url, "hub.example.com", 443, BOUND)
        .await
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        format!(
            "proxy 127.0.0.1:{port} refused the credentials (407 Proxy Authentication Required)"
        )
    );
    // What the proxy was sent: CONNECT with Basic credentials (RFC 7617), base64 of me:letmein.
    let request = fake.await.unwrap();
    assert!(
        request
            .starts_with("CONNECT hub.example.com:443 HTTP/1.1\r\nHost: hub.example.com:443\r\n"),
        "{request}"
    );
    assert!(
        request.contains("Proxy-Authorization: Basic bWU6bGV0bWVpbg==\r\n"),
        "{request}"
    );
}

/// Something that is not an HTTP proxy, or one whose answer never ends, is reported as a
/// malformed answer, after reading at most the head's cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_answer_is_refused_with_a_bounded_read() {
    let cases: [(&[u8], &str); 3] = [
        (
            b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
            "not an HTTP/1.x status line",
        ),
        (b"HTTP/1.1 200 OK\r\nX-Pad: ", "longer than 8192 bytes"),
        (b"HTTP/1.1 200 OK\r\n", "in the middle of its answer"),
    ];
    for (answer, expected) in cases {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let endless = expected.contains("longer");
        let fake = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp.write_all(answer).await;
            if endless {
                // Header bytes forever (bounded here too): the client must stop at its cap.
                for _ in 0..64 {
                    if tcp.write_all(&[b'a'; 1024]).await.is_err() {
                        break;
                    }
                }
            }
        });
        let url = ProxyUrl::parse(&format!("http://127.0.0.1:{port}")).unwrap();
        let err = proxy::connect(&url, "hub.example.com", 443, BOUND)
            .await
            .unwrap_err();
        assert!(matches!(err, ProxyError::Malformed { .. }), "{err:?}");
        assert!(err.to_string().contains(expected), "{err}");
        fake.abort();
    }
}
