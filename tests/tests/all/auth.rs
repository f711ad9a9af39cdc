//! Token authentication and credential rotation: managed identity (IMDS and Azure Arc flows)
//! against a local identity endpoint issuing signed JWTs and an MQTT 5 peer that checks them;
//! Kubernetes SAT rotation; X.509 rotation against Mosquitto requiring client certificates.

use std::path::Path;
use std::time::Duration;

use edgebridge::bridge::{self, RunOptions};
use edgebridge::config::{self, Auth};
use edgebridge::credentials::{CredentialError, IdentityOptions, Provider};
use edgebridge_tests::auth::{Answer, AuthProxy, Check, IdentityMode, IdentityServer, verify};
use edgebridge_tests::{
    Collector, Mosquitto, MosquittoOptions, Pki, Publisher, connector_yaml, eventually,
    init_tracing, write_file,
};

const SECOND: Duration = Duration::from_secs(1);
const AUDIENCE: &str = "https://eventgrid.azure.net";

fn opts(identity: &IdentityServer, key_dir: &Path) -> RunOptions {
    RunOptions {
        backoff: (Duration::from_millis(50), Duration::from_millis(500)),
        drain_timeout: Duration::from_secs(3),
        identity: IdentityOptions {
            endpoint: identity.url.clone(),
            arc: false,
            key_dir: key_dir.to_path_buf(),
            timeout: 10 * SECOND,
        },
        ..RunOptions::default()
    }
}

fn load(dir: &Path, yaml: &str) -> config::Config {
    edgebridge_tests::load_config(dir, yaml)
}

fn connector(
    local: &str,
    local_auth: &str,
    remote: &str,
    remote_auth: &str,
    routes: &str,
) -> String {
    connector_yaml("v5", 1, (local, local_auth), (remote, remote_auth), routes)
}

/// QoS 1 traffic keeps flowing across several managed-identity token refreshes (3 s tokens,
/// renewed at 80 %), every CONNECT carries a valid, unexpired token, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_tokens_are_refreshed_under_traffic_without_loss() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let identity = IdentityServer::start(IdentityMode::Imds, 3 * SECOND).await;
    let peer = AuthProxy::start(remote.port, Check::Jwt(AUDIENCE.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &connector(
            &local.endpoint(),
            "",
            &format!("127.0.0.1:{}", peer.port),
            "    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
            "    - {direction: local-to-remote, name: up, source: \"mi/#\"}\n",
        ),
    );
    let b = bridge::start(&cfg, &opts(&identity, dir.path()))
        .await
        .unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    let at_remote = Collector::start(remote.port, "mi-sub", "mi/#", false).await;
    let lp = Publisher::connect(local.port, "mi-pub").await;
    let total = 1200;
    for i in 0..total {
        lp.publish("mi/t", 1, false, &i.to_string()).await;
        if i % 20 == 19 {
            tokio::time::sleep(Duration::from_millis(130)).await;
        }
    }
    assert!(
        eventually(20 * SECOND, || at_remote.distinct_and_duplicates().0.len()
            == total)
        .await,
        "{} of {total}",
        at_remote.distinct_and_duplicates().0.len()
    );
    let seen = peer.seen();
    let accepted: Vec<_> = seen.iter().filter(|c| c.verdict.is_ok()).collect();
    let mut tokens: Vec<&str> = accepted.iter().map(|c| c.token.as_str()).collect();
    tokens.sort();
    tokens.dedup();
    println!(
        "managed identity: {total} messages, {} distinct received, {} duplicates; {} tokens issued, {} connects accepted with {} distinct tokens, {} refused",
        at_remote.distinct_and_duplicates().0.len(),
        at_remote.distinct_and_duplicates().1,
        identity.issued(),
        accepted.len(),
        tokens.len(),
        seen.len() - accepted.len()
    );
    assert!(tokens.len() >= 3, "at least two refreshes: {seen:?}");
    // This broker grants no authentication method: each refresh is a reconnect, counted.
    let target = b.stats.clients()[0].target.clone();
    assert!(
        target
            .reauth_reconnect
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2
    );
    assert_eq!(
        target.link_info().last_refresh.map(|(_, how)| how),
        Some("reconnect")
    );
    assert!(
        seen.iter().all(|c| c.verdict.is_ok()),
        "every CONNECT had a valid token: {seen:?}"
    );
    assert!(identity.issued() >= 3);
    b.shutdown().await;
}

