//! Compute targets: where runs execute (DESIGN.md section 7), and Azure ML compute YAML.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::names::validate_compute_name;
use crate::resources::{Capacity, parse_cpu};
use crate::spec::{Scalar, SpecError, parse_yaml};

/// The kind of a compute target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ComputeKind {
    /// The `muster dev` machine itself; runs as processes (or containers).
    Local,
    /// A pool of nodes scaling between `min_instances` and `max_instances`.
    Cluster,
    /// One node for one user; a queue.
    Instance,
    /// Existing machines that join with `muster agent --compute NAME`.
    Attached,
}

impl ComputeKind {
    /// The lowercase name used in flags and output.
    pub fn as_str(self) -> &'static str {
        match self {
            ComputeKind::Local => "local",
            ComputeKind::Cluster => "cluster",
            ComputeKind::Instance => "instance",
            ComputeKind::Attached => "attached",
        }
    }

    /// Parses a kind from a flag value or a YAML `type` (Azure ML's `amlcompute` is a
    /// cluster, `computeinstance` an instance). A `virtualmachine` is attached over SSH by
    /// `muster compute attach`, and `kubernetes` is not supported: both are errors that say
    /// what to do instead.
    pub fn parse(s: &str) -> Result<ComputeKind, String> {
        match s.to_ascii_lowercase().as_str() {
            "local" => Ok(ComputeKind::Local),
            "cluster" | "amlcompute" => Ok(ComputeKind::Cluster),
            "instance" | "computeinstance" => Ok(ComputeKind::Instance),
            "attached" => Ok(ComputeKind::Attached),
            "virtualmachine" => Err(
                "a virtualmachine is attached over SSH: `muster compute attach -f FILE` (or `muster compute attach NAME --ssh USER@HOST`) installs and joins its agent".into(),
            ),
            "kubernetes" => Err(
                "kubernetes compute is not supported: muster runs on machines that run `muster agent`; attach them with `muster compute attach NAME --ssh USER@HOST`, or run `muster agent --compute NAME` on each".into(),
            ),
            other => Err(format!(
                "unknown compute type {other:?}: use local, cluster (amlcompute), instance (computeinstance) or attached"
            )),
        }
    }
}

/// Dedicated capacity, or low-priority capacity that can be reclaimed at any time.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tier {
    /// Never reclaimed.
    #[default]
    Dedicated,
    /// May be reclaimed; its runs are restarted, not resumed.
    LowPriority,
}

impl Tier {
    /// The lowercase name used in flags, YAML and output.
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Dedicated => "dedicated",
            Tier::LowPriority => "low_priority",
        }
    }

    /// Parses `dedicated` or `low_priority` (also `lowpriority`, `low-priority`).
    pub fn parse(s: &str) -> Result<Tier, String> {
        match s.to_ascii_lowercase().replace('-', "_").as_str() {
            "dedicated" => Ok(Tier::Dedicated),
            "low_priority" | "lowpriority" => Ok(Tier::LowPriority),
            other => Err(format!(
                "unknown tier {other:?}: use dedicated or low_priority"
            )),
        }
    }
}

/// Default seconds a cluster node may idle before it is released (Azure ML's default).
pub const DEFAULT_IDLE_TIME_BEFORE_SCALE_DOWN_S: u64 = 120;

/// A compute target's definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ComputeSpec {
    /// The name (Azure ML rule, see [`validate_compute_name`]).
    pub name: String,
    /// The kind.
    pub kind: ComputeKind,
    /// What one node is: an Azure VM size (`STANDARD_NC6`) or `cpu=4,memory=16g,gpus=1`
    /// ([`crate::sizes`]). Every node of the target carries it as its `size` label (which a
    /// job's `resources.instance_type` selects); a `docker` provisioner gives each node's
    /// container these limits and GPUs.
    pub size: Option<String>,
    /// Cluster: the fewest nodes kept.
    pub min_instances: u32,
    /// Cluster: the most nodes allowed.
    pub max_instances: u32,
    /// Cluster: seconds a node may idle before it is released.
    pub idle_time_before_scale_down_s: u64,
    /// Dedicated or low-priority capacity.
    pub tier: Tier,
    /// Free text.
    pub description: Option<String>,
    /// Limits on what the target's active runs may hold together (none by default). Absent
    /// in logs and snapshots written before quotas existed, which decode as unlimited.
    #[serde(default, skip_serializing_if = "Quota::is_unlimited")]
    pub quota: Quota,
    /// What turns the autoscaler's "scale to N" into machines. Absent in logs and
    /// snapshots written before provisioners existed, which decode as `static`.
    #[serde(default, skip_serializing_if = "Provisioner::is_static")]
    pub provisioner: Provisioner,
    /// The workspace it belongs to: only runs of that workspace use it, only its members
    /// see it. Absent in logs written before workspaces existed (the default workspace).
    #[serde(
        default = "crate::access::default_workspace",
        skip_serializing_if = "crate::access::is_default_workspace"
    )]
    pub workspace: String,
    /// Azure ML's `tags`: free key/value metadata, shown with the target.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// A compute instance stopped by `muster compute stop`: its provisioner releases its
    /// node once idle and starts none until `muster compute start`; its runs wait.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopped: bool,
    /// What the target's runs may do beyond the hardened defaults (YAML `runs:`). Absent
    /// in logs and snapshots written before it existed, which decode as the defaults.
    #[serde(default, skip_serializing_if = "RunPolicy::is_default")]
    pub run_policy: RunPolicy,
}

/// The processes a run starts at most in a container when its compute target says nothing.
pub const DEFAULT_MAX_PROCESSES: u32 = 4096;

/// What an admin lets a compute target's runs do beyond the hardened defaults (a
/// container runs as a non-root user, with no capabilities, `no-new-privileges`, a
/// read-only root filesystem and at most [`DEFAULT_MAX_PROCESSES`] processes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunPolicy {
    /// Run containers as the image's user (often root) instead of a non-root one.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_root: bool,
    /// Linux capabilities added back to the containers (names without `CAP_`, upper case,
    /// e.g. `NET_BIND_SERVICE`); all others stay dropped.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub add_capabilities: Vec<String>,
    /// The most processes a container may hold at once (`None`: [`DEFAULT_MAX_PROCESSES`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u32>,
}

/// The Linux capabilities, without `CAP_` (capabilities(7)).
pub const CAPABILITIES: &[&str] = &[
    "AUDIT_CONTROL",
    "AUDIT_READ",
    "AUDIT_WRITE",
    "BLOCK_SUSPEND",
    "BPF",
    "CHECKPOINT_RESTORE",
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "IPC_LOCK",
    "IPC_OWNER",
    "KILL",
    "LEASE",
    "LINUX_IMMUTABLE",
    "MAC_ADMIN",
    "MAC_OVERRIDE",
    "MKNOD",
    "NET_ADMIN",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_RAW",
    "PERFMON",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYSLOG",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_CHROOT",
    "SYS_MODULE",
    "SYS_NICE",
    "SYS_PACCT",
    "SYS_PTRACE",
    "SYS_RAWIO",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "WAKE_ALARM",
];

impl RunPolicy {
    /// The hardened defaults, nothing allowed beyond them.
    pub fn is_default(&self) -> bool {
        *self == RunPolicy::default()
    }

