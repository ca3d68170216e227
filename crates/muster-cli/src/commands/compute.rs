//! `muster compute ...`.

use muster_core::compute::{
    CommandProvisioner, ComputeKind, ComputeSpec, DockerProvisioner, Provisioner, Tier,
    parse_compute_yaml_as,
};
use muster_proto::{Word, v1};
use serde_json::json;

use crate::cli::{ComputeCommand, ComputeCreateArgs, ComputeSettings, OutputFormat};
use crate::connect;
use crate::output::{NO_LIMIT, cpus, print_json, table, time};
use crate::snapshot::human_bytes;
use muster_client::status;

pub async fn run(server: &str, output: OutputFormat, cmd: ComputeCommand) -> anyhow::Result<()> {
    let cmd = match cmd {
        ComputeCommand::Attach(args) => return super::attach::attach(server, output, *args).await,
        ComputeCommand::Detach(args) => return super::attach::detach(server, output, *args).await,
        cmd => cmd,
    };
    // Validate input before touching the network.
    let create = match &cmd {
        ComputeCommand::Create(args) => {
            let mut spec = spec_from_args(args)?;
            if let Some(w) = crate::workspace() {
                spec.workspace = w.to_string();
            }
            Some(spec)
        }
        _ => None,
    };
    let mut c = connect(server).await?;
    match cmd {
        ComputeCommand::Create(_) => {
            let spec = create.expect("parsed above");
            for w in spec.warnings() {
                eprintln!("warning: {w}");
            }
            let created = c
                .compute
                .create_compute(v1::CreateComputeRequest {
                    compute: Some(muster_proto::compute_spec_to_wire(&spec)),
                })
                .await
                .map_err(status)?
                .into_inner();
            let got = c
                .compute
                .get_compute_status(v1::GetComputeRequest {
                    name: created.name.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            show(output, &got);
        }
        ComputeCommand::List => {
            let list = c
                .compute
                .list_computes(v1::ListComputesRequest {
                    workspace: crate::workspace().map(Into::into),
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&json!(
                    list.computes.iter().map(compute_json).collect::<Vec<_>>()
                ));
            } else {
                let mut t = table(&[
                    "NAME", "TYPE", "TIER", "NODES", "MIN", "MAX", "QUEUED", "ACTIVE",
                ]);
                for c in &list.computes {
                    t.add_row(vec![
                        c.name.clone(),
                        c.r#type.clone(),
                        c.tier.clone(),
                        c.nodes.to_string(),
                        c.min_instances.to_string(),
                        c.max_instances.to_string(),
                        c.queued_runs.to_string(),
                        c.active_runs.to_string(),
                    ]);
                }
                println!("{t}");
            }
        }
        ComputeCommand::Show { name } => {
            let got = c
                .compute
                .get_compute_status(v1::GetComputeRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            show(output, &got);
        }
        ComputeCommand::Update(args) => {
            let current = c
                .compute
                .get_compute(v1::GetComputeRequest {
                    name: args.name.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let mut spec =
                muster_proto::compute_spec_from_wire(&current).map_err(anyhow::Error::msg)?;
            apply_settings(&mut spec, &args.settings)?;
            if !args.node_labels.is_empty() {
                let Provisioner::Docker(d) = &mut spec.provisioner else {
                    anyhow::bail!(
                        "--node-labels: only a docker provisioner labels the nodes it starts; {} is {}: label a node with `muster agent --labels`",
                        spec.name,
                        spec.provisioner.kind_str()
                    );
                };
                d.labels = crate::cli::parse_labels(&args.node_labels)?;
            }
            spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
            let updated = c
                .compute
                .update_compute(v1::UpdateComputeRequest {
                    compute: Some(muster_proto::compute_spec_to_wire(&spec)),
                })
                .await
                .map_err(status)?
                .into_inner();
            let got = c
                .compute
                .get_compute_status(v1::GetComputeRequest {
                    name: updated.name.clone(),
                })
                .await
                .map_err(status)?
                .into_inner();
            show(output, &got);
        }
        ComputeCommand::Stop { name } => {
            let target = set_stopped(&mut c, &name, true).await?;
            if output == OutputFormat::Json {
                print_json(&compute_json(&target));
            } else {
                println!(
                    "Stopping compute instance {name}: its node stops once no run holds it; queued runs wait for `muster compute start {name}`."
                );
            }
        }
        ComputeCommand::Start { name } => {
            let target = set_stopped(&mut c, &name, false).await?;
            if output == OutputFormat::Json {
                print_json(&compute_json(&target));
            } else {
                println!("Starting compute instance {name}: its provisioner starts its node.");
            }
        }
        ComputeCommand::Restart { name, timeout } => {
            set_stopped(&mut c, &name, true).await?;
            eprintln!("Stopping compute instance {name}…");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(timeout);
            loop {
                let s = c
                    .compute
                    .get_compute_status(v1::GetComputeRequest { name: name.clone() })
                    .await
                    .map_err(status)?
                    .into_inner();
                if s.nodes.is_empty() && s.provisioned.is_empty() {
                    break;
                }
                if std::time::Instant::now() >= deadline {
                    anyhow::bail!(
                        "compute instance {name} is stopped but its node did not stop within {timeout} s (a run still holds it?): `muster compute show {name}` says what is left; `muster compute start {name}` starts it again"
                    );
                }
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            let target = set_stopped(&mut c, &name, false).await?;
            if output == OutputFormat::Json {
                print_json(&compute_json(&target));
            } else {
                println!("Restarted compute instance {name}: its provisioner starts a new node.");
            }
        }
        ComputeCommand::Delete { name } => {
            c.compute
                .delete_compute(v1::DeleteComputeRequest { name: name.clone() })
                .await
                .map_err(status)?;
            // An autoscaled target goes once its provisioner has stopped its nodes.
            let stopping = c
                .compute
                .get_compute_status(v1::GetComputeRequest { name: name.clone() })
                .await
                .ok()
                .map(|s| s.into_inner().provisioned.len());
            if output == OutputFormat::Json {
                print_json(&json!({"deleted": name, "stopping_nodes": stopping.unwrap_or(0)}));
            } else if let Some(n) = stopping {
                println!(
                    "Deleting compute target {name}: its provisioner is stopping {n} node(s); it goes with the last."
                );
            } else {
                println!("Deleted compute target {name}.");
            }
        }
        ComputeCommand::Attach(_) | ComputeCommand::Detach(_) => unreachable!("handled above"),
    }
    Ok(())
}

/// Stops or starts compute instance `name`; the target as it is now.
async fn set_stopped(
    c: &mut muster_client::Clients,
    name: &str,
    stopped: bool,
) -> anyhow::Result<v1::ComputeTarget> {
    Ok(c.compute
        .set_compute_stopped(v1::SetComputeStoppedRequest {
            name: name.to_string(),
            stopped,
        })
        .await
        .map_err(status)?
        .into_inner())
}

fn spec_from_args(a: &ComputeCreateArgs) -> anyhow::Result<ComputeSpec> {
    let mut spec = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            let kind = a
                .kind
                .as_deref()
                .map(ComputeKind::parse)
                .transpose()
                .map_err(|e| anyhow::anyhow!("--type: {e}"))?;
            parse_compute_yaml_as(&text, a.name.as_deref(), kind)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => {
            let name = a.name.clone().ok_or_else(|| {
                anyhow::anyhow!("give the compute target a NAME, or a YAML file with -f")
            })?;
            let kind = a.kind.as_deref().ok_or_else(|| {
                anyhow::anyhow!("--type: missing: use local, cluster, instance or attached")
            })?;
            ComputeSpec::new(
                name,
                ComputeKind::parse(kind).map_err(|e| anyhow::anyhow!("--type: {e}"))?,
            )
        }
    };
    if let Some(s) = &a.size {
        spec.size = Some(s.clone());
    }
    apply_settings(&mut spec, &a.settings)?;
    spec.provisioner = provisioner_from_args(a, spec.provisioner.clone())?;
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
}

/// `spec` with the settings the flags name changed (the rest as they are).
fn apply_settings(spec: &mut ComputeSpec, a: &ComputeSettings) -> anyhow::Result<()> {
    if let Some(v) = a.min_instances {
        spec.min_instances = v;
    }
    if let Some(v) = a.max_instances {
        spec.max_instances = v;
    }
    if let Some(v) = a.idle_time_before_scale_down {
        spec.idle_time_before_scale_down_s = v;
    }
    if let Some(t) = &a.tier {
        spec.tier = Tier::parse(t).map_err(|e| anyhow::anyhow!("--tier: {e}"))?;
    }
    if let Some(d) = &a.description {
        spec.description = Some(d.clone());
    }
    if let Some(v) = a.max_gpus {
        spec.quota.max_gpus = Some(v);
    }
    if let Some(v) = &a.max_cpus {
        spec.quota.max_cpu_millis = Some(
            muster_core::resources::parse_cpu(v).map_err(|e| anyhow::anyhow!("--max-cpus: {e}"))?,
        );
    }
    if let Some(v) = a.max_concurrent_runs {
        spec.quota.max_concurrent_runs = Some(v);
    }
    Ok(())
}

/// The provisioner from the flags, over the YAML's (if any).
fn provisioner_from_args(
    a: &ComputeCreateArgs,
    from_file: Provisioner,
) -> anyhow::Result<Provisioner> {
    let kind = match &a.provisioner {
        Some(k) => k.to_ascii_lowercase(),
        None => from_file.kind_str().to_string(),
    };
    let docker_flags = [
        ("--docker-image", a.docker_image.is_some()),
        ("--docker-network", a.docker_network.is_some()),
        ("--agent-servers", !a.agent_servers.is_empty()),
        ("--node-labels", !a.node_labels.is_empty()),
    ];
    let command_flags = [
        ("--scale-up", a.scale_up.is_some()),
        ("--scale-down", a.scale_down.is_some()),
    ];
    let refuse = |flags: &[(&str, bool)], needs: &str| -> anyhow::Result<()> {
        match flags.iter().find(|(_, given)| *given) {
            Some((flag, _)) => anyhow::bail!("{flag}: only for --provisioner {needs}"),
            None => Ok(()),
        }
    };
    match kind.as_str() {
        "static" => {
            refuse(&docker_flags, "docker")?;
            refuse(&command_flags, "command")?;
            Ok(Provisioner::Static)
        }
        "docker" => {
            refuse(&command_flags, "command")?;
            let mut d = match from_file {
                Provisioner::Docker(d) => d,
                _ => DockerProvisioner::default(),
            };
            if let Some(v) = &a.docker_image {
                d.image = v.clone();
            }
            if let Some(v) = &a.docker_network {
                d.network = v.clone();
            }
            if !a.agent_servers.is_empty() {
                d.servers = a
                    .agent_servers
                    .iter()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect();
            }
            if !a.node_labels.is_empty() {
                d.labels = crate::cli::parse_labels(&a.node_labels)
                    .map_err(|e| anyhow::anyhow!("--node-labels: {e}"))?;
            }
            Ok(Provisioner::Docker(d))
        }
        "command" => {
            refuse(&docker_flags, "docker")?;
            let mut c = match from_file {
                Provisioner::Command(c) => c,
                _ => CommandProvisioner::default(),
            };
            if let Some(v) = &a.scale_up {
                c.scale_up = v.clone();
            }
            if let Some(v) = &a.scale_down {
                c.scale_down = v.clone();
            }
            if c.scale_up.trim().is_empty() {
                anyhow::bail!("--scale-up: missing: give the script that starts nodes");
            }
            if c.scale_down.trim().is_empty() {
                anyhow::bail!("--scale-down: missing: give the script that stops nodes");
            }
            Ok(Provisioner::Command(c))
        }
        other => anyhow::bail!(
            "--provisioner: unknown provisioner {other:?}: use static, docker or command"
        ),
    }
}

fn provisioner_json(p: &v1::Provisioner) -> serde_json::Value {
    match p.r#type.as_str() {
        "docker" => json!({
            "type": p.r#type, "image": p.image, "network": p.network,
            "servers": p.servers, "labels": p.labels,
        }),
        "command" => json!({"type": p.r#type, "scale_up": p.scale_up, "scale_down": p.scale_down}),
        _ => json!({"type": "static"}),
    }
}

fn status_json(s: &v1::ComputeStatus) -> serde_json::Value {
    let c = s.compute.clone().unwrap_or_default();
    let mut v = compute_json(&c);
    let cap = c.capacity.unwrap_or_default();
    let alloc = c.allocated.unwrap_or_default();
    v["running_runs"] = json!(s.running_runs);
    v["free"] = json!({
        "cpu_millis": cap.cpu_millis.saturating_sub(alloc.cpu_millis),
        "memory_bytes": cap.memory_bytes.saturating_sub(alloc.memory_bytes),
        "gpus": cap.gpus.saturating_sub(alloc.gpus),
    });
    v["node_list"] = json!(
        s.nodes
            .iter()
            .map(|n| {
                let cap = n.capacity.unwrap_or_default();
                let alloc = n.allocated.unwrap_or_default();
                json!({
                    "name": n.name, "state": v1::NodeState::word_of(n.state), "state_reason": n.state_reason,
                    "runs": n.runs,
                    "capacity": {"cpu_millis": cap.cpu_millis, "memory_bytes": cap.memory_bytes, "gpus": cap.gpus, "max_runs": n.max_runs},
                    "allocated": {"cpu_millis": alloc.cpu_millis, "memory_bytes": alloc.memory_bytes, "gpus": alloc.gpus},
                })
            })
            .collect::<Vec<_>>()
    );
    v["provisioned"] = json!(
        s.provisioned
            .iter()
            .map(|p| json!({"name": p.name, "phase": v1::ProvisionPhase::word_of(p.phase), "requested_at": time(p.requested_at_ms)}))
            .collect::<Vec<_>>()
    );
    v["history"] = json!(
        s.history
            .iter()
            .map(|e| json!({"at": time(e.at_ms), "action": e.action, "nodes": e.nodes, "message": e.message}))
            .collect::<Vec<_>>()
    );
    v
}

fn compute_json(c: &v1::ComputeTarget) -> serde_json::Value {
    let cap = c.capacity.unwrap_or_default();
    let alloc = c.allocated.unwrap_or_default();
    json!({
        "name": c.name, "type": c.r#type, "size": c.size, "tier": c.tier,
        "min_instances": c.min_instances, "max_instances": c.max_instances,
        "idle_time_before_scale_down": c.idle_time_before_scale_down_s,
        "description": c.description, "created_at": time(c.created_at_ms),
        "tags": c.tags, "stopped": c.stopped,
        "nodes": c.nodes, "queued_runs": c.queued_runs, "active_runs": c.active_runs,
        "capacity": {"cpu_millis": cap.cpu_millis, "memory_bytes": cap.memory_bytes, "gpus": cap.gpus},
        "allocated": {"cpu_millis": alloc.cpu_millis, "memory_bytes": alloc.memory_bytes, "gpus": alloc.gpus},
        "provisioner": provisioner_json(&c.provisioner.clone().unwrap_or_default()),
        "quota": c.quota.map(|q| json!({
            "max_gpus": q.max_gpus, "max_cpu_millis": q.max_cpu_millis,
            "max_concurrent_runs": q.max_concurrent_runs,
        })),
        "runs": run_policy_json(c.run_policy.as_ref()),
    })
}

/// What the target's runs may do: the hardened defaults, or what its `runs:` allows.
fn run_policy_json(p: Option<&v1::RunPolicy>) -> serde_json::Value {
    let p = p.cloned().unwrap_or_default();
    json!({
        "allow_root": p.allow_root,
        "add_capabilities": p.add_capabilities,
        "max_processes": if p.max_processes == 0 {
            muster_core::compute::DEFAULT_MAX_PROCESSES
        } else {
            p.max_processes
        },
    })
}

/// The text line of the target's run policy.
fn run_policy_line(p: Option<&v1::RunPolicy>) -> String {
    let p = p.cloned().unwrap_or_default();
    let processes = if p.max_processes == 0 {
        muster_core::compute::DEFAULT_MAX_PROCESSES
    } else {
        p.max_processes
    };
    let mut parts = vec![if p.allow_root {
        "containers may run as root".to_string()
    } else {
        "non-root containers".to_string()
    }];
    parts.push(if p.add_capabilities.is_empty() {
        "no capabilities".to_string()
    } else {
        format!("capabilities {}", p.add_capabilities.join(","))
    });
    parts.push(format!("at most {processes} processes"));
    parts.join(", ")
}

fn show(output: OutputFormat, s: &v1::ComputeStatus) {
    if output == OutputFormat::Json {
        print_json(&status_json(s));
        return;
    }
    let c = s.compute.clone().unwrap_or_default();
    let cap = c.capacity.unwrap_or_default();
    let alloc = c.allocated.unwrap_or_default();
    let p = c.provisioner.clone().unwrap_or_default();
    println!("name         {}", c.name);
    println!("type         {}", c.r#type);
    println!("tier         {}", c.tier);
    if let Some(size) = &c.size {
        println!("size         {size}");
    }
    if c.stopped {
        println!(
            "state        stopped (`muster compute start {}` starts it)",
            c.name
        );
    }
    if !c.tags.is_empty() {
        let mut tags: Vec<_> = c.tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        tags.sort();
        println!("tags         {}", tags.join(", "));
    }
    if c.r#type == "cluster" {
        println!(
            "instances    {} to {} (idle {} s before scale-down)",
            c.min_instances, c.max_instances, c.idle_time_before_scale_down_s
        );
    }
    match p.r#type.as_str() {
        "docker" => println!(
            "provisioner  docker (image {}, network {}{})",
            p.image,
            p.network,
            if p.servers.is_empty() {
                String::new()
            } else {
                format!(", servers {}", p.servers.join(","))
            }
        ),
        "command" => println!(
            "provisioner  command (scale-up {}, scale-down {})",
            p.scale_up, p.scale_down
        ),
        _ => println!("provisioner  static"),
    }
    println!("run policy   {}", run_policy_line(c.run_policy.as_ref()));
    println!("nodes        {}", c.nodes);
    println!(
        "runs         {} queued, {} running, {} active",
        c.queued_runs, s.running_runs, c.active_runs
    );
    // A target of `local` nodes has no CPU or memory figure (see `NO_LIMIT`).
    let used_free_of = |used: u64, cap: u64, show: fn(u64) -> String| {
        if cap == 0 {
            NO_LIMIT.to_string()
        } else {
            format!(
                "{} used, {} free of {}",
                show(used),
                show(cap.saturating_sub(used)),
                show(cap)
            )
        }
    };
    println!(
        "cpu          {}",
        used_free_of(alloc.cpu_millis, cap.cpu_millis, cpus)
    );
    println!(
        "memory       {}",
        used_free_of(alloc.memory_bytes, cap.memory_bytes, human_bytes)
    );
    println!(
        "gpus         {} used, {} free of {}",
        alloc.gpus,
        cap.gpus.saturating_sub(alloc.gpus),
        cap.gpus
    );
    if let Some(q) = c.quota {
        let mut limits = Vec::new();
        if let Some(g) = q.max_gpus {
            limits.push(format!("{g} GPUs"));
        }
        if let Some(m) = q.max_cpu_millis {
            limits.push(format!("{} CPUs", m as f64 / 1000.0));
        }
        if let Some(r) = q.max_concurrent_runs {
            limits.push(format!("{r} active runs"));
        }
        println!("quota        at most {}", limits.join(", "));
    }
    if !s.nodes.is_empty() {
        let mut t = table(&["NODE", "STATE", "CPU USED/TOTAL", "GPUS USED/TOTAL", "RUNS"]);
        for n in &s.nodes {
            let cap = n.capacity.unwrap_or_default();
            let alloc = n.allocated.unwrap_or_default();
            t.add_row(vec![
                n.name.clone(),
                v1::NodeState::word_of(n.state).into_owned(),
                if cap.cpu_millis == 0 {
                    "-".into()
                } else {
                    format!("{}/{}", cpus(alloc.cpu_millis), cpus(cap.cpu_millis))
                },
                format!("{}/{}", alloc.gpus, cap.gpus),
                match n.max_runs {
                    0 => n.runs.len().to_string(),
                    max => format!("{}/{max}", n.runs.len()),
                },
            ]);
        }
        println!("{t}");
    }
    let pending: Vec<String> = s
        .provisioned
        .iter()
        .filter(|p| {
            p.phase() != v1::ProvisionPhase::Launched || !s.nodes.iter().any(|n| n.name == p.name)
        })
        .map(|p| format!("{} ({})", p.name, v1::ProvisionPhase::word_of(p.phase)))
        .collect();
    if !pending.is_empty() {
        println!("provisioning {}", pending.join(", "));
    }
    if !s.history.is_empty() {
        println!("last actions");
        for e in s.history.iter().rev().take(10) {
            println!(
                "  {}  {:<10} {}: {}",
                time(e.at_ms),
                e.action,
                e.nodes.join(","),
                e.message
            );
        }
    }
}