/// MQTT 5 re-authentication in place: against a broker that grants `OAUTH2-JWT` in CONNACK
/// and answers AUTH (the test harness's broker side, §4.12.1), three token refreshes under
/// QoS 1 traffic happen on the open connection: one CONNECT, no reconnect, no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn managed_identity_tokens_are_refreshed_in_place_without_reconnecting() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let identity = IdentityServer::start(IdentityMode::Imds, 4 * SECOND).await;
    let peer = AuthProxy::start_reauth(remote.port, Check::Jwt(AUDIENCE.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &connector(
            &local.endpoint(),
            "",
            &format!("127.0.0.1:{}", peer.port),
            "    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
            "    - {direction: local-to-remote, name: up, source: \"ra/#\"}\n",
        ),
    );
    let b = bridge::start(&cfg, &opts(&identity, dir.path()))
        .await
        .unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    let at_remote = Collector::start(remote.port, "ra-sub", "ra/#", false).await;
    let lp = Publisher::connect(local.port, "ra-pub").await;
    let target = || {
        b.stats
            .clients()
            .into_iter()
            .find(|c| c.route == "up")
            .map(|c| c.target.clone())
            .unwrap()
    };
    // QoS 1 traffic until three refreshes happened in place (each ~3.2 s), at most 30 s.
    let started = std::time::Instant::now();
    let mut total = 0;
    while target()
        .reauth_in_place
        .load(std::sync::atomic::Ordering::Relaxed)
        < 3
        && started.elapsed() < 30 * SECOND
    {
        for _ in 0..10 {
            lp.publish("ra/t", 1, false, &total.to_string()).await;
            total += 1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        eventually(20 * SECOND, || at_remote.distinct_and_duplicates().0.len()
            == total)
        .await,
        "{} of {total}",
        at_remote.distinct_and_duplicates().0.len()
    );
    let (distinct, duplicates) = at_remote.distinct_and_duplicates();
    let t = target();
    let in_place = t.reauth_in_place.load(std::sync::atomic::Ordering::Relaxed);
    let auths = peer.auths();
    println!(
        "re-authentication: {total} messages, {} distinct received, {duplicates} duplicates; {} CONNECTs, {} AUTHs ({} accepted), {in_place} in place, {} reconnects",
        distinct.len(),
        peer.seen().len(),
        auths.len(),
        auths.iter().filter(|a| a.verdict.is_ok()).count(),
        t.reconnects()
    );
    assert!(in_place >= 3, "three refreshes in place: {auths:?}");
    assert_eq!(duplicates, 0, "no message sent twice");
    assert_eq!(peer.seen().len(), 1, "one CONNECT: {:?}", peer.seen());
    assert_eq!(t.reconnects(), 0);
    assert_eq!(
        t.reauth_reconnect
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
    assert!(
        auths.len() >= 3 && auths.iter().all(|a| a.verdict.is_ok()),
        "{auths:?}"
    );
    let mut tokens: Vec<&str> = auths.iter().map(|a| a.token.as_str()).collect();
    tokens.dedup();
    assert_eq!(
        tokens.len(),
        auths.len(),
        "every AUTH carried a fresh token"
    );
    let link = t.link_info();
    assert_eq!(link.last_refresh.map(|(_, how)| how), Some("in-place"));
    // What an operator sees: /metrics and /status.
    let observed = edgebridge_tests::observed(&b);
    let metrics = edgebridge::metrics::render(observed.clone()).unwrap();
    let line = format!(
        "edgebridge_session_token_refreshes_total{{route=\"up\",side=\"remote\",client_id=\"edge-up\",how=\"in-place\"}} {in_place}"
    );
    assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    let status = edgebridge::status::status_json(&observed).to_string();
    assert!(
        status.contains("\"how\":\"in-place\"")
            && status.contains(&format!("\"address\":\"127.0.0.1:{}\"", peer.port)),
        "{status}"
    );
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_arc_challenge_flow_and_bad_identity_endpoints() {
    let dir = tempfile::tempdir().unwrap();
    let key_dir = dir.path().join("tokens");
    std::fs::create_dir_all(&key_dir).unwrap();
    let key = write_file(&key_dir, "challenge.key", "s3cret-key\n");
    let provider = |endpoint: &str, arc: bool| {
        Provider::new(
            Auth::ManagedIdentity {
                audience: AUDIENCE.into(),
            },
            IdentityOptions {
                endpoint: endpoint.into(),
                arc,
                key_dir: key_dir.clone(),
                timeout: 10 * SECOND,
            },
        )
    };
    // Arc: 401 challenge naming a key file in the allowed folder, then a token.
    let arc = IdentityServer::start(IdentityMode::Arc(key), 60 * SECOND).await;
    let creds = provider(&arc.url, true).connect().await.unwrap();
    assert_eq!(creds.auth_method.as_deref(), Some("OAUTH2-JWT"));
    assert!(verify(creds.auth_data.as_ref().unwrap().expose(), AUDIENCE).is_ok());
    assert!(
        !format!("{creds:?}").contains(creds.auth_data.as_ref().unwrap().expose()),
        "tokens never print"
    );
    // A challenge pointing outside the allowed folder is refused.
    let outside = write_file(dir.path(), "elsewhere.key", "x");
    let evil = IdentityServer::start(IdentityMode::Arc(outside), 60 * SECOND).await;
    let e = provider(&evil.url, true).connect().await.unwrap_err();
    assert!(matches!(e, CredentialError::KeyFileOutside { .. }), "{e}");
    assert!(e.to_string().contains("outside"), "{e}");
    // An endpoint that answers garbage, and one that is down.
    let garbage = IdentityServer::start(IdentityMode::Garbage, 60 * SECOND).await;
    let e = provider(&garbage.url, false).connect().await.unwrap_err();
    assert!(e.to_string().contains("not JSON"), "{e}");
    let port = edgebridge_tests::free_port();
    let e = provider(&format!("http://127.0.0.1:{port}/token"), false)
        .connect()
        .await
        .unwrap_err();
    assert!(matches!(e, CredentialError::Endpoint { .. }), "{e}");
    // A missing SAT file names the file.
    let sat = Provider::new(
        Auth::Kubernetes {
            token_path: dir.path().join("no-such-token"),
        },
        IdentityOptions::from_env(),
    );
    let e = sat.connect().await.unwrap_err();
    assert!(e.to_string().contains("no-such-token"), "{e}");
}

/// The bridge retries while the identity endpoint is down and starts forwarding once it is
/// up; the message published meanwhile waits in the source broker and arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_endpoint_that_is_down_is_retried_and_nothing_is_lost() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let peer = AuthProxy::start(remote.port, Check::Jwt(AUDIENCE.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &connector(
            &local.endpoint(),
            "",
            &format!("127.0.0.1:{}", peer.port),
            "    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
            "    - {direction: local-to-remote, name: up, source: \"down/#\"}\n",
        ),
    );
    // Reserve a port for the identity endpoint, start it later.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let mut o = opts(
        &IdentityServer::start(IdentityMode::Imds, 60 * SECOND).await,
        dir.path(),
    );
    o.identity.endpoint = format!("http://127.0.0.1:{port}/metadata/identity/oauth2/token");
    let b = bridge::start(&cfg, &o).await.unwrap();
    let at_remote = Collector::start(remote.port, "down-sub", "down/#", false).await;
    let lp = Publisher::connect(local.port, "down-pub").await;
    tokio::time::sleep(SECOND).await;
    lp.publish("down/x", 1, false, "waited").await;
    tokio::time::sleep(SECOND).await;
    assert_eq!(at_remote.count(), 0, "no token, no forwarding");
    // Now the endpoint comes up on that port.
    let server = IdentityServerOnPort::start(port).await;
    assert!(
        eventually(15 * SECOND, || at_remote.count() == 1).await,
        "forwarded after the endpoint came up"
    );
    assert_eq!(at_remote.messages()[0].payload, "waited");
    drop(server);
    b.shutdown().await;
}

