//! Distributed runs (DESIGN.md section 9): what each rank of an attempt is told about the
//! others, as environment variables and (for MPI) a hostfile.
//!
//! The agent of every node gets the whole placement (every rank's node name and address,
//! the attempt's port and secret) and calls [`rank_setup`]; the result depends on nothing
//! else, so every rank computes the same view of the job.
//!
//! - every distributed attempt: `AZ_BATCH_MASTER_NODE` (`addr:port` of rank 0, as Azure ML
//!   sets it); with a single instance the master is `127.0.0.1` (its processes meet inside
//!   its own container);
//! - `pytorch`: `MASTER_ADDR`, `MASTER_PORT`, `WORLD_SIZE`, `NODE_RANK`, `RANK`,
//!   `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, and torchrun's `PET_*` variables. muster starts the
//!   command **once per instance** (as Azure ML does when the command is a launcher): with
//!   `process_count_per_instance = K > 1`, `WORLD_SIZE` counts every process
//!   (instances × K), `RANK` is the global rank of the instance's first process
//!   (`NODE_RANK × K`), `LOCAL_RANK` is 0, and `PET_NPROC_PER_NODE = K`, so a command of
//!   `torchrun train.py` (no arguments needed) spawns the K processes and gives each its
//!   own `RANK` and `LOCAL_RANK`;
//! - `tensorflow`: `TF_CONFIG` with every rank's `addr:port` (`worker`, then `ps` for the
//!   last `parameter_server_count` ranks) and this rank's task;
//! - `mpi`: a hostfile (`<node name> slots=K` per rank, rank 0 first), Open MPI's
//!   `OMPI_MCA_orte_default_hostfile` (and PRRTE's name for Open MPI 5), the rsh agent
//!   (`OMPI_MCA_plm_rsh_agent`: muster's helper, which reaches the node's agent and execs
//!   into the rank's container; no sshd), no tree spawn, and `OMPI_ALLOW_RUN_AS_ROOT`.
//!   Hosts are named by muster node name (unique, unlike addresses); the helper maps each
//!   name to its node's agent with `MUSTER_RSH_PEERS` (`name=addr:port,...`).

use crate::spec::Distribution;

/// The lowest port a distributed attempt is given (torch.distributed's default).
pub const FIRST_MASTER_PORT: u16 = 29500;

/// The lowest port from [`FIRST_MASTER_PORT`] up that is not in `used` (the ports of the
/// other active attempts on the attempt's nodes). Distributed containers share their
/// node's network, so two attempts on one node must not listen on the same port.
pub fn choose_master_port(used: impl IntoIterator<Item = u16>) -> u16 {
    let used: std::collections::BTreeSet<u16> = used.into_iter().collect();
    (FIRST_MASTER_PORT..=u16::MAX)
        .find(|p| !used.contains(p))
        .unwrap_or(FIRST_MASTER_PORT)
}

/// One rank's node, as every rank sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    /// The node's name (unique): the host name in an MPI hostfile.
    pub name: String,
    /// The address other nodes reach it at (the agent's advertised address).
    pub address: String,
    /// The port of its agent's exec listener (the MPI rsh helper's way in), if it has one.
    pub exec_port: Option<u16>,
}

/// What [`rank_setup`] needs.
#[derive(Debug, Clone)]
pub struct Layout<'a> {
    /// The run's `distribution`.
    pub distribution: Option<&'a Distribution>,
    /// Every rank's node, rank order.
    pub peers: &'a [Peer],
    /// This rank.
    pub rank: u32,
    /// The attempt's port ([`crate::Attempt::master_port`]).
    pub master_port: u16,
    /// Where the hostfile appears to the command (a path inside the container).
    pub hostfile_path: &'a str,
    /// Where the rsh helper appears to the command, when the node has one.
    pub rsh_path: Option<&'a str>,
    /// The attempt's secret ([`crate::Attempt::secret`]), for the rsh helper.
    pub secret: Option<&'a str>,
}

/// The environment and files of one rank.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RankSetup {
    /// Variables to add, in a stable order.
    pub env: Vec<(String, String)>,
    /// The MPI hostfile's text, to write at [`Layout::hostfile_path`].
    pub hostfile: Option<String>,
}

