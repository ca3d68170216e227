//! Conversions between wire types and muster-core types.

use muster_core::compute::{
    CommandProvisioner, ComputeKind, ComputeSpec, DockerProvisioner, Provisioner, Quota, RunPolicy,
    Tier,
};
use muster_core::snapshot::GitInfo as CoreGit;
use muster_core::spec::{CodeRef as CoreCode, Distribution as CoreDist, Environment, OutputKind};
use muster_core::state::{
    AttemptState, Checkpoint as CoreCheckpoint, ComputeTarget as CoreCompute, Node as CoreNode,
    Run as CoreRun,
};
use muster_core::{
    Placement as CorePlacement, Resources as CoreResources, RunSpec as CoreSpec, State,
};

use crate::enums::Word;
use crate::v1;

impl From<CoreResources> for v1::Resources {
    fn from(r: CoreResources) -> Self {
        v1::Resources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
        }
    }
}

impl From<v1::Resources> for CoreResources {
    fn from(r: v1::Resources) -> Self {
        CoreResources {
            cpu_millis: r.cpu_millis,
            memory_bytes: r.memory_bytes,
            gpus: r.gpus,
        }
    }
}

impl From<muster_core::Gpu> for v1::Gpu {
    fn from(g: muster_core::Gpu) -> Self {
        v1::Gpu {
            uuid: g.uuid,
            model: g.model,
            memory_bytes: g.memory_bytes,
        }
    }
}

impl From<v1::Gpu> for muster_core::Gpu {
    fn from(g: v1::Gpu) -> Self {
        muster_core::Gpu {
            uuid: g.uuid,
            model: g.model,
            memory_bytes: g.memory_bytes,
        }
    }
}

impl From<CoreSpec> for v1::RunSpec {
    fn from(s: CoreSpec) -> Self {
        v1::RunSpec {
            command: s.command,
            compute: s.compute,
            experiment: s.experiment,
            display_name: s.display_name,
            description: s.description,
            tags: s.tags.into_iter().collect(),
            image: s.environment.image,
            environment_name: s.environment.name,
            conda_file: s.environment.conda_file,
            environment_variables: s.environment_variables.into_iter().collect(),
            inputs: s.inputs.into_iter().collect(),
            instance_count: s.instance_count,
            resources: Some(s.resources.into()),
            shm_size: s.shm_size,
            distribution: s.distribution.map(|d| match d {
                CoreDist::Pytorch {
                    process_count_per_instance,
                } => v1::Distribution {
                    r#type: "pytorch".into(),
                    process_count_per_instance,
                    ..Default::default()
                },
                CoreDist::Mpi {
                    process_count_per_instance,
                } => v1::Distribution {
                    r#type: "mpi".into(),
                    process_count_per_instance,
                    ..Default::default()
                },
                CoreDist::Tensorflow {
                    worker_count,
                    parameter_server_count,
                } => v1::Distribution {
                    r#type: "tensorflow".into(),
                    worker_count,
                    parameter_server_count,
                    ..Default::default()
                },
            }),
            timeout_s: s.timeout_s,
            priority: s.priority,
            max_attempts: s.max_attempts,
            node_selector: s.node_selector.into_iter().collect(),
            workspace: s.workspace,
            outputs: s
                .outputs
                .into_iter()
                .map(|(name, kind)| (name, kind.as_str().to_string()))
                .collect(),
            warnings: s.warnings,
            requested_compute: s.requested_compute,
            url_inputs: s.url_inputs.into_iter().collect(),
            snapshot_inputs: s.snapshot_inputs.into_iter().collect(),
            datastore_inputs: s
                .datastore_inputs
                .into_iter()
                .map(|(name, (datastore, path))| (name, v1::DatastorePath { datastore, path }))
                .collect(),
            host_inputs: s.host_inputs.into_iter().collect(),
            output_inputs: s.output_inputs.into_iter().collect(),
            download_inputs: s.download_inputs.into_iter().collect(),
            instance_type: s.instance_type,
            checkpoint_interval_s: s.checkpoint_interval_s,
            secrets: s
                .secrets
                .into_iter()
                .map(|r| v1::SecretRef {
                    name: r.name,
                    env: r.env,
                })
                .collect(),
            output_assets: s
                .output_assets
                .into_iter()
                .map(|(o, (name, version))| (o, v1::OutputAsset { name, version }))
                .collect(),
            code: s.code.map(|c| v1::CodeRef {
                manifest: c.manifest,
                files: c.files,
                bytes: c.bytes,
                git: c.git.map(|g| v1::GitInfo {
                    commit: g.commit,
                    branch: g.branch,
                    dirty: g.dirty,
                }),
            }),
        }
    }
}