/// An IMDS-mode identity endpoint on a given port (for the retry test).
struct IdentityServerOnPort(tokio::task::JoinHandle<()>);

impl IdentityServerOnPort {
    async fn start(port: u16) -> IdentityServerOnPort {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        IdentityServerOnPort(tokio::spawn(async move {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let token = edgebridge_tests::auth::jwt(AUDIENCE, 60 * SECOND, 0);
                let body = format!("{{\"access_token\":\"{token}\",\"expires_in\":\"60\"}}");
                let _ = s
                    .write_all(format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes())
                    .await;
            }
        }))
    }
}

impl Drop for IdentityServerOnPort {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Kubernetes SAT: the token file is re-read at every connect; after it rotates (and the
/// broker drops connections holding the old one) the bridge presents the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_token_is_used_at_the_next_connect() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let sat_dir = dir.path().join("sat");
    std::fs::create_dir_all(&sat_dir).unwrap();
    let token = write_file(&sat_dir, "sat-token", "token-one\n");
    let peer = AuthProxy::start(local.port, Check::SatFile(token.clone())).await;
    let cfg = load(
        dir.path(),
        &connector(
            &format!("127.0.0.1:{}", peer.port),
            &format!(
                "    authentication:\n      kubernetes:\n        secretPath: {}\n        serviceAccountTokenName: sat-token\n",
                sat_dir.display()
            ),
            &remote.endpoint(),
            "",
            "    - {direction: local-to-remote, name: up, source: \"sat/#\"}\n",
        ),
    );
    let b = bridge::start(
        &cfg,
        &opts(
            &IdentityServer::start(IdentityMode::Imds, SECOND).await,
            dir.path(),
        ),
    )
    .await
    .unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    let at_remote = Collector::start(remote.port, "sat-sub", "sat/#", false).await;
    let lp = Publisher::connect(local.port, "sat-pub").await;
    lp.publish("sat/x", 1, false, "one").await;
    assert!(eventually(10 * SECOND, || at_remote.count() == 1).await);
    std::fs::write(&token, "token-two\n").unwrap();
    peer.kick_all();
    assert!(
        eventually(10 * SECOND, || peer
            .seen()
            .iter()
            .any(|c| c.token == "token-two" && c.verdict.is_ok()))
        .await,
        "{:?}",
        peer.seen()
    );
    lp.publish("sat/x", 1, false, "two").await;
    assert!(eventually(10 * SECOND, || at_remote.count() == 2).await);
    assert!(
        peer.seen().iter().all(|c| c.verdict.is_ok()),
        "{:?}",
        peer.seen()
    );
    b.shutdown().await;
}

/// A projected service-account token (a JWT with `exp`) is read again at 80 % of its
/// lifetime and presented with AUTH on the open connection when the broker granted `K8S-SAT`:
/// the rotated tokens reach the broker without a reconnect.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_service_account_token_is_presented_in_place() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let dir = tempfile::tempdir().unwrap();
    let sat_dir = dir.path().join("sat");
    std::fs::create_dir_all(&sat_dir).unwrap();
    let token = write_file(
        &sat_dir,
        "sat-token",
        &edgebridge_tests::auth::jwt("sat", 3 * SECOND, 0),
    );
    let peer = AuthProxy::start_reauth(local.port, Check::SatFile(token.clone())).await;
    let cfg = load(
        dir.path(),
        &connector(
            &format!("127.0.0.1:{}", peer.port),
            &format!(
                "    authentication:\n      kubernetes:\n        secretPath: {}\n        serviceAccountTokenName: sat-token\n",
                sat_dir.display()
            ),
            &remote.endpoint(),
            "",
            "    - {direction: local-to-remote, name: up, source: \"sat/#\"}\n",
        ),
    );
    let b = bridge::start(
        &cfg,
        &opts(
            &IdentityServer::start(IdentityMode::Imds, SECOND).await,
            dir.path(),
        ),
    )
    .await
    .unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    // Kubelet: a new token every second (each valid 3 s).
    let rotate = {
        let token = token.clone();
        tokio::spawn(async move {
            for serial in 1.. {
                tokio::time::sleep(SECOND).await;
                let tmp = token.with_extension("tmp");
                std::fs::write(&tmp, edgebridge_tests::auth::jwt("sat", 3 * SECOND, serial))
                    .unwrap();
                std::fs::rename(&tmp, &token).unwrap();
            }
        })
    };
    let source = b.stats.clients()[0].source.clone();
    assert!(
        eventually(15 * SECOND, || source
            .reauth_in_place
            .load(std::sync::atomic::Ordering::Relaxed)
            >= 2)
        .await,
        "{:?}",
        peer.auths()
    );
    rotate.abort();
    let auths = peer.auths();
    assert!(auths.iter().all(|a| a.verdict.is_ok()), "{auths:?}");
    assert_eq!(peer.seen().len(), 1, "one CONNECT: {:?}", peer.seen());
    assert_eq!(source.reconnects(), 0);
    b.shutdown().await;
}

