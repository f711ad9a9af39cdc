//! Configuration: the source documents' YAML loads unchanged; every bad input gets one clear
//! error naming file, line, document and field.

use std::path::{Path, PathBuf};

use edgebridge::config::{self, Auth, Direction, LoadOptions, Protocol, Transport};
use edgebridge::model::QoS;
use edgebridge_tests::{fixture, write_file};

/// Secret and ConfigMap folders named by the source documents.
fn k8s_dirs(root: &Path) -> LoadOptions {
    let secrets = root.join("secrets");
    let configmaps = root.join("configmaps");
    let d = secrets.join("bridge-client-cert");
    std::fs::create_dir_all(&d).unwrap();
    // Real PEM: `check` looks into certificate and key files.
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["bridge".to_string()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    std::fs::write(d.join("client_cert.pem"), cert.pem()).unwrap();
    std::fs::write(d.join("client_key.pem"), key.serialize_pem()).unwrap();
    for cm in ["aio-ca-trust-bundle-test-only", "test-ca-configmap"] {
        let d = configmaps.join(cm);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ca.crt"), "x").unwrap();
    }
    LoadOptions {
        secrets_dir: secrets,
        configmaps_dir: configmaps,
    }
}

fn load(paths: &[PathBuf], opts: &LoadOptions) -> config::Config {
    match config::load(paths, opts) {
        Ok(c) => c,
        Err(report) => panic!("expected a valid configuration:\n{report}"),
    }
}

#[test]
fn the_newest_how_to_example_loads_as_written() {
    let dir = tempfile::tempdir().unwrap();
    let opts = k8s_dirs(dir.path());
    let cfg = load(&[fixture("seeds/001-connector-and-topic-map.yaml")], &opts);
    let c = &cfg.connectors[0];
    assert_eq!(c.name, "my-mqtt-bridge");
    assert_eq!(c.protocol, Protocol::V5);
    assert_eq!(c.client_id_prefix, "factory-gateway-");
    assert_eq!(
        c.remote.auth,
        Auth::ManagedIdentity {
            audience: "https://eventgrid.azure.net".into()
        }
    );
    assert_eq!(c.remote.endpoint.port, 8883);
    assert!(c.remote.tls.as_ref().unwrap().trusted_ca_dir.is_none());
    assert_eq!(
        c.local.tls.as_ref().unwrap().trusted_ca_dir,
        Some(opts.configmaps_dir.join("aio-ca-trust-bundle-test-only"))
    );
    assert!(matches!(c.local.auth, Auth::Kubernetes { .. }));
    assert_eq!(c.routes.len(), 2);
    let first = &c.routes[0];
    assert_eq!(first.direction, Direction::RemoteToLocal);
    assert_eq!(first.qos, QoS::AtMostOnce);
    assert_eq!(first.target.as_deref(), Some("local-topic"));
    let shared = first.shared.as_ref().unwrap();
    assert_eq!((shared.clients, shared.group.as_str()), (3, "group1"));
    assert_eq!(c.routes[1].qos, QoS::AtLeastOnce);
}

#[test]
fn the_earlier_draft_loads_with_its_apiversion_and_default_local_broker() {
    let dir = tempfile::tempdir().unwrap();
    let opts = k8s_dirs(dir.path());
    let cfg = load(&[fixture("seeds/000-connector-and-topic-map.yaml")], &opts);
    let c = &cfg.connectors[0];
    assert_eq!(c.namespace.as_deref(), Some("<SAME NAMESPACE AS BROKER>"));
    assert_eq!(c.log_level, config::LogLevel::Debug);
    // The commented-out localBrokerConnection means the documented default.
    assert_eq!(c.local.endpoint.to_string(), "aio-mq-dmqtt-frontend:1883");
    assert!(c.local.tls.is_none());
    assert!(
        matches!(c.local.auth, Auth::Kubernetes { ref token_path } if token_path.ends_with("localbroker/sat-token"))
    );
    assert_eq!(c.routes.len(), 2);
}

#[test]
fn the_x509_connector_of_the_draft_loads() {
    let dir = tempfile::tempdir().unwrap();
    let opts = k8s_dirs(dir.path());
    let cfg = load(&[fixture("seeds/000-x509-connector.yaml")], &opts);
    let c = &cfg.connectors[0];
    assert!(
        matches!(&c.remote.auth, Auth::X509 { cert, .. } if cert.ends_with("bridge-client-cert/client_cert.pem"))
    );
    assert!(c.routes.is_empty());
}

#[test]
fn the_event_grid_tutorial_loads_with_az_edge_apiversion_and_clientk8ssecret() {
    let dir = tempfile::tempdir().unwrap();
    let opts = k8s_dirs(dir.path());
    let cfg = load(&[fixture("seeds/003-event-grid-tutorial.yaml")], &opts);
    let c = &cfg.connectors[0];
    assert_eq!(c.bridge_instances, 3);
    assert_eq!(c.client_id_prefix, "e4k");
    assert!(matches!(c.remote.auth, Auth::X509 { .. }));
    let names: Vec<&str> = c.routes.iter().map(|r| r.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "command-from-cloud",
            "publish-telemetry-same-topic",
            "prioritize-alerts"
        ]
    );
    assert_eq!(c.routes[2].shared.as_ref().unwrap().clients, 2);
}

