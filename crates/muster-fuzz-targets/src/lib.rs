//! # muster-fuzz-targets: what each fuzz target checks
//!
//! One function per cargo-fuzz target in `fuzz/fuzz_targets/` (each target is a one-line
//! `fuzz_target!` calling its function here), and [`TARGETS`], which the corpus replay test
//! (`tests/corpus.rs`) walks to feed every file under `fuzz/corpus/<target>/` to the same
//! function under plain `cargo test`. A target and its regression test therefore cannot drift.
//!
//! Every function takes arbitrary bytes, must not panic, and asserts what must hold of what
//! the parser accepted: it validates, and it survives the encodings muster stores it in (the
//! Raft log's JSON, the wire's protobuf) unchanged.

use muster_core::spec::RunSpec;
use muster_proto::v1;

/// A target's body: arbitrary bytes in; panics on a property that does not hold.
pub type Body = fn(&[u8]);

/// Every target: its name (the file `fuzz/fuzz_targets/<name>.rs` and the corpus folder
/// `fuzz/corpus/<name>/`) and its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("job_yaml", job_yaml),
    ("sweep_yaml", sweep_yaml),
    ("pipeline_yaml", pipeline_yaml),
    ("compute_yaml", compute_yaml),
    ("runconfig_yaml", runconfig_yaml),
    ("ignore_file", ignore_file),
    ("proto_decode", proto_decode),
    ("proto_convert", proto_convert),
    ("raft_message", raft_message),
    ("token", token),
    ("safe_path", safe_path),
];

/// The experiment a parsed job falls back to when it names none.
const EXPERIMENT: &str = "fuzz";

fn text(data: &[u8]) -> Option<&str> {
    std::str::from_utf8(data).ok()
}

/// A run spec muster accepted: it validates, and the Raft log's JSON and the wire's
/// protobuf both carry it unchanged.
fn check_run_spec(spec: &RunSpec) {
    if let Err(e) = spec.validate() {
        panic!("an accepted run spec does not validate: {e}\n{spec:#?}");
    }
    let json = serde_json::to_string(spec).expect("a run spec serializes");
    let back: RunSpec = serde_json::from_str(&json).expect("a run spec's JSON parses back");
    assert_eq!(&back, spec, "the JSON round trip changed the run spec");
    let wire = v1::RunSpec::from(spec.clone());
    let bytes = prost::Message::encode_to_vec(&wire);
    let decoded = <v1::RunSpec as prost::Message>::decode(bytes.as_slice())
        .expect("an encoded run spec decodes");
    let back = muster_proto::spec_from_wire(decoded).expect("a wire run spec converts back");
    assert_eq!(&back, spec, "the protobuf round trip changed the run spec");
}

/// `muster run submit -f`: the v2 command job YAML, normalized into a run spec.
pub fn job_yaml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(job) = muster_core::spec::parse_job_yaml(text) else {
        return;
    };
    if let Ok(spec) = job.into_run_spec(EXPERIMENT) {
        check_run_spec(&spec);
    }
}

/// `muster sweep submit -f` (v2 sweep YAML) and `--hyperdrive-config` (v1 hdconfig YAML).
pub fn sweep_yaml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let sweeps = [
        muster_core::sweep::parse_sweep_yaml(text, EXPERIMENT),
        muster_core::sweep::parse_hyperdrive_config(text, RunSpec::new("python train.py")),
    ];
    for sweep in sweeps.into_iter().flatten() {
        if let Err(e) = sweep.validate() {
            panic!("an accepted sweep does not validate: {e}\n{sweep:#?}");
        }
        // The trial is a template (`${{search_space.x}}` left in); the first trial a seeded
        // random sampler starts is a run that must validate.
        let params = muster_core::sweep::sampler::sample_random(&sweep.search_space, 7, 0);
        match sweep.trial_run(&params) {
            Ok(trial) => check_run_spec(&trial),
            Err(e) => panic!("an accepted sweep's first trial is refused: {e}\n{sweep:#?}"),
        }
        let back = muster_proto::sweep_spec_from_wire(muster_proto::sweep_spec_to_wire(&sweep))
            .expect("a wire sweep spec converts back");
        assert_eq!(back, sweep, "the wire round trip changed the sweep");
    }
}