/// The variables and hostfile of rank `layout.rank` (see the module docs). A run with one
/// instance and no `distribution` gets nothing.
pub fn rank_setup(layout: &Layout<'_>) -> RankSetup {
    let n = layout.peers.len().max(1) as u32;
    let mut setup = RankSetup::default();
    if n == 1 && layout.distribution.is_none() {
        return setup;
    }
    let port = layout.master_port;
    // One instance: its processes meet inside its own container (or node), on loopback.
    let master = match layout.peers {
        [first, _, ..] => first.address.clone(),
        _ => "127.0.0.1".to_string(),
    };
    let mut set = |k: &str, v: String| setup.env.push((k.to_string(), v));
    set("AZ_BATCH_MASTER_NODE", format!("{master}:{port}"));
    match layout.distribution {
        None => {}
        Some(Distribution::Pytorch {
            process_count_per_instance,
        }) => {
            let k = (*process_count_per_instance).max(1);
            set("MASTER_ADDR", master.clone());
            set("MASTER_PORT", port.to_string());
            set("WORLD_SIZE", (n * k).to_string());
            set("NODE_RANK", layout.rank.to_string());
            set("RANK", (layout.rank * k).to_string());
            set("LOCAL_RANK", "0".into());
            set("LOCAL_WORLD_SIZE", k.to_string());
            set("PET_NNODES", n.to_string());
            set("PET_NODE_RANK", layout.rank.to_string());
            set("PET_NPROC_PER_NODE", k.to_string());
            set("PET_MASTER_ADDR", master.clone());
            set("PET_MASTER_PORT", port.to_string());
        }
        Some(Distribution::Tensorflow {
            parameter_server_count,
            ..
        }) => {
            let ps = (*parameter_server_count).min(n.saturating_sub(1));
            let workers = n - ps;
            let addr = |r: u32| {
                let a = layout
                    .peers
                    .get(r as usize)
                    .filter(|_| n > 1)
                    .map_or(master.as_str(), |p| p.address.as_str());
                format!("{a}:{port}")
            };
            let mut cluster = serde_json::Map::new();
            cluster.insert(
                "worker".into(),
                (0..workers).map(addr).collect::<Vec<_>>().into(),
            );
            if ps > 0 {
                cluster.insert(
                    "ps".into(),
                    (workers..n).map(addr).collect::<Vec<_>>().into(),
                );
            }
            let (kind, index) = if layout.rank < workers {
                ("worker", layout.rank)
            } else {
                ("ps", layout.rank - workers)
            };
            let tf = serde_json::json!({
                "cluster": cluster,
                "task": {"type": kind, "index": index},
            });
            set("TF_CONFIG", tf.to_string());
        }
        Some(Distribution::Mpi {
            process_count_per_instance,
        }) => {
            let k = (*process_count_per_instance).max(1);
            set("AZ_BATCHAI_MPI_MASTER_NODE", master.clone());
            let path = layout.hostfile_path.to_string();
            set("OMPI_MCA_orte_default_hostfile", path.clone());
            set("PRTE_MCA_prte_default_hostfile", path);
            set("OMPI_ALLOW_RUN_AS_ROOT", "1".into());
            set("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".into());
            // Containers usually may not ptrace each other: no cross-memory attach.
            set("OMPI_MCA_btl_vader_single_copy_mechanism", "none".into());
            let hostfile = if n == 1 {
                // One instance: everything is local, no remote launch.
                format!("localhost slots={k}\n")
            } else {
                if let Some(rsh) = layout.rsh_path {
                    set("OMPI_MCA_plm_rsh_agent", rsh.to_string());
                    set("PRTE_MCA_plm_ssh_agent", rsh.to_string());
                    // The launcher starts every daemon itself: a daemon has no way to
                    // reach a third node's container.
                    set("OMPI_MCA_plm_rsh_no_tree_spawn", "1".into());
                    set("PRTE_MCA_plm_ssh_no_tree_spawn", "1".into());
                    let peers: Vec<String> = layout
                        .peers
                        .iter()
                        .filter_map(|p| {
                            p.exec_port.map(|e| format!("{}={}:{e}", p.name, p.address))
                        })
                        .collect();
                    set("MUSTER_RSH_PEERS", peers.join(","));
                    if let Some(secret) = layout.secret {
                        set("MUSTER_RSH_SECRET", secret.to_string());
                    }
                }
                layout
                    .peers
                    .iter()
                    .map(|p| format!("{} slots={k}\n", p.name))
                    .collect()
            };
            setup.hostfile = Some(hostfile);
        }
    }
    setup
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: usize) -> Vec<Peer> {
        (0..n)
            .map(|i| Peer {
                name: format!("node-{i}"),
                address: format!("10.0.0.{}", i + 1),
                exec_port: Some(7000 + i as u16),
            })
            .collect()
    }

    fn layout<'a>(d: Option<&'a Distribution>, peers: &'a [Peer], rank: u32) -> Layout<'a> {
        Layout {
            distribution: d,
            peers,
            rank,
            master_port: 29501,
            hostfile_path: "/workspace/.muster/hostfile",
            rsh_path: Some("/opt/muster/bin/muster-rsh"),
            secret: Some("s3cret"),
        }
    }

    fn get<'a>(s: &'a RankSetup, k: &str) -> Option<&'a str> {
        s.env
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_single_instance_without_distribution_gets_nothing() {
        let p = peers(1);
        assert_eq!(rank_setup(&layout(None, &p, 0)), RankSetup::default());
    }

    #[test]
    fn pytorch_ranks_agree_on_the_master_and_count_every_process() {
        let p = peers(3);
        let d = Distribution::Pytorch {
            process_count_per_instance: 4,
        };
        let s = rank_setup(&layout(Some(&d), &p, 2));
        assert_eq!(get(&s, "MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(get(&s, "MASTER_PORT"), Some("29501"));
        assert_eq!(get(&s, "WORLD_SIZE"), Some("12"));
        assert_eq!(get(&s, "NODE_RANK"), Some("2"));
        assert_eq!(get(&s, "RANK"), Some("8"));
        assert_eq!(get(&s, "LOCAL_RANK"), Some("0"));
        assert_eq!(get(&s, "PET_NPROC_PER_NODE"), Some("4"));
        assert_eq!(get(&s, "PET_NNODES"), Some("3"));
        assert_eq!(get(&s, "AZ_BATCH_MASTER_NODE"), Some("10.0.0.1:29501"));
        assert_eq!(s.hostfile, None);

        let one = Distribution::Pytorch {
            process_count_per_instance: 1,
        };
        // A single instance (torchrun spawning K processes) meets on loopback.
        let single = peers(1);
        let s = rank_setup(&layout(Some(&d), &single, 0));
        assert_eq!(get(&s, "MASTER_ADDR"), Some("127.0.0.1"));
        assert_eq!(get(&s, "WORLD_SIZE"), Some("4"));
        let s0 = rank_setup(&layout(Some(&one), &p, 0));
        let s1 = rank_setup(&layout(Some(&one), &p, 1));
        assert_eq!(get(&s0, "WORLD_SIZE"), Some("3"));
        assert_eq!((get(&s0, "RANK"), get(&s1, "RANK")), (Some("0"), Some("1")));
        assert_eq!(get(&s0, "MASTER_ADDR"), get(&s1, "MASTER_ADDR"));
    }

    #[test]
    fn tensorflow_lists_every_worker_and_names_the_task() {
        let p = peers(3);
        let d = Distribution::Tensorflow {
            worker_count: 3,
            parameter_server_count: 0,
        };
        let s = rank_setup(&layout(Some(&d), &p, 1));
        let tf: serde_json::Value = serde_json::from_str(get(&s, "TF_CONFIG").unwrap()).unwrap();
        assert_eq!(
            tf["cluster"]["worker"],
            serde_json::json!(["10.0.0.1:29501", "10.0.0.2:29501", "10.0.0.3:29501"])
        );
        assert_eq!(
            tf["task"],
            serde_json::json!({"type": "worker", "index": 1})
        );

        let ps = Distribution::Tensorflow {
            worker_count: 2,
            parameter_server_count: 1,
        };
        let s = rank_setup(&layout(Some(&ps), &p, 2));
        let tf: serde_json::Value = serde_json::from_str(get(&s, "TF_CONFIG").unwrap()).unwrap();
        assert_eq!(tf["cluster"]["ps"], serde_json::json!(["10.0.0.3:29501"]));
        assert_eq!(tf["task"], serde_json::json!({"type": "ps", "index": 0}));
    }

    #[test]
    fn mpi_gets_a_hostfile_with_slots_and_the_rsh_helper() {
        let p = peers(2);
        let d = Distribution::Mpi {
            process_count_per_instance: 2,
        };
        let s = rank_setup(&layout(Some(&d), &p, 0));
        assert_eq!(
            s.hostfile.as_deref(),
            Some("node-0 slots=2\nnode-1 slots=2\n")
        );
        assert_eq!(
            get(&s, "OMPI_MCA_orte_default_hostfile"),
            Some("/workspace/.muster/hostfile")
        );
        assert_eq!(
            get(&s, "OMPI_MCA_plm_rsh_agent"),
            Some("/opt/muster/bin/muster-rsh")
        );
        assert_eq!(get(&s, "OMPI_ALLOW_RUN_AS_ROOT"), Some("1"));
        assert_eq!(get(&s, "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM"), Some("1"));
        assert_eq!(
            get(&s, "MUSTER_RSH_PEERS"),
            Some("node-0=10.0.0.1:7000,node-1=10.0.0.2:7001")
        );
        assert_eq!(get(&s, "MUSTER_RSH_SECRET"), Some("s3cret"));

        let one = peers(1);
        let s = rank_setup(&layout(Some(&d), &one, 0));
        assert_eq!(s.hostfile.as_deref(), Some("localhost slots=2\n"));
        assert_eq!(get(&s, "OMPI_MCA_plm_rsh_agent"), None);
    }

    #[test]
    fn every_distributed_attempt_names_the_master_node() {
        let p = peers(2);
        let s = rank_setup(&layout(None, &p, 1));
        assert_eq!(
            s.env,
            vec![(
                "AZ_BATCH_MASTER_NODE".to_string(),
                "10.0.0.1:29501".to_string()
            )]
        );
    }

    #[test]
    fn ports_are_the_lowest_free_from_29500() {
        assert_eq!(choose_master_port([]), 29500);
        assert_eq!(choose_master_port([29500, 29502]), 29501);
        assert_eq!(choose_master_port([29501, 29500, 80]), 29502);
    }

    /// Placing attempts through the state machine: two distributed attempts sharing a node
    /// get different ports, the secret is kept, and an ended attempt's port is free again.
    #[test]
    fn placed_attempts_on_a_shared_node_get_distinct_ports() {
        use crate::compute::{ComputeKind, ComputeSpec, Tier};
        use crate::resources::{Capacity, Resources};
        use crate::state::{AttemptEnd, AttemptReport, Command, State};
        use crate::{Placement, RunSpec};

        let mut s = State::default();
        let apply = |s: &mut State, c: Command| {
            s.apply(&c).unwrap_or_else(|e| panic!("{c:?}: {e}"));
            s.sanity_check().unwrap();
        };
        apply(
            &mut s,
            Command::CreateCompute {
                spec: ComputeSpec::new("pool", ComputeKind::Attached),
                at: 1,
            },
        );
        for id in ["a", "b", "c"] {
            apply(
                &mut s,
                Command::RegisterNode {
                    node_id: id.into(),
                    name: format!("host-{id}"),
                    compute: "pool".into(),
                    capacity: Capacity {
                        cpu_millis: 8000,
                        memory_bytes: 8 << 30,
                        gpus: vec![],
                        max_runs: 0,
                    },
                    labels: Default::default(),
                    tier: Tier::Dedicated,
                    address: format!("10.0.0.{}", id.as_bytes()[0]),
                    at: 2,
                },
            );
        }
        let resources = Resources {
            cpu_millis: 1000,
            memory_bytes: 1 << 20,
            gpus: 0,
        };
        let place = |s: &mut State, run: &str, nodes: &[&str], secret: Option<&str>| {
            let mut spec = RunSpec::new("train");
            spec.compute = "pool".into();
            spec.resources = resources;
            spec.instance_count = nodes.len() as u32;
            s.apply(&Command::SubmitRun {
                run_id: run.into(),
                spec: Box::new(spec),
                idempotency_key: None,
                at: 3,
            })
            .unwrap();
            let cmd = Command::PlaceRun {
                run_id: run.into(),
                attempt: 1,
                placements: nodes
                    .iter()
                    .map(|n| Placement {
                        node_id: n.to_string(),
                        gpus: vec![],
                        resources,
                    })
                    .collect(),
                at: 4,
                secret: None,
            };
            let cmd = match secret {
                Some(x) => cmd.with_secret(x.into()),
                None => cmd,
            };
            s.apply(&cmd).unwrap();
            s.sanity_check().unwrap();
            let a = s.runs[run].current_attempt().unwrap();
            (a.master_port, a.secret.clone())
        };
        assert_eq!(
            place(&mut s, "r1", &["a", "b"], Some("k1")),
            (Some(29500), Some("k1".into()))
        );
        // Rank 0 elsewhere, but shares node b: its port must differ too.
        assert_eq!(place(&mut s, "r2", &["c", "b"], None).0, Some(29501));
        // A single instance without distribution needs no port, and keeps no secret.
        assert_eq!(place(&mut s, "r3", &["a"], Some("k3")), (None, None));
        // r1 fails on rank 1: the attempt ends, its port is free again.
        apply(
            &mut s,
            Command::ReportAttempt {
                run_id: "r1".into(),
                attempt: 1,
                node_id: "b".into(),
                report: AttemptReport::Ended {
                    end: AttemptEnd::Failed,
                    exit_code: Some(1),
                    message: Some("exited with code 1".into()),
                    outputs: None,
                },
                at: 5,
            },
        );
        let r1 = &s.runs["r1"];
        assert_eq!(r1.message.as_deref(), Some("rank 1: exited with code 1"));
        assert_eq!(
            r1.attempts[0].secret, None,
            "an ended attempt keeps no secret"
        );
        assert_eq!(place(&mut s, "r4", &["a", "c"], None).0, Some(29500));
        // Old data without the fields still decodes.
        let mut old = serde_json::to_value(&s.runs["r4"]).unwrap();
        let attempt = &mut old["attempts"][0];
        attempt.as_object_mut().unwrap().remove("master_port");
        let run: crate::Run = serde_json::from_value(old).unwrap();
        assert_eq!(run.attempts[0].master_port, None);
    }
}
