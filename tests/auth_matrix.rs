//! The authorization matrix (DESIGN.md section 14, issue 13): every method of every service
//! the server registers — read from the descriptor sets, so a new RPC is in the matrix the
//! moment it exists — called by every kind of caller, each answer checked against the
//! policy written out below, independently of the server's table. A method without an
//! expectation here fails the test; a method the server's table lacks is refused to
//! everyone, which fails it too.
//!
//! Callers: nobody, a malformed token, a revoked token, an expired token, a user without
//! any role, a reader, a user, an operator, the cluster admin, an agent (its credential
//! from a real join), another server (the cluster key), and a server with a wrong key; and
//! on a TLS port, an agent's and a server's certificates, a client with neither certificate
//! nor token, and tokens over TLS.
//! Then the workspace rules: another workspace's run is NOT_FOUND and absent from lists,
//! and refusals land in the replicated audit log.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use muster_client::{Credentials, Servers};
use muster_proto::v1;
use muster_testkit::access;
use muster_testkit::cluster::TestCluster;
use prost::Message;
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Code, Status};

/// Raw bytes in, raw bytes out: any method can be called with an empty message.
#[derive(Debug, Clone, Default)]
struct RawCodec;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = Bytes;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }
    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl Encoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RawCodec {
    type Item = Bytes;
    type Error = Status;
    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Bytes>, Status> {
        Ok(Some(src.copy_to_bytes(src.remaining())))
    }
}

