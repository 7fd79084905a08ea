//! The deployment files agree with the binary: ports, probe paths, config keys, metric names.

use std::collections::BTreeSet;
use std::path::PathBuf;

use reset_gateway::GatewayConfig;
use yaml_serde::Value;

use crate::common::*;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

pub(crate) fn read(path: &str) -> String {
    std::fs::read_to_string(repo(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Every document of a YAML file.
fn documents(path: &str) -> Vec<Value> {
    let text = read(path);
    yaml_serde::Deserializer::from_str(&text)
        .map(|doc| Value::deserialize(doc).unwrap_or_else(|e| panic!("{path}: {e}")))
        .collect()
}

use serde::Deserialize;

pub(crate) fn one(path: &str) -> Value {
    let mut docs = documents(path);
    assert_eq!(docs.len(), 1, "{path}");
    docs.remove(0)
}

pub(crate) fn str_at<'a>(value: &'a Value, path: &[&str]) -> &'a str {
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
    assert_only_the_placeholder_client_is_refused(&config);
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
    // New connections keep coming while endpoints are withdrawn: SIGTERM waits for that.
    let wait = container["lifecycle"]["preStop"]["sleep"]["seconds"]
        .as_u64()
        .expect("a preStop wait before SIGTERM");
    assert!(wait >= 5);
    assert!(grace > wait + config.server.shutdown_grace.0.as_secs());

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
    assert_only_the_placeholder_client_is_refused(&config);
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
        // The file the operator writes stays out of commits and of image build contexts.
        let host_file = str_at(&secrets[name], &["file"]).trim_start_matches("./");
        let in_repo = format!("deploy/{host_file}");
        for ignore in [".gitignore", ".dockerignore"] {
            assert!(
                read(ignore).lines().any(|l| l == in_repo),
                "{ignore} does not list {in_repo}"
            );
        }
    }
    // The client's request id reaches the gateway through nginx.
    let nginx = read("deploy/compose/nginx.conf");
    assert!(nginx.contains("default $http_x_request_id;"), "{nginx}");
    let lb_waits_for = &compose["services"]["lb"]["depends_on"]["gateway"]["condition"];
    assert_eq!(
        lb_waits_for, "service_healthy",
        "the image has a health check"
    );

    // The image: the baked configuration serves the ports the image exposes, beyond
    // loopback, and its health check is the binary's own (distroless has no shell).
    let dockerfile = read("deploy/Dockerfile");
    let baked = GatewayConfig::from_yaml(&read("deploy/image.yaml")).unwrap();
    assert!(dockerfile.contains("COPY deploy/image.yaml /etc/reset-gateway/gateway.yaml"));
    assert_only_the_placeholder_client_is_refused(&baked);
    let expose = format!(
        "EXPOSE {} {}",
        baked.server.listen.port(),
        baked.admin.listen.port()
    );
    assert!(
        dockerfile.contains(&expose),
        "the Dockerfile should say {expose}"
    );
    assert!(baked.server.listen.ip().is_unspecified());
    assert!(
        baked.admin.listen.ip().is_unspecified(),
        "an exposed admin port must be served beyond loopback"
    );
    assert!(dockerfile.contains(r#"CMD ["/usr/local/bin/reset-gateway", "health"]"#));
    assert!(
        dockerfile.contains("nonroot"),
        "the image runs as a non-root user"
    );
    // The production stage carries no test double: built without default features, and
    // qb-mock is copied only into the demo stage.
    assert!(dockerfile.contains("-p reset-gateway --no-default-features"));
    let production = dockerfile
        .split("AS production")
        .nth(1)
        .unwrap()
        .split("AS demo")
        .next()
        .unwrap();
    assert!(
        !production
            .lines()
            .any(|l| l.starts_with("COPY") && l.contains("qb-mock")),
        "{production}"
    );
    assert!(dockerfile.trim_end().ends_with("FROM production"));
    let ignored = read(".dockerignore");
    assert!(
        ignored.lines().any(|l| l == "target"),
        "target/ stays out of the build context"
    );
}

#[test]
fn the_compose_demo_runs_with_nothing_to_prepare() {
    let compose = one("deploy/compose.demo.yaml");
    let gateway = &compose["services"]["gateway"];
    assert_eq!(gateway["build"]["target"], "demo");
    assert_eq!(compose["services"]["qb-mock"]["build"]["target"], "demo");
    assert!(compose.get("secrets").is_none(), "no files to create first");
    let mount = gateway["volumes"][0].as_str().unwrap();
    let (file, target) = mount.split_once(':').unwrap();
    assert_eq!(target, "/etc/reset-gateway/gateway.yaml:ro");
    assert_eq!(
        str_at(gateway, &["environment", "RESET_GATEWAY_CONFIG"]),
        "/etc/reset-gateway/gateway.yaml"
    );
    let yaml = read(&format!("deploy/{file}"));
    let config = GatewayConfig::from_yaml(&yaml).unwrap();
    // Valid as the gateway will see it, with the environment compose gives it.
    let key = str_at(gateway, &["environment", "QB_API_KEY"]);
    let secret = str_at(gateway, &["environment", "RESET_GATEWAY_KEY_SECRET"]);
    assert_eq!(
        config.store.key_secret_env.as_deref(),
        Some("RESET_GATEWAY_KEY_SECRET")
    );
    assert!(secret.len() >= 16);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_reset-gateway"))
        .args(["check-config", "--config"])
        .arg(repo(&format!("deploy/{file}")))
        .env_clear()
        .env("QB_API_KEY", key)
        .env("RESET_GATEWAY_KEY_SECRET", secret)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The gateway talks to qb-mock with the key qb-mock expects, and the token in the
    // file's comment is the one configured.
    assert_eq!(config.upstream.url, "http://qb-mock:3000");
    let mock = &compose["services"]["qb-mock"];
    assert_eq!(str_at(mock, &["environment", "QB_API_KEY"]), key);
    assert!(mock["entrypoint"][2].as_str().unwrap().ends_with(":3000"));
    let demo_digest = reset_guard::TokenDigest::of(b"demo-client-token");
    assert_eq!(config.guard.clients[0].token_sha256, demo_digest);
    assert!(read("deploy/compose.demo.yaml").contains("QB-Token: demo-client-token"));
    // qb-mock runs from the gateway's image, whose HEALTHCHECK asks a gateway's admin
    // port: it would be reported unhealthy for ever.
    assert_eq!(mock["healthcheck"]["disable"], true);
}

/// SHA-256("change-me"): the placeholder client the shipped files carry.
const PLACEHOLDER_DIGEST: &str = "e2186dbdb1bb4193608605e84f33208765b5693b55edd4f730a719a100eeea6f";

/// A shipped file's guard is refused for its placeholder client, and for nothing else.
pub(crate) fn assert_only_the_placeholder_client_is_refused(config: &GatewayConfig) {
    let error = config.guard.validate().unwrap_err();
    assert_eq!(error.path, "clients[0].token_sha256", "{error}");
    let mut real = config.clone();
    for client in &mut real.guard.clients {
        assert_eq!(client.token_sha256.to_hex(), PLACEHOLDER_DIGEST);
        client.token_sha256 = reset_guard::TokenDigest::of(IOS_TOKEN.as_bytes());
    }
    real.guard.validate().unwrap();
}

/// Every resource the kustomization lists, as `kubectl apply -k` would send them.
fn rendered_manifests() -> Vec<Value> {
    let kustomization = one("deploy/kubernetes/kustomization.yaml");
    kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .flat_map(|r| documents(&format!("deploy/kubernetes/{}", r.as_str().unwrap())))
        .collect()
}

#[test]
fn every_secret_volume_is_readable_by_its_container_user() {
    let mut checked = 0;
    for manifest in rendered_manifests() {
        let pod = &manifest["spec"]["template"]["spec"];
        let Some(volumes) = pod["volumes"].as_sequence() else {
            continue;
        };
        for volume in volumes.iter().filter(|v| v.get("secret").is_some()) {
            let name = volume["name"].as_str().unwrap();
            // Kubernetes writes secret files owned by root, group fsGroup when set.
            // Kubernetes reads YAML 1.1, where a leading 0 means octal (0440).
            let mode = match &volume["secret"]["defaultMode"] {
                Value::Null => 0o644,
                Value::String(text) if text.starts_with('0') => {
                    u64::from_str_radix(text, 8).unwrap()
                }
                value => value.as_u64().expect("a file mode"),
            };
            let fs_group = pod["securityContext"]["fsGroup"].as_u64();
            for container in pod["containers"].as_sequence().unwrap() {
                let mounts = container["volumeMounts"].as_sequence().unwrap();
                if !mounts.iter().any(|m| m["name"] == name) {
                    continue;
                }
                let user = container["securityContext"]["runAsUser"]
                    .as_u64()
                    .or(pod["securityContext"]["runAsUser"].as_u64())
                    .expect("a fixed user");
                let readable =
                    user == 0 || mode & 0o004 != 0 || (fs_group.is_some() && mode & 0o040 != 0);
                assert!(
                    readable,
                    "{}: volume {name} (mode {mode:o}) cannot be read by uid {user}",
                    manifest["metadata"]["name"].as_str().unwrap()
                );
                assert_eq!(mode & 0o007, 0, "{name}: secrets are not world-readable");
                checked += 1;
            }
        }
    }
    assert!(checked >= 1);
}

/// What one connection holding a request head near `server.max_header_bytes` (16 KiB) costs
/// the gateway in resident memory: 4,000 such connections took 143.5 MB over an idle
/// gateway's 19 MB (release build, two workers).
const BYTES_PER_FULL_CONNECTION: u64 = 36_000;

#[test]
fn the_kubernetes_pods_resources_bound_the_gateway() {
    for path in [
        "deploy/kubernetes/configmap.yaml",
        "deploy/kubernetes-nlb/configmap.yaml",
    ] {
        let configmap = one(path);
        let config = GatewayConfig::from_yaml(str_at(&configmap, &["data", "gateway.yaml"]))
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        // No CPU limit: the default (one worker per core) would count the node's cores.
        assert_ne!(config.server.workers, 0, "{path}: workers follow the node");
        let deployment = one("deploy/kubernetes/deployment.yaml");
        let limit = str_at(
            &deployment["spec"]["template"]["spec"]["containers"][0],
            &["resources", "limits", "memory"],
        );
        let limit: u64 = limit.strip_suffix("Mi").unwrap().parse::<u64>().unwrap() << 20;
        let connections = config.server.max_connections as u64 * BYTES_PER_FULL_CONNECTION;
        assert!(
            connections < limit * 3 / 4,
            "{path}: {} connections need {connections} bytes of a {limit}-byte limit",
            config.server.max_connections
        );
    }
}

#[test]
fn the_gateway_image_is_named_where_the_readme_says() {
    let deployment = one("deploy/kubernetes/deployment.yaml");
    let image = str_at(
        &deployment["spec"]["template"]["spec"]["containers"][0],
        &["image"],
    );
    let kustomization = one("deploy/kubernetes/kustomization.yaml");
    let named = kustomization["images"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|i| i["name"] == image)
        .unwrap_or_else(|| panic!("{image} is not in the kustomization's images"));
    // A placeholder that cannot be pulled by mistake, which the README says to replace.
    assert!(str_at(named, &["newName"]).starts_with("registry.invalid/"));
    assert!(read("README.md").contains("registry.invalid"));
}

#[test]
fn only_the_gateway_may_reach_its_redis() {
    let manifests = rendered_manifests();
    let policy = manifests
        .iter()
        .find(|m| m["kind"] == "NetworkPolicy")
        .expect("a NetworkPolicy in the kustomization");
    let redis = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "redis")
        .unwrap();
    let gateway = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "reset-gateway")
        .unwrap();
    let pod_labels = |d: &Value| d["spec"]["template"]["metadata"]["labels"].clone();
    assert_eq!(
        policy["spec"]["podSelector"]["matchLabels"],
        pod_labels(redis)
    );
    let from = &policy["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"];
    assert_eq!(*from, pod_labels(gateway));
    let redis_port = redis["spec"]["template"]["spec"]["containers"][0]["ports"][0]
        ["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(
        policy["spec"]["ingress"][0]["ports"][0]["port"].as_u64(),
        Some(redis_port)
    );
}

