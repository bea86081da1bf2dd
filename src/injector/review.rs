//! `admission.k8s.io/v1` `AdmissionReview` in and out.
//!
//! Only the envelope is typed (what the API server must send: `request.uid`, the kind, the
//! operation); the object stays JSON for [`super::patch`]. Two kinds of bad input, answered
//! differently on purpose:
//!
//! * a body that is not a v1 review with a `request.uid` can't be answered with a review at
//!   all (the API server matches answers by uid): HTTP 400 and a message ([`BadReview`]);
//! * a review whose `object` is not a usable Pod gets a proper review answer with
//!   `allowed: false` and the reason, which `kubectl` then shows to the user.
//!
//! Anything that is not a Pod CREATE (another kind, an update, a subresource) is allowed
//! unchanged: the webhook's rules should not send those, and refusing them would block the
//! cluster for nothing.

use super::patch::{Decision, decide};
use super::sidecar::Options;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

/// The only review version served (the chart registers `admissionReviewVersions: ["v1"]`).
pub const API_VERSION: &str = "admission.k8s.io/v1";

/// A body that can't be answered with a review: the reason, for an HTTP 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BadReview(pub String);

/// What was decided about one review, for the log line (no secrets: names and reasons only).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `namespace/name` of the pod (`generateName` + `*` before the API server names it).
    pub pod: String,
    /// The request's uid.
    pub uid: String,
    /// `injected`, `allowed: <reason>`, or `denied: <message>`.
    pub result: String,
}

/// The typed part of a review.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    api_version: Option<String>,
    kind: Option<String>,
    request: Option<Request>,
}

/// The typed part of `request`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Request {
    uid: String,
    kind: Option<GroupVersionKind>,
    operation: Option<String>,
    sub_resource: Option<String>,
    namespace: Option<String>,
    name: Option<String>,
    object: Option<Value>,
}

/// `request.kind`.
#[derive(Debug, Deserialize)]
struct GroupVersionKind {
    #[serde(default)]
    group: String,
    #[serde(default)]
    kind: String,
}

/// Answers the review in `body` (JSON) with the chart-wide `defaults`: the response review
/// (JSON) and what was decided, or why the body can't be answered.
pub fn answer(body: &[u8], defaults: &Options) -> Result<(Value, Outcome), BadReview> {
    let review: Review = serde_json::from_slice(body)
        .map_err(|err| BadReview(format!("the body is not an AdmissionReview: {err}")))?;
    if review.kind.as_deref() != Some("AdmissionReview")
        || review.api_version.as_deref() != Some(API_VERSION)
    {
        return Err(BadReview(format!(
            "expected an AdmissionReview of apiVersion {API_VERSION}, got kind {:?} apiVersion {:?}",
            review.kind.unwrap_or_default(),
            review.api_version.unwrap_or_default()
        )));
    }
    let request = review
        .request
        .ok_or_else(|| BadReview("the AdmissionReview has no request".into()))?;
    if request.uid.is_empty() {
        return Err(BadReview(
            "the AdmissionReview's request.uid is empty".into(),
        ));
    }
    let decision = decide_request(&request, defaults);
    let outcome = Outcome {
        pod: pod_name(&request),
        uid: request.uid.clone(),
        result: match &decision {
            Decision::Allow(reason) => format!("allowed: {reason}"),
            Decision::Patch(_) => "injected".into(),
            Decision::Deny(message) => format!("denied: {message}"),
        },
    };
    Ok((response(&request.uid, decision), outcome))
}

/// Pod CREATEs go to [`decide`]; everything else is allowed unchanged.
fn decide_request(request: &Request, defaults: &Options) -> Decision {
    let is_pod = request
        .kind
        .as_ref()
        .is_some_and(|gvk| gvk.group.is_empty() && gvk.kind == "Pod");
    if !is_pod {
        return Decision::Allow("not a Pod");
    }
    if request.operation.as_deref() != Some("CREATE") {
        return Decision::Allow("not a CREATE");
    }
    if request
        .sub_resource
        .as_deref()
        .is_some_and(|s| !s.is_empty())
    {
        return Decision::Allow("a subresource");
    }
    match &request.object {
        Some(object) => decide(object, defaults),
        None => Decision::Deny("the review of a Pod CREATE has no object".into()),
    }
}

