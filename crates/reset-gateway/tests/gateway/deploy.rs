//! The deployment files agree with the binary: ports, probe paths, config keys, metric names.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reset_gateway::GatewayConfig;
use serde_yaml::Value;

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

use serde::Deserialize;

fn one(path: &str) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{path}");
    docs.remove(0)
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_str()
        .unwrap_or_else(|| panic!("{path:?} is not a string"))
}

#[test]
fn kubernetes_manifests_match_the_binary() {
    let deployment = one("deploy/kubernetes/deployment.yaml");
    let configmap = one("deploy/kubernetes/configmap.yaml");
    let service = one("deploy/kubernetes/service.yaml");
    let secret = one("deploy/kubernetes/secret.example.yaml");
    let pdb = one("deploy/kubernetes/pdb.yaml");
    let hpa = one("deploy/kubernetes/hpa.yaml");

    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    let ports: Vec<(String, u64)> = container["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_owned(),
                p["containerPort"].as_u64().unwrap(),
            )
        })
        .collect();
    let port = |name: &str| {
        ports
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, p)| *p)
            .unwrap()
    };

    // The ConfigMap is a valid configuration whose listeners are the container's ports.
    let yaml = str_at(&configmap, &["data", "gateway.yaml"]);
    let config = GatewayConfig::from_yaml(yaml).unwrap_or_else(|e| panic!("configmap: {e}"));
    config.guard.validate().unwrap();
    assert_eq!(u64::from(config.server.listen.port()), port("http"));
    assert_eq!(u64::from(config.admin.listen.port()), port("admin"));
    assert!(
        config.admin.listen.ip().is_unspecified(),
        "probes must reach the admin port"
    );

    // Probes hit the admin endpoints.
    assert_eq!(
        str_at(container, &["livenessProbe", "httpGet", "path"]),
        "/healthz"
    );
    assert_eq!(
        str_at(container, &["readinessProbe", "httpGet", "path"]),
        "/readyz"
    );
    assert_eq!(
        str_at(container, &["livenessProbe", "httpGet", "port"]),
        "admin"
    );
    assert_eq!(
        str_at(container, &["readinessProbe", "httpGet", "port"]),
        "admin"
    );

    // The config file and the secrets are where the configuration says.
    let mounts = container["volumeMounts"].as_sequence().unwrap();
    let mount = |name: &str| {
        mounts
            .iter()
            .find(|m| m["name"] == name)
            .map(|m| str_at(m, &["mountPath"]))
            .unwrap()
    };
    let args: Vec<&str> = container["args"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    assert_eq!(
        args,
        ["--config", &format!("{}/gateway.yaml", mount("config"))]
    );
    let secrets_dir = mount("secrets");
    let secret_keys: BTreeSet<&str> = secret["stringData"]
        .as_mapping()
        .unwrap()
        .keys()
        .map(|k| k.as_str().unwrap())
        .collect();
    for file in [
        config.upstream.api_key_file.clone().unwrap(),
        config.store.key_secret_file.clone().unwrap(),
    ] {
        assert_eq!(
            file.parent().unwrap().to_str().unwrap(),
            secrets_dir,
            "{}",
            file.display()
        );
        let key = file.file_name().unwrap().to_str().unwrap();
        assert!(secret_keys.contains(key), "{key} is not in the Secret");
    }
    assert!(config.upstream.api_key.is_none());

    // SIGKILL comes only after the gateway's own drain.
    let grace = pod["terminationGracePeriodSeconds"].as_u64().unwrap();
    assert!(grace > config.server.shutdown_grace.0.as_secs());

    // Service, PDB and HPA point at this Deployment.
    let labels = &deployment["spec"]["template"]["metadata"]["labels"];
    assert_eq!(&service["spec"]["selector"], labels);
    assert_eq!(&pdb["spec"]["selector"]["matchLabels"], labels);
    assert_eq!(&deployment["spec"]["selector"]["matchLabels"], labels);
    for p in service["spec"]["ports"].as_sequence().unwrap() {
        let target = p["targetPort"].as_str().unwrap();
        assert!(ports.iter().any(|(n, _)| n == target), "{target}");
    }
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(
        hpa["spec"]["scaleTargetRef"]["name"],
        deployment["metadata"]["name"]
    );

    let kustomization = one("deploy/kubernetes/kustomization.yaml");
    for resource in kustomization["resources"].as_sequence().unwrap() {
        assert!(repo(&format!("deploy/kubernetes/{}", resource.as_str().unwrap())).is_file());
    }
}

#[test]
fn compose_and_dockerfile_match_the_binary() {
    let compose = one("deploy/compose.yaml");
    let config = GatewayConfig::from_yaml(&read("deploy/compose/gateway.yaml")).unwrap();
    config.guard.validate().unwrap();
    let listen = config.server.listen.port();
    assert!(read("deploy/compose/nginx.conf").contains(&format!("server gateway:{listen};")));
    assert_eq!(
        compose["services"]["lb"]["ports"][0],
        format!("8080:{listen}").as_str()
    );
    let secrets = compose["secrets"].as_mapping().unwrap();
    for file in [
        config.upstream.api_key_file.unwrap(),
        config.store.key_secret_file.unwrap(),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(secrets.contains_key(name), "compose has no secret {name}");
        assert!(file.starts_with("/run/secrets"));
    }
    let dockerfile = read("deploy/Dockerfile");
    let defaults = GatewayConfig::default();
    let expose = format!(
        "EXPOSE {} {}",
        defaults.server.listen.port(),
        defaults.admin.listen.port()
    );
    assert!(
        dockerfile.contains(&expose),
        "the Dockerfile should say {expose}"
    );
    assert!(
        dockerfile.contains("nonroot"),
        "the image runs as a non-root user"
    );
}

/// Metric family names a Prometheus expression refers to, without sample suffixes.
fn families(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("reset_gateway_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        let base = ["_total", "_bucket", "_count", "_sum"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name)
            .to_owned();
        names.insert(base);
    }
    names
}

#[tokio::test]
async fn alerts_and_dashboard_use_metrics_the_gateway_exports() {
    let gw = Gateway::start("").await;
    gw.reset_as_ios("email=alice%40example.com").await;
    let exported: BTreeSet<String> = gw
        .admin_get("/metrics")
        .await
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| l.split(' ').next().unwrap().to_owned())
        .collect();

    let rules = one("deploy/alerts/rules.yaml");
    let mut alerts = 0;
    for group in rules["groups"].as_sequence().unwrap() {
        for rule in group["rules"].as_sequence().unwrap() {
            let expr = str_at(rule, &["expr"]);
            let used = families(expr);
            assert!(!used.is_empty(), "{expr}");
            for name in used {
                assert!(
                    exported.contains(&name),
                    "alert {} uses {name}, not exported",
                    str_at(rule, &["alert"])
                );
            }
            alerts += 1;
        }
    }
    assert!(alerts >= 4);
    for required in ["upstream", "rate_limited", "store_errors", "config_reloads"] {
        assert!(
            read("deploy/alerts/rules.yaml").contains(required),
            "no alert on {required}"
        );
    }

    let dashboard: serde_json::Value =
        serde_json::from_str(&read("deploy/grafana/dashboard.json")).unwrap();
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(!panels.is_empty());
    for panel in panels {
        for target in panel["targets"].as_array().unwrap() {
            for name in families(target["expr"].as_str().unwrap()) {
                assert!(
                    exported.contains(&name),
                    "panel {} uses {name}, not exported",
                    panel["title"]
                );
            }
        }
    }
}