/// X.509: rotate the client certificate files; the next connection uses the new certificate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotated_client_certificate_is_used_at_the_next_connect() {
    init_tracing();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        ..Default::default()
    });
    std::fs::create_dir_all(dir.path().join("configmaps/ca")).unwrap();
    std::fs::copy(&pki.ca, dir.path().join("configmaps/ca/ca.crt")).unwrap();
    let secret = dir.path().join("secrets/client");
    pki.client_secret(&secret, "bridge-one");
    let yaml = connector(
        &local.endpoint(),
        "",
        &format!("localhost:{}", remote.tls_port.unwrap()),
        "    authentication:\n      x509:\n        secretName: client\n",
        "    - {direction: local-to-remote, name: up, source: \"x509/#\"}\n",
    )
    .replacen(
        "      tlsEnabled: false\n",
        "      tlsEnabled: true\n      trustedCaCertificateConfigMap: ca\n",
        1,
    );
    let cfg = load(dir.path(), &yaml);
    let b = bridge::start(
        &cfg,
        &opts(
            &IdentityServer::start(IdentityMode::Imds, SECOND).await,
            dir.path(),
        ),
    )
    .await
    .unwrap();
    assert!(b.wait_ready(10 * SECOND).await);
    assert!(remote.log().contains("u'bridge-one'"), "{}", remote.log());
    pki.client_secret(&secret, "bridge-two");
    // The broker restarts (as after a CA or policy change): the reconnect uses the new files.
    let remote = tokio::task::spawn_blocking(move || {
        let mut r = remote;
        r.restart();
        r
    })
    .await
    .unwrap();
    assert!(
        eventually(15 * SECOND, || remote.log().contains("u'bridge-two'")).await,
        "{}",
        remote.log()
    );
    let at_remote = Collector::start(remote.port, "x509-sub", "x509/#", false).await;
    let lp = Publisher::connect(local.port, "x509-pub").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    lp.publish("x509/x", 1, false, "rotated").await;
    assert!(eventually(10 * SECOND, || at_remote.count() == 1).await);
    b.shutdown().await;
}

