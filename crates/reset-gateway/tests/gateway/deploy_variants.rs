//! The deployment variants (Sentinel, a TCP balancer) agree with the binary and with each
//! other: the gateways point at what the variant deploys.

use reset_gateway::GatewayConfig;

use crate::deploy::{assert_only_the_placeholder_client_is_refused, one, read, str_at};

#[test]
fn the_compose_sentinel_variant_points_the_gateways_at_its_sentinels() {
    let compose = one("deploy/compose.sentinel.yaml");
    let services = compose["services"].as_mapping().unwrap();
    let gateway = &compose["services"]["gateway"];
    let mount = gateway["volumes"][0].as_str().unwrap();
    let (file, target) = mount.split_once(':').unwrap();
    assert_eq!(target, "/etc/reset-gateway/gateway.yaml:ro");
    let config = GatewayConfig::from_yaml(&read(&format!("deploy/{file}"))).unwrap();
    assert_only_the_placeholder_client_is_refused(&config);
    let redis = &config.store.redis;
    let nodes = redis.nodes.clone().unwrap_or_default();
    let sentinel_text = read("deploy/compose.sentinel.yaml");
    // Every node is a sentinel service of this file, on the port it listens on.
    assert!(
        nodes.len() >= 3,
        "a majority survives one sentinel going away"
    );
    for node in &nodes {
        let uri: http::Uri = node.parse().unwrap();
        let host = uri.host().unwrap();
        assert!(services.contains_key(host), "{node}: no service {host}");
        assert_eq!(uri.port_u16(), Some(26379));
        assert!(compose["services"][host].get("entrypoint").is_some());
    }
    // The sentinels monitor the master service under the name the gateways ask for, with a
    // quorum the sentinels can reach.
    let master = redis.sentinel_master.as_deref().unwrap();
    let monitor = sentinel_text
        .lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix(&format!("sentinel monitor {master} "))
        })
        .expect("a sentinel monitor line for the gateways' master name");
    let [host, port, quorum] = monitor.split(' ').collect::<Vec<_>>()[..] else {
        panic!("{monitor}");
    };
    assert!(services.contains_key(host), "{host}");
    assert_eq!(port, "6379");
    assert!(quorum.parse::<usize>().unwrap() <= nodes.len());
    let replica = compose["services"]["redis-replica"]["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect::<Vec<_>>()
        .join(" ");
    assert!(
        replica.contains(&format!("--replicaof {host} 6379")),
        "{replica}"
    );
    let secrets = compose["secrets"].as_mapping().unwrap();
    for file in [
        config.upstream.api_key_file.clone().unwrap(),
        config.store.key_secret_file.clone().unwrap(),
    ] {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(secrets.contains_key(name), "compose has no secret {name}");
    }
}

#[test]
fn the_tcp_balancer_variants_send_proxy_protocol_and_the_gateways_require_it() {
    // Compose: HAProxy in TCP mode sends v2 headers to every replica's public port.
    let compose = one("deploy/compose.tcp-lb.yaml");
    let gateway = &compose["services"]["gateway"];
    let (file, target) = gateway["volumes"][0]
        .as_str()
        .unwrap()
        .split_once(':')
        .unwrap();
    assert_eq!(target, "/etc/reset-gateway/gateway.yaml:ro");
    let config = GatewayConfig::from_yaml(&read(&format!("deploy/{file}"))).unwrap();
    assert_only_the_placeholder_client_is_refused(&config);
    let proxy = config.server.proxy_protocol.as_ref().unwrap();
    assert!(proxy.required && !proxy.trusted.is_empty());
    let listen = config.server.listen.port();
    let haproxy = read("deploy/compose/haproxy.cfg");
    let server = haproxy
        .lines()
        .find(|l| l.trim_start().starts_with("server-template"))
        .unwrap();
    assert!(server.contains(&format!(" gateway:{listen} ")), "{server}");
    assert!(server.contains(" send-proxy-v2"), "{server}");
    assert!(haproxy.contains("mode tcp"));
    let lb = &compose["services"]["lb"];
    assert!(lb["volumes"][0]
        .as_str()
        .unwrap()
        .starts_with("./compose/haproxy.cfg:"));
    assert_eq!(lb["ports"][0], format!("8080:{listen}").as_str());

    // Kubernetes: the base, a public Service through an NLB with PROXY protocol v2, and
    // the configuration requiring it.
    let kustomization = one("deploy/kubernetes-nlb/kustomization.yaml");
    let resources: Vec<&str> = kustomization["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap())
        .collect();
    assert_eq!(resources, ["../kubernetes", "service.yaml"]);
    let configmap = one("deploy/kubernetes-nlb/configmap.yaml");
    let base = one("deploy/kubernetes/configmap.yaml");
    assert_eq!(configmap["metadata"]["name"], base["metadata"]["name"]);
    let config = GatewayConfig::from_yaml(str_at(&configmap, &["data", "gateway.yaml"])).unwrap();
    assert_only_the_placeholder_client_is_refused(&config);
    let proxy = config.server.proxy_protocol.as_ref().unwrap();
    assert!(proxy.required && !proxy.trusted.is_empty());
    let service = one("deploy/kubernetes-nlb/service.yaml");
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(
        str_at(
            &service,
            &[
                "metadata",
                "annotations",
                "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol"
            ]
        ),
        "*"
    );
    let deployment = one("deploy/kubernetes/deployment.yaml");
    assert_eq!(
        &service["spec"]["selector"],
        &deployment["spec"]["template"]["metadata"]["labels"]
    );
    // Only the public port: the admin listener never reads a header.
    let ports = service["spec"]["ports"].as_sequence().unwrap();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0]["targetPort"], "http");
    // And the in-cluster Service loses it: a caller there sends no PROXY header, and the
    // gateway would close every connection it made.
    let patches: Vec<&str> = kustomization["patches"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|p| p["path"].as_str().unwrap())
        .collect();
    assert!(patches.contains(&"cluster-service.yaml"), "{patches:?}");
    let patch = one("deploy/kubernetes-nlb/cluster-service.yaml");
    let base_service = one("deploy/kubernetes/service.yaml");
    assert_eq!(patch["metadata"]["name"], base_service["metadata"]["name"]);
    let public_port = base_service["spec"]["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|p| p["targetPort"] == "http")
        .unwrap()["port"]
        .clone();
    assert_eq!(patch["spec"]["ports"][0]["port"], public_port);
    assert_eq!(patch["spec"]["ports"][0]["$patch"], "delete");
}