/// `muster pipeline submit -f`: a pipeline job into a validated DAG.
pub fn pipeline_yaml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(pipeline) = muster_core::pipeline::parse_pipeline_yaml(text, EXPERIMENT) else {
        return;
    };
    let order = muster_core::pipeline::topological_order(&pipeline.steps)
        .expect("an accepted pipeline is acyclic");
    assert_eq!(
        order, pipeline.order,
        "the stored order is the topological one"
    );
    for (position, name) in pipeline.order.iter().enumerate() {
        let step = &pipeline.steps[name];
        for dependency in step.depends_on() {
            let before = pipeline.order[..position].iter().any(|s| s == dependency);
            assert!(
                before,
                "step {name} runs before its input's step {dependency}"
            );
        }
        check_run_spec(&step.run);
    }
    let json = serde_json::to_string(&pipeline).expect("a pipeline serializes");
    let back: muster_core::pipeline::PipelineSpec =
        serde_json::from_str(&json).expect("a pipeline's JSON parses back");
    assert_eq!(back, pipeline, "the JSON round trip changed the pipeline");
}

/// `muster compute create -f`: Azure ML compute YAML.
pub fn compute_yaml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(compute) = muster_core::compute::parse_compute_yaml(text, None) else {
        return;
    };
    if let Err(e) = compute.validate() {
        panic!("an accepted compute target does not validate: {e}\n{compute:#?}");
    }
    let wire = muster_proto::compute_spec_to_wire(&compute);
    let bytes = prost::Message::encode_to_vec(&wire);
    let decoded = <v1::ComputeTarget as prost::Message>::decode(bytes.as_slice())
        .expect("an encoded compute target decodes");
    let back = muster_proto::compute_spec_from_wire(&decoded)
        .expect("a wire compute target converts back");
    assert_eq!(
        back, compute,
        "the protobuf round trip changed the compute target"
    );
}

/// `muster run submit --runconfig`: a v1 run configuration, normalized into a run spec.
pub fn runconfig_yaml(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let Ok(config) = muster_core::runconfig::parse_runconfig(text) else {
        return;
    };
    if let Ok(spec) = config.job.into_run_spec(EXPERIMENT) {
        check_run_spec(&spec);
    }
}

/// A `.amlignore` / `.gitignore` as the CLI's snapshot walk reads it (gitignore syntax via the
/// `ignore` crate, line by line): the first line of the input names the paths to match, the
/// rest is the ignore file. A file with no plain (un-negated) pattern ignores nothing.
pub fn ignore_file(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (paths, file) = text.split_once('\n').unwrap_or((text, ""));
    let mut builder = ignore::gitignore::GitignoreBuilder::new("/code");
    for line in file.lines() {
        // A bad glob is skipped by the walk (with a warning), as here.
        let _ = builder.add_line(None, line);
    }
    let Ok(ignore) = builder.build() else { return };
    let ignores_something = file.lines().any(|line| {
        let line = line.trim_end();
        !line.is_empty() && !line.starts_with('#') && !line.starts_with('!')
    });
    for path in paths.split(['\t', ' ']).filter(|p| !p.is_empty()) {
        for is_dir in [false, true] {
            let full = std::path::Path::new("/code").join(path.trim_start_matches('/'));
            let matched = ignore.matched_path_or_any_parents(&full, is_dir);
            if matched.is_ignore() {
                assert!(
                    ignores_something,
                    "{path:?} ignored by a file without a plain pattern"
                );
            }
        }
    }
}