    /// The process limit of a container.
    pub fn max_processes(&self) -> u32 {
        self.max_processes.unwrap_or(DEFAULT_MAX_PROCESSES)
    }

    /// Normalises the capability names (upper case, `CAP_` dropped, no repeats) and checks
    /// them and the process limit; the error names the field.
    pub fn normalized(mut self) -> Result<RunPolicy, SpecError> {
        let mut caps = Vec::new();
        for c in &self.add_capabilities {
            let upper = c.trim().to_ascii_uppercase();
            let name = upper.strip_prefix("CAP_").unwrap_or(&upper).to_string();
            if !CAPABILITIES.contains(&name.as_str()) {
                return Err(SpecError::field(
                    "runs.add_capabilities",
                    format!(
                        "{c:?} is not a Linux capability: write its name as in capabilities(7) without CAP_, e.g. NET_BIND_SERVICE"
                    ),
                ));
            }
            if !caps.contains(&name) {
                caps.push(name);
            }
        }
        self.add_capabilities = caps;
        if self.max_processes == Some(0) {
            return Err(SpecError::field(
                "runs.max_processes",
                "0 would let a run start nothing: give at least 1, or leave it out for 4096",
            ));
        }
        Ok(self)
    }
}

/// The image a `docker` provisioner starts agents from when none is given.
pub const DEFAULT_AGENT_IMAGE: &str = "muster:local";
/// The network mode of a `docker` provisioner's agent containers when none is given.
pub const DEFAULT_AGENT_NETWORK: &str = "host";

/// What turns the autoscaler's decisions into machines (DESIGN.md section 7).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Provisioner {
    /// Nothing to provision: nodes join by running `muster agent --compute NAME`.
    #[default]
    Static,
    /// Starts and stops agent containers on the leader's Docker host.
    Docker(DockerProvisioner),
    /// Runs an admin's scripts, e.g. to power machines on and off or call a cloud CLI.
    Command(CommandProvisioner),
}

/// Settings of the `docker` provisioner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerProvisioner {
    /// The image holding the `muster` binary (entrypoint `muster`), default `muster:local`.
    pub image: String,
    /// The containers' network mode, default `host` (an agent then reaches a server on
    /// 127.0.0.1).
    pub network: String,
    /// Servers the agents connect to (`host:port`); empty: the leader's known addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub servers: Vec<String>,
    /// Labels the agents give their nodes (`--labels`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

impl Default for DockerProvisioner {
    fn default() -> DockerProvisioner {
        DockerProvisioner {
            image: DEFAULT_AGENT_IMAGE.to_string(),
            network: DEFAULT_AGENT_NETWORK.to_string(),
            servers: Vec::new(),
            labels: BTreeMap::new(),
        }
    }
}

/// Settings of the `command` provisioner: two executables on the leader's machine, each
/// run as `SCRIPT COMPUTE SIZE NODE...` with `MUSTER_COMPUTE`, `MUSTER_SIZE`,
/// `MUSTER_NODES` (space-separated) and `MUSTER_SERVERS` (comma-separated) in the env.
/// `scale_up` must start `muster agent --compute COMPUTE --name NODE` for each node;
/// `scale_down` must stop them. Both must be idempotent per node name (a new leader may
/// repeat an action whose outcome it did not see).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandProvisioner {
    /// Starts nodes.
    pub scale_up: String,
    /// Stops nodes.
    pub scale_down: String,
}

impl Provisioner {
    /// True for `static`.
    pub fn is_static(&self) -> bool {
        matches!(self, Provisioner::Static)
    }

    /// Whether `other` is this provisioner with, at most, other node labels (what
    /// `compute update --node-labels` may change).
    pub fn same_but_labels(&self, other: &Provisioner) -> bool {
        match (self, other) {
            (Provisioner::Docker(a), Provisioner::Docker(b)) => {
                DockerProvisioner {
                    labels: b.labels.clone(),
                    ..a.clone()
                } == *b
            }
            (a, b) => a == b,
        }
    }

    /// The lowercase name used in flags, YAML and output.
    pub fn kind_str(&self) -> &'static str {
        match self {
            Provisioner::Static => "static",
            Provisioner::Docker(_) => "docker",
            Provisioner::Command(_) => "command",
        }
    }

    fn validate(&self, kind: ComputeKind) -> Result<(), SpecError> {
        if self.is_static() {
            return Ok(());
        }
        if !matches!(kind, ComputeKind::Cluster | ComputeKind::Instance) {
            return Err(SpecError::field(
                "provisioner",
                format!(
                    "{} targets never provision nodes (their machines join with `muster agent --compute NAME`): use provisioner static, or type cluster or instance",
                    kind.as_str()
                ),
            ));
        }
        match self {
            Provisioner::Static => Ok(()),
            Provisioner::Docker(d) => {
                if d.image.trim().is_empty() {
                    return Err(SpecError::field(
                        "provisioner.image",
                        format!("is empty: give the agent image (default {DEFAULT_AGENT_IMAGE})"),
                    ));
                }
                if d.network.trim().is_empty() {
                    return Err(SpecError::field(
                        "provisioner.network",
                        "is empty: give a Docker network mode such as host or bridge",
                    ));
                }
                if let Some(bad) = d.servers.iter().find(|s| {
                    s.trim().is_empty() || s.contains(char::is_whitespace) || s.contains(',')
                }) {
                    return Err(SpecError::field(
                        "provisioner.servers",
                        format!("{bad:?} is not a server address: use HOST:PORT"),
                    ));
                }
                for (k, v) in &d.labels {
                    if k.trim().is_empty() || k.contains(['=', ',']) || v.contains(',') {
                        return Err(SpecError::field(
                            format!("provisioner.labels.{k}"),
                            "a label is key=value with no ',' and no '=' in the key",
                        ));
                    }
                }
                Ok(())
            }
            Provisioner::Command(c) => {
                for (field, path) in [("scale_up", &c.scale_up), ("scale_down", &c.scale_down)] {
                    if path.trim().is_empty() {
                        return Err(SpecError::field(
                            format!("provisioner.{field}"),
                            "missing: give the path of the script to run on the leader",
                        ));
                    }
                }
                Ok(())
            }
        }
    }
}

/// Limits on what the active runs of one compute target hold together. The scheduler never
/// places a run that would exceed them, and `PlaceRun` rejects such a placement.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Quota {
    /// Most GPUs held at once (summed over every instance of every active run).
    #[serde(default)]
    pub max_gpus: Option<u32>,
    /// Most CPU millicores reserved at once.
    #[serde(default)]
    pub max_cpu_millis: Option<u64>,
    /// Most runs active (scheduled, preparing or running) at once; a gang counts once.
    #[serde(default)]
    pub max_concurrent_runs: Option<u32>,
}

/// What active runs hold against a [`Quota`] (or what one run would add).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct QuotaUsage {
    /// GPUs.
    pub gpus: u64,
    /// CPU millicores.
    pub cpu_millis: u64,
    /// Runs.
    pub runs: u64,
}

