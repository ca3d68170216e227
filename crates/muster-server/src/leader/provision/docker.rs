//! The `docker` provisioner: one agent container per node on the leader's Docker host.
//!
//! A container is named after its node (`muster-<compute>-<n>`, unique per compute
//! target) and labelled with the compute, the node and the servers its agent connects
//! to, so a new leader finds what exists by listing them: starting a node whose container
//! exists only makes sure it runs, and a labelled container no decision keeps (e.g. left
//! by a leader that died between stopping a node and recording it) is removed.
//!
//! The same listing finds reclaimed nodes: an up node whose container was removed, or
//! has exited, lost its machine without a decision (see the module above).
//!
//! A node's container is what the target's `size` says ([`muster_core::sizes`]): that many
//! CPUs and that much memory as the container's limits (and what its agent offers), and
//! that many GPUs by a device request to the NVIDIA runtime. Its agent runs image runs
//! too: it gets the engine's socket, and its data dir is a volume of its own
//! (`muster-<node>`, removed with the node) mounted at the volume's path on the host, so
//! the workspace paths the agent gives the engine for a run's mounts are the host's.

use std::collections::{BTreeMap, HashMap};

use bollard::Docker;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, VolumeCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, RemoveContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use muster_core::compute::DockerProvisioner;
use muster_core::sizes::node_size;
use muster_core::state::ProvisionOutcome;
use muster_docker::{message as engine_message, status_of};

use super::{Step, Work, agent_args};

/// Marks a container as a provisioned agent.
pub(crate) const LABEL_PROVISIONER: &str = "muster.provisioner";
/// The compute target of a provisioned agent container.
pub(crate) const LABEL_COMPUTE: &str = "muster.compute";
/// The node name of a provisioned agent container.
pub(crate) const LABEL_NODE: &str = "muster.provisioned-node";
/// The servers a provisioned agent connects to (comma-separated): which cluster owns it.
pub(crate) const LABEL_SERVERS: &str = "muster.servers";

/// The engine's socket, given to agent containers so they can run image runs.
const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// Seconds an agent gets to stop before it is killed.
const STOP_GRACE_S: i32 = 5;

/// What a pass did.
pub(crate) struct Outcome {
    /// The containers were listed (and strays removed).
    pub listed: bool,
    /// The outcomes to record.
    pub steps: Vec<Step>,
}

/// Starts the nodes to launch, removes the nodes being released, and (with `resync`)
/// removes labelled containers of this compute target that no decision keeps and reports
/// the up nodes whose containers are gone or exited.
pub(crate) async fn reconcile(
    docker: &Docker,
    settings: &DockerProvisioner,
    servers: &[String],
    work: &Work,
    resync: bool,
    joins: &BTreeMap<String, String>,
) -> Outcome {
    let servers_label = servers.join(",");
    let mut steps = Vec::new();
    let mut listed = false;
    if resync {
        match list(docker, &work.compute).await {
            Ok(containers) => {
                listed = true;
                steps.extend(reclaimed(&containers, &servers_label, work));
                for Container { name, labels, .. } in containers {
                    let node = labels.get(LABEL_NODE).cloned().unwrap_or_default();
                    let ours = labels.get(LABEL_SERVERS) == Some(&servers_label);
                    if ours && !work.keep.contains(&node) && !work.release.contains(&node) {
                        tracing::warn!(container = %name, "removing a stray agent container");
                        if let Err(e) = remove(docker, &name).await {
                            steps.push(Step::Failed(vec![], e));
                        }
                    }
                }
            }
            Err(e) => steps.push(Step::Failed(work.keep.clone(), e)),
        }
    }
    let mut started = Vec::new();
    for node in &work.launch {
        let join = joins.get(node).map(String::as_str);
        match ensure_running(docker, settings, servers, &servers_label, work, node, join).await {
            Ok(()) => started.push(node.clone()),
            Err(e) => {
                steps.push(Step::Failed(vec![node.clone()], e));
                break;
            }
        }
    }
    if !started.is_empty() {
        steps.insert(0, Step::Done(ProvisionOutcome::Launched, started));
    }
    let mut stopped = Vec::new();
    for node in &work.release {
        match remove(docker, node).await {
            Ok(()) => stopped.push(node.clone()),
            Err(e) => steps.push(Step::Failed(vec![node.clone()], e)),
        }
    }
    if !stopped.is_empty() {
        steps.push(Step::Done(ProvisionOutcome::Released, stopped));
    }
    Outcome { listed, steps }
}