/// Decode, encode, decode of one message type: prost must not panic, and what it decoded
/// re-encodes to something that decodes the same.
fn round_trip<M: prost::Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    let Ok(first) = M::decode(data) else { return };
    let bytes = first.encode_to_vec();
    assert_eq!(
        bytes.len(),
        first.encoded_len(),
        "encoded_len is the encoding's length"
    );
    let second = M::decode(bytes.as_slice()).expect("a re-encoded message decodes");
    assert_eq!(
        second.encoded_len(),
        bytes.len(),
        "the re-encoding is stable in length"
    );
    // A NaN double (metrics, sweep trials) is unequal to itself; everything else compares.
    if second != first {
        let shown = format!("{first:?}");
        assert!(
            shown.contains("NaN"),
            "decode(encode(m)) != m\n{first:?}\n{second:?}"
        );
    }
}

macro_rules! messages {
    ($($name:ident)*) => {
        /// Every message of `proto/muster/v1`, by name.
        pub const MESSAGES: &[(&str, Body)] = &[$((stringify!($name), round_trip::<v1::$name>)),*];
    };
}

messages! {
    WhoAmIRequest WhoAmIResponse CreateTokenRequest CreateTokenResponse TokenInfo ListTokensRequest
    ListTokensResponse RevokeTokenRequest RevokeTokenResponse Workspace SetServerlessComputeRequest
    CreateWorkspaceRequest ListWorkspacesRequest ListWorkspacesResponse DeleteWorkspaceRequest
    DeleteWorkspaceResponse Grant RoleRequest ListGrantsRequest ListGrantsResponse AuditEvent
    ListAuditRequest ListAuditResponse JoinRequest JoinResponse RegisterRequest RegisterResponse
    RunningAttempt HeartbeatRequest HeartbeatResponse AgentMessage CheckpointTaken Hello
    AttemptUpdate LogData MetricData ServerMessage Assignment StopAttempt UpdateAck LogResume
    MetricResume MissingBlobsRequest MissingBlobsResponse BlobChunk PutBlobResponse GetBlobRequest
    ClusterStatusRequest ClusterMember ClusterStatus AddServerRequest RemoveServerRequest
    TransferLeaderRequest BackupRequest BackupChunk RaftBatch RaftAck ForwardRequest
    ForwardResponse ReadIndexRequest ReadIndexResponse SetComputeStoppedRequest
    UpdateComputeRequest CreateComputeRequest ComputeStatus ProvisionedNode ScaleEvent
    ListComputesRequest ListComputesResponse GetComputeRequest DeleteComputeRequest
    DeleteComputeResponse ListNodesRequest ListNodesResponse SetNodeStateRequest Datastore
    CreateDatastoreRequest ListDatastoresRequest ListDatastoresResponse DataAsset
    CreateDataRequest GetDataRequest ListDataRequest ListDataResponse Component
    CreateComponentRequest GetComponentRequest ListComponentsRequest ListComponentsResponse
    GetRunMetricsRequest StreamRunMetricsRequest MetricSeries RunMetrics SubmitPipelineRequest
    GetPipelineRequest ListPipelinesRequest ListPipelinesResponse CancelPipelineRequest Pipeline
    PipelineOutput PipelineStep SubmitRunRequest GetRunRequest ListRunsRequest ListRunsResponse
    CancelRunRequest StreamLogsRequest LogChunk WaitRunRequest SweepSpec SubmitSweepRequest
    GetSweepRequest ListSweepsRequest ListSweepsResponse CancelSweepRequest SweepTrial Sweep
    Resources Gpu GitInfo CodeRef Distribution RunSpec OutputAsset DatastorePath Placement
    Checkpoint Attempt Run ComputeTarget Provisioner Quota Node
}

/// Every public proto message: the first byte picks the message type, the rest is decoded.
pub fn proto_decode(data: &[u8]) {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    let (_, check) = MESSAGES[usize::from(pick) % MESSAGES.len()];
    check(rest);
}

