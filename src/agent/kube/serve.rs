//! One command stream: reads the capped command, runs it within the header's timeout and
//! the agent's slots, streams progress and the answer back, and leaves one audit line.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::transport::session::{RecvStream, SendStream};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::info;

use super::{failure, humanize, KubeExecutor, MAX_CONCURRENT_WAITS};
use crate::auth::mask_tokens;
use crate::proto::codec::{encode_limited, read_frame_limited};
use crate::proto::kube::{
    apply_summary, FailureKind, KubeHeader, KubeReply, KubeRequest, MAX_KUBE_REPLY,
    MAX_KUBE_REQUEST, TOO_MANY_WAITS,
};
use crate::proto::StreamCode;

/// What a command was about, for the audit line: kind, namespace, name, and whether it
/// touches Secrets.
fn audit_target(request: &KubeRequest) -> (String, String, String, bool) {
    match request.target() {
        Some(t) => (
            t.kind.clone(),
            t.namespace.clone().unwrap_or_default(),
            t.name.clone(),
            t.is_secret(),
        ),
        None => {
            // apply: the kinds and names of its objects (never their contents)
            let docs: Vec<Value> = match request {
                KubeRequest::Apply { objects, .. } => {
                    serde_json::from_str(objects).unwrap_or_default()
                }
                _ => Vec::new(),
            };
            let (kinds, names, secret) = apply_summary(&docs, 20);
            (kinds, String::new(), names, secret)
        }
    }
}

/// Serves one command stream: reads the capped request, runs it within the header's timeout,
/// streams progress and the answer, and leaves one audit line.
pub async fn serve_command(
    mut send: SendStream,
    mut recv: RecvStream,
    header: KubeHeader,
    executor: Option<Arc<KubeExecutor>>,
    agent: &str,
) {
    send.set_priority(1);
    let started = Instant::now();
    let timeout = Duration::from_millis(header.timeout_ms.clamp(100, 24 * 3600 * 1000));
    let read = tokio::time::timeout(
        Duration::from_secs(30).min(timeout),
        read_frame_limited::<KubeRequest, _>(&mut recv, MAX_KUBE_REQUEST),
    )
    .await;
    let refused = match read {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => Err("stream ended before the command".to_string()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("no command in time".to_string()),
    };
    let request = match refused {
        Ok(r) => r,
        Err(why) => {
            info!("kubernetes command stream refused: {why}");
            send.reset(StreamCode::BadHeader.into());
            recv.stop(StreamCode::BadHeader.into());
            return;
        }
    };
    let verb = request.verb();
    let (kind, namespace, name, secret) = audit_target(&request);
    let (tx, mut rx) = mpsc::channel::<String>(64);
    let outcome = match &executor {
        None => Err(failure(
            FailureKind::NoCapability,
            409,
            "NoCapability",
            format!("agent {agent} has no Kubernetes access (cluster mode is off)"),
        )),
        Some(executor) => {
            // A wait takes its own slot first, or is refused at once: the slots left over
            // stay free for commands that change or read the cluster.
            let wait_slot = match request {
                KubeRequest::Wait { .. } => Some(executor.wait_permits.try_acquire()),
                _ => None,
            };
            let run = tokio::time::timeout(timeout, async {
                if let Some(Err(_)) = &wait_slot {
                    return Err(failure(
                        FailureKind::NotAllowed,
                        429,
                        TOO_MANY_WAITS,
                        format!(
                            "agent {agent} already runs {MAX_CONCURRENT_WAITS} waits; retry when \
                             one ends"
                        ),
                    ));
                }
                // Waiting for a permit counts against the command's own timeout.
                let _permit = executor.permits.acquire().await;
                executor.execute(request, &tx).await
            });
            tokio::pin!(run);
            // The hub stops the stream when its caller went away: a wait that reports no
            // progress must still end then, not hold its slot until its timeout.
            // `stopped` is cancel-safe, so it is asked anew each turn and a progress event
            // is written outside the `select!`.
            loop {
                let event = tokio::select! {
                    _ = send.stopped() => break Err(failure(FailureKind::Unavailable, 499,
                        "Cancelled", "the hub closed the command stream")),
                    done = &mut run => break match done {
                        Ok(r) => r,
                        Err(_) => Err(failure(FailureKind::Timeout, 504, "Timeout",
                            format!("the command did not finish within {}", humanize(timeout)))),
                    },
                    Some(event) = rx.recv() => event,
                };
                if write_reply(&mut send, &KubeReply::Progress(event))
                    .await
                    .is_err()
                {
                    // The hub is gone: stop working for nobody.
                    break Err(failure(
                        FailureKind::Unavailable,
                        499,
                        "Cancelled",
                        "the hub closed the command stream",
                    ));
                }
            }
        }
    };
    while let Ok(event) = rx.try_recv() {
        let _ = write_reply(&mut send, &KubeReply::Progress(event)).await;
    }
    let (label, reason) = match &outcome {
        Ok(_) => ("ok", String::new()),
        Err(f) => (f.kind.as_str(), f.reason.clone()),
    };
    let reply = KubeReply::Done(outcome);
    if let Err(e) = write_reply(&mut send, &reply).await {
        // Too large: tell the caller instead of going silent.
        let too_large = KubeReply::Done(Err(failure(
            FailureKind::TooLarge,
            413,
            "ResponseTooLarge",
            format!("the answer is larger than the channel's limit ({e}); use limit to page"),
        )));
        let _ = write_reply(&mut send, &too_large).await;
    }
    let _ = send.finish();
    // Names, kinds and reasons come from the caller: token-shaped text is masked.
    let (kind_m, namespace_m, name_m) = (
        mask_tokens(&kind),
        mask_tokens(&namespace),
        mask_tokens(&name),
    );
    let reason = mask_tokens(&reason);
    info!(target: "rna::audit", tenant = %header.caller.tenant, token_id = %header.caller.token_id,
        token_label = header.caller.label.as_deref().unwrap_or(""), agent, verb,
        kind = kind_m.as_ref(), namespace = namespace_m.as_ref(), name = name_m.as_ref(), secret,
        outcome = label, reason = reason.as_ref(),
        duration_ms = started.elapsed().as_millis() as u64, "kubernetes command");
}

async fn write_reply(send: &mut SendStream, reply: &KubeReply) -> Result<(), String> {
    let frame = encode_limited(reply, MAX_KUBE_REPLY).map_err(|e| e.to_string())?;
    send.write_all(&frame).await.map_err(|e| e.to_string())
}
