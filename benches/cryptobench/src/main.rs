//! One QUIC stream of N MiB between two quinn endpoints on loopback, with rustls on ring and
//! with rustls on aws-lc-rs, alternating pairs in one run: B1's shape (one stream's
//! throughput, MB/s = 10^6 bytes/s) and B4's (CPU seconds of the process, user + system, per
//! GB moved), for the part of rna that the crypto provider changes: TLS 1.3 and QUIC packet
//! protection on both ends.
//!
//! Usage: cryptobench [MIB_PER_TRANSFER] [ROUNDS]   (defaults 1024 and 3)
//!
//! Each round runs ring then aws-lc-rs, the next round aws-lc-rs then ring, so a machine that
//! gets busier or quieter during the run does not favour one provider. Both endpoints share
//! one current-thread runtime, so the process's CPU time is the cost of both ends.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Bytes written per call: quinn takes what its windows allow.
const CHUNK: usize = 64 * 1024;

#[derive(Clone, Copy, Debug)]
enum Provider {
    Ring,
    AwsLc,
}

impl Provider {
    fn name(self) -> &'static str {
        match self {
            Provider::Ring => "ring",
            Provider::AwsLc => "aws-lc-rs",
        }
    }

    fn provider(self) -> Arc<CryptoProvider> {
        Arc::new(match self {
            Provider::Ring => rustls::crypto::ring::default_provider(),
            Provider::AwsLc => rustls::crypto::aws_lc_rs::default_provider(),
        })
    }
}

/// User + system CPU time of this process, from /proc/self/stat (clock ticks of 10 ms).
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')').expect("stat format") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 12 and 13 after ')'.
    let ticks: u64 =
        fields[11].parse::<u64>().expect("utime") + fields[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 10)
}

struct Pki {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn pki() -> Pki {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
        .expect("params")
        .self_signed(&key)
        .expect("cert");
    Pki {
        cert: cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(key.serialize_der()),
    }
}

/// A server and a client endpoint on loopback, both on `provider`.
fn endpoints(p: Provider, pki: &Pki) -> (quinn::Endpoint, quinn::Endpoint, SocketAddr) {
    let provider = p.provider();
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert.clone()],
            PrivateKeyDer::Pkcs8(pki.key.clone_key()),
        )
        .expect("server config");
    server.alpn_protocols = vec![b"bench".to_vec()];
    let server = QuicServerConfig::try_from(server).expect("QUIC server config");
    let server = quinn::ServerConfig::with_crypto(Arc::new(server));
    let server = quinn::Endpoint::server(server, "127.0.0.1:0".parse().unwrap()).expect("server");
    let addr = server.local_addr().expect("addr");

    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cert.clone()).expect("root");
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"bench".to_vec()];
    let client = QuicClientConfig::try_from(client).expect("QUIC client config");
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client");
    ep.set_default_client_config(quinn::ClientConfig::new(Arc::new(client)));
    (server, ep, addr)
}

struct Measured {
    mb_per_s: f64,
    cpu_s_per_gb: f64,
}

/// One transfer of `bytes` from the server to the client on one stream (a download, as B1).
async fn transfer(p: Provider, pki: &Pki, bytes: u64) -> Measured {
    let (server, client, addr) = endpoints(p, pki);
    let serving = tokio::spawn(async move {
        let conn = server
            .accept()
            .await
            .expect("incoming")
            .await
            .expect("handshake");
        let mut send = conn.open_uni().await.expect("stream");
        let chunk = vec![0x5au8; CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            send.write_all(&chunk[..n]).await.expect("write");
            left -= n as u64;
        }
        send.finish().expect("finish");
        // Keep the connection until the client has read everything and closed.
        conn.closed().await;
        server.wait_idle().await;
    });
    let conn = client
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    let cpu = cpu_time();
    let started = Instant::now();
    let mut recv = conn.accept_uni().await.expect("stream");
    let mut got = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while let Some(n) = recv.read(&mut buf).await.expect("read") {
        got += n as u64;
    }
    let took = started.elapsed();
    let cpu = cpu_time() - cpu;
    assert_eq!(got, bytes, "whole stream");
    conn.close(0u32.into(), b"done");
    serving.await.expect("server task");
    client.wait_idle().await;
    let gb = bytes as f64 / 1e9;
    Measured {
        mb_per_s: bytes as f64 / 1e6 / took.as_secs_f64(),
        cpu_s_per_gb: cpu.as_secs_f64() / gb,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mib: u64 = args.next().map_or(1024, |a| a.parse().expect("MiB"));
    let rounds: usize = args.next().map_or(3, |a| a.parse().expect("rounds"));
    let bytes = mib << 20;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let pki = pki();
    let mut results: Vec<(Provider, Vec<Measured>)> =
        vec![(Provider::Ring, Vec::new()), (Provider::AwsLc, Vec::new())];
    // Warm-up: page-faults the buffers and settles the CPU's clock; not counted.
    rt.block_on(transfer(Provider::Ring, &pki, bytes.min(64 << 20)));
    rt.block_on(transfer(Provider::AwsLc, &pki, bytes.min(64 << 20)));
    for round in 0..rounds {
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let p = results[i].0;
            let m = rt.block_on(transfer(p, &pki, bytes));
            println!(
                "round {round} {:<9} {mib} MiB: {:7.1} MB/s  {:5.2} CPU-s/GB",
                p.name(),
                m.mb_per_s,
                m.cpu_s_per_gb
            );
            results[i].1.push(m);
        }
    }
    let summary: Vec<(f64, f64)> = results
        .iter()
        .map(|(_, ms)| {
            (
                median(ms.iter().map(|m| m.mb_per_s).collect()),
                median(ms.iter().map(|m| m.cpu_s_per_gb).collect()),
            )
        })
        .collect();
    for ((p, _), (mbs, cpu)) in results.iter().zip(&summary) {
        println!(
            "median {:<9} B1 {mbs:7.1} MB/s  B4 {cpu:5.2} CPU-s/GB",
            p.name()
        );
    }
    println!(
        "aws-lc-rs / ring: B1 {:.3}x  B4 {:.3}x (B1 above 1 and B4 below 1 favour aws-lc-rs)",
        summary[1].0 / summary[0].0,
        summary[1].1 / summary[0].1
    );
}
