//! The decision for one pod, and the JSON Patch (RFC 6902) that adds the sidecar.
//!
//! Pure functions of the pod JSON and the options, so every case (opted out, already injected,
//! an annotation error, existing init containers/volumes/annotations) is unit-tested without a
//! server. The pod is a `serde_json::Value` rather than a typed Kubernetes object: the injector
//! reads a few fields and must pass everything else through untouched, including fields newer
//! than any typed model we could link.
//!
//! JSON Patch `add` needs the parent to exist, so each addition is either "create the array or
//! object" or "add into it" depending on the pod; and the sidecar goes at index 0 of
//! `initContainers`, so it starts (and passes its startup probe) before any other init
//! container, which may itself need Redis.

use super::sidecar::{
    ACCESS_KEY_VOLUME, CONTAINER_NAME, INJECT_LABEL, INJECTED_ANNOTATION, Options,
};
use serde_json::{Map, Value, json};

/// What to do with a pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Admit it unchanged; the reason is for the log.
    Allow(&'static str),
    /// Admit it with these JSON Patch operations.
    Patch(Vec<Value>),
    /// Refuse it with this message (HTTP-like code 400 in the review's status).
    Deny(String),
}

/// Decides about a pod being created, with the chart-wide `defaults`.
pub fn decide(pod: &Value, defaults: &Options) -> Decision {
    let Some(pod) = pod.as_object() else {
        return Decision::Deny("the review's object is not a JSON object (a Pod)".into());
    };
    let Some(spec) = pod.get("spec").and_then(Value::as_object) else {
        return Decision::Deny("the review's object has no Pod spec".into());
    };
    let empty = Map::new();
    let metadata = pod.get("metadata").and_then(Value::as_object);
    let labels = object_at(metadata, "labels").unwrap_or(&empty);
    let annotations = object_at(metadata, "annotations").unwrap_or(&empty);
    if labels.get(INJECT_LABEL).and_then(Value::as_str) != Some("true") {
        return Decision::Allow("not labelled redis-entra-proxy.io/inject=true");
    }
    if is_injected(spec, annotations) {
        return Decision::Allow("already injected");
    }
    let options = match defaults.with_annotations(annotations) {
        Ok(options) => options,
        Err(message) => return Decision::Deny(message),
    };
    if let Err(message) = check_conflicts(spec, &options) {
        return Decision::Deny(message);
    }
    Decision::Patch(operations(metadata, spec, &options))
}

/// True when the pod already has the sidecar (under either container list) or our annotation:
/// a reinvocation, or a pod created from an injected pod's spec.
fn is_injected(spec: &Map<String, Value>, annotations: &Map<String, Value>) -> bool {
    annotations.get(INJECTED_ANNOTATION).and_then(Value::as_str) == Some("true")
        || ["initContainers", "containers"]
            .iter()
            .flat_map(|list| array_at(spec, list))
            .any(|container| container.get("name").and_then(Value::as_str) == Some(CONTAINER_NAME))
}

