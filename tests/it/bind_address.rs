//! An agent's `bind_address`: the hub sees the agent from that address, over QUIC and over
//! TLS/TCP, and the `rna agent --bind-address` flag reaches the sockets.

use std::net::IpAddr;

use crate::common::*;
use rna::agent::TransportMode;

const TENANT: &str = "acme/prod";

/// The `remote_address` the agents API shows for each session of `name`.
async fn remote_addresses(world: &World, name: &str) -> Vec<String> {
    let reader = world.token(TENANT, &[rna::auth::Scope::ReadInfraData]);
    let url = format!("http://{}/api/v1/agents", world.api);
    let out = tokio::process::Command::new("curl")
        .args(["-s", "-f", &url, "-H"])
        .arg(format!("Authorization: Bearer {reader}"))
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "curl {url}: {:?}", out.status);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v["agents"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["name"] == name)
        .map(|a| a["remote_address"].as_str().unwrap().to_string())
        .collect()
}

on_both_transports!(the_hub_sees_an_agent_from_its_bind_address);
async fn the_hub_sees_an_agent_from_its_bind_address(transport: TransportMode) {
    // 127.0.0.0/8 is all local on Linux: any address of it can be bound without setup.
    let bind: IpAddr = "127.7.8.9".parse().unwrap();
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    let mut config = world.agent_config_over("bound", &token, transport);
    config.bind_address = Some(bind);
    let agent = world.spawn_agent(config);
    world.wait_sessions(TENANT, "bound", 1).await;
    world.assert_transport(TENANT, "bound", transport);
    let seen = remote_addresses(&world, "bound").await;
    assert_eq!(seen.len(), 1, "{seen:?}");
    let addr: std::net::SocketAddr = seen[0].parse().unwrap();
    assert_eq!(addr.ip(), bind, "the hub sees the agent from {addr}");
    assert_ne!(addr.port(), 0);
    agent.stop().await;
    world.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rna_agent_bind_address_flag_and_environment_set_the_source() {
    let world = World::start().await;
    let token = world.agent_token(TENANT);
    for (name, bind, by_env) in [
        ("flagged", "127.7.8.10", false),
        ("from-env", "127.7.8.11", true),
    ] {
        let mut args = world.agent_process_args(name, &token);
        let mut cmd = tokio::process::Command::new(env!("CARGO_BIN_EXE_rna"));
        if by_env {
            cmd.env("RNA_BIND_ADDRESS", bind);
        } else {
            args.extend(["--bind-address".to_string(), bind.to_string()]);
        }
        let mut agent = cmd
            .args(&args)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        world.wait_sessions(TENANT, name, 1).await;
        let seen = remote_addresses(&world, name).await;
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert!(seen[0].starts_with(&format!("{bind}:")), "{name}: {seen:?}");
        agent.kill().await.unwrap();
    }
    world.stop().await;
}