/// Every method path of every service the server registers.
fn every_method() -> Vec<String> {
    let mut out = Vec::new();
    for set in [
        muster_proto::FILE_DESCRIPTOR_SET,
        tonic_health::pb::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
        tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
    ] {
        let fds = prost_types::FileDescriptorSet::decode(set).expect("descriptor set");
        for file in fds.file {
            for service in &file.service {
                for method in &service.method {
                    out.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// Who calls.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Who {
    Nobody,
    Malformed,
    Revoked,
    Expired,
    NoRole,
    Reader,
    User,
    Operator,
    Admin,
    Agent,
    Server,
    WrongKey,
}

use Who::*;

const EVERYONE: &[Who] = &[
    Nobody, Malformed, Revoked, Expired, NoRole, Reader, User, Operator, Admin, Agent, Server,
    WrongKey,
];

/// The policy: who may call each method. Written out here on purpose, not read from the
/// server, so the test checks the table instead of repeating it.
fn allowed(method: &str) -> Option<&'static [Who]> {
    const PUBLIC: &[Who] = &[Nobody, NoRole, Reader, User, Operator, Admin, Agent, Server];
    const READERS: &[Who] = &[Reader, User, Operator, Admin];
    const READERS_SERVERS: &[Who] = &[Reader, User, Operator, Admin, Server];
    const USERS: &[Who] = &[User, Operator, Admin];
    const OPERATORS: &[Who] = &[Operator, Admin];
    const ADMINS: &[Who] = &[Admin];
    const ANY_USER: &[Who] = &[NoRole, Reader, User, Operator, Admin];
    const AGENTS: &[Who] = &[Agent];
    const SERVERS: &[Who] = &[Server];
    const BLOB_WRITERS: &[Who] = &[User, Operator, Admin, Agent, Server];
    const BLOB_READERS: &[Who] = &[Reader, User, Operator, Admin, Agent, Server];
    let (service, name) = method.strip_prefix('/')?.split_once('/')?;
    Some(match (service, name) {
        ("grpc.health.v1.Health", _) => PUBLIC,
        ("grpc.reflection.v1.ServerReflection" | "grpc.reflection.v1alpha.ServerReflection", _) => {
            PUBLIC
        }
        ("muster.v1.RunService", "SubmitRun" | "CancelRun") => USERS,
        ("muster.v1.RunService", "GetRun" | "ListRuns" | "WaitRun") => READERS,
        ("muster.v1.RunService", "StreamLogs") => READERS_SERVERS,
        (
            "muster.v1.ComputeService",
            "CreateCompute" | "UpdateCompute" | "SetComputeStopped" | "DeleteCompute"
            | "SetNodeState",
        ) => OPERATORS,
        (
            "muster.v1.ComputeService",
            "ListComputes" | "GetCompute" | "ListNodes" | "GetComputeStatus",
        ) => READERS,
        ("muster.v1.SweepService", "SubmitSweep" | "CancelSweep") => USERS,
        ("muster.v1.SweepService", "GetSweep" | "ListSweeps") => READERS,
        ("muster.v1.PipelineService", "SubmitPipeline" | "CancelPipeline") => USERS,
        ("muster.v1.PipelineService", "GetPipeline" | "ListPipelines") => READERS,
        ("muster.v1.DataService", "CreateData") => USERS,
        ("muster.v1.DataService", "GetData" | "ListData" | "ListDatastores") => READERS,
        ("muster.v1.DataService", "CreateDatastore") => OPERATORS,
        ("muster.v1.ComponentService", "CreateComponent") => USERS,
        ("muster.v1.ComponentService", "GetComponent" | "ListComponents") => READERS,
        ("muster.v1.MetricsService", _) => READERS_SERVERS,
        ("muster.v1.BlobService", "MissingBlobs" | "PutBlob") => BLOB_WRITERS,
        ("muster.v1.BlobService", "GetBlob") => BLOB_READERS,
        ("muster.v1.AgentService", "Join") => PUBLIC,
        ("muster.v1.AgentService", _) => AGENTS,
        ("muster.v1.ClusterService", "Status") => READERS_SERVERS,
        (
            "muster.v1.ClusterService",
            "AddServer" | "RemoveServer" | "TransferLeader" | "Backup",
        ) => ADMINS,
        ("muster.v1.ClusterService", "Raft" | "Forward" | "ReadIndex" | "SecretKey") => SERVERS,
        (
            "muster.v1.AccessService",
            "WhoAmI" | "CreateToken" | "ListTokens" | "RevokeToken" | "ListWorkspaces"
            | "ListGrants",
        ) => ANY_USER,
        ("muster.v1.AccessService", "GrantRole" | "RevokeRole") => ADMINS,
        ("muster.v1.AccessService", "SetServerlessCompute") => OPERATORS,
        ("muster.v1.AccessService", "CreateWorkspace" | "DeleteWorkspace" | "ListAudit") => ADMINS,
        ("muster.v1.SecretService", "SetSecret" | "DeleteSecret") => OPERATORS,
        ("muster.v1.SecretService", "ListSecrets") => READERS,
        _ => return None,
    })
}

/// Calls `method` with one empty message as `who`; `Err(code)` when the authorization
/// layer refused it (the answer carries `muster-denied`), `Ok(())` when a handler answered
/// (whatever it answered: an empty message is rarely valid, but it got past the door).
async fn call(url: &str, credentials: &Credentials, method: &str) -> Result<(), Code> {
    let (_, channel) = Servers::new([url])
        .with_credentials(credentials.clone())
        .connect()
        .await
        .expect("connect");
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.expect("ready");
    let path = method.parse().expect("a path");
    let request = tonic::Request::new(tokio_stream::iter([Bytes::new()]));
    let answer = tokio::time::timeout(
        Duration::from_secs(10),
        grpc.streaming(request, path, RawCodec),
    )
    .await
    .unwrap_or_else(|_| panic!("{method} answered within 10 s"));
    match answer {
        Ok(_) => Ok(()),
        Err(status) if status.metadata().contains_key("muster-denied") => Err(status.code()),
        Err(status) => {
            assert!(
                !matches!(status.code(), Code::Unauthenticated),
                "{method}: a handler answered UNAUTHENTICATED: {status:?}"
            );
            Ok(())
        }
    }
}

async fn identities(cluster: &TestCluster) -> BTreeMap<Who, Credentials> {
    let url = cluster.urls();
    let mut admin = access::clients(&url).await.unwrap();
    let mut ids = BTreeMap::new();
    ids.insert(Nobody, Credentials::none());
    ids.insert(Malformed, Credentials::bearer("mst_not-a-token").unwrap());
    ids.insert(Admin, access::admin(&url));
    for (who, name, role) in [
        (Reader, "rita", Some("reader")),
        (User, "ursula", Some("user")),
        (Operator, "otto", Some("operator")),
        (NoRole, "nora", None),
    ] {
        let token = match role {
            Some(role) => access::user_token(&url, name, role, Some("default"))
                .await
                .unwrap(),
            None => {
                admin
                    .access
                    .create_token(v1::CreateTokenRequest {
                        user: name.into(),
                        ..Default::default()
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .token
            }
        };
        ids.insert(who, Credentials::bearer(&token).unwrap());
    }
    // A revoked token, and one that has expired.
    let revoked = admin
        .access
        .create_token(v1::CreateTokenRequest {
            name: "to revoke".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    admin
        .access
        .revoke_token(v1::RevokeTokenRequest {
            id: revoked.info.unwrap().id,
        })
        .await
        .unwrap();
    ids.insert(Revoked, Credentials::bearer(&revoked.token).unwrap());
    let expiring = admin
        .access
        .create_token(v1::CreateTokenRequest {
            name: "short-lived".into(),
            expires_in_s: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    ids.insert(Expired, Credentials::bearer(&expiring.token).unwrap());
    // An agent: a join token traded for a credential, as a real agent does.
    admin
        .compute
        .create_compute(v1::CreateComputeRequest {
            compute: Some(v1::ComputeTarget {
                name: "matrix-pool".into(),
                r#type: "attached".into(),
                ..Default::default()
            }),
        })
        .await
        .unwrap();
    let join = access::join_token(&url, "matrix-pool").await.unwrap();
    let (_, anonymous) = Servers::new([cluster.url(1)]).connect().await.unwrap();
    let credential = v1::agent_service_client::AgentServiceClient::new(anonymous)
        .join(v1::JoinRequest {
            join_token: join.clone(),
            node_name: "matrix-node".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .credential;
    ids.insert(Agent, Credentials::bearer(&credential).unwrap());
    ids.insert(Server, Credentials::server(2, cluster.key()).unwrap());
    ids.insert(
        WrongKey,
        Credentials::server(2, "not-the-cluster-key-but-long-enough-to-look-like-one").unwrap(),
    );
    // Let the short-lived token expire.
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    ids
}

/// Calls every method as each of `callers` (credentials in `ids`) and fails listing every
/// answer that differs from the policy.
async fn assert_matrix(url: &str, ids: &BTreeMap<Who, Credentials>, callers: &[Who]) {
    let methods = every_method();
    assert!(
        methods.len() > 40,
        "the descriptor sets list the services: {methods:?}"
    );
    let mut wrong = Vec::new();
    for method in &methods {
        let Some(expected) = allowed(method) else {
            wrong.push(format!(
                "{method}: no expectation in this test; add its rule to grpc/auth.rs and here"
            ));
            continue;
        };
        for who in callers {
            let got = call(url, &ids[who], method).await;
            let should = expected.contains(who);
            match (&got, should) {
                (Ok(()), true) => {}
                (Err(code), false) => {
                    // Nobody and bad credentials are unauthenticated; known callers without
                    // the right are denied.
                    let want = match who {
                        Nobody | Malformed | Revoked | Expired | WrongKey => Code::Unauthenticated,
                        _ => Code::PermissionDenied,
                    };
                    if *code != want {
                        wrong.push(format!(
                            "{method} as {who:?}: refused with {code:?}, expected {want:?}"
                        ));
                    }
                }
                (Ok(()), false) => {
                    wrong.push(format!("{method} as {who:?}: let in, must be refused"))
                }
                (Err(code), true) => wrong.push(format!(
                    "{method} as {who:?}: refused with {code:?}, must be let in"
                )),
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} wrong answers:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_method_admits_exactly_the_callers_its_rule_names() {
    let cluster = TestCluster::start(1).await.unwrap();
    let ids = identities(&cluster).await;
    assert_matrix(&cluster.url(1), &ids, EVERYONE).await;
}

/// The same matrix on a TLS port, where agents and servers are known by their
/// certificates: an agent certificate gets exactly an agent's methods, a server
/// certificate a server's, a client without a certificate or token nothing, and tokens work
/// as over plaintext.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_tls_certificates_get_exactly_their_roles_methods() {
    let cluster = TestCluster::start_tls(1).await.unwrap();
    let url = cluster.url(1);
    let tls = cluster.tls_dir().unwrap().to_path_buf();
    let ca = tls.join("ca.pem");
    let trust = || muster_client::ClientTls::from_ca_file(&ca).unwrap();
    let holder = |dir: &std::path::Path| {
        Credentials::none().with_tls(
            trust()
                .with_identity_files(&dir.join("cert.pem"), &dir.join("key.pem"))
                .unwrap(),
        )
    };
    let agent = muster_cli::tls::issue_agent(&tls, "local", "matrix-node").unwrap();
    let reader = access::user_token(&url, "rita", "reader", Some("default"))
        .await
        .unwrap();
    let ids = BTreeMap::from([
        (Nobody, Credentials::none().with_tls(trust())),
        (Admin, access::admin(&url)),
        (
            Reader,
            access::with_tls(&url, Credentials::bearer(&reader).unwrap()),
        ),
        (Agent, holder(&agent)),
        (Server, holder(&tls.join("server-1000000"))),
    ]);
    assert_matrix(&url, &ids, &[Nobody, Reader, Admin, Agent, Server]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_workspace_is_invisible_and_refusals_are_audited() {
    let cluster = TestCluster::start(1).await.unwrap();
    let url = cluster.urls();
    let mut admin = access::clients(&url).await.unwrap();
    for name in ["vision", "nlp"] {
        admin
            .access
            .create_workspace(v1::CreateWorkspaceRequest { name: name.into() })
            .await
            .unwrap();
        admin
            .compute
            .create_compute(v1::CreateComputeRequest {
                compute: Some(v1::ComputeTarget {
                    name: format!("{name}-pool"),
                    r#type: "attached".into(),
                    workspace: name.into(),
                    ..Default::default()
                }),
            })
            .await
            .unwrap();
    }
    let vera = access::user_token(&url, "vera", "user", Some("vision"))
        .await
        .unwrap();
    let nils = access::user_token(&url, "nils", "user", Some("nlp"))
        .await
        .unwrap();
    let mut vera = muster_client::connect(&url, Credentials::bearer(&vera).unwrap())
        .await
        .unwrap();
    let mut nils = muster_client::connect(&url, Credentials::bearer(&nils).unwrap())
        .await
        .unwrap();
    let spec = |compute: &str, workspace: &str| v1::RunSpec {
        command: "true".into(),
        compute: compute.into(),
        experiment: "e".into(),
        instance_count: 1,
        max_attempts: 1,
        workspace: workspace.into(),
        ..Default::default()
    };
    let run = vera
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("vision-pool", "vision")),
            idempotency_key: Some("k1".into()),
        })
        .await
        .unwrap()
        .into_inner();
    // Nils sees nothing of it: not by id, not in lists, not its compute target; he cannot
    // cancel it, nor submit into vision, nor use vision's compute from nlp.
    let get = nils
        .runs
        .get_run(v1::GetRunRequest {
            id: run.id.clone(),
            stale: false,
        })
        .await;
    assert_eq!(get.unwrap_err().code(), Code::NotFound);
    let cancel = nils
        .runs
        .cancel_run(v1::CancelRunRequest {
            id: run.id.clone(),
            reason: None,
        })
        .await;
    assert_eq!(cancel.unwrap_err().code(), Code::NotFound);
    let listed = nils
        .runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert!(listed.iter().all(|r| r.id != run.id), "{listed:?}");
    let computes = nils
        .compute
        .list_computes(v1::ListComputesRequest::default())
        .await
        .unwrap()
        .into_inner()
        .computes;
    assert_eq!(
        computes.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
        vec!["nlp-pool"]
    );
    let into_vision = nils
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("vision-pool", "vision")),
            idempotency_key: None,
        })
        .await;
    assert_eq!(into_vision.unwrap_err().code(), Code::NotFound);
    let cross = nils
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("vision-pool", "nlp")),
            idempotency_key: None,
        })
        .await;
    assert_eq!(
        cross.unwrap_err().code(),
        Code::NotFound,
        "vision's compute is unknown in nlp"
    );
    // An operator of nlp chooses nlp's serverless compute, among nlp's own targets only,
    // and cannot touch vision's; nlp's serverless jobs then land on nlp-pool.
    let olga = access::user_token(&url, "olga", "operator", Some("nlp"))
        .await
        .unwrap();
    let mut olga = muster_client::connect(&url, Credentials::bearer(&olga).unwrap())
        .await
        .unwrap();
    let set = |workspace: &str, compute: &str| v1::SetServerlessComputeRequest {
        workspace: workspace.into(),
        compute: Some(compute.into()),
    };
    let theirs = olga
        .access
        .set_serverless_compute(set("vision", "vision-pool"))
        .await;
    assert!(
        matches!(
            theirs.unwrap_err().code(),
            Code::NotFound | Code::PermissionDenied
        ),
        "another workspace's setting"
    );
    let borrowed = olga
        .access
        .set_serverless_compute(set("nlp", "vision-pool"))
        .await;
    assert_eq!(borrowed.unwrap_err().code(), Code::FailedPrecondition);
    let denied = nils
        .access
        .set_serverless_compute(set("nlp", "nlp-pool"))
        .await;
    assert_eq!(
        denied.unwrap_err().code(),
        Code::PermissionDenied,
        "a user is no operator"
    );
    olga.access
        .set_serverless_compute(set("nlp", "nlp-pool"))
        .await
        .unwrap();
    // Secrets: nlp's operator sets nlp's, not vision's; a user of nlp lists the names but
    // sets none; vision sees none of nlp's, and a vision run cannot name one.
    let secret = |workspace: &str| v1::SetSecretRequest {
        workspace: workspace.into(),
        name: "NLP_KEY".into(),
        value: b"nlp-value".to_vec(),
    };
    olga.secrets.set_secret(secret("nlp")).await.unwrap();
    assert_eq!(
        olga.secrets
            .set_secret(secret("vision"))
            .await
            .unwrap_err()
            .code(),
        Code::NotFound,
        "another workspace's secrets"
    );
    assert_eq!(
        nils.secrets
            .set_secret(secret("nlp"))
            .await
            .unwrap_err()
            .code(),
        Code::PermissionDenied,
        "a user sets no secret"
    );
    let names = |r: v1::ListSecretsResponse| -> Vec<String> {
        r.secrets.into_iter().map(|s| s.name).collect()
    };
    let listed = nils
        .secrets
        .list_secrets(v1::ListSecretsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(!format!("{listed:?}").contains("nlp-value"));
    assert_eq!(names(listed), vec!["NLP_KEY".to_string()]);
    let vera_sees = vera
        .secrets
        .list_secrets(v1::ListSecretsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(names(vera_sees).is_empty(), "vision sees none of nlp's");
    let asked = vera
        .secrets
        .list_secrets(v1::ListSecretsRequest {
            workspace: "nlp".into(),
        })
        .await;
    assert_eq!(asked.unwrap_err().code(), Code::NotFound);
    let deleted = vera
        .secrets
        .delete_secret(v1::DeleteSecretRequest {
            workspace: "nlp".into(),
            name: "NLP_KEY".into(),
        })
        .await;
    // vera is no operator anywhere: the door refuses her before the workspace matters.
    assert!(matches!(
        deleted.unwrap_err().code(),
        Code::NotFound | Code::PermissionDenied
    ));
    let deleted = olga
        .secrets
        .delete_secret(v1::DeleteSecretRequest {
            workspace: "vision".into(),
            name: "NLP_KEY".into(),
        })
        .await;
    assert_eq!(deleted.unwrap_err().code(), Code::NotFound, "not in vision");
    let mut borrowing = spec("vision-pool", "vision");
    borrowing.secrets = vec![v1::SecretRef {
        name: "NLP_KEY".into(),
        env: None,
    }];
    let refused = vera
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(borrowing),
            idempotency_key: None,
        })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused:?}");
    assert!(refused.message().contains("NLP_KEY"), "{refused:?}");
    let serverless = nils
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("serverless", "nlp")),
            idempotency_key: None,
        })
        .await
        .unwrap()
        .into_inner()
        .spec
        .unwrap();
    assert_eq!(
        (
            serverless.compute.as_str(),
            serverless.requested_compute.as_deref()
        ),
        ("nlp-pool", Some("serverless"))
    );
    // The same idempotency key in another workspace is another run.
    let own = nils
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("nlp-pool", "nlp")),
            idempotency_key: Some("k1".into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_ne!(own.id, run.id);
    // Vera still has hers, and the cluster admin sees both.
    assert_eq!(
        vera.runs
            .get_run(v1::GetRunRequest {
                id: run.id.clone(),
                stale: false
            })
            .await
            .unwrap()
            .into_inner()
            .id,
        run.id
    );
    let all = admin
        .runs
        .list_runs(v1::ListRunsRequest::default())
        .await
        .unwrap()
        .into_inner()
        .runs;
    assert_eq!(all.len(), 3, "vera's, nils's serverless one and his own");
    // Blobs are addressed by content, but a user reads only those of runs they may see: a
    // digest learnt elsewhere opens nothing.
    let file = vera
        .blobs
        .upload_bytes(b"print('vision')\n".to_vec())
        .await
        .unwrap();
    let listing = format!(r#"{{"files":[{{"path":"train.py","sha256":"{file}","size":16}}]}}"#);
    let manifest = vera
        .blobs
        .upload_bytes(listing.clone().into_bytes())
        .await
        .unwrap();
    let stray = vera
        .blobs
        .upload_bytes(b"no run refers to this".to_vec())
        .await
        .unwrap();
    vera.runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(v1::RunSpec {
                code: Some(v1::CodeRef {
                    manifest: manifest.clone(),
                    ..Default::default()
                }),
                ..spec("vision-pool", "vision")
            }),
            idempotency_key: Some("with-code".into()),
        })
        .await
        .unwrap();
    // Vera reads her run's snapshot and its files; a cluster-wide admin reads any blob.
    let got = vera.blobs.download_bytes(&manifest).await.unwrap();
    assert_eq!(got, listing.as_bytes());
    assert_eq!(
        vera.blobs.download_bytes(&file).await.unwrap(),
        b"print('vision')\n"
    );
    assert!(admin.blobs.download_bytes(&stray).await.is_ok());
    // Nils reads none of them, and no user reads a blob no run of theirs refers to.
    for (who, sha) in [("nils", &manifest), ("nils", &file), ("vera", &stray)] {
        let client = if who == "nils" { &mut nils } else { &mut vera };
        match client.blobs.download_bytes(sha).await.unwrap_err() {
            muster_client::ClientError::Blob { status, .. } => {
                assert_eq!(status.code(), Code::NotFound, "{who}: {status:?}")
            }
            other => panic!("{who}: {other:?}"),
        }
    }
    // A reader of nlp may not submit there.
    let reader = access::user_token(&url, "rolf", "reader", Some("nlp"))
        .await
        .unwrap();
    let mut reader = muster_client::connect(&url, Credentials::bearer(&reader).unwrap())
        .await
        .unwrap();
    let submit = reader
        .runs
        .submit_run(v1::SubmitRunRequest {
            spec: Some(spec("nlp-pool", "nlp")),
            idempotency_key: None,
        })
        .await
        .unwrap_err();
    assert_eq!(submit.code(), Code::PermissionDenied, "{submit:?}");
    assert!(submit.message().contains("needs user"), "{submit:?}");
    // Refusals are in the replicated audit log within a few seconds, without any secret.
    let mut audited = false;
    for _ in 0..50 {
        let log = admin
            .access
            .list_audit(v1::ListAuditRequest { limit: 1000 })
            .await
            .unwrap()
            .into_inner();
        if log
            .events
            .iter()
            .any(|e| e.action == "denied" && e.detail.contains("user:rolf"))
        {
            assert!(
                log.events.iter().all(|e| !e.detail.contains("mst_")),
                "{log:?}"
            );
            assert!(
                log.events
                    .iter()
                    .any(|e| e.action == "role.grant" && e.detail.contains("vera"))
            );
            audited = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(audited, "the refusal was recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_may_have_only_so_many_uploads_open_at_once() {
    let dev = muster_testkit::DevCluster::start_with(|c| c.server.max_uploads_per_caller = 2)
        .await
        .unwrap();
    let url = dev.url();
    let sha = muster_client::hash_bytes(b"hello");
    // Two uploads that send their first chunk and then hold the stream open.
    let mut held = Vec::new();
    for _ in 0..2 {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(v1::BlobChunk {
            sha256: sha.clone(),
            data: b"hel".to_vec(),
        })
        .await
        .unwrap();
        let mut blobs =
            v1::blob_service_client::BlobServiceClient::new(access::channel(&url).await.unwrap());
        let call = tokio::spawn(async move {
            blobs
                .put_blob(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await
        });
        held.push((tx, call));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut blobs =
        v1::blob_service_client::BlobServiceClient::new(access::channel(&url).await.unwrap());
    let third = blobs
        .put_blob(tokio_stream::iter([v1::BlobChunk {
            sha256: sha.clone(),
            data: b"hello".to_vec(),
        }]))
        .await
        .unwrap_err();
    assert_eq!(third.code(), Code::ResourceExhausted, "{third:?}");
    assert!(
        third.message().contains("already has 2 uploads open"),
        "{third:?}"
    );
    // Another caller (the local agent's credential would do; here a second user) is not
    // affected, and once one upload ends the admin may start another.
    let other = access::user_token(&url, "olga", "user", Some("default"))
        .await
        .unwrap();
    let (_, channel) = Servers::new([url.as_str()])
        .with_credentials(Credentials::bearer(&other).unwrap())
        .connect()
        .await
        .unwrap();
    let stored = v1::blob_service_client::BlobServiceClient::new(channel)
        .put_blob(tokio_stream::iter([v1::BlobChunk {
            sha256: sha.clone(),
            data: b"hello".to_vec(),
        }]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stored.size, 5);
    let (tx, call) = held.pop().unwrap();
    tx.send(v1::BlobChunk {
        sha256: String::new(),
        data: b"lo".to_vec(),
    })
    .await
    .unwrap();
    drop(tx);
    assert_eq!(call.await.unwrap().unwrap().into_inner().size, 5);
    let again = blobs
        .put_blob(tokio_stream::iter([v1::BlobChunk {
            sha256: sha,
            data: b"hello".to_vec(),
        }]))
        .await;
    assert!(again.is_ok(), "{again:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_a_used_or_expired_join_token_is_told_what_to_do() {
    let dev = muster_testkit::DevCluster::start().await.unwrap();
    let url = dev.url();
    let join = access::join_token(&url, "local").await.unwrap();
    let run_agent = |name: &str, join: &str| {
        let data = tempfile::tempdir().unwrap();
        let mut config = muster_testkit::agents::agent_config(
            &url,
            data.path(),
            "local",
            name,
            std::sync::Arc::new(muster_agent::NoGpus),
        );
        config.join_token = Some(join.to_string());
        async move {
            let _keep = data;
            tokio::time::timeout(
                Duration::from_secs(60),
                muster_agent::run(config, std::future::pending::<()>()),
            )
            .await
        }
    };
    // The first agent joins (and keeps running: the timeout ends it).
    let first = tokio::spawn(run_agent("first", &join));
    muster_testkit::agents::wait_for_node(&url, "first")
        .await
        .unwrap();
    // A second agent with the same token is refused, and says to make a new one.
    let second = run_agent("second", &join).await.expect("it stops at once");
    let err = second.unwrap_err().to_string();
    assert!(err.contains("already used (by node first)"), "{err}");
    assert!(err.contains("muster token create --join"), "{err}");
    // So is one whose token expired.
    let mut admin = dev.clients().await.unwrap();
    let short = admin
        .access
        .create_token(v1::CreateTokenRequest {
            join: true,
            compute: "local".into(),
            expires_in_s: 1,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .token;
    tokio::time::sleep(Duration::from_millis(1_200)).await;
    let late = run_agent("late", &short).await.expect("it stops at once");
    let err = late.unwrap_err().to_string();
    assert!(err.contains("the join token expired"), "{err}");
    // And one whose token was revoked (`muster token revoke ID`) before it was used; a
    // used one cannot be revoked (its node's credential is what to remove).
    let unused = admin
        .access
        .create_token(v1::CreateTokenRequest {
            join: true,
            compute: "local".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = unused.info.expect("its info").id;
    admin
        .access
        .revoke_token(v1::RevokeTokenRequest { id: id.clone() })
        .await
        .expect("a join token is revoked");
    let revoked = run_agent("revoked", &unused.token)
        .await
        .expect("it stops at once");
    assert!(revoked.is_err(), "{revoked:?}");
    let used_id = join.split('_').nth(1).unwrap().to_string();
    let used = admin
        .access
        .revoke_token(v1::RevokeTokenRequest { id: used_id })
        .await
        .unwrap_err();
    assert!(
        used.message().contains("used already, by node first"),
        "{used:?}"
    );
    first.abort();
}
