//! What the SOCKS front logs about what clients send: a user name that is not an agent name
//! is logged by its length only (a client that swapped user name and password sends its
//! token there), and anything shaped like a token is masked in every log line.

use crate::common::*;

const TENANT: &str = "acme/prod";

/// Log lines of this test process at info, as an operator sees them.
fn logs() -> &'static Captured {
    process_logs()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn user_supplied_text_never_logs_a_token() {
    let logs = logs();
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let _agent = world.connect_agent(TENANT, "edge", &token, 1).await;
    let http = http_server().await;
    let (id, secret) = {
        let mut parts = token.split('_').skip(1);
        (parts.next().unwrap(), parts.next().unwrap())
    };

    // User name and password swapped.
    assert_eq!(
        socks_connect(world.socks, &token, "edge", Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );
    // An agent name with a wrong password is named.
    let wrong = "rna_0123456789ab_ffffffffffffffffffffffffffffffffffffffffffffffff";
    assert_eq!(
        socks_connect(world.socks, "edge", wrong, Dest::Ip(http))
            .await
            .err(),
        Some(0xff)
    );
    // A token pasted into a destination name reaches the agent, which cannot resolve it;
    // the hub logs the failure with the name masked.
    let name = format!("{secret}.rna_{id}.invalid");
    let reply = socks_connect(world.socks, "edge", &token, Dest::Name(&name, 80))
        .await
        .err();
    assert!(
        matches!(reply, Some(0x04 | 0x06)),
        "unresolvable name: {reply:?}"
    );
    world.stop().await;

    let text = logs.text();
    let swapped = text
        .lines()
        .find(|l| l.contains("a user name of 65 bytes that is not an agent name"))
        .unwrap_or_else(|| panic!("no refusal line for the swapped credentials:\n{text}"));
    assert!(swapped.contains("INFO"), "{swapped}");
    assert!(
        text.contains("authentication refused for user \"edge\""),
        "{text}"
    );
    assert!(
        text.contains("***.rna_***.invalid"),
        "masked name expected:\n{text}"
    );
    for line in text.lines() {
        assert!(!line.contains(secret), "token secret in a log line: {line}");
        assert!(
            !line.contains("ffffffffffffffffffffffffffffffffffffffffffffffff"),
            "refused password in a log line: {line}"
        );
        assert!(
            !line.contains(&format!("\"rna_{id}")),
            "token quoted as a user name: {line}"
        );
    }
}