impl QuotaUsage {
    /// What one run with `instances` instances of `per_instance` holds.
    pub fn of_run(per_instance: &crate::Resources, instances: u32) -> QuotaUsage {
        QuotaUsage {
            gpus: per_instance.gpus as u64 * instances as u64,
            cpu_millis: per_instance.cpu_millis.saturating_mul(instances as u64),
            runs: 1,
        }
    }

    /// Adds `other` (saturating).
    pub fn add(&mut self, other: &QuotaUsage) {
        self.gpus = self.gpus.saturating_add(other.gpus);
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.runs = self.runs.saturating_add(other.runs);
    }

    /// Subtracts `other` (saturating at zero).
    pub fn sub(&mut self, other: &QuotaUsage) {
        self.gpus = self.gpus.saturating_sub(other.gpus);
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.runs = self.runs.saturating_sub(other.runs);
    }

    /// `self - other` per field, clamped at zero.
    pub fn minus(mut self, other: &QuotaUsage) -> QuotaUsage {
        self.sub(other);
        self
    }
}

impl Quota {
    /// True when no limit is set.
    pub fn is_unlimited(&self) -> bool {
        *self == Quota::default()
    }

    /// Whether `used + need` stays within every limit (what [`Quota::admits`] checks,
    /// without the words).
    pub fn allows(&self, used: &QuotaUsage, need: &QuotaUsage) -> bool {
        let within = |max: Option<u64>, used: u64, need: u64| {
            max.is_none_or(|max| need == 0 || used.saturating_add(need) <= max)
        };
        within(self.max_gpus.map(u64::from), used.gpus, need.gpus)
            && within(self.max_cpu_millis, used.cpu_millis, need.cpu_millis)
            && within(
                self.max_concurrent_runs.map(u64::from),
                used.runs,
                need.runs,
            )
    }

    /// Checks that `used + need` stays within every limit; the error is the reason a person
    /// reads on a waiting run, e.g. `quota: 8/8 GPUs in use, needs 2`.
    pub fn admits(&self, used: &QuotaUsage, need: &QuotaUsage) -> Result<(), String> {
        if self.allows(used, need) {
            return Ok(());
        }
        if let Some(max) = self.max_gpus
            && need.gpus > 0
            && used.gpus.saturating_add(need.gpus) > max as u64
        {
            return Err(format!(
                "quota: {}/{max} GPUs in use, needs {}",
                used.gpus, need.gpus
            ));
        }
        if let Some(max) = self.max_cpu_millis
            && need.cpu_millis > 0
            && used.cpu_millis.saturating_add(need.cpu_millis) > max
        {
            return Err(format!(
                "quota: {}/{} CPUs in use, needs {}",
                cores(used.cpu_millis),
                cores(max),
                cores(need.cpu_millis)
            ));
        }
        if let Some(max) = self.max_concurrent_runs
            && need.runs > 0
            && used.runs.saturating_add(need.runs) > max as u64
        {
            return Err(format!("quota: {}/{max} runs active", used.runs));
        }
        Ok(())
    }

    /// Why a run needing `need` can never start under this quota, if so.
    pub fn never_admits(&self, need: &QuotaUsage) -> Option<String> {
        self.admits(&QuotaUsage::default(), need).err().map(|_| {
            let mut parts = Vec::new();
            if let Some(max) = self.max_gpus
                && need.gpus > max as u64
            {
                parts.push(format!("{} GPUs but the quota allows {max}", need.gpus));
            }
            if let Some(max) = self.max_cpu_millis
                && need.cpu_millis > max
            {
                parts.push(format!(
                    "{} CPUs but the quota allows {}",
                    cores(need.cpu_millis),
                    cores(max)
                ));
            }
            if self.max_concurrent_runs == Some(0) {
                parts.push("a run slot but the quota allows none".to_string());
            }
            format!("quota: needs {}", parts.join(" and "))
        })
    }

    fn validate(&self) -> Result<(), SpecError> {
        if self.max_cpu_millis == Some(0) {
            return Err(SpecError::field(
                "quota.max_cpu",
                "must be more than 0 (leave it out for no limit)",
            ));
        }
        if self.max_concurrent_runs == Some(0) {
            return Err(SpecError::field(
                "quota.max_concurrent_runs",
                "must be at least 1 (leave it out for no limit)",
            ));
        }
        Ok(())
    }
}

/// Millicores as cores, e.g. `2`, `0.5`.
pub fn cores(millis: u64) -> String {
    if millis.is_multiple_of(1000) {
        format!("{}", millis / 1000)
    } else {
        format!("{}", millis as f64 / 1000.0)
    }
}

impl ComputeSpec {
    /// A spec of the given kind with Azure ML's defaults.
    pub fn new(name: impl Into<String>, kind: ComputeKind) -> ComputeSpec {
        ComputeSpec {
            name: name.into(),
            kind,
            size: None,
            min_instances: 0,
            max_instances: if kind == ComputeKind::Cluster { 1 } else { 0 },
            idle_time_before_scale_down_s: DEFAULT_IDLE_TIME_BEFORE_SCALE_DOWN_S,
            tier: Tier::Dedicated,
            description: None,
            quota: Quota::default(),
            provisioner: Provisioner::Static,
            workspace: crate::access::default_workspace(),
            tags: BTreeMap::new(),
            stopped: false,
            run_policy: RunPolicy::default(),
        }
    }

    /// The fewest and most nodes the autoscaler keeps, or `None` for a target it never
    /// scales: a cluster scales between `min_instances` and `max_instances`; an instance
    /// is exactly one node; attached and local targets never provision. A `static`
    /// provisioner has nothing to scale with either.
    pub fn scale_bounds(&self) -> Option<(u32, u32)> {
        if self.provisioner.is_static() {
            return None;
        }
        match self.kind {
            ComputeKind::Cluster => Some((self.min_instances, self.max_instances)),
            ComputeKind::Instance if self.stopped => Some((0, 0)),
            ComputeKind::Instance => Some((1, 1)),
            ComputeKind::Local | ComputeKind::Attached => None,
        }
    }

    /// Why `run` can never start on this target, if it cannot: more instances than the
    /// autoscaler may ever provide, or more GPUs or CPUs than the quota lets all its runs
    /// hold together. The error names the run's field and both numbers. Targets whose
    /// nodes join by themselves (attached, local, `static`) have no fixed size to check.
    pub fn never_fits(&self, run: &crate::spec::RunSpec) -> Option<SpecError> {
        let n = run.instance_count;
        // A stopped instance is still one node once started.
        let max = match self.kind {
            ComputeKind::Instance => self.scale_bounds().map(|_| 1),
            _ => self.scale_bounds().map(|(_, max)| max),
        };
        if let Some(max) = max
            && n > max
        {
            let what = match self.kind {
                ComputeKind::Instance => "a compute instance is one node".to_string(),
                _ => format!("it scales to at most {max} (max_instances)"),
            };
            return Some(SpecError::field(
                "resources.instance_count",
                format!(
                    "the run spans {n} nodes, but compute target {:?} never has that many: {what}; lower instance_count or submit to a larger target",
                    self.name
                ),
            ));
        }
        let need = QuotaUsage::of_run(&run.resources, n);
        self.quota.never_admits(&need).map(|why| {
            SpecError::field(
                "resources",
                format!(
                    "the run can never start on compute target {:?}: {why} (all its runs together); ask for less, or have an admin raise the quota",
                    self.name
                ),
            )
        })
    }