/// The response review for `uid`.
fn response(uid: &str, decision: Decision) -> Value {
    let response = match decision {
        Decision::Allow(_) => json!({"uid": uid, "allowed": true}),
        Decision::Patch(ops) => {
            let patch = serde_json::to_vec(&ops).unwrap_or_default();
            json!({
                "uid": uid,
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(patch)
            })
        }
        Decision::Deny(message) => json!({
            "uid": uid,
            "allowed": false,
            "status": {"code": 400, "message": message}
        }),
    };
    json!({"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response})
}

/// `namespace/name` for the log; a pod of a Deployment has no name yet, only `generateName`.
fn pod_name(request: &Request) -> String {
    let metadata = request.object.as_ref().and_then(|o| o.get("metadata"));
    let field = |key: &str| metadata.and_then(|m| m.get(key)).and_then(Value::as_str);
    let name = match (
        request.name.as_deref(),
        field("name"),
        field("generateName"),
    ) {
        (Some(name), _, _) if !name.is_empty() => name.to_string(),
        (_, Some(name), _) => name.to_string(),
        (_, _, Some(prefix)) => format!("{prefix}*"),
        _ => "?".into(),
    };
    format!("{}/{name}", request.namespace.as_deref().unwrap_or("?"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Options {
        Options {
            upstream: Some("cache.example".into()),
            ..Options::default()
        }
    }

    fn review(request: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": API_VERSION, "kind": "AdmissionReview", "request": request
        }))
        .unwrap_or_default()
    }

    fn pod_request(operation: &str, object: Value) -> Value {
        json!({
            "uid": "u-1",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "operation": operation,
            "namespace": "ns",
            "object": object
        })
    }

    #[test]
    fn bodies_that_cannot_be_answered() {
        for body in [
            &b"not json"[..],
            br#"{"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview", "request": {"uid": "x"}}"#,
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": ""}}"#,
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {}}"#,
        ] {
            assert!(answer(body, &defaults()).is_err(), "{body:?}");
        }
    }

    #[test]
    fn non_pod_creates_are_allowed_unchanged() {
        let labelled = json!({"metadata": {"labels": {"redis-entra-proxy.io/inject": "true"}},
                              "spec": {"containers": []}});
        let mut other_kind = pod_request("CREATE", labelled.clone());
        other_kind["kind"]["kind"] = json!("Deployment");
        other_kind["kind"]["group"] = json!("apps");
        let mut subresource = pod_request("CREATE", labelled.clone());
        subresource["subResource"] = json!("binding");
        for request in [other_kind, pod_request("UPDATE", labelled), subresource] {
            let (response, _) = answer(&review(request), &defaults()).expect("answered");
            assert_eq!(response["response"], json!({"uid": "u-1", "allowed": true}));
        }
    }

    #[test]
    fn an_unusable_object_is_denied_with_a_message() {
        let (response, outcome) =
            answer(&review(pod_request("CREATE", json!(42))), &defaults()).expect("answered");
        assert_eq!(response["response"]["allowed"], false);
        assert_eq!(response["response"]["status"]["code"], 400);
        assert!(outcome.result.starts_with("denied: "), "{outcome:?}");
    }

    #[test]
    fn the_log_names_generated_pods() {
        let object = json!({"metadata": {"generateName": "web-"}, "spec": {"containers": []}});
        let (_, outcome) =
            answer(&review(pod_request("CREATE", object)), &defaults()).expect("answered");
        assert_eq!(outcome.pod, "ns/web-*");
        assert_eq!(outcome.uid, "u-1");
    }
}
