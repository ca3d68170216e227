//! Mutual TLS between daemons (issue 13): a 3-server cluster and an agent on TLS 1.3 with
//! certificates of the cluster CA (`muster tls init`) runs runs through a leader kill and a
//! certificate rotation without losing one; and the port refuses plaintext, a foreign CA,
//! an expired certificate, and callers whose certificate does not give them the method.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use muster_client::{ClientTls, Credentials, Servers};
use muster_core::RunSpec;
use muster_proto::v1;
use muster_testkit::access;
use muster_testkit::agents::{AgentHandle, agent_config};
use muster_testkit::cluster::TestCluster;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tonic::Code;

async fn submit(urls: &str, key: &str) -> String {
    let mut spec = RunSpec::new(format!("echo {key}"));
    spec.compute = "tls-pool".into();
    for _ in 0..100 {
        if let Ok(mut c) = access::clients(urls).await
            && let Ok(r) = c
                .runs
                .submit_run(v1::SubmitRunRequest {
                    spec: Some(spec.clone().into()),
                    idempotency_key: Some(key.into()),
                })
                .await
        {
            return r.into_inner().id;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("run {key} was not acknowledged within 20 s");
}

async fn completed(urls: &str, id: &str) {
    for _ in 0..300 {
        if let Ok(mut c) = access::clients(urls).await
            && let Ok(r) = c
                .runs
                .get_run(v1::GetRunRequest {
                    id: id.into(),
                    stale: false,
                })
                .await
        {
            let state = r.into_inner().state();
            if state == v1::RunState::Completed {
                return;
            }
            assert!(
                !matches!(state, v1::RunState::Failed | v1::RunState::Canceled),
                "{id}: {state:?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("run {id} did not complete within 60 s");
}

/// The certificate a server presents to a fresh TLS connection (as a client that trusts
/// the CA in `ca`).
async fn presented(addr: &str, ca: &Path) -> Vec<u8> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn der_of(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_cluster_keeps_every_run_through_a_leader_kill_and_a_certificate_rotation() {
    let mut cluster = TestCluster::start_tls(3).await.unwrap();
    let tls = cluster.tls_dir().unwrap().to_path_buf();
    let urls = cluster.urls();
    let mut admin = access::clients(&urls).await.unwrap();
    admin
        .compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "tls-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    // The agent's certificate names its node: it needs no join token.
    let agent_dir = muster_cli::tls::issue_agent(&tls, "tls-pool", "tls-node").unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut config = agent_config(
        &urls,
        data.path(),
        "tls-pool",
        "tls-node",
        Arc::new(muster_agent::NoGpus),
    );
    config.servers = Servers::parse(&urls).urls().to_vec();
    config.tls = Some(
        ClientTls::from_ca_file(&agent_dir.join("ca.pem"))
            .unwrap()
            .with_identity_files(&agent_dir.join("cert.pem"), &agent_dir.join("key.pem"))
            .unwrap(),
    );
    let _agent = AgentHandle::start(&urls, config).await.unwrap();
    assert!(
        !data.path().join("credential").exists(),
        "a certified agent keeps no token"
    );

    let mut ids = vec![submit(&urls, "before").await];
    completed(&urls, &ids[0]).await;

    // The leader goes; the other two carry on.
    let leader = cluster.leader().await.unwrap();
    cluster.kill(leader).await.unwrap();
    let rest: Vec<String> = cluster
        .ids()
        .into_iter()
        .filter(|id| *id != leader)
        .map(|id| cluster.url(id))
        .collect();
    let rest = rest.join(",");
    ids.push(submit(&rest, "after-kill").await);
    completed(&rest, &ids[1]).await;

    // Rotation: every running server presents its new certificate to new connections.
    for id in cluster.ids() {
        if id == leader {
            continue;
        }
        let holder = muster_cli::tls::rotate(&tls, id, &[]).unwrap();
        let fresh = der_of(&holder.join("cert.pem"));
        let addr = cluster.url(id).trim_start_matches("http://").to_string();
        let mut seen = Vec::new();
        for _ in 0..50 {
            seen = presented(&addr, &tls.join("ca.pem")).await;
            if seen == fresh {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(seen, fresh, "server {id} presents its rotated certificate");
    }
    // Let the servers remake their connections to each other with the new certificates
    // (checked every 2 s), so what follows crosses them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    ids.push(submit(&rest, "after-rotation").await);
    completed(&rest, &ids[2]).await;

    // The killed server comes back (its old certificate is still valid) and catches up.
    cluster.restart(leader).await.unwrap();
    let all = admin_list(&cluster.url(leader)).await;
    for id in &ids {
        assert!(
            all.iter().any(|r| &r.id == id),
            "{id} on the restarted server"
        );
    }
}

async fn admin_list(url: &str) -> Vec<v1::Run> {
    for _ in 0..100 {
        if let Ok(mut c) = access::clients(url).await
            && let Ok(r) = c.runs.list_runs(v1::ListRunsRequest::default()).await
        {
            return r.into_inner().runs;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("{url} did not answer within 20 s");
}

/// A channel to `url` over TLS trusting `ca`, presenting `identity` (a `muster tls`
/// holder directory) if given.
async fn tls_channel(
    url: &str,
    ca: &Path,
    identity: Option<&Path>,
) -> Result<muster_client::Channel, muster_client::ClientError> {
    let mut tls = ClientTls::from_ca_file(ca).unwrap();
    if let Some(dir) = identity {
        tls = tls
            .with_identity_files(&dir.join("cert.pem"), &dir.join("key.pem"))
            .unwrap();
    }
    Servers::new([url])
        .with_credentials(Credentials::none().with_tls(tls))
        .connect()
        .await
        .map(|(_, c)| c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_foreign_and_expired_certificates_are_refused() {
    let cluster = TestCluster::start_tls(1).await.unwrap();
    let tls = cluster.tls_dir().unwrap().to_path_buf();
    let url = cluster.url(1);
    let ca = tls.join("ca.pem");
    let status = |channel: muster_client::Channel| async move {
        v1::cluster_service_client::ClusterServiceClient::new(channel)
            .status(v1::ClusterStatusRequest::default())
            .await
    };

    // Plaintext to a TLS port: no answer.
    let plain = Servers::new([url.as_str()]).connect().await;
    match plain {
        Err(_) => {}
        Ok((_, channel)) => {
            let answer = status(channel).await;
            assert!(answer.is_err(), "plaintext got {answer:?}");
        }
    }

    // A client that trusts another CA does not trust this server.
    let elsewhere = tempfile::tempdir().unwrap();
    muster_cli::tls::init(elsewhere.path(), &[(1, vec![])], false).unwrap();
    let foreign = tls_channel(&url, &elsewhere.path().join("ca.pem"), None).await;
    match foreign {
        Err(_) => {}
        Ok(channel) => assert!(status(channel).await.is_err(), "a foreign CA was trusted"),
    }

    // A server certificate of another CA is refused in the handshake.
    let forged = elsewhere.path().join("server-1");
    match tls_channel(&url, &ca, Some(&forged)).await {
        Err(_) => {}
        Ok(channel) => {
            let answer = status(channel).await;
            assert!(answer.is_err(), "a foreign CA's certificate got {answer:?}");
        }
    }

    // An expired certificate of the right CA is refused too.
    let real_ca = muster_cli::tls::load_ca(&tls).unwrap();
    let (cert, key) = real_ca
        .issue(
            "muster://server/2",
            &[],
            Duration::from_secs(3600),
            Duration::from_secs(7200),
        )
        .unwrap();
    let expired = tempfile::tempdir().unwrap();
    std::fs::write(expired.path().join("cert.pem"), cert).unwrap();
    std::fs::write(expired.path().join("key.pem"), key).unwrap();
    match tls_channel(&url, &ca, Some(expired.path())).await {
        Err(_) => {}
        Ok(channel) => {
            let answer = status(channel).await;
            assert!(answer.is_err(), "an expired certificate got {answer:?}");
        }
    }

    // A valid server certificate is a server: it may ask for status, but not speak Raft
    // as another server, nor submit runs (that is a user's).
    let harness = tls.join("server-1000000");
    let channel = tls_channel(&url, &ca, Some(&harness)).await.unwrap();
    assert!(status(channel.clone()).await.is_ok());
    let raft = v1::cluster_service_client::ClusterServiceClient::new(channel.clone())
        .raft(v1::RaftBatch {
            from: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(raft.code(), Code::PermissionDenied, "{raft:?}");
    let submit = v1::run_service_client::RunServiceClient::new(channel)
        .submit_run(v1::SubmitRunRequest {
            spec: Some(RunSpec::new("true").into()),
            idempotency_key: None,
        })
        .await
        .unwrap_err();
    assert_eq!(submit.code(), Code::PermissionDenied, "{submit:?}");

    // An agent certificate is an agent: no user API.
    let agent = muster_cli::tls::issue_agent(&tls, "local", "n1").unwrap();
    let channel = tls_channel(&url, &ca, Some(&agent)).await.unwrap();
    let list = v1::run_service_client::RunServiceClient::new(channel)
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(list.code(), Code::PermissionDenied, "{list:?}");

    // A user's token over TLS works as over plaintext.
    let mut admin = access::clients(&url).await.unwrap();
    let me = admin
        .access
        .who_am_i(v1::WhoAmIRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(me.principal, "user:admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_joins_with_a_token_and_the_ca_fingerprint_and_then_has_a_certificate() {
    let cluster = TestCluster::start_tls(1).await.unwrap();
    let tls = cluster.tls_dir().unwrap().to_path_buf();
    let url = cluster.urls();
    let mut admin = access::clients(&url).await.unwrap();
    admin
        .compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "tls-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let pin = muster_cli::tls::fingerprint(&tls).unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = |join: Option<String>, pin: Option<String>| {
        let mut c = agent_config(
            &url,
            data.path(),
            "tls-pool",
            "pinned",
            Arc::new(muster_agent::NoGpus),
        );
        c.join_token = join;
        c.ca_fingerprint = pin;
        c
    };

    // A wrong fingerprint: the agent trusts nothing and says so.
    let wrong = format!("SHA256:{}", "0".repeat(64));
    let join = access::join_token(&url, "tls-pool").await.unwrap();
    let refused = tokio::time::timeout(
        Duration::from_secs(30),
        muster_agent::run(
            config(Some(join.clone()), Some(wrong)),
            std::future::pending::<()>(),
        ),
    )
    .await
    .expect("it stops at once")
    .unwrap_err()
    .to_string();
    assert!(
        refused.contains("does not match --ca-fingerprint"),
        "{refused}"
    );
    assert!(!data.path().join("tls/ca.pem").exists(), "nothing is kept");

    // The right one: the CA is kept, the servers sign the node's certificate.
    let agent = AgentHandle::start(&url, config(Some(join), Some(pin.clone())))
        .await
        .unwrap();
    for f in ["tls/ca.pem", "tls/cert.pem", "tls/key.pem", "credential"] {
        assert!(data.path().join(f).exists(), "{f}");
    }
    assert_eq!(
        muster_client::pki::fingerprint(
            &std::fs::read_to_string(data.path().join("tls/ca.pem")).unwrap()
        )
        .unwrap(),
        pin
    );
    agent.stop().await.unwrap();
    // Restarted with neither a join token nor a fingerprint, it is known by its certificate.
    let again = AgentHandle::start(&url, config(None, None)).await.unwrap();
    let run = {
        let mut spec = RunSpec::new("echo pinned");
        spec.compute = "tls-pool".into();
        admin
            .runs
            .submit_run(v1::SubmitRunRequest {
                spec: Some(spec.into()),
                idempotency_key: None,
            })
            .await
            .unwrap()
            .into_inner()
            .id
    };
    completed(&url, &run).await;
    again.stop().await.unwrap();
}