/// Converts a wire run spec to core. Fails only on an unknown distribution type; the
/// server validates the result with [`CoreSpec::validate`].
pub fn spec_from_wire(s: v1::RunSpec) -> Result<CoreSpec, String> {
    let distribution = match s.distribution {
        None => None,
        Some(d) => Some(match d.r#type.as_str() {
            "pytorch" => CoreDist::Pytorch {
                process_count_per_instance: d.process_count_per_instance.max(1),
            },
            "mpi" => CoreDist::Mpi {
                process_count_per_instance: d.process_count_per_instance,
            },
            "tensorflow" => CoreDist::Tensorflow {
                worker_count: d.worker_count,
                parameter_server_count: d.parameter_server_count,
            },
            other => {
                return Err(format!(
                    "distribution.type: unknown distribution {other:?}: use pytorch, mpi or tensorflow"
                ));
            }
        }),
    };
    let outputs = s
        .outputs
        .into_iter()
        .map(|(name, kind)| {
            OutputKind::parse(Some(&kind))
                .map(|k| (name.clone(), k))
                .map_err(|e| format!("outputs.{name}.type: {e}"))
        })
        .collect::<Result<_, String>>()?;
    Ok(CoreSpec {
        outputs,
        warnings: s.warnings,
        requested_compute: s.requested_compute,
        url_inputs: s.url_inputs.into_iter().collect(),
        snapshot_inputs: s.snapshot_inputs.into_iter().collect(),
        datastore_inputs: s
            .datastore_inputs
            .into_iter()
            .map(|(name, d)| (name, (d.datastore, d.path)))
            .collect(),
        host_inputs: s.host_inputs.into_iter().collect(),
        output_inputs: s.output_inputs.into_iter().collect(),
        download_inputs: s.download_inputs.into_iter().collect(),
        instance_type: s.instance_type,
        checkpoint_interval_s: s.checkpoint_interval_s,
        secrets: s
            .secrets
            .into_iter()
            .map(|r| muster_core::secrets::SecretRef {
                name: r.name,
                env: r.env,
            })
            .collect(),
        output_assets: s
            .output_assets
            .into_iter()
            .map(|(o, a)| (o, (a.name, a.version)))
            .collect(),
        command: s.command,
        compute: s.compute,
        experiment: s.experiment,
        display_name: s.display_name,
        description: s.description,
        tags: s.tags.into_iter().collect(),
        environment: Environment {
            image: s.image,
            name: s.environment_name,
            conda_file: s.conda_file,
        },
        environment_variables: s.environment_variables.into_iter().collect(),
        inputs: s.inputs.into_iter().collect(),
        instance_count: s.instance_count,
        resources: s.resources.unwrap_or_default().into(),
        shm_size: s.shm_size,
        distribution,
        timeout_s: s.timeout_s,
        priority: s.priority,
        max_attempts: s.max_attempts,
        node_selector: s.node_selector.into_iter().collect(),
        workspace: if s.workspace.is_empty() {
            muster_core::access::DEFAULT_WORKSPACE.to_string()
        } else {
            s.workspace
        },
        code: s.code.map(|c| CoreCode {
            manifest: c.manifest,
            files: c.files,
            bytes: c.bytes,
            git: c.git.map(|g| CoreGit {
                commit: g.commit,
                branch: g.branch,
                dirty: g.dirty,
            }),
        }),
    })
}

/// A placement with the node's name and address filled in from the state.
pub fn placement_to_wire(state: &State, p: &CorePlacement) -> v1::Placement {
    let node = state.nodes.get(&p.node_id);
    v1::Placement {
        node_id: p.node_id.clone(),
        node_name: node.map(|n| n.name.clone()).unwrap_or_default(),
        address: node.map(|n| n.address.clone()).unwrap_or_default(),
        gpus: p.gpus.clone(),
        resources: Some(p.resources.into()),
        exec_port: 0,
    }
}

/// A placement as an `Assignment` carries it: with the node's current exec port (from its
/// label [`EXEC_PORT_LABEL`]), which run views leave out (it is the node's, not history).
pub fn placement_to_assignment(state: &State, p: &CorePlacement) -> v1::Placement {
    let mut wire = placement_to_wire(state, p);
    wire.exec_port = state
        .nodes
        .get(&p.node_id)
        .and_then(|n| n.labels.get(EXEC_PORT_LABEL))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    wire
}

/// The node label in which an agent advertises the port of its exec listener (the way in
/// for the MPI rsh helper of distributed runs); copied into `Placement.exec_port`.
pub const EXEC_PORT_LABEL: &str = "muster.exec-port";