#[test]
fn every_snippet_of_the_how_tos_loads() {
    let dir = tempfile::tempdir().unwrap();
    let opts = k8s_dirs(dir.path());
    let cfg = load(&[fixture("seeds/snippets.yaml")], &opts);
    assert!(cfg.connectors.len() >= 8);
    let total_routes: usize = cfg.connectors.iter().map(|c| c.routes.len()).sum();
    assert_eq!(total_routes, 8);
}

#[test]
fn a_folder_of_files_loads_together_and_the_quickstart_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    write_file(
        dir.path(),
        "a-connector.yaml",
        "apiVersion: az-edge.com/v1alpha4\nkind: MqttBridgeConnector\nmetadata: {name: c}\nspec:\n  protocol: v3\n  remoteBrokerConnection: {endpoint: \"h:1\", tls: {tlsEnabled: false}, protocol: webSocket}\n  localBrokerConnection: {endpoint: \"l:1883\", authentication: {usernamePassword: {secretName: up}}}\n",
    );
    write_file(
        dir.path(),
        "b-map.yml",
        "apiVersion: az-edge.com/v1alpha4\nkind: MqttBridgeTopicMap\nmetadata: {name: m}\nspec:\n  mqttBridgeConnectorRef: c\n  routes: [{direction: local-to-remote, name: r, source: \"a/#\"}]\n",
    );
    write_file(dir.path(), "ignored.txt", "not yaml: [");
    let secrets = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(secrets.path().join("up")).unwrap();
    write_file(&secrets.path().join("up"), "username", "edge\n");
    let opts = LoadOptions {
        secrets_dir: secrets.path().to_path_buf(),
        configmaps_dir: secrets.path().to_path_buf(),
    };
    let cfg = load(&[dir.path().to_path_buf()], &opts);
    assert!(matches!(
        cfg.connectors[0].local.auth,
        Auth::UsernamePassword { .. }
    ));
    let c = &cfg.connectors[0];
    assert_eq!(c.protocol, Protocol::V3);
    assert_eq!(c.remote.transport, Transport::WebSocket);
    assert_eq!(c.routes[0].name, "r");

    let quick = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/quickstart.yaml");
    let cfg = load(&[quick], &LoadOptions::default());
    assert!(cfg.connectors[0].local.endpoint.embedded);
}

