//! Waiting for an object to meet a condition: rollout complete (the rules of
//! `kubectl rollout status`), a status condition, or deletion. The evaluation is pure; the
//! executor's watch loop below feeds it each state of the object.

use std::time::Duration;

use futures_util::StreamExt;
use kube::api::{DynamicObject, WatchEvent, WatchParams};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tracing::warn;

use super::{bad_request, failure, from_kube, guard, humanize, KubeExecutor, KubeFailure};
use crate::proto::kube::{FailureKind, ObjectRef, WaitFor};

/// Where an object stands against a condition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Eval {
    /// The condition holds; the message says so.
    Met(String),
    /// Not yet; the message says what is missing.
    Pending(String),
    /// It never will (a rollout past its progress deadline).
    Failed(String),
}

impl Eval {
    /// The message.
    pub fn message(&self) -> &str {
        match self {
            Eval::Met(m) | Eval::Pending(m) | Eval::Failed(m) => m,
        }
    }
}

fn int(v: &Value, path: &[&str]) -> Option<i64> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_i64()
}

fn text<'a>(v: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p)?;
    }
    cur.as_str()
}

fn conditions(obj: &Value) -> impl Iterator<Item = &Value> {
    obj.get("status")
        .and_then(|s| s.get("conditions"))
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

/// Evaluates `obj` (present) against `condition`. `kind` is the object's kind.
pub fn evaluate(kind: &str, obj: &Value, condition: &WaitFor) -> Eval {
    match condition {
        WaitFor::Deleted => Eval::Pending(format!(
            "{kind} {:?} still exists",
            text(obj, &["metadata", "name"]).unwrap_or("")
        )),
        WaitFor::Condition { type_, status } => {
            let found = conditions(obj).find(|c| text(c, &["type"]) == Some(type_.as_str()));
            match found {
                Some(c) if text(c, &["status"]).is_some_and(|s| s.eq_ignore_ascii_case(status)) => {
                    Eval::Met(format!("condition {type_} is {status}"))
                }
                Some(c) => Eval::Pending(format!(
                    "condition {type_} is {}{}",
                    text(c, &["status"]).unwrap_or("unknown"),
                    text(c, &["message"])
                        .map(|m| format!(": {m}"))
                        .unwrap_or_default()
                )),
                None => Eval::Pending(format!("condition {type_} is not reported yet")),
            }
        }
        WaitFor::Rollout => rollout(kind, obj),
    }
}

/// The rules of `kubectl rollout status` for Deployment, StatefulSet and DaemonSet.
fn rollout(kind: &str, obj: &Value) -> Eval {
    let name = text(obj, &["metadata", "name"]).unwrap_or("");
    let generation = int(obj, &["metadata", "generation"]).unwrap_or(0);
    let observed = int(obj, &["status", "observedGeneration"]).unwrap_or(0);
    let lower = kind.to_ascii_lowercase();
    if observed < generation {
        return Eval::Pending(format!("waiting for {lower} spec update to be observed"));
    }
    let status = |f: &str| int(obj, &["status", f]).unwrap_or(0);
    match kind {
        "Deployment" => {
            let progress_failed = conditions(obj).any(|c| {
                text(c, &["type"]) == Some("Progressing")
                    && text(c, &["reason"]) == Some("ProgressDeadlineExceeded")
            });
            if progress_failed {
                return Eval::Failed(format!(
                    "deployment {name:?} exceeded its progress deadline"
                ));
            }
            let wanted = int(obj, &["spec", "replicas"]).unwrap_or(1);
            let updated = status("updatedReplicas");
            let replicas = status("replicas");
            let available = status("availableReplicas");
            if updated < wanted {
                Eval::Pending(format!(
                    "waiting for deployment {name:?} rollout to finish: {updated} out of {wanted} new replicas have been updated"
                ))
            } else if replicas > updated {
                Eval::Pending(format!(
                    "waiting for deployment {name:?} rollout to finish: {} old replicas are pending termination",
                    replicas - updated
                ))
            } else if available < updated {
                Eval::Pending(format!(
                    "waiting for deployment {name:?} rollout to finish: {available} of {updated} updated replicas are available"
                ))
            } else {
                Eval::Met(format!("deployment {name:?} successfully rolled out"))
            }
        }
        "StatefulSet" => {
            let strategy =
                text(obj, &["spec", "updateStrategy", "type"]).unwrap_or("RollingUpdate");
            if strategy != "RollingUpdate" {
                return Eval::Met(format!(
                    "statefulset {name:?} uses {strategy}: rollout status is not tracked"
                ));
            }
            let wanted = int(obj, &["spec", "replicas"]).unwrap_or(1);
            let ready = status("readyReplicas");
            let updated = status("updatedReplicas");
            if ready < wanted {
                return Eval::Pending(format!(
                    "waiting for {ready} of {wanted} pods of statefulset {name:?} to be ready"
                ));
            }
            let partition = int(
                obj,
                &["spec", "updateStrategy", "rollingUpdate", "partition"],
            )
            .unwrap_or(0);
            if partition > 0 {
                let want_updated = wanted - partition;
                return if updated < want_updated {
                    Eval::Pending(format!(
                        "waiting for partitioned roll out of statefulset {name:?} to finish: {updated} out of {want_updated} new pods have been updated"
                    ))
                } else {
                    Eval::Met(format!(
                        "partitioned roll out of statefulset {name:?} complete: {updated} new pods have been updated"
                    ))
                };
            }
            let current = text(obj, &["status", "currentRevision"]);
            let update = text(obj, &["status", "updateRevision"]);
            if current != update {
                Eval::Pending(format!(
                    "waiting for statefulset {name:?} rolling update to complete: {updated} pods at revision {}",
                    update.unwrap_or("?")
                ))
            } else {
                Eval::Met(format!(
                    "statefulset {name:?} rolling update complete: {ready} pods at revision {}",
                    current.unwrap_or("?")
                ))
            }
        }
        "DaemonSet" => {
            let desired = status("desiredNumberScheduled");
            let updated = status("updatedNumberScheduled");
            let available = status("numberAvailable");
            if updated < desired {
                Eval::Pending(format!(
                    "waiting for daemon set {name:?} rollout to finish: {updated} out of {desired} new pods have been updated"
                ))
            } else if available < desired {
                Eval::Pending(format!(
                    "waiting for daemon set {name:?} rollout to finish: {available} of {desired} updated pods are available"
                ))
            } else {
                Eval::Met(format!("daemon set {name:?} successfully rolled out"))
            }
        }
        other => Eval::Failed(format!(
            "rollout status is only known for Deployment, StatefulSet and DaemonSet, not {other}"
        )),
    }
}

impl KubeExecutor {
    pub(super) async fn wait(
        &self,
        target: &ObjectRef,
        condition: &WaitFor,
        timeout: Duration,
        progress: &mpsc::Sender<String>,
    ) -> Result<String, KubeFailure> {
        if target.name.is_empty() {
            return Err(bad_request("wait needs an object name"));
        }
        let resolved = self.resolve(&target.api_version, &target.kind).await?;
        if *condition == WaitFor::Rollout
            && !matches!(
                resolved.resource.kind.as_str(),
                "Deployment" | "StatefulSet" | "DaemonSet"
            )
        {
            return Err(bad_request(format!(
                "rollout status is only known for Deployment, StatefulSet and DaemonSet, not {}",
                resolved.resource.kind
            )));
        }
        let ns = self.namespace_for(&resolved, target.namespace.as_deref());
        self.check(&resolved, ns.as_deref(), Some(&target.name))?;
        self.guard_secret(&resolved, ns.as_deref(), &target.name, None)?;
        let secret = guard::is_secrets(&resolved.resource.group, &resolved.resource.plural);
        let api = self.api(&resolved, ns.as_deref());
        let kind = resolved.resource.kind.clone();
        let describe = match &ns {
            Some(ns) => format!("{kind} {ns}/{}", target.name),
            None => format!("{kind} {}", target.name),
        };
        let mut last = String::new();
        let work = async {
            // Judges one state of the object (None: it does not exist), reports what is
            // missing when that changed, and gives the answer once there is one.
            let mut settle = |obj: Option<&DynamicObject>| -> Option<Result<String, KubeFailure>> {
                if let Some(o) = obj.filter(|_| secret) {
                    let value = serde_json::to_value(o).unwrap_or(Value::Null);
                    if let Err(refused) =
                        self.guard_secret(&resolved, ns.as_deref(), &target.name, Some(&value))
                    {
                        return Some(Err(refused));
                    }
                }
                let eval = match (obj, condition) {
                    (None, WaitFor::Deleted) => Eval::Met(format!("{describe} is deleted")),
                    (None, _) => Eval::Pending(format!("{describe} does not exist yet")),
                    (Some(o), c) => match serde_json::to_value(o) {
                        Ok(v) => evaluate(&kind, &v, c),
                        Err(e) => Eval::Failed(format!("{describe}: {e}")),
                    },
                };
                if eval.message() != last {
                    last = eval.message().to_string();
                    // The final state is said once, by the answer, not also as progress.
                    if matches!(eval, Eval::Pending(_)) {
                        let event =
                            json!({"type": "progress", "object": describe, "message": last});
                        // A full channel only drops a progress line, never the final answer.
                        let _ = progress.try_send(event.to_string());
                    }
                }
                match eval {
                    Eval::Met(m) => Some(Ok(m)),
                    Eval::Failed(m) => {
                        Some(Err(failure(FailureKind::Api, 422, "RolloutFailed", m)))
                    }
                    Eval::Pending(_) => None,
                }
            };
            loop {
                let current = api.get_opt(&target.name).await.map_err(from_kube)?;
                if let Some(answer) = settle(current.as_ref()) {
                    return answer;
                }
                let version = current
                    .as_ref()
                    .and_then(|o| o.metadata.resource_version.clone())
                    .unwrap_or_else(|| "0".into());
                let params = WatchParams::default()
                    .fields(&format!("metadata.name={}", target.name))
                    .timeout(290);
                let mut events = match api.watch(&params, &version).await {
                    Ok(s) => s.boxed(),
                    Err(e) => {
                        warn!("watch of {describe} failed, reading again: {e}");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                while let Some(event) = events.next().await {
                    let obj = match event {
                        Ok(WatchEvent::Added(o)) | Ok(WatchEvent::Modified(o)) => Some(o),
                        Ok(WatchEvent::Deleted(_)) => None,
                        Ok(WatchEvent::Bookmark(_)) => continue,
                        // 410 Gone and friends: read the object again and watch anew, after
                        // a pause so a failing watch cannot spin.
                        Ok(WatchEvent::Error(_)) | Err(_) => {
                            tokio::time::sleep(Duration::from_millis(500)).await;
                            break;
                        }
                    };
                    if let Some(answer) = settle(obj.as_ref()) {
                        return answer;
                    }
                }
            }
        };
        match tokio::time::timeout(timeout, work).await {
            Ok(Ok(message)) => Ok(
                json!({"type": "done", "met": true, "object": describe, "message": message})
                    .to_string(),
            ),
            Ok(Err(f)) => Err(f),
            Err(_) => Err(failure(
                FailureKind::Timeout,
                504,
                "Timeout",
                format!(
                    "timed out after {} waiting for {describe}: {}",
                    humanize(timeout),
                    if last.is_empty() {
                        "no answer yet"
                    } else {
                        last.as_str()
                    }
                ),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(generation: i64, status: Value) -> Value {
        json!({"metadata": {"name": "web", "generation": generation},
               "spec": {"replicas": 3}, "status": status})
    }

    #[test]
    fn deployment_rollouts_follow_kubectl() {
        let table = [
            (
                deployment(2, json!({"observedGeneration": 1})),
                "P",
                "spec update",
            ),
            (
                deployment(
                    2,
                    json!({"observedGeneration": 2, "updatedReplicas": 1, "replicas": 1}),
                ),
                "P",
                "1 out of 3 new replicas",
            ),
            (
                deployment(
                    2,
                    json!({"observedGeneration": 2, "updatedReplicas": 3, "replicas": 4, "availableReplicas": 3}),
                ),
                "P",
                "1 old replicas",
            ),
            (
                deployment(
                    2,
                    json!({"observedGeneration": 2, "updatedReplicas": 3, "replicas": 3, "availableReplicas": 2}),
                ),
                "P",
                "2 of 3 updated replicas are available",
            ),
            (
                deployment(
                    2,
                    json!({"observedGeneration": 2, "updatedReplicas": 3, "replicas": 3, "availableReplicas": 3}),
                ),
                "M",
                "successfully rolled out",
            ),
            (
                deployment(
                    2,
                    json!({"observedGeneration": 2, "conditions": [
                    {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]}),
                ),
                "F",
                "progress deadline",
            ),
        ];
        for (obj, want, text) in table {
            let got = evaluate("Deployment", &obj, &WaitFor::Rollout);
            let tag = match got {
                Eval::Met(_) => "M",
                Eval::Pending(_) => "P",
                Eval::Failed(_) => "F",
            };
            assert_eq!(tag, want, "{obj}");
            assert!(got.message().contains(text), "{got:?}");
        }
    }

    #[test]
    fn statefulsets_daemonsets_and_conditions() {
        let sts = json!({"metadata": {"name": "db", "generation": 1}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 1, "readyReplicas": 2, "updatedReplicas": 2,
                       "currentRevision": "r1", "updateRevision": "r2"}});
        assert!(matches!(
            evaluate("StatefulSet", &sts, &WaitFor::Rollout),
            Eval::Pending(_)
        ));
        let mut done = sts.clone();
        done["status"]["currentRevision"] = json!("r2");
        assert!(matches!(
            evaluate("StatefulSet", &done, &WaitFor::Rollout),
            Eval::Met(_)
        ));

        let ds = json!({"metadata": {"name": "agent", "generation": 1},
            "status": {"observedGeneration": 1, "desiredNumberScheduled": 3,
                       "updatedNumberScheduled": 3, "numberAvailable": 2}});
        assert!(matches!(
            evaluate("DaemonSet", &ds, &WaitFor::Rollout),
            Eval::Pending(_)
        ));

        let ready = WaitFor::Condition {
            type_: "Ready".into(),
            status: "True".into(),
        };
        let pod = json!({"metadata": {"name": "p"}, "status": {"conditions": [
            {"type": "Ready", "status": "False", "message": "containers not ready"}]}});
        let got = evaluate("Pod", &pod, &ready);
        assert_eq!(
            got,
            Eval::Pending("condition Ready is False: containers not ready".into())
        );
        let pod = json!({"status": {"conditions": [{"type": "Ready", "status": "True"}]}});
        assert!(matches!(evaluate("Pod", &pod, &ready), Eval::Met(_)));
        assert!(matches!(
            evaluate("ConfigMap", &pod, &WaitFor::Rollout),
            Eval::Failed(_)
        ));
    }
}
