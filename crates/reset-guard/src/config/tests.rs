use super::*;

const DIGEST: &str = "2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae";

fn config(yaml: &str) -> Result<GuardSettings, ConfigError> {
    GuardConfig::from_yaml(yaml)?.validate()
}

#[test]
fn defaults_fill_everything_but_clients() {
    let settings = config(&format!("clients: [{{ id: ios, token_sha256: {DIGEST} }}]")).unwrap();
    assert_eq!(settings.path(), DEFAULT_PATH);
    assert_eq!(settings.other_routes(), OtherRoutes::Reject);
    assert!(settings.uniform());
    assert_eq!(settings.min_latency, Duration::ZERO);
    assert_eq!(settings.clients.len(), 1);
}

#[test]
fn unknown_keys_are_named_with_their_line() {
    let yaml = format!(
        "clients:\n  - id: ios\n    token_sha256: {DIGEST}\nresponses:\n  unifrom: false\n"
    );
    let error = GuardConfig::from_yaml(&yaml).unwrap_err();
    assert_eq!(error.path, "responses.unifrom");
    assert_eq!(error.line, Some(5));
    assert!(error.message.contains("unknown field `unifrom`"), "{error}");
}

#[test]
fn bad_values_are_named_with_their_line() {
    let error =
        GuardConfig::from_yaml("clients:\n  - id: ios\n    token_sha256: abc\n").unwrap_err();
    assert_eq!(error.path, "clients[0].token_sha256");
    assert_eq!(error.line, Some(3));
    assert!(error.message.contains("64 hex digits"), "{error}");

    let error = GuardConfig::from_yaml("responses:\n  min_latency: 5 s\n").unwrap_err();
    assert_eq!(error.path, "responses.min_latency");
    assert_eq!(error.line, Some(2));

    let error =
        GuardConfig::from_yaml("client_ip:\n  trusted_proxies: [10.0.0.0/33]\n").unwrap_err();
    assert_eq!(error.path, "client_ip.trusted_proxies[0]");
}

#[test]
fn validation_names_the_key() {
    assert_eq!(config("{}").unwrap_err().path, "clients");
    let twice = format!(
        "clients:\n  - {{ id: a, token_sha256: {DIGEST} }}\n  - {{ id: a, token_sha256: {} }}\n",
        "0".repeat(64)
    );
    let error = config(&twice).unwrap_err();
    assert_eq!(error.path, "clients[1].id");
    let same_token = format!(
        "clients:\n  - {{ id: a, token_sha256: {DIGEST} }}\n  - {{ id: b, token_sha256: {DIGEST} }}\n"
    );
    assert_eq!(
        config(&same_token).unwrap_err().path,
        "clients[1].token_sha256"
    );
    let error = config(&format!(
        "path: reset\nclients: [{{ id: a, token_sha256: {DIGEST} }}]"
    ))
    .unwrap_err();
    assert_eq!(error.path, "path");
}

#[test]
fn trusted_proxies_accept_hosts_and_blocks() {
    let settings = config(&format!(
        "clients: [{{ id: a, token_sha256: {DIGEST} }}]\nclient_ip: {{ trusted_proxies: [10.0.0.0/8, '::1', 192.168.0.0/16] }}"
    ))
    .unwrap();
    let nets: Vec<String> = settings
        .trusted_proxies()
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128", "192.168.0.0/16"]);
}

#[test]
fn a_block_with_host_bits_is_refused_with_both_readings() {
    let error =
        GuardConfig::from_yaml("client_ip:\n  trusted_proxies: [10.0.0.1/8]\n").unwrap_err();
    assert_eq!(error.path, "client_ip.trusted_proxies[0]");
    assert_eq!(error.line, Some(2));
    assert!(error.message.contains("10.0.0.0/8"), "{error}");
    assert!(
        error.message.contains("10.0.0.1 for the one host"),
        "{error}"
    );
}

/// Peers are compared in IPv4 form, so a block written IPv4-mapped is read as IPv4 (it
/// would never match otherwise).
#[test]
fn an_ipv4_mapped_block_is_read_as_the_ipv4_block() {
    let cidr = |text: &str| text.parse::<crate::Cidr>().map(|c| c.0.to_string());
    assert_eq!(cidr("::ffff:127.0.0.1/128").unwrap(), "127.0.0.1/32");
    assert_eq!(cidr("::ffff:10.0.0.0/104").unwrap(), "10.0.0.0/8");
    assert_eq!(cidr("::ffff:192.0.2.7").unwrap(), "192.0.2.7/32");
    assert_eq!(cidr("2001:db8::/32").unwrap(), "2001:db8::/32");
    // A refusal is an error type of its own, saying what to write.
    let refused: Box<dyn std::error::Error> = Box::new(cidr("10.0.0.1/8").unwrap_err());
    assert!(
        refused.to_string().contains("write 10.0.0.0/8"),
        "{refused}"
    );
    // And it matches an IPv4 peer.
    let trusted = [cidr("::ffff:127.0.0.1/128").unwrap().parse().unwrap()];
    let mut headers = http::HeaderMap::new();
    headers.insert("x-forwarded-for", "203.0.113.9".parse().unwrap());
    let client = crate::ClientIp::resolve("127.0.0.1".parse().unwrap(), &headers, &trusted);
    assert_eq!(
        client.ip(),
        "203.0.113.9".parse::<std::net::IpAddr>().unwrap()
    );
}