/// Loads `yaml` and returns the report's lines.
fn errors_of(yaml: &str) -> Vec<String> {
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "bridge.yaml", yaml);
    let opts = LoadOptions {
        secrets_dir: dir.path().join("secrets"),
        configmaps_dir: dir.path().join("configmaps"),
    };
    match config::load(&[path], &opts) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(report) => report
            .errors
            .iter()
            .map(|e| {
                let line = e.to_string();
                line.split_once("bridge.yaml")
                    .map(|(_, r)| r.to_string())
                    .unwrap_or(line)
            })
            .collect(),
    }
}

const CONNECTOR: &str = "apiVersion: mq.iotoperations.azure.com/v1beta1
kind: MqttBridgeConnector
metadata:
  name: b
spec:
  protocol: v5
  remoteBrokerConnection:
    endpoint: remote:8883
    tls:
      tlsEnabled: false
";

fn with_routes(routes: &str) -> String {
    format!(
        "{CONNECTOR}---\napiVersion: mq.iotoperations.azure.com/v1beta1\nkind: MqttBridgeTopicMap\nmetadata:\n  name: m\nspec:\n  mqttBridgeConnectorRef: b\n  routes:\n{routes}"
    )
}

fn assert_one(errors: &[String], expected: &[&str]) {
    assert_eq!(errors.len(), 1, "expected one error, got {errors:#?}");
    for part in expected {
        assert!(
            errors[0].contains(part),
            "{:?} does not contain {part:?}",
            errors[0]
        );
    }
}

#[test]
fn a_misspelled_field_is_reported_with_its_line() {
    let yaml = CONNECTOR.replace("  protocol: v5\n", "  protocol: v5\n  bridgeInstance: 2\n");
    assert_one(
        &errors_of(&yaml),
        &[
            ":7:",
            "MqttBridgeConnector \"b\"",
            "spec.bridgeInstance",
            "unknown field",
            "bridgeInstances",
        ],
    );
}

#[test]
fn a_wrong_type_is_reported() {
    let yaml = CONNECTOR.replace(
        "  protocol: v5\n",
        "  protocol: v5\n  bridgeInstances: two\n",
    );
    assert_one(
        &errors_of(&yaml),
        &[":7:", "spec.bridgeInstances", "expected an integer"],
    );
    let yaml = CONNECTOR.replace("tlsEnabled: false", "tlsEnabled: maybe");
    assert_one(&errors_of(&yaml), &[":10:", "tlsEnabled", "true or false"]);
    let yaml = CONNECTOR.replace("protocol: v5", "protocol: v4");
    assert_one(&errors_of(&yaml), &[":6:", "spec.protocol", "v5, v3"]);
}

#[test]
fn a_missing_required_field_is_reported() {
    let yaml = CONNECTOR.replace("    endpoint: remote:8883\n", "");
    assert_one(
        &errors_of(&yaml),
        &[
            "spec.remoteBrokerConnection.endpoint",
            "required field is missing",
        ],
    );
    let yaml = with_routes("    - direction: local-to-remote\n      source: a\n");
    assert_one(
        &errors_of(&yaml),
        &[":19:", "spec.routes[0].name", "required"],
    );
}

#[test]
fn an_unknown_connector_ref_is_reported() {
    let yaml = with_routes("    - {direction: local-to-remote, name: r, source: a}\n")
        .replace("mqttBridgeConnectorRef: b", "mqttBridgeConnectorRef: nope");
    assert_one(
        &errors_of(&yaml),
        &[":17:", "MqttBridgeTopicMap \"m\"", "\"nope\"", "loaded: b"],
    );
}

#[test]
fn a_duplicate_route_name_is_reported() {
    let yaml = with_routes(
        "    - {direction: local-to-remote, name: r, source: a}\n    - {direction: remote-to-local, name: r, source: b}\n",
    );
    assert_one(
        &errors_of(&yaml),
        &[":20:", "\"r\" is already used", "bridge.yaml:19"],
    );
}

#[test]
fn a_wildcard_in_target_is_reported() {
    let yaml =
        with_routes("    - {direction: local-to-remote, name: r, source: a/#, target: b/+}\n");
    assert_one(
        &errors_of(&yaml),
        &[":19:", "spec.routes[0].target", "wildcard"],
    );
}

