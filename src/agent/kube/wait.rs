//! Waiting for an object to meet a condition: rollout complete (the rules of
//! `kubectl rollout status`), a status condition, or deletion. Pure evaluation here; the
//! watch loop lives in the executor.

use serde_json::Value;

use crate::proto::kube::WaitFor;

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