/// The wire-to-core conversions a server applies to what a client sent (run, sweep and
/// compute specs, provisioners, code refs, data assets): the first byte picks one. Whatever
/// converts and validates converts back to the wire and in again unchanged.
pub fn proto_convert(data: &[u8]) {
    use prost::Message as _;
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    match pick % 6 {
        0 => {
            let Ok(wire) = v1::RunSpec::decode(rest) else {
                return;
            };
            if let Ok(spec) = muster_proto::spec_from_wire(wire)
                && spec.validate().is_ok()
            {
                check_run_spec(&spec);
            }
        }
        1 => {
            let Ok(wire) = v1::SweepSpec::decode(rest) else {
                return;
            };
            if let Ok(sweep) = muster_proto::sweep_spec_from_wire(wire)
                && sweep.validate().is_ok()
            {
                let back =
                    muster_proto::sweep_spec_from_wire(muster_proto::sweep_spec_to_wire(&sweep))
                        .expect("a wire sweep spec converts back");
                assert_eq!(back, sweep, "the wire round trip changed the sweep");
            }
        }
        2 => {
            let Ok(wire) = v1::ComputeTarget::decode(rest) else {
                return;
            };
            if let Ok(compute) = muster_proto::compute_spec_from_wire(&wire)
                && compute.validate().is_ok()
            {
                let again = muster_proto::compute_spec_to_wire(&compute);
                let back = muster_proto::compute_spec_from_wire(&again)
                    .expect("a wire compute target converts back");
                assert_eq!(
                    back, compute,
                    "the wire round trip changed the compute target"
                );
            }
        }
        3 => {
            let Ok(wire) = v1::Provisioner::decode(rest) else {
                return;
            };
            if let Ok(p) = muster_proto::provisioner_from_wire(&wire) {
                let back =
                    muster_proto::provisioner_from_wire(&muster_proto::provisioner_to_wire(&p))
                        .expect("a wire provisioner converts back");
                assert_eq!(back, p, "the wire round trip changed the provisioner");
            }
        }
        4 => {
            let Ok(wire) = v1::CodeRef::decode(rest) else {
                return;
            };
            let code = muster_proto::code_from_wire(wire);
            let back = muster_proto::code_from_wire(muster_proto::code_to_wire(code.clone()));
            assert_eq!(back, code, "the wire round trip changed the code ref");
        }
        _ => {
            let Ok(wire) = v1::DataAsset::decode(rest) else {
                return;
            };
            if let Ok(asset) = muster_proto::data_asset_from_wire(&wire, 1, "fuzz") {
                let again = muster_proto::data_asset_to_wire(&asset);
                let back = muster_proto::data_asset_from_wire(&again, 1, "fuzz")
                    .expect("a wire data asset converts back");
                assert_eq!(back, asset, "the wire round trip changed the data asset");
            }
        }
    }
}

/// A raft message from a peer ([`muster_raft::decode_message`]): the first two bytes are the
/// size cap in bytes (the real one is [`muster_raft::MAX_MESSAGE_BYTES`]), the third the node
/// id it is for. What decodes fits the cap, is for that node, and decodes again from its
/// own encoding to the same message as raft reads it (type, peers, term, index, entries,
/// commit, rejection, snapshot metadata). Not the bytes or the whole message: the protobuf
/// 2 runtime keeps unknown fields in a hash map, so their order in an encoding (and its
/// equality, which compares them) varies from one encoding to the next.
pub fn raft_message(data: &[u8]) {
    use protobuf::Message as _;
    let [a, b, to, rest @ ..] = data else { return };
    let cap = usize::from(u16::from_le_bytes([*a, *b]));
    let to = u64::from(*to);
    let Ok(message) = muster_raft::decode_message(rest, to, cap) else {
        return;
    };
    assert!(rest.len() <= cap, "a message over the cap was decoded");
    assert_eq!(message.to, to, "a message for another node was decoded");
    let bytes = message.write_to_bytes().expect("a decoded message encodes");
    let back = raft::eraftpb::Message::parse_from_bytes(&bytes).expect("it decodes again");
    assert_eq!(
        raft_view(&back),
        raft_view(&message),
        "decode(encode(m)) reads differently"
    );
}

