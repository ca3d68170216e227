//! `muster compute ...`.

use muster_core::compute::{ComputeKind, ComputeSpec, Tier, parse_compute_yaml};
use muster_proto::v1;
use serde_json::json;

use crate::cli::{ComputeCommand, ComputeCreateArgs, OutputFormat};
use crate::client::{connect, status};
use crate::output::{print_json, table, time};

pub async fn run(server: &str, output: OutputFormat, cmd: ComputeCommand) -> anyhow::Result<()> {
    // Validate input before touching the network.
    let create = match &cmd {
        ComputeCommand::Create(args) => Some(spec_from_args(args)?),
        _ => None,
    };
    let mut c = connect(server).await?;
    match cmd {
        ComputeCommand::Create(_) => {
            let spec = create.expect("parsed above");
            let created = c
                .compute
                .create_compute(v1::CreateComputeRequest {
                    compute: Some(muster_proto::compute_spec_to_wire(&spec)),
                })
                .await
                .map_err(status)?
                .into_inner();
            show(output, &created);
        }
        ComputeCommand::List => {
            let list = c
                .compute
                .list_computes(v1::ListComputesRequest {})
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
                .get_compute(v1::GetComputeRequest { name })
                .await
                .map_err(status)?
                .into_inner();
            show(output, &got);
        }
        ComputeCommand::Delete { name } => {
            c.compute
                .delete_compute(v1::DeleteComputeRequest { name: name.clone() })
                .await
                .map_err(status)?;
            if output == OutputFormat::Json {
                print_json(&json!({"deleted": name}));
            } else {
                println!("Deleted compute target {name}.");
            }
        }
    }
    Ok(())
}

fn spec_from_args(a: &ComputeCreateArgs) -> anyhow::Result<ComputeSpec> {
    let mut spec = match &a.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?;
            parse_compute_yaml(&text, a.name.as_deref())
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
    if let Some(k) = &a.kind
        && a.file.is_some()
    {
        spec.kind = ComputeKind::parse(k).map_err(|e| anyhow::anyhow!("--type: {e}"))?;
    }
    if let Some(s) = &a.size {
        spec.size = Some(s.clone());
    }
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
    spec.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(spec)
}

fn compute_json(c: &v1::ComputeTarget) -> serde_json::Value {
    let cap = c.capacity.unwrap_or_default();
    let alloc = c.allocated.unwrap_or_default();
    json!({
        "name": c.name, "type": c.r#type, "size": c.size, "tier": c.tier,
        "min_instances": c.min_instances, "max_instances": c.max_instances,
        "idle_time_before_scale_down": c.idle_time_before_scale_down_s,
        "description": c.description, "created_at": time(c.created_at_ms),
        "nodes": c.nodes, "queued_runs": c.queued_runs, "active_runs": c.active_runs,
        "capacity": {"cpu_millis": cap.cpu_millis, "memory_bytes": cap.memory_bytes, "gpus": cap.gpus},
        "allocated": {"cpu_millis": alloc.cpu_millis, "memory_bytes": alloc.memory_bytes, "gpus": alloc.gpus},
    })
}

fn show(output: OutputFormat, c: &v1::ComputeTarget) {
    if output == OutputFormat::Json {
        print_json(&compute_json(c));
        return;
    }
    let cap = c.capacity.unwrap_or_default();
    let alloc = c.allocated.unwrap_or_default();
    println!("name        {}", c.name);
    println!("type        {}", c.r#type);
    println!("tier        {}", c.tier);
    if let Some(s) = &c.size {
        println!("size        {s}");
    }
    if c.r#type == "cluster" {
        println!(
            "instances   {} to {} (idle {} s before scale-down)",
            c.min_instances, c.max_instances, c.idle_time_before_scale_down_s
        );
    }
    println!("nodes       {}", c.nodes);
    println!(
        "runs        {} queued, {} active",
        c.queued_runs, c.active_runs
    );
    println!(
        "cpu         {:.1} of {:.1} allocated",
        alloc.cpu_millis as f64 / 1000.0,
        cap.cpu_millis as f64 / 1000.0
    );
    println!(
        "memory      {} of {} allocated",
        crate::snapshot::human_bytes(alloc.memory_bytes),
        crate::snapshot::human_bytes(cap.memory_bytes)
    );
    println!("gpus        {} of {} allocated", alloc.gpus, cap.gpus);
}
