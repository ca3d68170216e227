//! muster studio's compute pages: `/compute` (the targets, in Azure ML's tabs: clusters,
//! instances, attached), `/compute/{name}` (a target's settings, its nodes with their
//! CPUs, memory and GPUs — each GPU with the run holding it — and the autoscaler's last
//! actions) and `/queue` (the waiting runs of every target in scheduling order, each with
//! the scheduler's own reason). Read-only; what a viewer sees is limited to the
//! workspaces they may read, as everywhere in the studio.

use std::collections::BTreeMap;
use std::sync::Arc;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use muster_core::Node;
use muster_core::compute::{ComputeKind, cores};
use muster_core::state::{ComputeTarget, State as CoreState, human_bytes};
use serde::Deserialize;

use super::session::Viewer;
use super::studio::{Head, render};
use crate::server::Server;
use crate::views::access::Readable;

/// Seconds between reloads of the compute and queue pages.
const REFRESH_S: u32 = 5;

/// Most waiting runs `/queue` lists per compute target (the first in line).
const QUEUE_ROWS: usize = 200;

/// One compute target as its card shows it.
#[derive(Debug)]
pub(super) struct TargetCard {
    pub name: String,
    pub kind: &'static str,
    pub tier: &'static str,
    pub size: String,
    pub provisioner: &'static str,
    /// `2 ready, 1 lost` (or `no node`).
    pub nodes: String,
    pub gpus_used: usize,
    pub gpus: usize,
    pub queued: usize,
    pub active: usize,
    pub stopped: bool,
}

impl TargetCard {
    /// The card of `t` in `s`.
    pub(super) fn of(s: &CoreState, t: &ComputeTarget) -> Self {
        let nodes: Vec<&Node> = s
            .nodes
            .values()
            .filter(|n| n.compute == t.spec.name)
            .collect();
        let mut states: BTreeMap<&'static str, usize> = BTreeMap::new();
        for n in &nodes {
            *states.entry(n.state.as_str()).or_default() += 1;
        }
        let nodes_text = if states.is_empty() {
            "no node".to_string()
        } else {
            states
                .iter()
                .map(|(s, n)| format!("{n} {s}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let wire = muster_proto::compute_to_wire(s, t);
        TargetCard {
            name: t.spec.name.clone(),
            kind: t.spec.kind.as_str(),
            tier: t.spec.tier.as_str(),
            size: t.spec.size.clone().unwrap_or_default(),
            provisioner: t.spec.provisioner.kind_str(),
            nodes: nodes_text,
            gpus_used: nodes.iter().map(|n| n.allocated_gpus.len()).sum(),
            gpus: nodes.iter().map(|n| n.capacity.gpus.len()).sum(),
            queued: wire.queued_runs as usize,
            active: wire.active_runs as usize,
            stopped: t.spec.stopped,
        }
    }
}

/// `/compute`'s tabs, as Azure ML's Compute page has them.
const TABS: [(&str, &str); 3] = [
    ("cluster", "Compute clusters"),
    ("instance", "Compute instances"),
    ("attached", "Attached compute"),
];

/// `/compute?tab=…`.
#[derive(Debug, Default, Deserialize)]
pub(super) struct ComputeQuery {
    /// `cluster` (default), `instance` or `attached` (`local` shows with attached).
    #[serde(default)]
    tab: Option<String>,
}

/// A tab: its key, label, how many targets it holds, and whether it is the one shown.
#[derive(Debug)]
struct Tab {
    key: &'static str,
    label: &'static str,
    count: usize,
    current: bool,
}

#[derive(Debug, Template)]
#[template(path = "studio/compute_list.html", whitespace = "minimize")]
struct ComputeListPage {
    head: Head,
    tabs: Vec<Tab>,
    /// The create command for this tab's kind.
    create: &'static str,
    targets: Vec<TargetCard>,
}

/// Which tab a kind is listed under.
fn tab_of(kind: ComputeKind) -> &'static str {
    match kind {
        ComputeKind::Cluster => "cluster",
        ComputeKind::Instance => "instance",
        ComputeKind::Attached | ComputeKind::Local => "attached",
    }
}

/// `GET /compute`.
pub(super) async fn compute_list(
    State(c): State<Arc<Server>>,
    viewer: Viewer,
    Query(q): Query<ComputeQuery>,
) -> Response {
    let tab = q.tab.as_deref().unwrap_or("cluster");
    let Some(&(tab, _)) = TABS.iter().find(|(k, _)| *k == tab) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("tab: {tab:?} is not a tab: use cluster, instance or attached\n"),
        )
            .into_response();
    };
    let (targets, counts) = c.coordinator.read(|s| {
        let mine: Vec<&ComputeTarget> = s
            .computes
            .values()
            .filter(|t| viewer.readable.contains(&t.spec.workspace))
            .collect();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for t in &mine {
            *counts.entry(tab_of(t.spec.kind)).or_default() += 1;
        }
        let cards = mine
            .into_iter()
            .filter(|t| tab_of(t.spec.kind) == tab)
            .map(|t| TargetCard::of(s, t))
            .collect::<Vec<_>>();
        (cards, counts)
    });
    render(&ComputeListPage {
        head: Head {
            title: "Compute".to_string(),
            refresh_s: Some(REFRESH_S),
            back: Some("studio"),
        },
        tabs: TABS
            .iter()
            .map(|&(key, label)| Tab {
                key,
                label,
                count: counts.get(key).copied().unwrap_or(0),
                current: key == tab,
            })
            .collect(),
        create: match tab {
            "cluster" => {
                "muster compute create NAME --type cluster --min-instances 0 --max-instances 4 --provisioner docker --size cpu=4,memory=16g"
            }
            "instance" => "muster compute create NAME --type instance --provisioner docker",
            _ => {
                "muster compute attach NAME --ssh USER@HOST (or muster agent --compute NAME on the machine)"
            }
        },
        targets,
    })
}