    /// Whether one instance of `run` fits a node of this target, given what its
    /// registered nodes offer (`nodes`). A provisioned target's machines all come from one
    /// recipe, so once one has joined, a request larger than every node is refused with
    /// the numbers; on a target whose nodes join by themselves a larger node may still
    /// come, so the run is accepted with a warning that it waits for one. With no node
    /// yet, nothing is known (the waiting reason says so).
    pub fn node_fit(&self, run: &crate::spec::RunSpec, nodes: &[&Capacity]) -> NodeFit {
        if nodes.is_empty() {
            return NodeFit::Fits;
        }
        let r = &run.resources;
        let holds = |c: &&Capacity| {
            r.gpus as usize <= c.gpus.len()
                && r.cpu_millis <= c.cpu_millis
                && r.memory_bytes <= c.memory_bytes
        };
        if nodes.iter().any(holds) {
            return NodeFit::Fits;
        }
        let gpus = nodes.iter().map(|c| c.gpus.len()).max().unwrap_or(0);
        let cpu = nodes.iter().map(|c| c.cpu_millis).max().unwrap_or(0);
        let memory = nodes.iter().map(|c| c.memory_bytes).max().unwrap_or(0);
        let (field, asked) = if r.gpus as usize > gpus {
            (
                "resources.gpus",
                format!(
                    "{} on one node, but its nodes have at most {gpus}",
                    plural_gpus(r.gpus as usize)
                ),
            )
        } else if r.cpu_millis > cpu {
            (
                "resources.cpu",
                format!(
                    "{} CPUs on one node, but its nodes have at most {}",
                    cores(r.cpu_millis),
                    cores(cpu)
                ),
            )
        } else if r.memory_bytes > memory {
            (
                "resources.memory",
                format!(
                    "{} of memory on one node, but its nodes have at most {}",
                    crate::resources::format_bytes(r.memory_bytes),
                    crate::resources::format_bytes(memory)
                ),
            )
        } else {
            (
                "resources",
                format!(
                    "{}, {} CPUs and {} together on one node, but none of its nodes has all three",
                    plural_gpus(r.gpus as usize),
                    cores(r.cpu_millis),
                    crate::resources::format_bytes(r.memory_bytes)
                ),
            )
        };
        let n = nodes.len();
        let counted = if n == 1 {
            "1 node".to_string()
        } else {
            format!("{n} nodes")
        };
        if self.provisioner.is_static() {
            NodeFit::WaitsForNode(format!(
                "{field}: the run asks for {asked} ({counted} joined compute target {:?}); it waits until a larger node joins",
                self.name
            ))
        } else {
            NodeFit::Never(SpecError::field(
                field,
                format!(
                    "the run asks for {asked} (compute target {:?} makes every node with its {} provisioner, and {counted} joined): ask for less, or submit to a target with larger nodes",
                    self.name,
                    self.provisioner.kind_str()
                ),
            ))
        }
    }

    /// Acts on a run's `instance_type` for this target, whose nodes carry the labels
    /// `node_labels`. Where nodes have sizes (the target's `size`, or a node's `size`
    /// label), the run selects nodes labelled with it (spelled as the target spells its
    /// size); a provisioned target of another size is an error. Elsewhere it sizes nothing:
    /// the warning says so.
    pub fn place_instance_type<'a>(
        &self,
        run: &mut crate::spec::RunSpec,
        mut node_labels: impl Iterator<Item = &'a BTreeMap<String, String>>,
    ) -> Result<Option<String>, SpecError> {
        use crate::sizes::SIZE_LABEL;
        let Some(asked) = run.instance_type.clone() else {
            return Ok(None);
        };
        let label = match &self.size {
            Some(size) if size.eq_ignore_ascii_case(&asked) => size.clone(),
            Some(size) if !self.provisioner.is_static() => {
                return Err(SpecError::field(
                    "resources.instance_type",
                    format!(
                        "the run asks for {asked} nodes, but compute target {:?} makes nodes of size {size}: submit to a target of size {asked}, or remove instance_type",
                        self.name
                    ),
                ));
            }
            Some(_) => asked,
            None if node_labels.any(|l| l.contains_key(SIZE_LABEL)) => asked,
            None => {
                return Ok(Some(format!(
                    "resources.instance_type: {asked} sizes nothing: compute target {:?} has no size, so the run is placed by resources.cpu, memory and gpus (give the target a size, or label its nodes {SIZE_LABEL}={asked})",
                    self.name
                )));
            }
        };
        run.node_selector
            .entry(SIZE_LABEL.to_string())
            .or_insert(label);
        Ok(None)
    }

    /// What the spec says that does nothing, for the user to read at create time: a
    /// cluster (or instance) under the `static` provisioner, whose min, max and idle time
    /// scale nothing since nodes only join by themselves.
    pub fn warnings(&self) -> Vec<String> {
        let mut out = Vec::new();
        if matches!(self.kind, ComputeKind::Cluster) && self.provisioner.is_static() {
            out.push(format!(
                "provisioner: compute target {:?} has the static provisioner, so min_instances ({}), max_instances ({}) and idle_time_before_scale_down ({} s) start and stop nothing: nodes join with `muster agent --compute {}`; to grow and shrink it, create it with --provisioner docker (agent containers on the leader's Docker host) or --provisioner command (your scripts)",
                self.name,
                self.min_instances,
                self.max_instances,
                self.idle_time_before_scale_down_s,
                self.name
            ));
        }
        out
    }

    /// Checks the name, the size, the scaling bounds and the quota; the error names the
    /// field.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_compute_name(&self.name).map_err(|e| SpecError::field("name", e.to_string()))?;
        if let Some(size) = &self.size {
            let known = crate::sizes::node_size(size).map_err(|e| SpecError::field("size", e))?;
            if known.is_none() && matches!(self.provisioner, Provisioner::Docker(_)) {
                return Err(SpecError::field(
                    "size",
                    format!(
                        "muster does not know how many CPUs, how much memory and how many GPUs {size:?} has, and a docker provisioner sizes its nodes' containers by it: name an Azure VM size (e.g. STANDARD_DS3_v2, STANDARD_NC6s_v3) or write cpu=4,memory=16g,gpus=1"
                    ),
                ));
            }
        }
        self.quota.validate()?;
        self.run_policy.clone().normalized()?;
        self.provisioner.validate(self.kind)?;
        if self.kind == ComputeKind::Cluster && self.min_instances > self.max_instances {
            return Err(SpecError::field(
                "min_instances",
                format!(
                    "min_instances ({}) is larger than max_instances ({}): lower min_instances or raise max_instances",
                    self.min_instances, self.max_instances
                ),
            ));
        }
        Ok(())
    }
}

/// Whether a run fits the nodes of its target ([`ComputeSpec::node_fit`]).
#[derive(Debug, Clone, PartialEq)]
pub enum NodeFit {
    /// Some node holds one instance, or no node has joined yet.
    Fits,
    /// No node that has joined holds it, but a larger one may join: a warning.
    WaitsForNode(String),
    /// No node of this provisioned target ever will: the submit is refused.
    Never(SpecError),
}

fn plural_gpus(n: usize) -> String {
    if n == 1 {
        "1 GPU".to_string()
    } else {
        format!("{n} GPUs")
    }
}