/// What the API server would refuse, or what would make the sidecar crash-loop or expose it:
/// `hostNetwork` (the sidecar would bind the node's own loopback, shared with every other
/// host-network pod on the node), a volume already named like ours, a container mounting a
/// volume of that name (it would see the access key, which only the sidecar may read), or an
/// app container declaring a port the sidecar binds.
fn check_conflicts(spec: &Map<String, Value>, options: &Options) -> Result<(), String> {
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "the pod has hostNetwork: true, so its redis-entra-proxy sidecar would listen on the \
             node's own network ({} and the admin ports {}), shared with every host-network \
             pod on the node: a second such pod's sidecar could not start, and any process on \
             the node could use this one's credentials. Run the pod without hostNetwork, or \
             reach the cache through the chart's gateway mode (a Deployment and a Service with \
             a listen password) instead of a sidecar",
            options.listen,
            options.ports()[..2]
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join("/")
        ));
    }
    if options.volume().is_some()
        && array_at(spec, "volumes")
            .any(|volume| volume.get("name").and_then(Value::as_str) == Some(ACCESS_KEY_VOLUME))
    {
        return Err(format!(
            "the pod already has a volume named {ACCESS_KEY_VOLUME}, which the injector adds \
             for redis-entra-proxy.io/access-key-secret: rename it"
        ));
    }
    let mounting = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| array_at(spec, list))
        .find(|container| {
            let mounts = container.get("volumeMounts").and_then(Value::as_array);
            mounts
                .into_iter()
                .flatten()
                .any(|mount| mount.get("name").and_then(Value::as_str) == Some(ACCESS_KEY_VOLUME))
        });
    if let Some(container) = mounting {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
        return Err(format!(
            "container {name:?} mounts a volume named {ACCESS_KEY_VOLUME}, the name of the \
             volume that holds the sidecar's access key: only the sidecar may mount it; rename \
             the mount"
        ));
    }
    let sidecar_ports = options.ports();
    for container in ["initContainers", "containers"]
        .iter()
        .flat_map(|list| array_at(spec, list))
    {
        let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
        let ports = container.get("ports").and_then(Value::as_array);
        for port in ports.into_iter().flatten() {
            let number = port.get("containerPort").and_then(Value::as_u64);
            if let Some(clash) = sidecar_ports
                .iter()
                .find(|p| Some(u64::from(**p)) == number)
            {
                return Err(format!(
                    "container {name:?} declares port {clash}, which the redis-entra-proxy \
                     sidecar binds: set redis-entra-proxy.io/admin-port (or \
                     redis-entra-proxy.io/listen) to a free port"
                ));
            }
        }
    }
    if let Some((start, end)) = options.cluster_range() {
        for container in ["initContainers", "containers"]
            .iter()
            .flat_map(|list| array_at(spec, list))
        {
            let name = container.get("name").and_then(Value::as_str).unwrap_or("?");
            let ports = container.get("ports").and_then(Value::as_array);
            for port in ports.into_iter().flatten() {
                let Some(number) = port.get("containerPort").and_then(Value::as_u64) else {
                    continue;
                };
                if (u64::from(start)..=u64::from(end)).contains(&number) {
                    return Err(format!(
                        "container {name:?} declares port {number}, inside the cluster-node \
                         ports {start}-{end} where the redis-entra-proxy sidecar listens for each \
                         cluster node (redis-entra-proxy.io/cluster-ports, default the \
                         cluster-max-nodes ports after the listen port): set \
                         redis-entra-proxy.io/cluster-ports to a range without it, or \
                         redis-entra-proxy.io/cluster to off"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The patch: the sidecar first among the init containers, the access-key volume if any, and
/// the `injected` annotation.
fn operations(
    metadata: Option<&Map<String, Value>>,
    spec: &Map<String, Value>,
    options: &Options,
) -> Vec<Value> {
    let mut ops = Vec::new();
    let container = options.container();
    if spec.get("initContainers").is_some_and(Value::is_array) {
        ops.push(add("/spec/initContainers/0", container));
    } else {
        ops.push(add("/spec/initContainers", json!([container])));
    }
    if let Some(volume) = options.volume() {
        if spec.get("volumes").is_some_and(Value::is_array) {
            ops.push(add("/spec/volumes/-", volume));
        } else {
            ops.push(add("/spec/volumes", json!([volume])));
        }
    }
    // The opt-in label was found, so `metadata` exists: only `annotations` may be missing.
    if object_at(metadata, "annotations").is_some() {
        ops.push(add(
            &format!("/metadata/annotations/{}", escape(INJECTED_ANNOTATION)),
            json!("true"),
        ));
    } else {
        ops.push(add(
            "/metadata/annotations",
            json!({ INJECTED_ANNOTATION: "true" }),
        ));
    }
    ops
}

/// One `add` operation.
fn add(path: &str, value: Value) -> Value {
    json!({"op": "add", "path": path, "value": value})
}

/// Escapes a key for a JSON pointer (RFC 6901): `~` → `~0`, `/` → `~1`.
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// `object[key]` when it is a JSON object.
fn object_at<'a>(
    object: Option<&'a Map<String, Value>>,
    key: &str,
) -> Option<&'a Map<String, Value>> {
    object?.get(key)?.as_object()
}

/// The elements of `object[key]` when it is an array (none otherwise).
fn array_at<'a>(object: &'a Map<String, Value>, key: &str) -> impl Iterator<Item = &'a Value> {
    object
        .get(key)
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Options {
        Options {
            upstream: Some("cache.example:6380".into()),
            ..Options::default()
        }
    }

    fn pod(metadata: Value, spec: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec})
    }

    fn labelled() -> Value {
        json!({"name": "app", "labels": {"redis-entra-proxy.io/inject": "true"}})
    }

    fn patch_of(decision: Decision) -> Vec<Value> {
        match decision {
            Decision::Patch(ops) => ops,
            other => panic!("expected a patch, got {other:?}"),
        }
    }

    #[test]
    fn a_plain_pod_gets_new_arrays_and_annotations() {
        let ops = patch_of(decide(
            &pod(labelled(), json!({"containers": [{"name": "app"}]})),
            &defaults(),
        ));
        let paths: Vec<&str> = ops.iter().filter_map(|op| op["path"].as_str()).collect();
        assert_eq!(paths, ["/spec/initContainers", "/metadata/annotations"]);
        assert_eq!(ops[0]["value"][0]["name"], CONTAINER_NAME);
        assert_eq!(ops[1]["value"][INJECTED_ANNOTATION], "true");
    }

    #[test]
    fn existing_arrays_and_annotations_are_added_into() {
        let mut metadata = labelled();
        metadata["annotations"] = json!({
            "other": "x",
            "redis-entra-proxy.io/access-key-secret": "keys/primary"
        });
        let spec = json!({
            "initContainers": [{"name": "migrate"}],
            "containers": [{"name": "app"}],
            "volumes": [{"name": "data", "emptyDir": {}}]
        });
        let ops = patch_of(decide(&pod(metadata, spec), &defaults()));
        let paths: Vec<&str> = ops.iter().filter_map(|op| op["path"].as_str()).collect();
        assert_eq!(
            paths,
            [
                "/spec/initContainers/0",
                "/spec/volumes/-",
                "/metadata/annotations/redis-entra-proxy.io~1injected"
            ]
        );
        assert_eq!(ops[1]["value"]["secret"]["items"][0]["key"], "primary");
    }

    #[test]
    fn unlabelled_or_injected_pods_are_left_alone() {
        let spec = json!({"containers": [{"name": "app"}]});
        assert!(matches!(
            decide(&pod(json!({"name": "x"}), spec.clone()), &defaults()),
            Decision::Allow(_)
        ));
        let mut metadata = labelled();
        metadata["labels"]["redis-entra-proxy.io/inject"] = json!("false");
        assert!(matches!(
            decide(&pod(metadata, spec.clone()), &defaults()),
            Decision::Allow(_)
        ));
        let mut metadata = labelled();
        metadata["annotations"] = json!({INJECTED_ANNOTATION: "true"});
        assert_eq!(
            decide(&pod(metadata, spec), &defaults()),
            Decision::Allow("already injected")
        );
        for list in ["initContainers", "containers"] {
            let spec = json!({"containers": [{"name": "app"}], list: [{"name": CONTAINER_NAME}]});
            assert_eq!(
                decide(&pod(labelled(), spec), &defaults()),
                Decision::Allow("already injected")
            );
        }
    }

    #[test]
    fn conflicts_and_bad_objects_are_denied() {
        let spec = json!({"containers": [{"name": "app", "ports": [{"containerPort": 9090}]}]});
        let Decision::Deny(message) = decide(&pod(labelled(), spec), &defaults()) else {
            panic!("port clash admitted");
        };
        assert!(message.contains("port 9090"), "{message}");
        let mut metadata = labelled();
        metadata["annotations"] = json!({"redis-entra-proxy.io/access-key-secret": "k"});
        let spec =
            json!({"containers": [{"name": "app"}], "volumes": [{"name": ACCESS_KEY_VOLUME}]});
        assert!(matches!(
            decide(&pod(metadata, spec), &defaults()),
            Decision::Deny(_)
        ));
        let spec = json!({"hostNetwork": true, "containers": [{"name": "app"}]});
        let Decision::Deny(message) = decide(&pod(labelled(), spec), &defaults()) else {
            panic!("a host-network pod admitted");
        };
        assert!(
            message.starts_with("the pod has hostNetwork: true"),
            "{message}"
        );
        assert!(message.contains("9090/9091"), "{message}");
        let spec = json!({"hostNetwork": false, "containers": [{"name": "app"}]});
        assert!(matches!(
            decide(&pod(labelled(), spec), &defaults()),
            Decision::Patch(_)
        ));
        // Another container mounting the key's volume name would see the key.
        let spec = json!({"containers": [{"name": "app",
            "volumeMounts": [{"name": ACCESS_KEY_VOLUME, "mountPath": "/k"}]}]});
        let Decision::Deny(message) = decide(&pod(labelled(), spec), &defaults()) else {
            panic!("a mount of the key's volume admitted");
        };
        assert!(
            message.contains("only the sidecar may mount it"),
            "{message}"
        );
        assert!(matches!(
            decide(&json!("pod"), &defaults()),
            Decision::Deny(_)
        ));
        assert!(matches!(
            decide(&json!({"metadata": labelled()}), &defaults()),
            Decision::Deny(_)
        ));
    }

    #[test]
    fn pointer_escaping() {
        assert_eq!(escape("a/b~c"), "a~1b~0c");
    }
}