/// A run as the API shows it.
pub fn run_to_wire(state: &State, r: &CoreRun) -> v1::Run {
    v1::Run {
        id: r.id.clone(),
        spec: Some(r.spec.clone().into()),
        state: v1::RunState::from(r.state).into(),
        attempt: r.attempt_number(),
        exit_code: r.exit_code,
        created_at_ms: r.created_at,
        started_at_ms: r.started_at,
        finished_at_ms: r.finished_at,
        message: r.message.clone(),
        cancel_requested: r.cancel_requested,
        seq: r.seq,
        archive: String::new(),
        checkpoint: r.checkpoint.clone().map(checkpoint_to_wire),
        attempts: r
            .attempts
            .iter()
            .map(|a| v1::Attempt {
                number: a.number,
                placements: a
                    .placements
                    .iter()
                    .map(|p| placement_to_wire(state, p))
                    .collect(),
                state: v1::AttemptState::from(a.state).into(),
                end: match a.state {
                    AttemptState::Ended(e) => v1::AttemptEnd::from(e),
                    _ => v1::AttemptEnd::Unspecified,
                }
                .into(),
                placed_at_ms: a.placed_at,
                started_at_ms: a.started_at,
                finished_at_ms: a.finished_at,
                exit_code: a.exit_code,
                message: a.message.clone(),
                outputs: a.outputs.clone(),
                resumed_from: a.resumed_from.clone().map(checkpoint_to_wire),
            })
            .collect(),
    }
}

/// A checkpoint on the wire.
pub fn checkpoint_to_wire(c: CoreCheckpoint) -> v1::Checkpoint {
    v1::Checkpoint {
        sha256: c.sha256,
        attempt: c.attempt,
        seq: c.seq,
        files: c.files,
        bytes: c.bytes,
        cause: v1::CheckpointCause::from(c.cause).into(),
        at_ms: c.at,
    }
}

/// A code snapshot reference on the wire.
pub fn code_to_wire(c: CoreCode) -> v1::CodeRef {
    v1::CodeRef {
        manifest: c.manifest,
        files: c.files,
        bytes: c.bytes,
        git: c.git.map(|g| v1::GitInfo {
            commit: g.commit,
            branch: g.branch,
            dirty: g.dirty,
        }),
    }
}

/// A code snapshot reference from the wire (validated with the run spec it joins).
pub fn code_from_wire(c: v1::CodeRef) -> CoreCode {
    CoreCode {
        manifest: c.manifest,
        files: c.files,
        bytes: c.bytes,
        git: c.git.map(|g| CoreGit {
            commit: g.commit,
            branch: g.branch,
            dirty: g.dirty,
        }),
    }
}

/// The state of a pipeline: running, canceling, completed, failed or canceled.
pub fn pipeline_state_to_wire(p: &muster_core::state::Pipeline) -> v1::PipelineState {
    match (&p.finished, &p.cancel_requested) {
        (Some(f), _) if f.succeeded => v1::PipelineState::Completed,
        (Some(_), Some(_)) => v1::PipelineState::Canceled,
        (Some(_), None) => v1::PipelineState::Failed,
        (None, Some(_)) => v1::PipelineState::Canceling,
        (None, None) => v1::PipelineState::Running,
    }
}

/// A pipeline as the API shows it: its state and each step's (run, reuse, failure).
pub fn pipeline_to_wire(state: &State, p: &muster_core::state::Pipeline) -> v1::Pipeline {
    use muster_core::pipeline::StepState;
    let states = state.pipeline_step_states(p);
    let steps: Vec<v1::PipelineStep> = p
        .spec
        .order
        .iter()
        .map(|name| {
            let spec = &p.spec.steps[name];
            let rec = p.steps.get(name);
            let run = rec
                .and_then(|r| r.run_id.as_ref())
                .and_then(|id| state.runs.get(id));
            let (step_state, reason) = match (rec, run) {
                (None, _) => (v1::StepState::Pending, None),
                (Some(r), _) if r.failed.is_some() => (v1::StepState::Failed, r.failed.clone()),
                (Some(r), _) if r.reused.is_some() => (v1::StepState::Reused, None),
                (Some(_), Some(run)) => (run.state.into(), run.message.clone()),
                (Some(_), None) => (v1::StepState::Failed, Some("its run is missing".into())),
            };
            let outputs = match states.get(name) {
                Some(StepState::Completed { outputs, .. }) => outputs.clone().into_iter().collect(),
                _ => Default::default(),
            };
            v1::PipelineStep {
                name: name.clone(),
                state: step_state.into(),
                run_id: rec.and_then(|r| r.run_id.clone()),
                reused_from: rec
                    .filter(|r| r.reused.is_some())
                    .and_then(|r| r.reuse_key.as_deref())
                    .and_then(|k| state.pipeline_reused_from(k))
                    .map(str::to_string),
                compute: spec.run.compute.clone(),
                reason,
                depends_on: spec.depends_on().into_iter().map(str::to_string).collect(),
                inputs: rec
                    .map(|r| r.mounts.clone().into_iter().collect())
                    .unwrap_or_default(),
                outputs,
            }
        })
        .collect();
    let pipeline_state = pipeline_state_to_wire(p);
    let message = matches!(
        pipeline_state,
        v1::PipelineState::Failed | v1::PipelineState::Canceled
    )
    .then(|| {
        muster_core::pipeline::failure_summary(
            steps
                .iter()
                .filter(|s: &&v1::PipelineStep| {
                    matches!(
                        s.state(),
                        v1::StepState::Failed | v1::StepState::Canceled | v1::StepState::TimedOut
                    )
                })
                .map(|s| (s.name.as_str(), s.reason.as_deref().unwrap_or("failed"))),
        )
    })
    .filter(|m| !m.is_empty());
    v1::Pipeline {
        message,
        id: p.id.clone(),
        display_name: p.spec.display_name.clone(),
        experiment: p.spec.experiment.clone(),
        state: pipeline_state.into(),
        created_at_ms: p.created_at,
        finished_at_ms: p.finished.as_ref().map(|f| f.at),
        steps,
        cancel_reason: p.cancel_requested.clone(),
        outputs: p
            .spec
            .outputs
            .iter()
            .map(|(name, (step, output))| v1::PipelineOutput {
                name: name.clone(),
                step: step.clone(),
                output: output.clone(),
                identity: match states.get(step) {
                    Some(StepState::Completed { outputs, .. }) => outputs.get(output).cloned(),
                    _ => None,
                },
            })
            .collect(),
    }
}