/// Azure ML v2 compute YAML (`type: amlcompute` and friends), as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComputeFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    /// v1: `vm_size`.
    #[serde(alias = "vm_size")]
    size: Option<String>,
    /// v1: `min_nodes`.
    #[serde(alias = "min_nodes")]
    min_instances: Option<u32>,
    /// v1: `max_nodes`.
    #[serde(alias = "max_nodes")]
    max_instances: Option<u32>,
    /// v1: `idle_seconds_before_scaledown`.
    #[serde(alias = "idle_seconds_before_scaledown")]
    idle_time_before_scale_down: Option<u64>,
    /// v1: `vm_priority` (`dedicated`, `lowpriority`).
    #[serde(alias = "vm_priority")]
    tier: Option<String>,
    description: Option<String>,
    location: Option<String>,
    ssh_public_access_enabled: Option<bool>,
    ssh_settings: Option<yaml_serde::Value>,
    network_settings: Option<yaml_serde::Value>,
    identity: Option<yaml_serde::Value>,
    tags: Option<BTreeMap<String, Scalar>>,
    /// muster: limits on what the target's active runs hold together.
    quota: Option<QuotaFile>,
    /// muster: what turns "scale to N" into machines.
    provisioner: Option<ProvisionerFile>,
    /// muster: what the target's runs may do beyond the hardened defaults.
    runs: Option<RunsFile>,
}

/// `runs:` as written (a muster addition to Azure ML's compute YAML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsFile {
    allow_root: Option<bool>,
    add_capabilities: Option<Vec<String>>,
    max_processes: Option<u32>,
}

/// The Azure-only keys of a compute file, each refused with what to use on-prem.
fn refuse_azure_only(file: &ComputeFile) -> Result<(), SpecError> {
    let refuse = |key: &str, why: &str| Err(SpecError::field(key, why.to_string()));
    if file.location.is_some() {
        return refuse(
            "location",
            "muster's nodes are your own machines, in no cloud region: remove location (to place runs on some nodes, label them with `muster agent --labels` and select them with a job's node_selector)",
        );
    }
    if file.ssh_public_access_enabled == Some(true) {
        return refuse(
            "ssh_public_access_enabled",
            "muster opens no SSH login on a target's nodes: remove it or set it to false; follow a run with `muster run logs --follow`, and attach a machine you reach over SSH with `muster compute attach NAME --ssh USER@HOST`",
        );
    }
    if file.ssh_settings.is_some() {
        return refuse(
            "ssh_settings",
            "muster opens no SSH login on a target's nodes: remove ssh_settings; to attach a machine over SSH, give its address and user to `muster compute attach -f FILE` (type: virtualmachine) or `muster compute attach NAME --ssh USER@HOST`",
        );
    }
    if file.network_settings.is_some() {
        return refuse(
            "network_settings",
            "muster places nodes in no virtual network: remove network_settings; a node is on whatever network its machine is, and reaches the servers it is given (`muster agent --server`)",
        );
    }
    if file.identity.is_some() {
        return refuse(
            "identity",
            "muster gives compute targets no managed identity: remove identity; a run reaches what its node can reach, and takes credentials as environment variables (`environment_variables:` in the job)",
        );
    }
    Ok(())
}

/// `provisioner:` as written (a muster addition to Azure ML's compute YAML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProvisionerFile {
    #[serde(rename = "type")]
    kind: Option<String>,
    image: Option<String>,
    network: Option<String>,
    servers: Option<Vec<String>>,
    labels: Option<BTreeMap<String, String>>,
    scale_up: Option<String>,
    scale_down: Option<String>,
}

impl ProvisionerFile {
    fn into_provisioner(self) -> Result<Provisioner, SpecError> {
        let kind = self.kind.as_deref().unwrap_or("static");
        let only = |given: bool, key: &str, for_kind: &str| {
            if given {
                Err(SpecError::field(
                    format!("provisioner.{key}"),
                    format!(
                        "only a {for_kind} provisioner takes {key}: remove it, or set provisioner.type: {for_kind}"
                    ),
                ))
            } else {
                Ok(())
            }
        };
        match kind.to_ascii_lowercase().as_str() {
            "static" => {
                for (given, key) in [
                    (self.image.is_some(), "image"),
                    (self.network.is_some(), "network"),
                    (self.servers.is_some(), "servers"),
                    (self.labels.is_some(), "labels"),
                ] {
                    only(given, key, "docker")?;
                }
                only(self.scale_up.is_some(), "scale_up", "command")?;
                only(self.scale_down.is_some(), "scale_down", "command")?;
                Ok(Provisioner::Static)
            }
            "docker" => {
                only(self.scale_up.is_some(), "scale_up", "command")?;
                only(self.scale_down.is_some(), "scale_down", "command")?;
                let mut d = DockerProvisioner::default();
                if let Some(v) = self.image {
                    d.image = v;
                }
                if let Some(v) = self.network {
                    d.network = v;
                }
                d.servers = self.servers.unwrap_or_default();
                d.labels = self.labels.unwrap_or_default();
                Ok(Provisioner::Docker(d))
            }
            "command" => {
                for (given, key) in [
                    (self.image.is_some(), "image"),
                    (self.network.is_some(), "network"),
                    (self.servers.is_some(), "servers"),
                    (self.labels.is_some(), "labels"),
                ] {
                    only(given, key, "docker")?;
                }
                Ok(Provisioner::Command(CommandProvisioner {
                    scale_up: self.scale_up.unwrap_or_default(),
                    scale_down: self.scale_down.unwrap_or_default(),
                }))
            }
            other => Err(SpecError::field(
                "provisioner.type",
                format!("unknown provisioner {other:?}: use static, docker or command"),
            )),
        }
    }
}

/// `quota:` as written (a muster addition to Azure ML's compute YAML).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaFile {
    max_gpus: Option<u32>,
    /// CPUs: `64`, `0.5` or `500m`.
    max_cpu: Option<Scalar>,
    max_concurrent_runs: Option<u32>,
}

/// Parses Azure ML compute YAML. `name_override` (the CLI's positional NAME) wins over the
/// file's `name`; the file must say its `type`.
pub fn parse_compute_yaml(
    text: &str,
    name_override: Option<&str>,
) -> Result<ComputeSpec, SpecError> {
    parse_compute_yaml_as(text, name_override, None)
}

