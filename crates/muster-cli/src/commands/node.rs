//! `muster node ...`.

use muster_proto::{Word, v1};
use serde_json::json;

use crate::cli::{NodeCommand, OutputFormat};
use crate::connect;
use crate::output::{NO_LIMIT, cpus, print_json, table, time};
use crate::paging::{self, PageArgs};
use crate::snapshot::human_bytes;
use muster_client::Clients;
use muster_client::status;

pub async fn run(server: &str, output: OutputFormat, cmd: NodeCommand) -> anyhow::Result<()> {
    let mut c = connect(server).await?;
    let wanted = match &cmd {
        NodeCommand::List { compute, page } => {
            return list(&c, output, compute.clone(), *page).await;
        }
        NodeCommand::Show { node } => node.clone(),
        NodeCommand::Drain { node }
        | NodeCommand::Evict { node }
        | NodeCommand::Resume { node }
        | NodeCommand::Remove { node } => {
            let action = match &cmd {
                NodeCommand::Drain { .. } => "drain",
                NodeCommand::Evict { .. } => "evict",
                NodeCommand::Remove { .. } => "remove",
                _ => "resume",
            };
            let n = c
                .compute
                .set_node_state(v1::SetNodeStateRequest {
                    node: node.clone(),
                    action: action.into(),
                    reason: None,
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&node_json(&n));
            } else {
                let what = match action {
                    "drain" => "takes no new runs; running ones finish",
                    "evict" => "is evicted; its runs restart elsewhere",
                    "remove" => {
                        "is removed; its agent's credential is revoked (a new join token brings the machine back)"
                    }
                    _ => "takes runs again",
                };
                println!("Node {} {what}.", n.name);
            }
            return Ok(());
        }
    };
    // Every node (not paged), to find the one by name or id.
    let nodes = c
        .compute
        .list_nodes(v1::ListNodesRequest::default())
        .await
        .map_err(status)?
        .into_inner()
        .nodes;
    let node = nodes
        .iter()
        .find(|n| n.name == wanted || n.id == wanted)
        .ok_or_else(|| {
            anyhow::anyhow!("node {wanted:?} is not registered: list nodes with `muster node list`")
        })?;
    if output == OutputFormat::Json {
        print_json(&node_json(node));
    } else {
        let cap = node.capacity.unwrap_or_default();
        let alloc = node.allocated.unwrap_or_default();
        println!(
            "name        {}\nid          {}\ncompute     {}\nstate       {}{}\ntier        {}\naddress     {}",
            node.name,
            node.id,
            node.compute,
            v1::NodeState::word_of(node.state),
            node.state_reason
                .as_ref()
                .map(|r| format!(" ({r})"))
                .unwrap_or_default(),
            node.tier,
            node.address
        );
        // `local` nodes have no CPU or memory figure (see `NO_LIMIT`).
        let allocated = |used: u64, cap: u64, show: fn(u64) -> String| {
            if cap == 0 {
                NO_LIMIT.to_string()
            } else {
                format!("{} of {} allocated", show(used), show(cap))
            }
        };
        println!(
            "cpu         {}",
            allocated(alloc.cpu_millis, cap.cpu_millis, cpus)
        );
        println!(
            "memory      {}",
            allocated(alloc.memory_bytes, cap.memory_bytes, human_bytes)
        );
        println!("gpus        {} of {} allocated", alloc.gpus, cap.gpus);
        for g in &node.gpus {
            let used = if node.allocated_gpus.contains(&g.uuid) {
                "in use"
            } else {
                "free"
            };
            println!(
                "  {} {} {} ({used})",
                g.uuid,
                g.model,
                human_bytes(g.memory_bytes)
            );
        }
        let labels: Vec<String> = node
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!("labels      {}", labels.join(", "));
        println!("runs        {}", node.runs.join(", "));
        println!(
            "heartbeat   {}",
            node.last_heartbeat_ms
                .map(time)
                .unwrap_or_else(|| "none seen by this server".into())
        );
    }
    Ok(())
}

/// `muster node list`: a page of nodes by name (every one with `--all`).
async fn list(
    c: &Clients,
    output: OutputFormat,
    compute: Option<String>,
    page: PageArgs,
) -> anyhow::Result<()> {
    let fetched = paging::fetch(page.rows(), |page_size, page_token| {
        let mut client = c.compute.clone();
        let request = v1::ListNodesRequest {
            compute: compute.clone(),
            page_size,
            page_token,
        };
        async move {
            let answer = client.list_nodes(request).await?.into_inner();
            Ok::<_, tonic::Status>((answer.nodes, answer.next_page_token))
        }
    })
    .await
    .map_err(status)?;
    let nodes = fetched.rows;
    if output == OutputFormat::Json {
        print_json(&json!(nodes.iter().map(node_json).collect::<Vec<_>>()));
    } else {
        let mut t = table(&["NAME", "COMPUTE", "STATE", "CPUS", "MEMORY", "GPUS", "RUNS"]);
        for n in &nodes {
            let cap = n.capacity.unwrap_or_default();
            t.add_row(vec![
                n.name.clone(),
                n.compute.clone(),
                v1::NodeState::word_of(n.state).into_owned(),
                if cap.cpu_millis == 0 {
                    "-".into()
                } else {
                    cpus(cap.cpu_millis)
                },
                if cap.memory_bytes == 0 {
                    "-".into()
                } else {
                    human_bytes(cap.memory_bytes)
                },
                format!("{}/{}", n.allocated_gpus.len(), n.gpus.len()),
                n.runs.len().to_string(),
            ]);
        }
        println!("{t}");
    }
    if fetched.more {
        let shown = format!("the first {} nodes by name", nodes.len());
        eprintln!("{}", paging::more_hint(&shown, "node", false));
    }
    Ok(())
}

fn node_json(n: &v1::Node) -> serde_json::Value {
    let cap = n.capacity.unwrap_or_default();
    let alloc = n.allocated.unwrap_or_default();
    json!({
        "id": n.id, "name": n.name, "compute": n.compute, "state": v1::NodeState::word_of(n.state), "state_reason": n.state_reason,
        "tier": n.tier, "address": n.address, "labels": n.labels,
        "capacity": {"cpu_millis": cap.cpu_millis, "memory_bytes": cap.memory_bytes, "gpus": cap.gpus},
        "allocated": {"cpu_millis": alloc.cpu_millis, "memory_bytes": alloc.memory_bytes, "gpus": alloc.gpus},
        "gpus": n.gpus.iter().map(|g| json!({"uuid": g.uuid, "model": g.model, "memory_bytes": g.memory_bytes, "allocated": n.allocated_gpus.contains(&g.uuid)})).collect::<Vec<_>>(),
        "runs": n.runs,
        "registered_at": time(n.registered_at_ms),
        "last_heartbeat": n.last_heartbeat_ms.map(time),
    })
}