#[test]
fn documented_placeholder_tokens_are_refused() {
    let placeholder = TokenDigest::of(b"change-me").to_hex();
    let error = config(&format!(
        "clients:\n  - {{ id: ok, token_sha256: {DIGEST} }}\n  - {{ id: app, token_sha256: {placeholder} }}\n"
    ))
    .unwrap_err();
    assert_eq!(error.path, "clients[1].token_sha256");
    assert!(error.message.contains("hash-token"), "{error}");
}

#[test]
fn the_digest_of_the_empty_token_is_refused() {
    // A bare `Authorization: ApiKey` or an empty QB-Token would match it.
    let empty = TokenDigest::of(b"").to_hex();
    let error = config(&format!(
        "clients:\n  - {{ id: app, token_sha256: {empty} }}\n"
    ))
    .unwrap_err();
    assert_eq!(error.path, "clients[0].token_sha256");
    assert!(error.message.contains("empty token"), "{error}");
}

#[test]
fn a_tab_in_the_indentation_is_called_a_tab() {
    let error = GuardConfig::from_yaml("responses:\n\tuniform: false\n").unwrap_err();
    assert!(error.message.contains("tab"), "{error}");
    assert_eq!(error.line, Some(2));
}

#[test]
fn a_path_is_spelled_as_sent_and_padding_is_bounded() {
    let client = format!("clients: [{{ id: ios, token_sha256: {DIGEST} }}]\n");
    for path in ["/réinit", "'/a b'", "/a%2", "/a%zz"] {
        let error = config(&format!("{client}path: {path}\n")).unwrap_err();
        assert_eq!(error.path, "path", "{path}: {error}");
    }
    for path in ["/v1/users/password/reset.json", "/r%C3%A9init"] {
        config(&format!("{client}path: {path}\n")).unwrap();
    }
    let error = config(&format!("{client}responses: {{ min_latency: 11s }}\n")).unwrap_err();
    assert_eq!(error.path, "responses.min_latency");
    config(&format!("{client}responses: {{ min_latency: 10s }}\n")).unwrap();
    // The builder goes through the same check.
    let built = GuardConfig::new()
        .client("ios", crate::TokenDigest::of(b"a token"))
        .min_latency(Duration::MAX)
        .validate()
        .unwrap_err();
    assert_eq!(built.path, "responses.min_latency");
}

#[test]
fn rate_limit_fields_on_successes_cannot_give_away_a_silenced_per_email_denial() {
    let client = format!("clients: [{{ id: ios, token_sha256: {DIGEST} }}]\n");
    let with = |limits: &str, uniform: bool| {
        config(&format!(
            "{client}limits: {{ response_headers: true, {limits} }}\nresponses: {{ uniform: {uniform} }}\n"
        ))
    };
    let error = with("per_email: [{ requests: 3, per: 1h }]", true).unwrap_err();
    assert_eq!(error.path, "limits.response_headers");
    assert!(error.message.contains("uniform"), "{error}");
    // Nothing to give away: no per-email denial, or none silenced.
    with("per_email: []", true).unwrap();
    with("per_email: [{ requests: 3, per: 1h, shadow: true }]", true).unwrap();
    with("per_email: [{ requests: 3, per: 1h }]", false).unwrap();
}

#[test]
fn a_quota_written_twice_in_one_group_is_refused() {
    // `3/1h` and `3/60m` are one quota: charged twice, and counted under one name.
    let yaml = format!(
        "clients: [{{ id: ios, token_sha256: {DIGEST} }}]\nlimits:\n  global:\n    - {{ requests: 3, per: 1h }}\n    - {{ requests: 10, per: 1d }}\n    - {{ requests: 3, per: 60m }}\n"
    );
    let error = config(&yaml).unwrap_err().located(&yaml);
    assert_eq!(error.path, "limits.global[2]");
    assert_eq!(error.line, Some(6));
    assert!(
        error.message.contains("same quota as limits.global[0]"),
        "{error}"
    );
    // A shadow copy beside it is another quota (what promoting it would do).
    let shadow = yaml.replace("per: 60m }", "per: 60m, shadow: true }");
    config(&shadow).unwrap();
    // As is one that differs in its burst alone.
    let burst = yaml.replace("per: 60m }", "per: 60m, burst: 5 }");
    config(&burst).unwrap();
}

#[test]
fn windows_beyond_a_hundred_years_are_refused() {
    // Kept in nanoseconds of a clock that may count from 1970 (a replayed log's), a state
    // beyond that overflowed and admitted everything.
    for (quota, why) in [
        ("{ requests: 1, per: 200000d }", "per is too long"),
        ("{ requests: 1, per: 36501d }", "per is too long"),
        (
            "{ requests: 10, per: 3650d, burst: 1000 }",
            "burst × per / requests is too long",
        ),
    ] {
        let yaml = format!(
            "clients: [{{ id: ios, token_sha256: {DIGEST} }}]\nlimits:\n  per_ip: [{quota}]\n"
        );
        let error = config(&yaml).unwrap_err();
        assert_eq!(error.path, "limits.per_ip[0]", "{quota}");
        assert!(error.message.contains(why), "{quota}: {error}");
    }
    let yaml = format!(
        "clients: [{{ id: ios, token_sha256: {DIGEST} }}]\nlimits:\n  per_ip: [{{ requests: 1, per: 36500d }}]\n"
    );
    config(&yaml).unwrap();
}