/// One GPU of a node: what it is and which run holds it.
#[derive(Debug)]
pub(super) struct GpuCell {
    pub uuid: String,
    pub model: String,
    pub memory: String,
    pub run: Option<String>,
}

/// A node as a target's page lists it.
#[derive(Debug)]
struct NodeRow {
    name: String,
    state: &'static str,
    reason: String,
    cpu: String,
    memory: String,
    gpus: Vec<GpuCell>,
    labels: String,
    runs: Vec<String>,
}

/// An autoscaler decision or provisioner outcome.
#[derive(Debug)]
struct EventRow {
    at: String,
    action: String,
    nodes: String,
    message: String,
}

#[derive(Debug, Template)]
#[template(path = "studio/compute.html", whitespace = "minimize")]
struct ComputePage {
    head: Head,
    card: TargetCard,
    description: String,
    scaling: String,
    quota: String,
    tags: String,
    nodes: Vec<NodeRow>,
    events: Vec<EventRow>,
}

/// The run holding each GPU (by UUID) of `node`: from the placements of its attempts.
fn gpu_holders(s: &CoreState, node: &Node) -> BTreeMap<String, String> {
    let mut held = BTreeMap::new();
    for (run_id, number) in &node.attempts {
        let Some(attempt) = s
            .runs
            .get(run_id)
            .and_then(|r| r.attempts.iter().find(|a| a.number == *number))
        else {
            continue;
        };
        for p in attempt.placements.iter().filter(|p| p.node_id == node.id) {
            for gpu in &p.gpus {
                held.insert(gpu.clone(), run_id.clone());
            }
        }
    }
    held
}

/// One node's GPUs on the front page's grid: each cell the run holding that GPU.
#[derive(Debug)]
pub(super) struct GpuRow {
    pub compute: String,
    pub node: String,
    pub cells: Vec<GpuCell>,
}

/// The GPU grid of the targets `readable` covers: every node with a GPU, by target and
/// name.
pub(super) fn gpu_grid(s: &CoreState, readable: &Readable) -> Vec<GpuRow> {
    let mut rows: Vec<GpuRow> = s
        .nodes
        .values()
        .filter(|n| !n.capacity.gpus.is_empty())
        .filter(|n| {
            s.computes
                .get(&n.compute)
                .is_some_and(|t| readable.contains(&t.spec.workspace))
        })
        .map(|n| GpuRow {
            compute: n.compute.clone(),
            node: n.name.clone(),
            cells: gpu_cells(s, n),
        })
        .collect();
    rows.sort_by(|a, b| (&a.compute, &a.node).cmp(&(&b.compute, &b.node)));
    rows
}

/// `node`'s GPUs, each with the run holding it.
fn gpu_cells(s: &CoreState, node: &Node) -> Vec<GpuCell> {
    let held = gpu_holders(s, node);
    node.capacity
        .gpus
        .iter()
        .map(|g| GpuCell {
            run: held.get(&g.uuid).cloned(),
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            memory: human_bytes(g.memory_bytes),
        })
        .collect()
}