/// A compute target as the API shows it, with a summary of its nodes and runs.
pub fn compute_to_wire(state: &State, c: &CoreCompute) -> v1::ComputeTarget {
    let name = &c.spec.name;
    let nodes: Vec<&CoreNode> = state
        .nodes
        .values()
        .filter(|n| &n.compute == name)
        .collect();
    let mut capacity = CoreResources::default();
    let mut allocated = CoreResources::default();
    for n in &nodes {
        capacity.add(&n.capacity_resources());
        allocated.add(&n.allocated);
        allocated.gpus = allocated.gpus.saturating_add(n.allocated_gpus.len() as u32);
    }
    let (mut queued, mut active) = (0u32, 0u32);
    for r in state.runs.values().filter(|r| &r.spec.compute == name) {
        if r.state == muster_core::RunState::Queued {
            queued += 1;
        } else if r.state.is_active() {
            active += 1;
        }
    }
    let mut wire = compute_spec_to_wire(&c.spec);
    wire.created_at_ms = c.created_at;
    wire.nodes = nodes.len() as u32;
    wire.queued_runs = queued;
    wire.active_runs = active;
    wire.capacity = Some(capacity.into());
    wire.allocated = Some(allocated.into());
    wire
}

/// The definition fields of a compute target.
pub fn compute_spec_to_wire(s: &ComputeSpec) -> v1::ComputeTarget {
    v1::ComputeTarget {
        name: s.name.clone(),
        r#type: s.kind.as_str().to_string(),
        size: s.size.clone(),
        min_instances: s.min_instances,
        max_instances: s.max_instances,
        idle_time_before_scale_down_s: s.idle_time_before_scale_down_s,
        tier: s.tier.as_str().to_string(),
        description: s.description.clone(),
        quota: (!s.quota.is_unlimited()).then_some(v1::Quota {
            max_gpus: s.quota.max_gpus,
            max_cpu_millis: s.quota.max_cpu_millis,
            max_concurrent_runs: s.quota.max_concurrent_runs,
        }),
        provisioner: (!s.provisioner.is_static()).then(|| provisioner_to_wire(&s.provisioner)),
        workspace: s.workspace.clone(),
        tags: s.tags.clone().into_iter().collect(),
        stopped: s.stopped,
        run_policy: run_policy_to_wire(&s.run_policy),
        ..Default::default()
    }
}

/// A compute target's run policy on the wire (`None` for the defaults).
pub fn run_policy_to_wire(p: &RunPolicy) -> Option<v1::RunPolicy> {
    (!p.is_default()).then(|| v1::RunPolicy {
        allow_root: p.allow_root,
        add_capabilities: p.add_capabilities.clone(),
        max_processes: p.max_processes.unwrap_or(0),
    })
}

/// Reads a run policy from the wire (unset: the defaults); a capability muster does not
/// know is an error naming the field.
pub fn run_policy_from_wire(p: Option<&v1::RunPolicy>) -> Result<RunPolicy, String> {
    let Some(p) = p else {
        return Ok(RunPolicy::default());
    };
    RunPolicy {
        allow_root: p.allow_root,
        add_capabilities: p.add_capabilities.clone(),
        max_processes: Some(p.max_processes).filter(|m| *m > 0),
    }
    .normalized()
    .map_err(|e| e.to_string())
}

