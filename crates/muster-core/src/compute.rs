//! Compute targets: where runs execute (DESIGN.md section 7), and Azure ML compute YAML.

use serde::{Deserialize, Serialize};

use crate::names::validate_compute_name;
use crate::spec::{SpecError, parse_yaml};

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
    /// cluster, `computeinstance` an instance, `virtualmachine`/`kubernetes` attached).
    pub fn parse(s: &str) -> Result<ComputeKind, String> {
        match s.to_ascii_lowercase().as_str() {
            "local" => Ok(ComputeKind::Local),
            "cluster" | "amlcompute" => Ok(ComputeKind::Cluster),
            "instance" | "computeinstance" => Ok(ComputeKind::Instance),
            "attached" | "virtualmachine" | "kubernetes" => Ok(ComputeKind::Attached),
            other => Err(format!(
                "unknown compute type {other:?}: use local, cluster (amlcompute), instance or attached"
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
    /// A size name (e.g. `STANDARD_NC6`), informational for provisioners.
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
        }
    }

    /// Checks the name and the scaling bounds; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        validate_compute_name(&self.name).map_err(|e| SpecError::field("name", e.to_string()))?;
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

/// Azure ML v2 compute YAML (`type: amlcompute` and friends), as written.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ComputeFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    name: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    size: Option<String>,
    min_instances: Option<u32>,
    max_instances: Option<u32>,
    idle_time_before_scale_down: Option<u64>,
    tier: Option<String>,
    description: Option<String>,
    location: Option<String>,
    ssh_public_access_enabled: Option<bool>,
    ssh_settings: Option<yaml_serde::Value>,
    network_settings: Option<yaml_serde::Value>,
    identity: Option<yaml_serde::Value>,
    tags: Option<yaml_serde::Value>,
}

/// Parses Azure ML compute YAML. `name_override` (the CLI's positional NAME) wins over the
/// file's `name`. Azure-only settings (`location`, `ssh_*`, `network_settings`, `identity`)
/// are accepted and ignored, as they have no meaning on-prem.
pub fn parse_compute_yaml(
    text: &str,
    name_override: Option<&str>,
) -> Result<ComputeSpec, SpecError> {
    let file: ComputeFile = parse_yaml(text)?;
    let _ = (
        &file.location,
        &file.ssh_public_access_enabled,
        &file.ssh_settings,
        &file.network_settings,
        &file.identity,
        &file.tags,
    );
    let name = name_override
        .map(str::to_string)
        .or(file.name)
        .ok_or_else(|| SpecError::field("name", "missing: give the compute target a name"))?;
    let kind = match &file.kind {
        Some(k) => ComputeKind::parse(k).map_err(|e| SpecError::field("type", e))?,
        None => ComputeKind::Cluster,
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
        let e = parse_compute_yaml("name: gpu-a\nmax_instance: 3\n", None).unwrap_err();
        assert_eq!(e.path, "max_instance");
        assert!(e.to_string().contains("unknown key"), "{e}");
        let e = parse_compute_yaml("name: gpu-a\ntier: cheap\n", None).unwrap_err();
        assert_eq!(e.path, "tier");
        let e = parse_compute_yaml("name: g1\n", None).unwrap_err();
        assert_eq!(e.path, "name");
        let e = parse_compute_yaml("name: gpus\nmin_instances: 3\nmax_instances: 1\n", None)
            .unwrap_err();
        assert_eq!(e.path, "min_instances");
    }
}