/// TLS failures name what to fix: an untrusted server, a key that does not match its
/// certificate, a missing file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_failures_are_clear() {
    use edgebridge::config::{BrokerConnection, Tls, Transport, parse::parse_endpoint};
    use edgebridge::mqtt::transport;
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(&dir.path().join("pki"));
    let other = Pki::new(&dir.path().join("other"));
    let remote = Mosquitto::start(MosquittoOptions {
        tls: Some(pki.server_files()),
        ..Default::default()
    });
    let ca_dir = |p: &Pki, name: &str| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(&p.ca, d.join("ca.crt")).unwrap();
        d
    };
    let good_ca = ca_dir(&pki, "good-ca");
    let wrong_ca = ca_dir(&other, "wrong-ca");
    pki.client_secret(&dir.path().join("client"), "c1");
    other.client_secret(&dir.path().join("other-client"), "c2");
    let conn = |ca: &Path, cert: &Path, key: &Path| BrokerConnection {
        endpoint: parse_endpoint(&format!("localhost:{}", remote.tls_port.unwrap())).unwrap(),
        transport: Transport::Mqtt,
        tls: Some(Tls {
            trusted_ca_dir: Some(ca.to_path_buf()),
        }),
        auth: Auth::X509 {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            intermediates: None,
        },
        reach: Default::default(),
        embedded_log: None,
    };
    let cert = dir.path().join("client/client_cert.pem");
    let key = dir.path().join("client/client_key.pem");
    let err = |c: BrokerConnection| async move {
        match transport::open(&c, &c.endpoint).await {
            Ok(_) => "connected".to_string(),
            Err(e) => edgebridge::error::chain(&e),
        }
    };
    let e = err(conn(&wrong_ca, &cert, &key)).await;
    assert!(
        e.contains("TLS handshake with localhost:")
            && e.contains("invalid peer certificate")
            && e.contains("`trustedCaCertificateConfigMap` must hold the CA"),
        "{e}"
    );
    let e = err(conn(
        &good_ca,
        &cert,
        &dir.path().join("other-client/client_key.pem"),
    ))
    .await;
    assert!(
        e.contains("client certificate") && e.contains("client_cert.pem"),
        "{e}"
    );
    let e = err(conn(&good_ca, &dir.path().join("nope.pem"), &key)).await;
    assert!(e.contains("nope.pem: cannot read certificates"), "{e}");
    assert_eq!(err(conn(&good_ca, &cert, &key)).await, "connected");

    // A broker whose certificate names another host, and one whose certificate has expired.
    for (names, expired, expect) in [
        (
            &["other.example"][..],
            false,
            "not issued for this host name",
        ),
        (&["localhost"][..], true, "has expired"),
    ] {
        let sub = dir.path().join(format!("pki-{expired}"));
        let bad = Pki::with_server(&sub, names, expired);
        let broker = Mosquitto::start(MosquittoOptions {
            tls: Some(bad.server_files()),
            ..Default::default()
        });
        let ca = ca_dir(&bad, &format!("ca-{expired}"));
        bad.client_secret(&sub.join("client"), "c3");
        let c = BrokerConnection {
            endpoint: parse_endpoint(&format!("localhost:{}", broker.tls_port.unwrap())).unwrap(),
            transport: Transport::Mqtt,
            tls: Some(Tls {
                trusted_ca_dir: Some(ca),
            }),
            auth: Auth::X509 {
                cert: sub.join("client/client_cert.pem"),
                key: sub.join("client/client_key.pem"),
                intermediates: Some(sub.join("client/client_intermediate_certs.pem")),
            },
            reach: Default::default(),
            embedded_log: None,
        };
        let e = err(c).await;
        assert!(e.contains(expect), "{e}");
    }
}