/// One provisioned agent container, as listed.
struct Container {
    name: String,
    labels: HashMap<String, String>,
    /// The engine's word for it: created, running, paused, restarting, exited, dead...
    state: String,
    /// How the engine describes it, e.g. "Exited (137) 2 seconds ago".
    status: String,
}

/// The up nodes of `work` whose agent container this cluster's listing no longer shows
/// running: removed, exited or dead. A container being created or restarted is not gone.
fn reclaimed(containers: &[Container], servers_label: &str, work: &Work) -> Vec<Step> {
    work.up
        .iter()
        .filter_map(|(name, node_id)| {
            let container = containers.iter().find(|c| {
                c.labels.get(LABEL_NODE) == Some(name)
                    && c.labels.get(LABEL_SERVERS).map(String::as_str) == Some(servers_label)
            });
            let why = match container {
                None => format!("its agent container {name} was removed from the Docker host"),
                Some(c) if matches!(c.state.as_str(), "exited" | "dead") => format!(
                    "its agent container {name} stopped on the Docker host ({})",
                    c.status
                ),
                Some(_) => return None,
            };
            Some(Step::Reclaimed {
                node_id: node_id.clone(),
                name: name.clone(),
                why,
            })
        })
        .collect()
}

/// The provisioned agent containers of `compute`, running or not.
async fn list(docker: &Docker, compute: &str) -> Result<Vec<Container>, String> {
    let filters = HashMap::from([(
        "label",
        vec![
            format!("{LABEL_PROVISIONER}=docker"),
            format!("{LABEL_COMPUTE}={compute}"),
        ],
    )]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let list = docker.list_containers(Some(options)).await.map_err(|e| {
        format!(
            "could not list the agent containers: {}",
            engine_message(&e)
        )
    })?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let name = c.names?.first()?.trim_start_matches('/').to_string();
            Some(Container {
                name,
                labels: c.labels.unwrap_or_default(),
                state: c.state.map(|s| s.to_string()).unwrap_or_default(),
                status: c.status.unwrap_or_default(),
            })
        })
        .collect())
}