/// Reads the definition fields of a wire compute target; the error names the field.
pub fn compute_spec_from_wire(c: &v1::ComputeTarget) -> Result<ComputeSpec, String> {
    let kind = ComputeKind::parse(&c.r#type).map_err(|e| format!("type: {e}"))?;
    let tier = if c.tier.is_empty() {
        Tier::Dedicated
    } else {
        Tier::parse(&c.tier).map_err(|e| format!("tier: {e}"))?
    };
    Ok(ComputeSpec {
        name: c.name.clone(),
        kind,
        size: c.size.clone(),
        min_instances: c.min_instances,
        max_instances: c.max_instances,
        idle_time_before_scale_down_s: c.idle_time_before_scale_down_s,
        tier,
        description: c.description.clone(),
        quota: c
            .quota
            .map(|q| Quota {
                max_gpus: q.max_gpus,
                max_cpu_millis: q.max_cpu_millis,
                max_concurrent_runs: q.max_concurrent_runs,
            })
            .unwrap_or_default(),
        provisioner: c
            .provisioner
            .as_ref()
            .map(provisioner_from_wire)
            .transpose()?
            .unwrap_or_default(),
        workspace: if c.workspace.is_empty() {
            muster_core::access::DEFAULT_WORKSPACE.to_string()
        } else {
            c.workspace.clone()
        },
        tags: c.tags.clone().into_iter().collect(),
        // Read-only on the wire: only StopCompute and StartCompute change it.
        stopped: false,
        run_policy: run_policy_from_wire(c.run_policy.as_ref())?,
    })
}

/// A provisioner's settings on the wire.
pub fn provisioner_to_wire(p: &Provisioner) -> v1::Provisioner {
    let mut w = v1::Provisioner {
        r#type: p.kind_str().to_string(),
        ..Default::default()
    };
    match p {
        Provisioner::Static => {}
        Provisioner::Docker(d) => {
            w.image = d.image.clone();
            w.network = d.network.clone();
            w.servers = d.servers.clone();
            w.labels = d.labels.clone().into_iter().collect();
        }
        Provisioner::Command(c) => {
            w.scale_up = c.scale_up.clone();
            w.scale_down = c.scale_down.clone();
        }
    }
    w
}

/// Reads a provisioner from the wire (empty fields take the defaults); the error names
/// the field. Validation against the compute kind is [`ComputeSpec::validate`]'s.
pub fn provisioner_from_wire(w: &v1::Provisioner) -> Result<Provisioner, String> {
    let docker_fields = !w.image.is_empty()
        || !w.network.is_empty()
        || !w.servers.is_empty()
        || !w.labels.is_empty();
    let command_fields = !w.scale_up.is_empty() || !w.scale_down.is_empty();
    match w.r#type.to_ascii_lowercase().as_str() {
        "" | "static" => {
            if docker_fields || command_fields {
                return Err(
                    "provisioner: settings given for a static provisioner: set provisioner.type to docker or command"
                        .into(),
                );
            }
            Ok(Provisioner::Static)
        }
        "docker" => {
            if command_fields {
                return Err(
                    "provisioner.scale_up/scale_down: only a command provisioner takes scripts"
                        .into(),
                );
            }
            let mut d = DockerProvisioner::default();
            if !w.image.is_empty() {
                d.image = w.image.clone();
            }
            if !w.network.is_empty() {
                d.network = w.network.clone();
            }
            d.servers = w.servers.clone();
            d.labels = w.labels.clone().into_iter().collect();
            Ok(Provisioner::Docker(d))
        }
        "command" => {
            if docker_fields {
                return Err("provisioner.image/network/servers/labels: only a docker provisioner takes them".into());
            }
            Ok(Provisioner::Command(CommandProvisioner {
                scale_up: w.scale_up.clone(),
                scale_down: w.scale_down.clone(),
            }))
        }
        other => Err(format!(
            "provisioner.type: unknown provisioner {other:?}: use static, docker or command"
        )),
    }
}