/// `GET /compute/{name}`.
pub(super) async fn compute_page(
    State(c): State<Arc<Server>>,
    Path(name): Path<String>,
    viewer: Viewer,
) -> Response {
    let page = c.coordinator.read(|s| {
        let t = s
            .computes
            .get(&name)
            .filter(|t| viewer.readable.contains(&t.spec.workspace))?;
        let spec = &t.spec;
        let mut nodes: Vec<&Node> = s.nodes.values().filter(|n| n.compute == name).collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        let nodes = nodes
            .into_iter()
            .map(|n| NodeRow {
                name: n.name.clone(),
                state: n.state.as_str(),
                reason: n.state_reason.clone().unwrap_or_default(),
                cpu: format!(
                    "{} of {}",
                    cores(n.allocated.cpu_millis),
                    cores(n.capacity.cpu_millis)
                ),
                memory: format!(
                    "{} of {}",
                    human_bytes(n.allocated.memory_bytes),
                    human_bytes(n.capacity.memory_bytes)
                ),
                gpus: gpu_cells(s, n),
                labels: n
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                runs: n.attempts.iter().map(|(r, _)| r.clone()).collect(),
            })
            .collect();
        let events = s
            .scaling
            .get(&name)
            .map(|sc| {
                sc.history
                    .iter()
                    .rev()
                    .map(|e| EventRow {
                        at: super::studio::ms(Some(e.at)),
                        action: e.action.clone(),
                        nodes: e.nodes.join(", "),
                        message: e.message.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let q = &spec.quota;
        let quota = [
            q.max_gpus.map(|g| format!("{g} GPUs")),
            q.max_cpu_millis.map(|c| format!("{} CPUs", cores(c))),
            q.max_concurrent_runs.map(|r| format!("{r} runs at once")),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ");
        Some(ComputePage {
            head: Head {
                title: format!("Compute {name}"),
                refresh_s: Some(REFRESH_S),
                back: Some("studio"),
            },
            card: TargetCard::of(s, t),
            description: spec.description.clone().unwrap_or_default(),
            scaling: match spec.scale_bounds() {
                Some((min, max)) => format!(
                    "{min} to {max} nodes; a node idle {} s is released",
                    spec.idle_time_before_scale_down_s
                ),
                None => "nodes join by themselves (muster agent --compute NAME)".to_string(),
            },
            quota: if quota.is_empty() {
                "none".to_string()
            } else {
                quota
            },
            tags: spec
                .tags
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(", "),
            nodes,
            events,
        })
    });
    match page {
        Some(p) => render(&p),
        None => (
            StatusCode::NOT_FOUND,
            format!("compute target {name} does not exist: /compute lists them\n"),
        )
            .into_response(),
    }
}

/// A waiting run on `/queue`.
#[derive(Debug)]
struct QueueRow {
    position: usize,
    id: String,
    experiment: String,
    priority: i32,
    asks: String,
    waited: String,
    reason: String,
}

/// The queue of one compute target.
#[derive(Debug)]
struct QueueOf {
    compute: String,
    rows: Vec<QueueRow>,
    /// How many more wait beyond the rows shown.
    more: usize,
}

#[derive(Debug, Template)]
#[template(path = "studio/queue.html", whitespace = "minimize")]
struct QueuePage {
    head: Head,
    queues: Vec<QueueOf>,
}

/// `GET /queue`.
pub(super) async fn queue_page(State(c): State<Arc<Server>>, viewer: Viewer) -> Response {
    let now = crate::coordinator::now_ms();
    let queues = c
        .coordinator
        .read(|s| queues(s, &viewer.readable, now, |r| c.waiting.reason(r)));
    render(&QueuePage {
        head: Head {
            title: "Queue".to_string(),
            refresh_s: Some(REFRESH_S),
            back: Some("studio"),
        },
        queues,
    })
}

/// The waiting runs of the targets `readable` covers, each target's in its queue order.
fn queues(
    s: &CoreState,
    readable: &Readable,
    now: u64,
    reason: impl Fn(&muster_core::Run) -> Option<String>,
) -> Vec<QueueOf> {
    s.computes
        .values()
        .filter(|t| readable.contains(&t.spec.workspace))
        .filter_map(|t| {
            let waiting: Vec<&muster_core::Run> = s.queued_on(&t.spec.name).collect();
            if waiting.is_empty() {
                return None;
            }
            let rows = waiting
                .iter()
                .take(QUEUE_ROWS)
                .enumerate()
                .map(|(i, r)| QueueRow {
                    position: i + 1,
                    id: r.id.clone(),
                    experiment: r.spec.experiment.clone(),
                    priority: r.spec.priority,
                    asks: asks(r),
                    waited: waited(now.saturating_sub(r.created_at)),
                    reason: reason(r)
                        .unwrap_or_else(|| "waiting for the next scheduling pass".into()),
                })
                .collect();
            Some(QueueOf {
                compute: t.spec.name.clone(),
                more: waiting.len().saturating_sub(QUEUE_ROWS),
                rows,
            })
        })
        .collect()
}

/// What a run asks for, per instance: `2 × (4 CPUs, 16 GiB, 1 GPU)`.
fn asks(r: &muster_core::Run) -> String {
    let res = &r.spec.resources;
    let mut parts = Vec::new();
    if res.cpu_millis > 0 {
        parts.push(format!("{} CPUs", cores(res.cpu_millis)));
    }
    if res.memory_bytes > 0 {
        parts.push(human_bytes(res.memory_bytes));
    }
    if res.gpus > 0 {
        parts.push(format!(
            "{} GPU{}",
            res.gpus,
            if res.gpus == 1 { "" } else { "s" }
        ));
    }
    let each = if parts.is_empty() {
        "no reserved resources".to_string()
    } else {
        parts.join(", ")
    };
    match r.spec.instance_count {
        0 | 1 => each,
        n => format!("{n} × ({each})"),
    }
}

/// `5 s`, `3 min`, `2 h`.
fn waited(ms: u64) -> String {
    let s = ms / 1000;
    match s {
        0..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_read_well() {
        assert_eq!(waited(5_000), "5 s");
        assert_eq!(waited(600_000), "10 min");
        assert_eq!(waited(3 * 3_600_000), "3 h");
    }
}
