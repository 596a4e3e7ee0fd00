//! `rna::dev::run` in-process: the hub and agent `rna dev` runs, on port 0, used through
//! SOCKS5 with curl exactly as its printed line says, and stopped by its cancellation token.

use std::net::SocketAddr;

use crate::common::*;
use rna::dev::{DevOptions, DevReady};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

fn options(dir: &std::path::Path) -> DevOptions {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    DevOptions {
        dir: dir.to_path_buf(),
        socks: any,
        api: any,
        socks_no_auth: false,
        allow: Vec::new(),
        deny: Vec::new(),
        kubeconfig: None,
        kube_context: None,
    }
}

/// Starts `rna::dev::run` on a task; returns what its `ready` callback saw, whether its
/// `hub_started` callback ran before that, and the task.
async fn start(
    options: DevOptions,
    shutdown: CancellationToken,
) -> (
    DevReady,
    bool,
    tokio::task::JoinHandle<Result<(), rna::dev::DevError>>,
) {
    let (ready_tx, ready_rx) = oneshot::channel();
    let (hub_tx, mut hub_rx) = oneshot::channel();
    let task = tokio::spawn(rna::dev::run(
        shutdown,
        options,
        move |handle| {
            let _ = hub_tx.send(handle);
        },
        move |ready| {
            let _ = ready_tx.send(ready.clone());
        },
    ));
    let ready = within("rna dev to be up", ready_rx)
        .await
        .expect("run ended before it was up");
    let hub_started = hub_rx.try_recv().is_ok();
    (ready, hub_started, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dev_run_serves_socks_through_its_agent_and_returns_ok_when_cancelled() {
    init_logs();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    let http = http_server().await;
    let mut tokens = Vec::new();
    for run in 0..2 {
        let shutdown = CancellationToken::new();
        let (ready, hub_started, task) = start(options(&state), shutdown.clone()).await;
        assert!(hub_started, "run {run}: hub_started is called before ready");
        assert_ne!(ready.socks.port(), 0, "run {run}: the bound SOCKS5 address");
        let token = ready.token.expose().to_string();
        // The printed curl line names the bound address and the token.
        let lines = ready.lines();
        let expected = format!(
            "curl --proxy socks5h://local:{token}@{} http://{}/healthz",
            ready.socks,
            ready.api.unwrap()
        );
        assert!(lines.contains(&expected), "run {run}: {lines:#?}");
        // The hub's own /healthz through the agent, as the printed line fetches it.
        let healthz = format!("http://{}/healthz", ready.api.unwrap());
        let (code, body) = curl(ready.socks, "local", &token, &[&healthz]).await;
        assert_eq!((code, body.as_slice()), (0, &b"ok\n"[..]), "run {run}");
        // A destination on the loopback, which the dev agent may dial.
        let url = format!("http://{http}/bytes/2000");
        let (code, body) = curl(ready.socks, "local", &token, &[&url]).await;
        assert_eq!(code, 0, "run {run}");
        assert_eq!(body, pattern(2000), "run {run}");

        shutdown.cancel();
        let result = within("rna::dev::run to return", task).await.unwrap();
        assert!(result.is_ok(), "run {run}: {result:?}");
        tokens.push(token);
    }
    // The second run reused the state folder and its token.
    assert_eq!(tokens[0], tokens[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_run_cancelled_while_starting_returns_ok_without_announcing() {
    let dir = tempfile::tempdir().unwrap();
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let (ready_tx, mut ready_rx) = oneshot::channel::<()>();
    let result = within(
        "rna::dev::run to return",
        rna::dev::run(
            shutdown,
            options(dir.path()),
            |_| {},
            move |_| {
                let _ = ready_tx.send(());
            },
        ),
    )
    .await;
    assert!(result.is_ok(), "{result:?}");
    assert!(
        ready_rx.try_recv().is_err(),
        "a stopped run announced itself"
    );
}

#[tokio::test]
async fn dev_run_names_the_state_folder_it_cannot_prepare() {
    let dir = tempfile::tempdir().unwrap();
    // A file where the state folder should be.
    let state = dir.path().join("state");
    std::fs::write(&state, b"not a folder").unwrap();
    let result = rna::dev::run(CancellationToken::new(), options(&state), |_| {}, |_| {}).await;
    let err = result.expect_err("a file is no state folder");
    let text = rna::fsutil::error_chain(&err);
    assert!(
        text.starts_with(&format!(
            "preparing {}: creating {}: ",
            state.display(),
            state.display()
        )),
        "{text}"
    );
}
