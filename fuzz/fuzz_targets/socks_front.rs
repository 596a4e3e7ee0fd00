//! The hub's SOCKS5 front (greeting, RFC 1929 authentication, request, destination checks,
//! error reply) driven by arbitrary client bytes delivered in arbitrary pieces over an
//! in-memory duplex stream. It must never panic or hang, and must answer only well-formed
//! SOCKS5 bytes.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rna::auth::TokenStore;
use rna::hub::socks::fuzz_front;
use rna::hub::NoAuthRoute;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The token the seed corpus authenticates with (scope `proxy`, tenant `acme/prod`).
const TOKEN: &str = "rna_0123456789ab_000102030405060708090a0b0c0d0e0f1011121314151617";

fn store() -> &'static TokenStore {
    static STORE: OnceLock<TokenStore> = OnceLock::new();
    STORE.get_or_init(|| {
        let sha: String = Sha256::digest(TOKEN.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let text = format!(
            "[[token]]\nid = \"0123456789ab\"\nsha256 = \"{sha}\"\ntenant = \"acme/prod\"\n\
             scopes = [\"proxy\"]\ncreated = 1700000000\n"
        );
        TokenStore::parse(&text, Path::new("fuzz.toml")).expect("fixed store parses")
    })
}

fuzz_target!(|input: &[u8]| {
    // Byte 0: bit 0 offers the no-auth method; the next 0..=15 bytes are piece sizes.
    let Some((&flags, rest)) = input.split_first() else {
        return;
    };
    let (cuts, data) = rest.split_at(usize::from(flags >> 4).min(rest.len()));
    let no_auth = (flags & 1 == 1).then(|| NoAuthRoute {
        agent: "dev".into(),
        tenant: "acme/dev".parse().expect("tenant"),
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let (client, server) = tokio::io::duplex(1 << 20);
        let front = fuzz_front(server, store(), no_auth.as_ref());
        let talk = async move {
            let mut client = client;
            let mut rest = data;
            let mut i = 0;
            while !rest.is_empty() {
                let n = (usize::from(cuts.get(i).copied().unwrap_or(255)) + 1).min(rest.len());
                i += 1;
                if client.write_all(&rest[..n]).await.is_err() {
                    break;
                }
                rest = &rest[n..];
                tokio::task::yield_now().await;
            }
            let _ = client.shutdown().await;
            let mut answer = Vec::new();
            let _ = client.read_to_end(&mut answer).await;
            answer
        };
        let (outcome, answer) = tokio::join!(front, talk);
        // Every answer starts with a method choice: version 5.
        if let Some(&first) = answer.first() {
            assert_eq!(first, 5, "answer {answer:?}");
        }
        if let Ok(request) = outcome {
            if let Ok(open) = &request.open {
                assert_ne!(open.port, 0);
            }
        }
    });
});