fn identity_provider(url: &str, arc: bool, key_dir: &Path, timeout: Duration) -> Provider {
    Provider::new(
        Auth::ManagedIdentity {
            audience: AUDIENCE.into(),
        },
        IdentityOptions {
            endpoint: url.into(),
            arc,
            key_dir: key_dir.to_path_buf(),
            timeout,
        },
    )
}

/// Every shape of HTTP answer an identity endpoint may send: a chunked 3.7 KB token on a
/// kept-alive connection (what Go's net/http sends), `Content-Length`, the Arc challenge
/// answered chunked, a body over the size bound, an answer slower than the timeout, and a
/// redirect: each gives a token or a clear, named error, and none hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_answers_chunked_sized_oversized_slow_and_redirected() {
    let dir = tempfile::tempdir().unwrap();
    let key_dir = dir.path().join("tokens");
    std::fs::create_dir_all(&key_dir).unwrap();
    let key = write_file(&key_dir, "challenge.key", "s3cret-key\n");
    let timeout = 2 * SECOND;
    let token_of = |creds: edgebridge::credentials::ConnectCredentials| {
        creds.auth_data.unwrap().expose().to_string()
    };
    for answer in [Answer::Chunked, Answer::ContentLength] {
        let server = IdentityServer::start_with(IdentityMode::Imds, 60 * SECOND, answer).await;
        let started = std::time::Instant::now();
        let token = token_of(
            identity_provider(&server.url, false, &key_dir, timeout)
                .connect()
                .await
                .unwrap_or_else(|e| panic!("{answer:?}: {}", edgebridge::error::chain(&e))),
        );
        assert!(verify(&token, AUDIENCE).is_ok(), "{answer:?}");
        assert!(
            started.elapsed() < timeout,
            "{answer:?}: the body's end is known without waiting for the connection to close"
        );
        if answer == Answer::Chunked {
            assert!(token.len() > 3000, "a padded token: {}", token.len());
        }
    }
    let arc =
        IdentityServer::start_with(IdentityMode::Arc(key), 60 * SECOND, Answer::Chunked).await;
    let token = token_of(
        identity_provider(&arc.url, true, &key_dir, timeout)
            .connect()
            .await
            .unwrap(),
    );
    assert!(verify(&token, AUDIENCE).is_ok());

    let big = IdentityServer::start_with(IdentityMode::Imds, 60 * SECOND, Answer::Oversized).await;
    let e = identity_provider(&big.url, false, &key_dir, timeout)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(e, CredentialError::TooLarge { limit: 65536, .. }),
        "{e}"
    );
    assert!(e.to_string().contains("over 65536 bytes"), "{e}");

    let slow = IdentityServer::start_with(
        IdentityMode::Imds,
        60 * SECOND,
        Answer::Slow(Duration::from_secs(5)),
    )
    .await;
    let started = std::time::Instant::now();
    let e = identity_provider(&slow.url, false, &key_dir, timeout)
        .connect()
        .await
        .unwrap_err();
    let waited = started.elapsed();
    assert!(
        waited >= timeout && waited < timeout + SECOND,
        "gave up at the timeout: {waited:?}"
    );
    let text = edgebridge::error::chain(&e);
    assert!(text.contains("no complete answer within 2s"), "{text}");

    let redirect =
        IdentityServer::start_with(IdentityMode::Imds, 60 * SECOND, Answer::Redirect).await;
    let e = identity_provider(&redirect.url, false, &key_dir, timeout)
        .connect()
        .await
        .unwrap_err();
    assert!(
        matches!(e, CredentialError::Response { status: 307, .. }),
        "{e}"
    );
    // Not followed: following would have gone to 169.254.169.254 and failed to connect.
    assert!(e.to_string().contains("redirects are refused"), "{e}");
}