#[test]
fn an_invalid_source_filter_is_reported() {
    let yaml = with_routes("    - {direction: local-to-remote, name: r, source: a/#/b}\n");
    assert_one(
        &errors_of(&yaml),
        &["spec.routes[0].source", "'#' must be the last level"],
    );
    let yaml = with_routes("    - {direction: local-to-remote, name: r, source: \"a+\"}\n");
    assert_one(
        &errors_of(&yaml),
        &["spec.routes[0].source", "'+' must stand alone"],
    );
}

#[test]
fn a_share_number_below_one_is_reported() {
    let yaml = with_routes(
        "    - direction: local-to-remote\n      name: r\n      source: a\n      sharedSubscription:\n        groupMinimumShareNumber: 0\n        groupName: g\n",
    );
    assert_one(
        &errors_of(&yaml),
        &[":23:", "groupMinimumShareNumber", "0 is out of range"],
    );
}

#[test]
fn a_missing_secret_file_is_reported() {
    let yaml = CONNECTOR.replace(
        "      tlsEnabled: false\n",
        "      tlsEnabled: true\n    authentication:\n      x509:\n        secretName: bridge-client-cert\n",
    );
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains(":13:") && errors[0].contains("client_cert.pem"),
        "{errors:?}"
    );
    assert!(errors[1].contains("client_key.pem"), "{errors:?}");
}

#[test]
fn a_yaml_syntax_error_names_line_and_column() {
    let errors = errors_of("apiVersion: [unclosed\nkind: x\n");
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert!(errors[0].contains("YAML syntax error"), "{errors:?}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let yaml = with_routes(
        "    - {direction: sideways, name: r, source: a}\n    - {direction: local-to-remote, name: s, source: a, target: \"#\", qos: 3}\n",
    )
    .replace("protocol: v5", "protocol: v9");
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 4, "{errors:#?}");
}

#[test]
fn two_spellings_of_one_field_are_refused() {
    let yaml = with_routes("    - {direction: local-to-remote, name: r, source: a}\n").replace(
        "tlsEnabled: false",
        "tlsEnabled: true\n      trustedCaCertificateName: a\n      trustedCaCertificateConfigMap: b",
    );
    let errors = errors_of(&yaml);
    assert!(
        errors.iter().any(|e| e.contains("two spellings")),
        "{errors:#?}"
    );
}

#[test]
fn an_unknown_kind_or_apiversion_is_reported() {
    let yaml = CONNECTOR.replace("mq.iotoperations.azure.com/v1beta1", "example.com/v1");
    assert_one(
        &errors_of(&yaml),
        &["apiVersion", "not supported", "az-edge.com/v1alpha4"],
    );
    let yaml = CONNECTOR.replace("kind: MqttBridgeConnector", "kind: Broker");
    assert_one(&errors_of(&yaml), &["kind", "\"Broker\""]);
}

#[test]
fn token_auth_with_mqtt_3_is_refused() {
    let yaml = CONNECTOR.replace("protocol: v5", "protocol: v3").replace(
        "      tlsEnabled: false\n",
        "      tlsEnabled: true\n    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
    );
    let errors = errors_of(&yaml);
    assert_eq!(errors.len(), 2, "{errors:#?}");
    assert!(
        errors[0].contains("remoteBrokerConnection.authentication")
            && errors[0].contains("protocol: v5")
    );
    assert!(errors[1].contains("localBrokerConnection is omitted, and its documented default"));
}

#[test]
fn an_endpoint_without_port_is_reported() {
    let yaml = CONNECTOR.replace("remote:8883", "remote");
    assert_one(&errors_of(&yaml), &[":8:", "endpoint", "no port"]);
}