/// Creates (if missing) and starts (if stopped) the agent container of `node`.
async fn ensure_running(
    docker: &Docker,
    settings: &DockerProvisioner,
    servers: &[String],
    servers_label: &str,
    work: &Work,
    node: &str,
    join: Option<&str>,
) -> Result<(), String> {
    let mut labels: HashMap<String, String> = settings
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    labels.insert(LABEL_PROVISIONER.into(), "docker".into());
    labels.insert(LABEL_COMPUTE.into(), work.compute.clone());
    labels.insert(LABEL_NODE.into(), node.into());
    labels.insert(LABEL_SERVERS.into(), servers_label.into());
    let data_dir = data_volume(docker, node, &labels).await?;
    let mut cmd = vec!["--server".to_string(), servers.join(",")];
    cmd.extend(agent_args(
        &work.compute,
        node,
        work.tier,
        &settings.labels,
        &data_dir,
    ));
    let mut host = HostConfig {
        network_mode: Some(settings.network.clone()),
        init: Some(true),
        binds: Some(vec![
            format!("{}:{data_dir}", volume_name(node)),
            format!("{DOCKER_SOCKET}:{DOCKER_SOCKET}"),
        ]),
        ..Default::default()
    };
    // A known size is the container's limits, what its agent offers, and its GPUs.
    if let Some(size) = work
        .size
        .as_deref()
        .and_then(|s| node_size(s).ok().flatten())
    {
        if size.cpu_millis > 0 {
            host.nano_cpus = Some(size.cpu_millis as i64 * 1_000_000);
            cmd.extend(["--cpus".into(), format!("{}m", size.cpu_millis)]);
        }
        if size.memory_bytes > 0 {
            host.memory = Some(size.memory_bytes as i64);
            cmd.extend(["--memory".into(), size.memory_bytes.to_string()]);
        }
        if size.gpus > 0 {
            host.device_requests = Some(vec![DeviceRequest {
                driver: Some("nvidia".into()),
                count: Some(size.gpus.into()),
                capabilities: Some(vec![vec!["gpu".into()]]),
                ..Default::default()
            }]);
        }
    }
    let body = ContainerCreateBody {
        image: Some(settings.image.clone()),
        entrypoint: Some(vec!["muster".into()]),
        cmd: Some(cmd),
        // The agent trades it for its credential on first start (kept in its data dir).
        env: join.map(|j| vec![format!("MUSTER_JOIN_TOKEN={j}")]),
        labels: Some(labels),
        host_config: Some(host),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(node).build();
    match docker.create_container(Some(options), body).await {
        Ok(_) => {}
        Err(e) if status_of(&e) == Some(409) => {} // exists: start it below if stopped
        Err(e) if status_of(&e) == Some(404) && engine_message(&e).contains("image") => {
            return Err(format!(
                "image {} is not on the Docker host: build it (deploy/build-image.sh builds muster:local) or set the provisioner's image",
                settings.image
            ));
        }
        Err(e) => {
            return Err(format!(
                "could not create the agent container {node}: {}",
                engine_message(&e)
            ));
        }
    }
    match docker.start_container(node, None).await {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(304) => Ok(()), // already running
        Err(e) => Err(format!(
            "could not start the agent container {node}: {}",
            engine_message(&e)
        )),
    }
}

/// The name of `node`'s data volume.
fn volume_name(node: &str) -> String {
    format!("muster-{node}")
}

/// Creates (if missing) `node`'s data volume; where it lies on the host, which is where
/// the agent container mounts it.
async fn data_volume(
    docker: &Docker,
    node: &str,
    labels: &HashMap<String, String>,
) -> Result<String, String> {
    let options = VolumeCreateRequest {
        name: Some(volume_name(node)),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let volume = docker.create_volume(options).await.map_err(|e| {
        format!(
            "could not create the data volume of node {node}: {}",
            engine_message(&e)
        )
    })?;
    if volume.mountpoint.is_empty() {
        return Err(format!(
            "the data volume of node {node} has no path on the Docker host (driver {}): the docker provisioner needs the local volume driver",
            volume.driver
        ));
    }
    Ok(volume.mountpoint)
}

/// Stops (SIGTERM, then SIGKILL after the grace) and removes a container and its data
/// volume; one that does not exist is not an error.
async fn remove(docker: &Docker, name: &str) -> Result<(), String> {
    let stop = StopContainerOptionsBuilder::default()
        .t(STOP_GRACE_S)
        .build();
    match docker.stop_container(name, Some(stop)).await {
        Ok(()) => {}
        Err(e) if matches!(status_of(&e), Some(304 | 404)) => {}
        Err(e) => tracing::debug!(container = name, "docker stop: {}", engine_message(&e)),
    }
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(name, Some(options)).await {
        Ok(()) => {}
        Err(e) if status_of(&e) == Some(404) => {}
        Err(e) => {
            return Err(format!(
                "could not remove the agent container {name}: {}",
                engine_message(&e)
            ));
        }
    }
    match docker
        .remove_volume(
            &volume_name(name),
            None::<bollard::query_parameters::RemoveVolumeOptions>,
        )
        .await
    {
        Ok(()) => Ok(()),
        Err(e) if status_of(&e) == Some(404) => Ok(()),
        Err(e) => Err(format!(
            "could not remove the data volume of node {name}: {}",
            engine_message(&e)
        )),
    }
}