/// A chunked token answer authenticates the bridge: messages cross to the token-checking peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_token_answer_authenticates_the_bridge() {
    init_tracing();
    let local = Mosquitto::start(MosquittoOptions::default());
    let remote = Mosquitto::start(MosquittoOptions::default());
    let identity =
        IdentityServer::start_with(IdentityMode::Imds, 60 * SECOND, Answer::Chunked).await;
    let peer = AuthProxy::start(remote.port, Check::Jwt(AUDIENCE.into())).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = load(
        dir.path(),
        &connector(
            &local.endpoint(),
            "",
            &format!("127.0.0.1:{}", peer.port),
            "    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
            "    - {direction: local-to-remote, name: up, source: \"chunk/#\"}\n",
        ),
    );
    let b = bridge::start(&cfg, &opts(&identity, dir.path()))
        .await
        .unwrap();
    assert!(b.wait_ready(10 * SECOND).await, "{:?}", peer.seen());
    let at_remote = Collector::start(remote.port, "chunk-sub", "chunk/#", false).await;
    let lp = Publisher::connect(local.port, "chunk-pub").await;
    for i in 0..20 {
        lp.publish("chunk/t", 1, false, &i.to_string()).await;
    }
    assert_eq!(at_remote.wait_for(20, 10 * SECOND).await, 20);
    let seen = peer.seen();
    assert!(
        !seen.is_empty() && seen.iter().all(|c| c.verdict.is_ok()),
        "{seen:?}"
    );
    assert!(seen[0].token.len() > 3000, "the padded token went through");
    b.shutdown().await;
}