/// What raft reads of a message: its known fields, entries by their known fields.
fn raft_view(m: &raft::eraftpb::Message) -> String {
    let entries: Vec<_> = m
        .get_entries()
        .iter()
        .map(|e| {
            (
                e.get_entry_type(),
                e.term,
                e.index,
                e.get_data().to_vec(),
                e.get_context().to_vec(),
            )
        })
        .collect();
    let meta = m.get_snapshot().get_metadata();
    format!(
        "{:?} {} {} {} {} {} {} {} {} {} {} {} {:?} {:?} {} {} {:?} {:?}",
        m.get_msg_type(),
        m.to,
        m.from,
        m.term,
        m.log_term,
        m.index,
        m.commit,
        m.commit_term,
        m.reject,
        m.reject_hint,
        m.request_snapshot,
        m.priority,
        m.get_context(),
        entries,
        meta.index,
        meta.term,
        meta.get_conf_state().get_voters(),
        m.get_snapshot().get_data(),
    )
}

/// API and join tokens (`<prefix><id>_<secret>`): what parses is the token formatted from
/// its parts (up to surrounding whitespace), and a formatted token parses into its parts.
pub fn token(data: &[u8]) {
    let Some(text) = text(data) else { return };
    let (prefix, presented) = text.split_once('\n').unwrap_or(("mst_", text));
    if let Some((id, secret)) = muster_core::access::parse_token(prefix, presented) {
        assert_eq!(
            muster_core::access::format_token(prefix, id, secret),
            presented.trim(),
            "a parsed token is not its parts formatted"
        );
        assert!(!id.contains('_') && !secret.is_empty());
    }
    if let Some((id, secret)) = presented.split_once('_') {
        let formatted = muster_core::access::format_token(prefix, id, secret);
        let plain = |s: &str| {
            !s.is_empty() && s.len() <= 64 && s.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if plain(id) && plain(secret) && prefix.trim() == prefix {
            assert_eq!(
                muster_core::access::parse_token(prefix, &formatted),
                Some((id, secret)),
                "a formatted token does not parse into its parts"
            );
        }
    }
}

/// The snapshot path rule ([`muster_core::snapshot::is_safe_relative_path`]) the agent applies
/// to every manifest entry before it writes a file: an accepted path is relative, has no `..`
/// or `.` component, and joined under a root stays under it. The input is also tried as a
/// manifest (JSON), whose `validate` must accept exactly the safe paths.
pub fn safe_path(data: &[u8]) {
    use muster_core::snapshot::{Manifest, is_safe_relative_path};
    use std::path::{Component, Path};
    let check = |p: &str| {
        if !is_safe_relative_path(p) {
            return;
        }
        assert!(!p.starts_with('/') && !p.is_empty(), "{p:?} accepted");
        assert!(
            !p.split('/').any(|c| c == ".." || c == "."),
            "{p:?} accepted"
        );
        let path = Path::new(p);
        assert!(path.is_relative(), "{p:?} accepted but absolute");
        assert!(
            path.components().all(|c| matches!(c, Component::Normal(_))),
            "{p:?} accepted with a non-plain component"
        );
        let root = Path::new("/snapshot");
        let joined = root.join(path);
        assert!(joined.starts_with(root), "{p:?} escapes the root");
        assert_eq!(
            joined.components().count(),
            root.components().count() + path.components().count(),
            "{p:?} joined does not nest under the root"
        );
    };
    if let Ok(manifest) = serde_json::from_slice::<Manifest>(data) {
        let all_safe = manifest
            .files
            .iter()
            .all(|f| is_safe_relative_path(&f.path));
        let hashes_ok = manifest
            .files
            .iter()
            .all(|f| muster_core::snapshot::is_sha256_hex(&f.sha256));
        assert_eq!(
            manifest.validate().is_ok(),
            all_safe && hashes_ok,
            "Manifest::validate disagrees with the path and hash rules"
        );
        for f in &manifest.files {
            check(&f.path);
        }
    }
    check(&String::from_utf8_lossy(data));
}