/// A Redis server's arguments: `maxmemory-policy` is `noeviction`. Every key the gateway
/// writes has a TTL, so a `volatile-*` policy (or an `allkeys-*` one) may evict a key that
/// still counts, and that address's quota starts afresh without a word.
fn assert_never_evicts(what: &str, args: &[&str]) {
    let policy = args
        .windows(2)
        .find(|pair| pair[0] == "--maxmemory-policy")
        .map(|pair| pair[1]);
    assert_eq!(policy, Some("noeviction"), "{what}: {args:?}");
}

fn strings(value: &Value) -> Vec<&str> {
    value
        .as_sequence()
        .map(|items| items.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

#[test]
fn every_shipped_redis_keeps_keys_that_still_count() {
    let mut checked = 0;
    for file in [
        "deploy/compose.yaml",
        "deploy/compose.demo.yaml",
        "deploy/compose.tcp-lb.yaml",
        "deploy/compose.sentinel.yaml",
    ] {
        let compose = one(file);
        for (name, service) in compose["services"].as_mapping().unwrap() {
            let command = strings(&service["command"]);
            // Data nodes; a sentinel (started from a script of its own) holds no keys.
            if command.first() == Some(&"redis-server") {
                assert_never_evicts(&format!("{file}: {}", name.as_str().unwrap()), &command);
                checked += 1;
            }
        }
    }
    let manifests = rendered_manifests();
    let redis = manifests
        .iter()
        .find(|m| m["kind"] == "Deployment" && m["metadata"]["name"] == "redis")
        .unwrap();
    let container = &redis["spec"]["template"]["spec"]["containers"][0];
    assert_never_evicts("deploy/kubernetes/redis.yaml", &strings(&container["args"]));
    // compose.yaml, the demo, the TCP balancer's, and the Sentinel variant's master and replica.
    assert_eq!(checked, 5);
}

#[test]
fn the_redis_the_configmap_names_is_deployed() {
    let manifests = rendered_manifests();
    let configmap = manifests.iter().find(|m| m["kind"] == "ConfigMap").unwrap();
    let config = GatewayConfig::from_yaml(str_at(configmap, &["data", "gateway.yaml"])).unwrap();
    let url: http::Uri = config
        .store
        .redis
        .url
        .as_deref()
        .expect("the ConfigMap names a Redis URL")
        .parse()
        .unwrap();
    let service = manifests
        .iter()
        .find(|m| m["kind"] == "Service" && m["metadata"]["name"] == url.host().unwrap())
        .expect("a Service named as the Redis URL's host");
    let port = service["spec"]["ports"][0]["port"].as_u64().unwrap();
    assert_eq!(Some(port as u16), url.port_u16());
    let selector = &service["spec"]["selector"];
    assert!(manifests
        .iter()
        .any(|m| m["kind"] == "Deployment"
            && &m["spec"]["template"]["metadata"]["labels"] == selector));
}

#[test]
fn the_production_build_has_no_test_double() {
    let out = std::process::Command::new(env!("CARGO"))
        .args([
            "tree",
            "--locked",
            "-p",
            "reset-gateway",
            "--no-default-features",
            "-e",
            "normal",
            "--prefix",
            "none",
        ])
        .current_dir(repo(""))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.starts_with("reset-gateway "), "{tree}");
    assert!(!tree.lines().any(|l| l.starts_with("qb-mock ")), "{tree}");
}

/// The alert rules load, and fire on what their tests say (a replica down under either kind
/// of scrape job, nothing scraped at all, a store down), with Prometheus's own `promtool`.
#[test]
fn the_alert_rules_fire_as_their_tests_say() {
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "rules_test.yaml"],
    ] {
        let out = std::process::Command::new("promtool")
            .args(args)
            .current_dir(repo("deploy/alerts"))
            .output()
            .expect("promtool (scripts/test installs it)");
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
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
    // One quota, so the per-quota families have a series.
    let gw = Gateway::start(
        "  limits: { per_ip: [], per_client: [], per_email: [{ requests: 3, per: 1h }], global: [] }\n",
    )
    .await;
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
    for required in [
        "upstream",
        "rate_limited",
        "store_errors",
        "config_last_reload_successful",
        "limit=\"global\"",
    ] {
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