/// [`parse_compute_yaml`], with the CLI's `--type` (when given) over the file's.
///
/// Every Azure ML key is honoured or refused with what to use instead: v1 spellings
/// (`min_nodes`, `max_nodes`, `vm_size`, `vm_priority`, `idle_seconds_before_scaledown`)
/// are aliases; `tags` are kept and shown; `ssh_public_access_enabled: false` is what
/// muster does anyway (it opens no SSH on nodes). `location`, `ssh_settings`, an enabled
/// `ssh_public_access_enabled`, `network_settings` and `identity` have nothing on-prem to
/// act on and are errors naming what to do instead.
pub fn parse_compute_yaml_as(
    text: &str,
    name_override: Option<&str>,
    kind_override: Option<ComputeKind>,
) -> Result<ComputeSpec, SpecError> {
    let file: ComputeFile = parse_yaml(text)?;
    refuse_azure_only(&file)?;
    let name = name_override
        .map(str::to_string)
        .or(file.name)
        .ok_or_else(|| SpecError::field("name", "missing: give the compute target a name"))?;
    let kind = match (kind_override, &file.kind) {
        (Some(k), _) => k,
        (None, Some(k)) => ComputeKind::parse(k).map_err(|e| SpecError::field("type", e))?,
        (None, None) => {
            return Err(SpecError::field(
                "type",
                "missing: say what the target is: amlcompute (a cluster), computeinstance (an instance) or attached (machines that join by themselves); a virtual machine is attached with `muster compute attach`",
            ));
        }
    };
    let mut spec = ComputeSpec::new(name, kind);
    spec.size = file.size;
    if let Some(v) = file.min_instances {
        spec.min_instances = v;
    }
    if let Some(v) = file.max_instances {
        spec.max_instances = v;
    }
    if let Some(v) = file.idle_time_before_scale_down {
        spec.idle_time_before_scale_down_s = v;
    }
    if let Some(t) = &file.tier {
        spec.tier = Tier::parse(t).map_err(|e| SpecError::field("tier", e))?;
    }
    spec.description = file.description;
    spec.tags = file
        .tags
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| (k, v.to_string()))
        .collect();
    if let Some(q) = file.quota {
        spec.quota = Quota {
            max_gpus: q.max_gpus,
            max_cpu_millis: q
                .max_cpu
                .map(|c| parse_cpu(&c.to_string()))
                .transpose()
                .map_err(|e| SpecError::field("quota.max_cpu", e))?,
            max_concurrent_runs: q.max_concurrent_runs,
        };
    }
    if let Some(p) = file.provisioner {
        spec.provisioner = p.into_provisioner()?;
    }
    if let Some(r) = file.runs {
        spec.run_policy = RunPolicy {
            allow_root: r.allow_root.unwrap_or(false),
            add_capabilities: r.add_capabilities.unwrap_or_default(),
            max_processes: r.max_processes,
        }
        .normalized()?;
    }
    spec.validate()?;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_azure_ml_low_priority_cluster() {
        let text = include_str!("../../../../shared/formats/v2_compute_cluster_low_priority.yml");
        let spec = parse_compute_yaml(text, None).unwrap();
        assert_eq!(spec.name, "low-pri-example");
        assert_eq!(spec.kind, ComputeKind::Cluster);
        assert_eq!(spec.size.as_deref(), Some("STANDARD_DS3_v2"));
        assert_eq!((spec.min_instances, spec.max_instances), (0, 2));
        assert_eq!(spec.idle_time_before_scale_down_s, 120);
        assert_eq!(spec.tier, Tier::LowPriority);
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_field() {
        let e = parse_compute_yaml("name: gpu-a\ntype: amlcompute\nmax_instance: 3\n", None)
            .unwrap_err();
        assert_eq!(e.path, "max_instance");
        assert!(e.to_string().contains("unknown key"), "{e}");
        let e =
            parse_compute_yaml("name: gpu-a\ntype: amlcompute\ntier: cheap\n", None).unwrap_err();
        assert_eq!(e.path, "tier");
        let e = parse_compute_yaml("name: g1\ntype: amlcompute\n", None).unwrap_err();
        assert_eq!(e.path, "name");
        let e = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nmin_instances: 3\nmax_instances: 1\n",
            None,
        )
        .unwrap_err();
        assert_eq!(e.path, "min_instances");
        let e = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nquota:\n  max_concurrent_runs: 0\n",
            None,
        )
        .unwrap_err();
        assert_eq!(e.path, "quota.max_concurrent_runs");
        let e = parse_compute_yaml("name: gpus\ntype: amlcompute\nquota:\n  max_gpu: 3\n", None)
            .unwrap_err();
        assert_eq!(e.path, "quota.max_gpu");
    }

    #[test]
    fn v1_spellings_are_aliases_and_tags_are_kept() {
        let spec = parse_compute_yaml(
            "name: old-pool\ntype: amlcompute\nvm_size: STANDARD_NC6\nmin_nodes: 1\nmax_nodes: 3\nvm_priority: lowpriority\nidle_seconds_before_scaledown: 600\ntags:\n  team: vision\n  cost: 7\n",
            None,
        )
        .unwrap();
        assert_eq!(spec.size.as_deref(), Some("STANDARD_NC6"));
        assert_eq!((spec.min_instances, spec.max_instances), (1, 3));
        assert_eq!(spec.tier, Tier::LowPriority);
        assert_eq!(spec.idle_time_before_scale_down_s, 600);
        assert_eq!(spec.tags.get("cost").map(String::as_str), Some("7"));
        // Both spellings at once is ambiguous.
        let e = parse_compute_yaml(
            "name: old-pool\ntype: amlcompute\nmin_nodes: 1\nmin_instances: 2\n",
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("duplicate"), "{e}");
    }

    #[test]
    fn azure_only_keys_and_kinds_are_refused_with_what_to_do() {
        for (yaml, path, says) in [
            (
                "type: amlcompute\nlocation: westeurope\n",
                "location",
                "node_selector",
            ),
            (
                "type: amlcompute\nssh_public_access_enabled: true\n",
                "ssh_public_access_enabled",
                "compute attach",
            ),
            (
                "type: amlcompute\nssh_settings:\n  admin_username: azureuser\n",
                "ssh_settings",
                "compute attach",
            ),
            (
                "type: amlcompute\nnetwork_settings:\n  vnet_name: v\n",
                "network_settings",
                "remove network_settings",
            ),
            (
                "type: amlcompute\nidentity:\n  type: system_assigned\n",
                "identity",
                "environment_variables",
            ),
            ("type: kubernetes\n", "type", "not supported"),
            ("type: virtualmachine\n", "type", "muster compute attach"),
            ("min_instances: 1\n", "type", "missing"),
        ] {
            let e = parse_compute_yaml(&format!("name: gpus\n{yaml}"), None).unwrap_err();
            assert_eq!(e.path, path, "{yaml}: {e}");
            assert!(e.to_string().contains(says), "{yaml}: {e}");
        }
        // What muster does anyway is accepted; the CLI's --type stands in for the file's.
        let spec = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nssh_public_access_enabled: false\n",
            None,
        )
        .unwrap();
        assert_eq!(spec.kind, ComputeKind::Cluster);
        let spec =
            parse_compute_yaml_as("name: gpus\n", None, Some(ComputeKind::Attached)).unwrap();
        assert_eq!(spec.kind, ComputeKind::Attached);
    }

    #[test]
    fn instance_type_selects_sized_nodes_and_warns_elsewhere() {
        let mut run = crate::spec::RunSpec::new("echo");
        run.instance_type = Some("standard_nc6".into());
        let none = BTreeMap::new();
        // No size anywhere: a warning, nothing selected.
        let plain = ComputeSpec::new("plain", ComputeKind::Attached);
        let w = plain
            .place_instance_type(&mut run.clone(), [&none].into_iter())
            .unwrap()
            .unwrap();
        assert!(
            w.starts_with("resources.instance_type: standard_nc6 sizes nothing"),
            "{w}"
        );
        // A node labelled with a size: the run selects that label.
        let labelled = BTreeMap::from([("size".to_string(), "big".to_string())]);
        let mut r = run.clone();
        assert_eq!(
            plain.place_instance_type(&mut r, [&labelled].into_iter()),
            Ok(None)
        );
        assert_eq!(r.node_selector["size"], "standard_nc6");
        // The target's own size, spelled as the target spells it.
        let mut sized = ComputeSpec::new("gpus", ComputeKind::Cluster);
        sized.size = Some("STANDARD_NC6".into());
        let mut r = run.clone();
        assert_eq!(
            sized.place_instance_type(&mut r, std::iter::empty()),
            Ok(None)
        );
        assert_eq!(r.node_selector["size"], "STANDARD_NC6");
        // A provisioned target of another size never makes such nodes.
        sized.provisioner = Provisioner::Docker(DockerProvisioner::default());
        sized.size = Some("STANDARD_DS3_v2".into());
        let e = sized
            .place_instance_type(&mut run.clone(), std::iter::empty())
            .unwrap_err();
        assert_eq!(e.path, "resources.instance_type");
    }

    #[test]
    fn a_docker_provisioner_needs_a_size_it_can_read() {
        let base = "name: gpus\ntype: amlcompute\nprovisioner:\n  type: docker\n";
        let e = parse_compute_yaml(&format!("{base}size: my-box\n"), None).unwrap_err();
        assert_eq!(e.path, "size");
        assert!(e.to_string().contains("cpu=4,memory=16g,gpus=1"), "{e}");
        assert!(parse_compute_yaml(&format!("{base}size: cpu=1,memory=512m\n"), None).is_ok());
        // Elsewhere an unknown name is only a label.
        assert!(parse_compute_yaml("name: gpus\ntype: attached\nsize: my-box\n", None).is_ok());
        let e = parse_compute_yaml("name: gpus\ntype: attached\nsize: cpu=x\n", None).unwrap_err();
        assert_eq!(e.path, "size");
    }

    #[test]
    fn a_run_policy_parses_normalised_and_old_specs_decode_hardened() {
        let spec = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nruns:\n  allow_root: true\n  add_capabilities: [cap_net_bind_service, NET_BIND_SERVICE]\n  max_processes: 64\n",
            None,
        )
        .unwrap();
        assert_eq!(
            spec.run_policy,
            RunPolicy {
                allow_root: true,
                add_capabilities: vec!["NET_BIND_SERVICE".into()],
                max_processes: Some(64),
            }
        );
        assert_eq!(spec.run_policy.max_processes(), 64);
        let e = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nruns:\n  add_capabilities: [ROOT]\n",
            None,
        )
        .unwrap_err();
        assert_eq!(e.path, "runs.add_capabilities");
        let e = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nruns:\n  max_processes: 0\n",
            None,
        )
        .unwrap_err();
        assert_eq!(e.path, "runs.max_processes");
        assert!(
            parse_compute_yaml(
                "name: gpus\ntype: amlcompute\nruns:\n  privileged: true\n",
                None
            )
            .is_err()
        );
        // Written before run policies existed: the hardened defaults.
        let mut old = serde_json::to_value(ComputeSpec::new("c", ComputeKind::Cluster)).unwrap();
        assert!(old.get("run_policy").is_none());
        old.as_object_mut().unwrap().remove("run_policy");
        let decoded: ComputeSpec = serde_json::from_value(old).unwrap();
        assert!(decoded.run_policy.is_default());
        assert_eq!(decoded.run_policy.max_processes(), DEFAULT_MAX_PROCESSES);
    }

    #[test]
    fn quotas_parse_and_old_specs_decode_unlimited() {
        let spec = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nquota:\n  max_gpus: 8\n  max_cpu: 64\n  max_concurrent_runs: 4\n",
            None,
        )
        .unwrap();
        assert_eq!(
            spec.quota,
            Quota {
                max_gpus: Some(8),
                max_cpu_millis: Some(64_000),
                max_concurrent_runs: Some(4)
            }
        );
        let old = r#"{"name":"gpus","kind":"cluster","size":null,"min_instances":0,"max_instances":1,"idle_time_before_scale_down_s":120,"tier":"dedicated","description":null}"#;
        let spec: ComputeSpec = serde_json::from_str(old).unwrap();
        assert!(spec.quota.is_unlimited());
        assert!(!serde_json::to_string(&spec).unwrap().contains("quota"));
    }

    #[test]
    fn quota_reasons_read_well() {
        let q = Quota {
            max_gpus: Some(8),
            max_cpu_millis: Some(16_000),
            max_concurrent_runs: Some(2),
        };
        let used = QuotaUsage {
            gpus: 8,
            cpu_millis: 4_000,
            runs: 1,
        };
        let need = QuotaUsage {
            gpus: 2,
            cpu_millis: 1_500,
            runs: 1,
        };
        assert_eq!(
            q.admits(&used, &need).unwrap_err(),
            "quota: 8/8 GPUs in use, needs 2"
        );
        let need = need.minus(&QuotaUsage {
            gpus: 2,
            ..Default::default()
        });
        assert_eq!(q.admits(&used, &need), Ok(()));
        let big = QuotaUsage {
            gpus: 16,
            cpu_millis: 0,
            runs: 1,
        };
        assert_eq!(
            q.never_admits(&big).unwrap(),
            "quota: needs 16 GPUs but the quota allows 8"
        );
        assert_eq!(q.never_admits(&need), None);
    }

    #[test]
    fn provisioners_parse_beside_azure_ml_keys() {
        let base = include_str!("../../../../shared/formats/v2_compute_cluster_low_priority.yml");
        let text = format!(
            "{base}\nprovisioner:\n  type: docker\n  servers: [127.0.0.1:7070]\n  labels:\n    zone: a\n"
        );
        let spec = parse_compute_yaml(&text, None).unwrap();
        let Provisioner::Docker(d) = &spec.provisioner else {
            panic!("{:?}", spec.provisioner)
        };
        assert_eq!(d.image, DEFAULT_AGENT_IMAGE);
        assert_eq!(d.network, DEFAULT_AGENT_NETWORK);
        assert_eq!(d.servers, vec!["127.0.0.1:7070".to_string()]);
        assert_eq!(d.labels.get("zone").map(String::as_str), Some("a"));
        assert_eq!(spec.scale_bounds(), Some((0, 2)));

        let spec = parse_compute_yaml(
            "name: gpus\ntype: amlcompute\nprovisioner:\n  type: command\n  scale_up: /opt/up.sh\n  scale_down: /opt/down.sh\n",
            None,
        )
        .unwrap();
        assert_eq!(
            spec.provisioner,
            Provisioner::Command(CommandProvisioner {
                scale_up: "/opt/up.sh".into(),
                scale_down: "/opt/down.sh".into()
            })
        );
        // Static by default, and old specs decode static and serialize without the key.
        let spec = parse_compute_yaml("name: gpus\ntype: amlcompute\n", None).unwrap();
        assert!(spec.provisioner.is_static());
        assert_eq!(spec.scale_bounds(), None);
        assert!(
            !serde_json::to_string(&spec)
                .unwrap()
                .contains("provisioner")
        );
        let mut inst = ComputeSpec::new("box-a", ComputeKind::Instance);
        inst.provisioner = Provisioner::Docker(DockerProvisioner::default());
        assert_eq!(inst.scale_bounds(), Some((1, 1)));
        let round: ComputeSpec =
            serde_json::from_str(&serde_json::to_string(&inst).unwrap()).unwrap();
        assert_eq!(round, inst);
    }

    #[test]
    fn bad_provisioners_name_the_field() {
        let cases = [
            (
                "provisioner:\n  type: docker\n  imagee: x\n",
                "provisioner.imagee",
            ),
            ("provisioner:\n  type: cloud\n", "provisioner.type"),
            (
                "provisioner:\n  type: command\n  scale_up: /a\n",
                "provisioner.scale_down",
            ),
            (
                "provisioner:\n  type: docker\n  scale_up: /a\n",
                "provisioner.scale_up",
            ),
            (
                "provisioner:\n  type: command\n  scale_up: /a\n  scale_down: /b\n  image: x\n",
                "provisioner.image",
            ),
            (
                "provisioner:\n  type: docker\n  image: ''\n",
                "provisioner.image",
            ),
            (
                "provisioner:\n  type: docker\n  servers: ['a b']\n",
                "provisioner.servers",
            ),
            (
                "type: attached\nprovisioner:\n  type: docker\n",
                "provisioner",
            ),
        ];
        for (yaml, path) in cases {
            let kind = if yaml.starts_with("type:") {
                ""
            } else {
                "type: amlcompute\n"
            };
            let e = parse_compute_yaml(&format!("name: gpus\n{kind}{yaml}"), None).unwrap_err();
            assert_eq!(e.path, path, "{yaml}: {e}");
        }
    }

    #[test]
    fn a_run_that_can_never_fit_names_the_field_and_both_numbers() {
        let mut cluster = ComputeSpec::new("gpu-pool", ComputeKind::Cluster);
        cluster.max_instances = 2;
        cluster.provisioner = Provisioner::Command(CommandProvisioner {
            scale_up: "true".into(),
            scale_down: "true".into(),
        });
        cluster.quota.max_gpus = Some(8);
        let run = |gpus: u32, instances: u32| {
            let mut r = crate::spec::RunSpec::new("train");
            r.resources.gpus = gpus;
            r.instance_count = instances;
            r
        };
        let e = cluster.never_fits(&run(0, 1000)).unwrap();
        assert_eq!(e.path, "resources.instance_count");
        assert!(
            e.message.contains("spans 1000 nodes")
                && e.message.contains("at most 2 (max_instances)"),
            "{e}"
        );
        let e = cluster.never_fits(&run(5, 2)).unwrap();
        assert_eq!(e.path, "resources");
        assert!(e.message.contains("10 GPUs but the quota allows 8"), "{e}");
        assert_eq!(cluster.never_fits(&run(4, 2)), None);
        // An instance is one node.
        let mut instance = ComputeSpec::new("box", ComputeKind::Instance);
        instance.provisioner = cluster.provisioner.clone();
        assert!(
            instance
                .never_fits(&run(0, 2))
                .unwrap()
                .message
                .contains("a compute instance is one node")
        );
        // Nodes that join by themselves have no size to check.
        let attached = ComputeSpec::new("farm", ComputeKind::Attached);
        assert_eq!(attached.never_fits(&run(0, 1000)), None);
    }

    #[test]
    fn a_static_cluster_is_warned_that_its_bounds_scale_nothing() {
        let mut cluster = ComputeSpec::new("gpus", ComputeKind::Cluster);
        cluster.max_instances = 4;
        let w = cluster.warnings();
        assert_eq!(w.len(), 1);
        assert!(
            w[0].contains("max_instances (4)") && w[0].contains("--provisioner docker"),
            "{w:?}"
        );
        cluster.provisioner = Provisioner::Docker(DockerProvisioner::default());
        assert!(cluster.warnings().is_empty());
        assert!(
            ComputeSpec::new("farm", ComputeKind::Attached)
                .warnings()
                .is_empty()
        );
    }

    #[test]
    fn a_run_larger_than_every_node_is_refused_on_a_provisioned_target_and_warned_elsewhere() {
        let node = |gpus: usize, cpu: u64, gib: u64| Capacity {
            cpu_millis: cpu * 1000,
            memory_bytes: gib << 30,
            gpus: (0..gpus)
                .map(|i| crate::resources::Gpu {
                    uuid: format!("GPU-{i}"),
                    model: "A100".into(),
                    memory_bytes: 80 << 30,
                })
                .collect(),
            max_runs: 0,
        };
        let (small, big) = (node(1, 8, 32), node(4, 4, 64));
        let run = |gpus: u32, cpu: u64, gib: u64| {
            let mut r = crate::spec::RunSpec::new("train");
            r.resources.gpus = gpus;
            r.resources.cpu_millis = cpu * 1000;
            r.resources.memory_bytes = gib << 30;
            r
        };
        let mut cluster = ComputeSpec::new("gpus", ComputeKind::Cluster);
        cluster.provisioner = Provisioner::Docker(DockerProvisioner::default());
        // Nothing is known before a node joins; a node that holds it is enough.
        assert_eq!(cluster.node_fit(&run(8, 0, 0), &[]), NodeFit::Fits);
        assert_eq!(
            cluster.node_fit(&run(4, 2, 0), &[&small, &big]),
            NodeFit::Fits
        );
        let NodeFit::Never(e) = cluster.node_fit(&run(8, 0, 0), &[&small, &big]) else {
            panic!("8 GPUs never fit")
        };
        assert_eq!(e.path, "resources.gpus");
        assert!(
            e.message
                .contains("8 GPUs on one node, but its nodes have at most 4")
                && e.message.contains("docker provisioner, and 2 nodes joined"),
            "{e}"
        );
        let NodeFit::Never(e) = cluster.node_fit(&run(0, 16, 0), &[&small]) else {
            panic!("16 CPUs never fit")
        };
        assert_eq!(e.path, "resources.cpu");
        assert!(
            e.message
                .contains("16 CPUs on one node, but its nodes have at most 8"),
            "{e}"
        );
        let NodeFit::Never(e) = cluster.node_fit(&run(0, 0, 128), &[&small]) else {
            panic!("128 GiB never fits")
        };
        assert_eq!(e.path, "resources.memory");
        assert!(e.message.contains("128 GiB of memory"), "{e}");
        // Each amount alone fits some node, all three together none.
        let NodeFit::Never(e) = cluster.node_fit(&run(4, 8, 0), &[&small, &big]) else {
            panic!("4 GPUs with 8 CPUs never fit")
        };
        assert_eq!(e.path, "resources");
        assert!(e.message.contains("none of its nodes has all three"), "{e}");
        // Nodes that join by themselves: a warning, and the run waits.
        let attached = ComputeSpec::new("farm", ComputeKind::Attached);
        let NodeFit::WaitsForNode(w) = attached.node_fit(&run(2, 0, 0), &[&small]) else {
            panic!("a larger node may join")
        };
        assert!(
            w.starts_with("resources.gpus: the run asks for 2 GPUs on one node, but its nodes have at most 1 (1 node joined compute target \"farm\")")
                && w.ends_with("it waits until a larger node joins"),
            "{w}"
        );
    }
}