/// The connectivity extensions load, and each mistake in them is named with its line.
#[test]
fn failover_addresses_and_the_proxy_load_and_their_mistakes_are_named() {
    use edgebridge::config::{HttpProxy, ProxyCredentials, ProxySetting, no_proxy_matches};
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secrets/proxy-login");
    std::fs::create_dir_all(&secret).unwrap();
    std::fs::write(secret.join("username"), "u").unwrap();
    let extended = CONNECTOR.replace(
        "    tls:\n      tlsEnabled: false\n",
        "    tls:\n      tlsEnabled: false\n    failoverEndpoints: [\"remote-b:8883\", \"[::1]:8883\"]\n    failoverMode: round-robin\n    primaryCheckInterval: 10s\n    proxy:\n      url: http://proxy.corp:3128\n      secretName: proxy-login\n",
    );
    let path = write_file(
        dir.path(),
        "bridge.yaml",
        &with_routes("    - {direction: local-to-remote, name: r, source: a}\n")
            .replace(CONNECTOR, &extended),
    );
    let cfg = load(
        &[path],
        &LoadOptions {
            secrets_dir: dir.path().join("secrets"),
            configmaps_dir: dir.path().join("configmaps"),
        },
    );
    let reach = &cfg.connectors[0].remote.reach;
    assert_eq!(reach.failover.len(), 2);
    assert_eq!(reach.failover[1].host, "::1");
    assert!(reach.round_robin);
    assert_eq!(reach.primary_check, std::time::Duration::from_secs(10));
    match &reach.proxy {
        ProxySetting::Http(p) => {
            assert_eq!(p.address(), "proxy.corp:3128");
            assert!(matches!(p.credentials, Some(ProxyCredentials::Secret(_))));
        }
        other => panic!("{other:?}"),
    }
    // Without `proxy`, the remote uses the environment's; the local never does.
    let plain = load_one(&with_routes(
        "    - {direction: local-to-remote, name: r, source: a}\n",
    ));
    assert_eq!(
        plain.connectors[0].remote.reach.proxy,
        ProxySetting::Environment
    );
    assert_eq!(plain.connectors[0].local.reach.proxy, ProxySetting::None);
    // An embedded remote is in process: no proxy; an explicit one is an error.
    let embedded = with_routes("    - {direction: local-to-remote, name: r, source: a}\n")
        .replace("remote:8883", "embedded://127.0.0.1:0");
    assert_eq!(
        load_one(&embedded).connectors[0].remote.reach.proxy,
        ProxySetting::None
    );
    let errors = errors_of(&embedded.replace(
        "      tlsEnabled: false\n",
        "      tlsEnabled: false\n    proxy: {url: \"http://p:1\"}\n",
    ));
    assert!(
        errors.iter().any(|e| e.contains("proxy do not apply")),
        "{errors:#?}"
    );
    // `embeddedLogSize`: read on an embedded endpoint, refused (named) elsewhere or too small.
    let sized = |value: &str| {
        embedded.replace(
            "embedded://127.0.0.1:0\n",
            &format!("embedded://127.0.0.1:0\n    embeddedLogSize: {value}\n"),
        )
    };
    assert!(sized("64Mi").contains("embeddedLogSize"), "{embedded}");
    assert_eq!(
        load_one(&sized("64Mi")).connectors[0].remote.embedded_log,
        Some(64 << 20)
    );
    assert_eq!(load_one(&embedded).connectors[0].remote.embedded_log, None);
    let errors = errors_of(&sized("100k"));
    assert!(
        errors
            .iter()
            .any(|e| e.contains("remoteBrokerConnection.embeddedLogSize")
                && e.contains("at least 1048576")),
        "{errors:#?}"
    );
    let errors = errors_of(&CONNECTOR.replace(
        "    tls:\n      tlsEnabled: false\n",
        "    tls:\n      tlsEnabled: false\n    embeddedLogSize: 64Mi\n",
    ));
    assert!(
        errors.iter().any(|e| e.contains(":11:")
            && e.contains("embeddedLogSize")
            && e.contains("only to an embedded:// endpoint")),
        "{errors:#?}"
    );
    // Mistakes, each named.
    for (field, value, expect) in [
        ("failoverEndpoints", "remote-b", "expected a list"),
        ("failoverEndpoints", "[\"remote-b\"]", "no port"),
        ("failoverMode", "sometimes", "failoverMode"),
        ("primaryCheckInterval", "0s", "expected a duration"),
        ("proxy", "{url: https://p:1}", "must start with http://"),
        (
            "proxy",
            "{url: http://p:1, secretName: nope}",
            "Secret \"nope\"",
        ),
    ] {
        let yaml = CONNECTOR.replace(
            "    tls:\n      tlsEnabled: false\n",
            &format!("    tls:\n      tlsEnabled: false\n    {field}: {value}\n"),
        );
        let errors = errors_of(&yaml);
        assert!(
            errors
                .iter()
                .any(|e| e.contains(":11:") && e.contains(field) && e.contains(expect)),
            "{field}: {value}: {errors:#?}"
        );
    }
    // Proxy URLs with credentials, and NO_PROXY lists.
    let p = HttpProxy::parse("http://user:p%40ss@10.0.0.1:8080/").unwrap();
    assert_eq!(p.address(), "10.0.0.1:8080");
    match p.credentials {
        Some(ProxyCredentials::Inline { user, password }) => {
            assert_eq!(user, "user");
            assert_eq!(password.expose(), "p@ss");
            assert!(!format!("{password:?}").contains("p@ss"));
        }
        other => panic!("{other:?}"),
    }
    assert!(HttpProxy::parse("http://p:1/path").is_err());
    assert!(no_proxy_matches(
        "localhost, .example.com",
        "broker.example.com"
    ));
    assert!(no_proxy_matches("example.com", "example.com"));
    assert!(no_proxy_matches("*", "anything"));
    assert!(!no_proxy_matches("example.com", "notexample.com"));
    assert!(!no_proxy_matches("", "broker"));
}