/// A compute target with its provisioner, nodes, runs and autoscaling history.
pub fn compute_status_to_wire(
    state: &State,
    c: &CoreCompute,
    last_heartbeat: impl Fn(&str) -> Option<u64>,
) -> v1::ComputeStatus {
    let name = &c.spec.name;
    let running = state
        .runs
        .values()
        .filter(|r| &r.spec.compute == name && r.state == muster_core::RunState::Running)
        .count() as u32;
    let scaling = state.scaling.get(name);
    v1::ComputeStatus {
        compute: Some(compute_to_wire(state, c)),
        nodes: state
            .nodes
            .values()
            .filter(|n| &n.compute == name)
            .map(|n| node_to_wire(n, last_heartbeat(&n.id)))
            .collect(),
        running_runs: running,
        provisioned: scaling
            .map(|s| {
                s.nodes
                    .iter()
                    .map(|(n, p)| v1::ProvisionedNode {
                        name: n.clone(),
                        phase: v1::ProvisionPhase::from(p.phase).into(),
                        requested_at_ms: p.requested_at,
                    })
                    .collect()
            })
            .unwrap_or_default(),
        history: scaling
            .map(|s| {
                s.history
                    .iter()
                    .map(|e| v1::ScaleEvent {
                        at_ms: e.at,
                        action: e.action.clone(),
                        nodes: e.nodes.clone(),
                        message: e.message.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A node as the API shows it.
pub fn node_to_wire(n: &CoreNode, last_heartbeat_ms: Option<u64>) -> v1::Node {
    let mut allocated: v1::Resources = n.allocated.into();
    allocated.gpus = n.allocated_gpus.len() as u32;
    v1::Node {
        id: n.id.clone(),
        name: n.name.clone(),
        compute: n.compute.clone(),
        capacity: Some(n.capacity_resources().into()),
        gpus: n.capacity.gpus.iter().cloned().map(Into::into).collect(),
        labels: n.labels.clone().into_iter().collect(),
        tier: n.tier.as_str().to_string(),
        address: n.address.clone(),
        state: v1::NodeState::from(n.state).into(),
        state_reason: n.state_reason.clone(),
        registered_at_ms: n.registered_at,
        allocated: Some(allocated),
        allocated_gpus: n.allocated_gpus.iter().cloned().collect(),
        runs: n.attempts.iter().map(|(r, a)| format!("{r}/{a}")).collect(),
        last_heartbeat_ms,
        max_runs: n.capacity.max_runs,
    }
}

/// A sweep spec on the wire: the trial as a [`v1::RunSpec`], the rest as muster-core's
/// JSON (the encoding the replicated log stores).
pub fn sweep_spec_to_wire(s: &muster_core::sweep::SweepSpec) -> v1::SweepSpec {
    let mut definition = serde_json::to_value(s).expect("a sweep spec serializes");
    if let Some(map) = definition.as_object_mut() {
        map.remove("trial");
    }
    v1::SweepSpec {
        trial: Some(s.trial.clone().into()),
        definition_json: definition.to_string(),
    }
}

/// Converts a wire sweep spec to core; the server validates the result with
/// [`muster_core::sweep::SweepSpec::validate`].
pub fn sweep_spec_from_wire(s: v1::SweepSpec) -> Result<muster_core::sweep::SweepSpec, String> {
    let trial = spec_from_wire(s.trial.ok_or("spec.trial: missing")?)
        .map_err(|e| format!("spec.trial.{e}"))?;
    let mut definition: serde_json::Value = serde_json::from_str(&s.definition_json)
        .map_err(|e| format!("spec.definition_json: not JSON: {e}"))?;
    let map = definition
        .as_object_mut()
        .ok_or("spec.definition_json: must be a JSON object")?;
    map.insert(
        "trial".into(),
        serde_json::to_value(&trial).map_err(|e| format!("spec.trial: {e}"))?,
    );
    serde_json::from_value(definition).map_err(|e| format!("spec.definition_json: {e}"))
}

/// The state of a sweep: running, canceling, completed, timed_out or canceled.
pub fn sweep_state_to_wire(s: &muster_core::state::Sweep) -> v1::SweepState {
    use muster_core::sweep::SweepEnd;
    match (&s.finished, &s.cancel_requested) {
        (Some(f), _) => match f.end {
            SweepEnd::Completed => v1::SweepState::Completed,
            SweepEnd::TimedOut => v1::SweepState::TimedOut,
            SweepEnd::Canceled => v1::SweepState::Canceled,
        },
        (None, Some(_)) => v1::SweepState::Canceling,
        (None, None) => v1::SweepState::Running,
    }
}

/// The state word of a sweep ([`sweep_state_to_wire`]'s word), for messages.
pub fn sweep_state(s: &muster_core::state::Sweep) -> &'static str {
    sweep_state_to_wire(s).word()
}

fn policy_to_text(p: &muster_core::sweep::EarlyTermination) -> String {
    use muster_core::sweep::{PolicyKind, Slack};
    let kind = match &p.kind {
        PolicyKind::Bandit {
            slack: Slack::Factor(f),
        } => format!("bandit (slack_factor {f})"),
        PolicyKind::Bandit {
            slack: Slack::Amount(a),
        } => format!("bandit (slack_amount {a})"),
        PolicyKind::MedianStopping => "median_stopping".to_string(),
        PolicyKind::TruncationSelection {
            truncation_percentage,
            exclude_finished,
        } => format!(
            "truncation_selection ({truncation_percentage}%{})",
            if *exclude_finished {
                ", finished trials excluded"
            } else {
                ""
            }
        ),
    };
    format!(
        "{kind}, evaluation_interval {}, delay_evaluation {}",
        p.evaluation_interval, p.delay_evaluation
    )
}

/// A sweep with its trials ranked by the primary metric (best first). `series[i]` is trial
/// `i`'s primary-metric series from the metric store (empty when it logged none).
pub fn sweep_to_wire(
    state: &State,
    s: &muster_core::state::Sweep,
    series: &[muster_core::metrics::Series],
) -> v1::Sweep {
    use muster_core::sweep::{Sampling, StopReason, rank_trials};
    let goal = s.spec.objective.goal;
    let views = state.sweep_trial_views(s, series);
    let ranked = rank_trials(goal, &views);
    let trials = ranked
        .iter()
        .filter_map(|(index, best)| {
            let t = s.trials.get(*index as usize)?;
            let metric = series.get(*index as usize);
            Some(v1::SweepTrial {
                index: t.index,
                run_id: t.run_id.clone(),
                params: t
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                state: state
                    .runs
                    .get(&t.run_id)
                    .map_or(v1::RunState::Unspecified, |r| r.state.into())
                    .into(),
                best: *best,
                last: metric.and_then(|m| m.last()).map(|(_, v)| v),
                points: metric.map_or(0, |m| m.len() as u64),
                stopped: t.stopped.as_ref().map(ToString::to_string),
                early_terminated: matches!(t.stopped, Some(StopReason::EarlyTermination(_))),
            })
        })
        .collect();
    let best_trial = match &s.finished {
        Some(f) => f.best_trial,
        None => ranked.first().and_then(|(i, v)| v.map(|_| *i)),
    };
    v1::Sweep {
        id: s.id.clone(),
        display_name: s.spec.display_name.clone(),
        experiment: s.spec.experiment.clone(),
        compute: s.spec.trial.compute.clone(),
        state: sweep_state_to_wire(s).into(),
        primary_metric: s.spec.objective.primary_metric.clone(),
        goal: match goal {
            muster_core::sweep::Goal::Maximize => "maximize",
            muster_core::sweep::Goal::Minimize => "minimize",
        }
        .to_string(),
        sampling: match s.spec.sampling {
            Sampling::Random { .. } => "random",
            Sampling::Grid => "grid",
            Sampling::Bayesian => "bayesian",
        }
        .to_string(),
        early_termination: s.spec.early_termination.as_ref().map(policy_to_text),
        max_total_trials: s.spec.limits.max_total_trials,
        max_concurrent_trials: s.spec.limits.max_concurrent_trials,
        timeout_s: s.spec.limits.timeout_s,
        trials,
        best_trial,
        created_at_ms: s.created_at,
        finished_at_ms: s.finished.as_ref().map(|f| f.at),
        message: s.cancel_requested.clone(),
        seed: s.seed,
        spec: Some(sweep_spec_to_wire(&s.spec)),
    }
}

/// Why the controller stopped a trial, for people (`muster sweep show`, the web UI):
/// "stopped early: <the policy's reason>" or "stopped: <why>"; empty when it was not.
pub fn sweep_trial_note(t: &v1::SweepTrial) -> String {
    match (&t.stopped, t.early_terminated) {
        (Some(reason), true) => {
            let reason = reason.strip_prefix("stopped early ").unwrap_or(reason);
            format!("stopped early: {reason}")
        }
        (Some(reason), false) => format!("stopped: {reason}"),
        (None, _) => String::new(),
    }
}

/// A run's metrics on the wire: each metric's points past the first `skip[name]` (only the
/// last point with `last_only`), only `name`'s when given.
pub fn metrics_to_wire(
    run_id: &str,
    log: &muster_core::metrics::MetricsLog,
    name: Option<&str>,
    skip: &std::collections::HashMap<String, u64>,
    last_only: bool,
) -> v1::RunMetrics {
    let series = log
        .series
        .iter()
        .filter(|(n, _)| name.is_none_or(|want| want == n.as_str()))
        .map(|(n, s)| {
            let points = s.points();
            let from = if last_only {
                points.len().saturating_sub(1)
            } else {
                (skip.get(n).copied().unwrap_or(0) as usize).min(points.len())
            };
            v1::MetricSeries {
                name: n.clone(),
                steps: points[from..].iter().map(|p| p.0).collect(),
                values: points[from..].iter().map(|p| p.1).collect(),
                points_before: from as u64,
            }
        })
        .collect();
    v1::RunMetrics {
        run_id: run_id.to_string(),
        series,
        malformed: log.malformed,
        last_error: log.last_error.clone(),
        ended: false,
    }
}

/// A data asset as the API shows it.
pub fn data_asset_to_wire(a: &muster_core::data::DataAsset) -> v1::DataAsset {
    use muster_core::data::DataSource;
    let (manifest, file, url, output) = match &a.source {
        DataSource::Snapshot { manifest, file } => {
            (Some(manifest.clone()), file.clone(), None, None)
        }
        DataSource::Url { url } => (None, None, Some(url.clone()), None),
        DataSource::Output { archive, folder } => {
            (None, None, None, Some(format!("{archive}/{folder}")))
        }
    };
    v1::DataAsset {
        name: a.name.clone(),
        version: a.version.clone(),
        workspace: a.workspace.clone(),
        r#type: a.kind.as_str().to_string(),
        manifest,
        file,
        url,
        description: a.description.clone(),
        created_at_ms: a.created_at,
        created_by: a.created_by.clone(),
        input_path: a.input_path(),
        output,
    }
}

/// A wire data asset to core (its maker and time are the server's to set); the error
/// names the field.
pub fn data_asset_from_wire(
    a: &v1::DataAsset,
    created_at: u64,
    created_by: &str,
) -> Result<muster_core::data::DataAsset, String> {
    use muster_core::data::{DataAsset, DataSource};
    let kind = OutputKind::parse(Some(a.r#type.as_str())).map_err(|e| format!("type: {e}"))?;
    let source = match (&a.manifest, &a.url) {
        (Some(m), None) => DataSource::Snapshot {
            manifest: m.clone(),
            file: a.file.clone(),
        },
        (None, Some(u)) => DataSource::Url { url: u.clone() },
        _ => return Err("path: give the uploaded manifest or an http(s) URL, one of them".into()),
    };
    Ok(DataAsset {
        name: a.name.clone(),
        version: a.version.clone(),
        workspace: if a.workspace.is_empty() {
            muster_core::access::DEFAULT_WORKSPACE.to_string()
        } else {
            a.workspace.clone()
        },
        kind,
        source,
        description: a.description.clone(),
        created_at,
        created_by: created_by.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_spec_round_trips_through_the_wire() {
        let mut spec = CoreSpec::new("python train.py");
        spec.distribution = Some(CoreDist::Tensorflow {
            worker_count: 2,
            parameter_server_count: 1,
        });
        spec.environment.image = Some("busybox".into());
        spec.environment_variables.insert("A".into(), "1".into());
        spec.timeout_s = Some(5);
        spec.code = Some(CoreCode {
            manifest: "a".repeat(64),
            files: 2,
            bytes: 10,
            git: Some(CoreGit {
                commit: "abc".into(),
                branch: Some("main".into()),
                dirty: true,
            }),
        });
        let wire: v1::RunSpec = spec.clone().into();
        assert_eq!(spec_from_wire(wire).unwrap(), spec);
    }

    #[test]
    fn provisioners_round_trip_and_bad_ones_name_the_field() {
        let docker = Provisioner::Docker(DockerProvisioner {
            image: "muster:local".into(),
            network: "host".into(),
            servers: vec!["127.0.0.1:7070".into()],
            labels: [("zone".to_string(), "a".to_string())].into(),
        });
        let command = Provisioner::Command(CommandProvisioner {
            scale_up: "/up".into(),
            scale_down: "/down".into(),
        });
        for p in [Provisioner::Static, docker, command] {
            assert_eq!(provisioner_from_wire(&provisioner_to_wire(&p)).unwrap(), p);
        }
        let d = provisioner_from_wire(&v1::Provisioner {
            r#type: "docker".into(),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d, Provisioner::Docker(DockerProvisioner::default()));
        let e = provisioner_from_wire(&v1::Provisioner {
            r#type: "cloud".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("provisioner.type"), "{e}");
        let e = provisioner_from_wire(&v1::Provisioner {
            r#type: "docker".into(),
            scale_up: "/x".into(),
            ..Default::default()
        })
        .unwrap_err();
        assert!(e.starts_with("provisioner.scale_up"), "{e}");
    }

    #[test]
    fn metrics_skip_seen_points_and_filter_by_name() {
        let mut log = muster_core::metrics::MetricsLog::new();
        for v in [1.0, 2.0, 3.0] {
            log.feed_json_line(&format!(r#"{{"name":"loss","value":{v}}}"#));
        }
        log.feed_json_line(r#"{"name":"acc","value":0.5,"step":7}"#);
        log.feed_json_line("nope");
        let skip = [("loss".to_string(), 2)].into();
        let w = metrics_to_wire("r", &log, None, &skip, false);
        assert_eq!(w.malformed, 1);
        assert_eq!(w.series.len(), 2);
        let loss = w.series.iter().find(|s| s.name == "loss").unwrap();
        assert_eq!(
            (loss.points_before, loss.steps.clone(), loss.values.clone()),
            (2, vec![2], vec![3.0])
        );
        let w = metrics_to_wire("r", &log, Some("acc"), &Default::default(), true);
        assert_eq!(w.series.len(), 1);
        assert_eq!(w.series[0].steps, [7]);
    }

    #[test]
    fn sweep_spec_round_trips_through_the_wire() {
        let spec = muster_core::sweep::parse_sweep_yaml(
            "type: sweep\ntrial:\n  command: python t.py --lr ${{search_space.lr}}\n  environment:\n    image: busybox\nsampling_algorithm:\n  type: random\n  seed: 3\nsearch_space:\n  lr:\n    type: loguniform\n    min_value: -5\n    max_value: -1\n  b:\n    type: choice\n    values: [1, two]\nobjective:\n  primary_metric: acc\n  goal: maximize\nearly_termination:\n  type: truncation_selection\n  truncation_percentage: 20\nlimits:\n  max_total_trials: 5\n  trial_timeout: 60\n",
            "e",
        )
        .unwrap();
        let wire = sweep_spec_to_wire(&spec);
        assert!(!wire.definition_json.contains("\"trial\""));
        assert_eq!(sweep_spec_from_wire(wire).unwrap(), spec);
        let bad = v1::SweepSpec {
            trial: Some(spec.trial.clone().into()),
            definition_json: "[1]".into(),
        };
        assert!(
            sweep_spec_from_wire(bad)
                .unwrap_err()
                .contains("definition_json")
        );
    }
}