/// A `MakeWriter` into a shared buffer.
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// The bridge at `trace` level (and every crate under it), with a password, a managed-identity
/// token fetched through the Azure Arc challenge (and its key file), a service-account token
/// and a client key: traffic crosses on every connection, and none of the secrets appears in
/// the output, nor in the configuration's `Debug`.
#[test]
fn no_secret_appears_in_any_output_at_trace_level() {
    let out = Captured::default();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(out.clone())
        .with_ansi(false)
        .finish();
    // A runtime on this thread only, so that everything it runs logs to this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let secrets = rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::new(&dir.path().join("pki"));
        // Connector one: local with user name and password, remote with managed identity.
        let password = "pw-9b1e7c33-never-print";
        let local1 = Mosquitto::start(MosquittoOptions {
            password: Some(("bridge".into(), password.into())),
            ..Default::default()
        });
        let remote1 = Mosquitto::start(MosquittoOptions::default());
        let key_dir = dir.path().join("tokens");
        std::fs::create_dir_all(&key_dir).unwrap();
        let arc_key = "arc-key-5e0c1d-never-print";
        let key = write_file(&key_dir, "c.key", arc_key);
        let identity = IdentityServer::start(IdentityMode::Arc(key), 60 * SECOND).await;
        let peer = AuthProxy::start(remote1.port, Check::Jwt(AUDIENCE.into())).await;
        let login = dir.path().join("secrets/login");
        std::fs::create_dir_all(&login).unwrap();
        write_file(&login, "username", "bridge");
        write_file(&login, "password", password);
        // Connector two: local with a service-account token, remote over TLS with a client
        // certificate.
        let sat_token = "sat-token-77aa0f-never-print";
        let sat = write_file(dir.path(), "sat-token", sat_token);
        let local2 = Mosquitto::start(MosquittoOptions::default());
        let sat_peer = AuthProxy::start(local2.port, Check::SatFile(sat.clone())).await;
        let remote2 = Mosquitto::start(MosquittoOptions {
            tls: Some(pki.server_files()),
            ..Default::default()
        });
        pki.client_secret(&dir.path().join("secrets/cert"), "mqttbridge");
        std::fs::create_dir_all(dir.path().join("configmaps/ca")).unwrap();
        std::fs::copy(&pki.ca, dir.path().join("configmaps/ca/ca.crt")).unwrap();
        let client_key = std::fs::read_to_string(dir.path().join("secrets/cert/client_key.pem"))
            .unwrap();
        let yaml = format!(
            "{}---\n{}",
            connector(
                &local1.endpoint(),
                "    authentication:\n      usernamePassword:\n        secretName: login\n",
                &format!("127.0.0.1:{}", peer.port),
                "    authentication:\n      systemAssignedManagedIdentity:\n        audience: https://eventgrid.azure.net\n",
                "    - {direction: local-to-remote, name: one, source: \"s/#\"}\n",
            ),
            connector(
                &format!("127.0.0.1:{}", sat_peer.port),
                &format!(
                    "    authentication:\n      kubernetes:\n        secretPath: {}\n        serviceAccountTokenName: sat-token\n",
                    dir.path().display()
                ),
                &format!("localhost:{}", remote2.tls_port.unwrap()),
                "",
                "    - {direction: local-to-remote, name: two, source: \"s/#\"}\n",
            )
            .replace("test-bridge", "second-bridge")
            .replace("test-map", "second-map")
            .replace("clientIdPrefix: edge-", "clientIdPrefix: other-")
            .replacen(
                "    tls:\n      tlsEnabled: false\n",
                "    tls:\n      tlsEnabled: true\n      trustedCaCertificateConfigMap: ca\n    authentication:\n      x509:\n        secretName: cert\n",
                1,
            )
        );
        let cfg = load(dir.path(), &yaml);
        let mut o = opts(&identity, &key_dir);
        o.identity.arc = true;
        let b = bridge::start(&cfg, &o).await.unwrap();
        assert!(b.wait_ready(15 * SECOND).await, "{:?}", b.stats.all());
        let at1 = Collector::start(remote1.port, "sec-sub-1", "s/#", false).await;
        let at2 = Collector::start(remote2.port, "sec-sub-2", "s/#", false).await;
        let p1 = Publisher::connect_with_login(local1.port, "sec-pub-1", "bridge", password).await;
        let p2 = Publisher::connect(local2.port, "sec-pub-2").await;
        p1.publish("s/x", 1, false, "one").await;
        p2.publish("s/x", 1, false, "two").await;
        assert_eq!(at1.wait_for(1, 10 * SECOND).await, 1);
        assert_eq!(at2.wait_for(1, 10 * SECOND).await, 1);
        let debug = format!("{cfg:?} {:?}", b.stats.all());
        b.shutdown().await;
        let mut secrets: Vec<String> = vec![
            password.into(),
            arc_key.into(),
            sat_token.into(),
        ];
        secrets.extend(identity.tokens());
        // The key's base64 body, line by line.
        secrets.extend(
            client_key
                .lines()
                .filter(|l| !l.starts_with("-----") && l.len() > 20)
                .map(str::to_string),
        );
        (secrets, debug)
    });
    let (secrets, debug) = secrets;
    let log = String::from_utf8_lossy(&out.0.lock().unwrap()).into_owned();
    assert!(log.contains("TRACE"), "at trace level: {log}");
    assert!(
        log.contains("Sending ConnectSpec") && log.contains("**REDACTED**"),
        "CONNECT with its credentials is logged, redacted: {log}"
    );
    assert!(log.contains("Answering the Arc challenge"), "{log}");
    assert!(secrets.len() >= 6, "{}", secrets.len());
    for s in &secrets {
        assert!(
            !log.contains(s.as_str()),
            "a secret appears in the log: {s}"
        );
        assert!(
            !debug.contains(s.as_str()),
            "a secret appears in Debug output: {s}"
        );
    }
    println!(
        "trace level: {} lines of output, none of the {} secrets in them",
        log.lines().count(),
        secrets.len()
    );
}