fn load_one(yaml: &str) -> config::Config {
    edgebridge_tests::load_config(tempfile::tempdir().unwrap().path(), yaml)
}

/// Hostile or absurd configuration files are refused with a named error, quickly and with
/// bounded memory: an alias bomb (even under an unknown key), deep nesting, a file over the
/// size limit, bytes that are not UTF-8, tabs, absurd numbers, a 70,000-byte topic.
#[test]
fn hostile_configuration_files_get_named_errors() {
    let mut bomb = String::from("lol0: &l0 [x, x, x, x, x, x, x, x, x]\n");
    for i in 1..10 {
        let p = i - 1;
        bomb.push_str(&format!(
            "lol{i}: &l{i} [*l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}, *l{p}]\n"
        ));
    }
    let bombed = CONNECTOR.replace(
        "spec:\n",
        &format!(
            "  labels:\n{}spec:\n",
            bomb.lines()
                .map(|l| format!("    {l}\n"))
                .collect::<String>()
        ),
    );
    let started = std::time::Instant::now();
    assert_one(
        &errors_of(&bombed),
        &[
            "YAML syntax error",
            "aliases expand to more than 100000 nodes",
        ],
    );
    assert!(
        started.elapsed() < std::time::Duration::from_secs(2),
        "refused at once"
    );

    let deep = format!(
        "{}---\nx: {}1{}\n",
        CONNECTOR,
        "[".repeat(200),
        "]".repeat(200)
    );
    assert_one(&errors_of(&deep), &["nested more than 64 levels deep"]);

    assert_one(
        &errors_of(&CONNECTOR.replace("    endpoint", "\tendpoint")),
        &["YAML syntax error", "tab"],
    );
    assert_one(
        &errors_of(&CONNECTOR.replace(
            "  protocol: v5\n",
            "  protocol: v5\n  bridgeInstances: 1000000\n",
        )),
        &[
            "spec.bridgeInstances",
            "1000000 is out of range; expected 1 to 1000",
        ],
    );
    let long = "a".repeat(70_000);
    let errors = errors_of(&with_routes(&format!(
        "    - {{direction: local-to-remote, name: r, source: \"{long}\"}}\n"
    )));
    assert_one(
        &errors,
        &[
            "spec.routes[0].source",
            "(70000 bytes)",
            "more than MQTT's 65535",
        ],
    );
    assert!(
        errors[0].len() < 400,
        "the topic is not echoed in full: {} bytes",
        errors[0].len()
    );

    let dir = tempfile::tempdir().unwrap();
    let binary = dir.path().join("binary.yaml");
    std::fs::write(&binary, b"apiVersion: \xff\xfe\n").unwrap();
    let big = dir.path().join("big.yaml");
    std::fs::write(&big, format!("# {}\n", "x".repeat(17 << 20))).unwrap();
    let report = config::load(&[binary, big], &LoadOptions::default()).unwrap_err();
    let text = report.to_string();
    assert!(
        text.contains("binary.yaml: not UTF-8 text (invalid byte at offset 12)"),
        "{text}"
    );
    assert!(
        text.contains("big.yaml: the file is larger than 16 MiB; refused"),
        "{text}"
    );
}

/// Many routes load in one pass (route names are checked with a lookup, not a scan per route).
#[test]
fn ten_thousand_routes_load() {
    let routes: String = (0..10_000)
        .map(|i| format!("    - {{direction: local-to-remote, name: r{i}, source: \"t/{i}/#\"}}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = write_file(dir.path(), "many.yaml", &with_routes(&routes));
    let cfg = load(&[path], &LoadOptions::default());
    assert_eq!(cfg.connectors[0].routes.len(), 10_000);
    let mut dup = routes.clone();
    dup.push_str("    - {direction: local-to-remote, name: r5000, source: \"t/x\"}\n");
    let errors = errors_of(&with_routes(&dup));
    assert_one(&errors, &["route name \"r5000\" is already used"]);
}

/// `check` looks into the client certificate and key files: a key in `client_cert.pem` or no
/// key in `client_key.pem` is an error; a key readable by every user is a warning.
#[test]
fn certificate_files_are_checked_and_readable_secrets_warned() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let pki = edgebridge_tests::Pki::new(&dir.path().join("pki"));
    let secret = dir.path().join("secrets/client");
    pki.client_secret(&secret, "bridge");
    let yaml = CONNECTOR.replace(
        "      tlsEnabled: false\n",
        "      tlsEnabled: false\n    authentication:\n      x509:\n        secretName: client\n",
    );
    let path = write_file(dir.path(), "bridge.yaml", &yaml);
    let opts = LoadOptions {
        secrets_dir: dir.path().join("secrets"),
        configmaps_dir: dir.path().join("configmaps"),
    };
    let key = secret.join("client_key.pem");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let cfg = config::load(std::slice::from_ref(&path), &opts).unwrap();
    let warnings = cfg.warnings();
    assert_eq!(warnings.len(), 1, "{warnings:?}");
    assert!(
        warnings[0].contains("client_key.pem is readable by every user"),
        "{warnings:?}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    assert!(
        config::load(std::slice::from_ref(&path), &opts)
            .unwrap()
            .warnings()
            .is_empty()
    );
    // The key pasted into the certificate file, then a certificate where the key belongs.
    let cert = secret.join("client_cert.pem");
    let cert_text = std::fs::read_to_string(&cert).unwrap();
    let key_text = std::fs::read_to_string(&key).unwrap();
    std::fs::write(&cert, format!("{cert_text}{key_text}")).unwrap();
    let e = config::load(std::slice::from_ref(&path), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_cert.pem holds a private key"), "{e}");
    std::fs::write(&cert, &cert_text).unwrap();
    std::fs::write(&key, &cert_text).unwrap();
    let e = config::load(std::slice::from_ref(&path), &opts)
        .unwrap_err()
        .to_string();
    assert!(e.contains("client_key.pem holds no PEM private key"), "{e}");
}
