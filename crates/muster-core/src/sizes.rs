//! Node sizes: what a compute target's `size` means in CPUs, memory and GPUs.
//!
//! Azure ML names a virtual machine size (`STANDARD_NC6s_v3`); on-prem there is no VM to
//! order, but a size still says what one node of the target is. muster reads two forms:
//!
//! - an Azure VM size name it knows (the table below: the general-purpose D/DS/F/E sizes
//!   and the GPU NC/ND/NV sizes Azure ML users pick most), case-insensitive;
//! - muster's own `cpu=4,memory=16g,gpus=1` (each key optional, in any order).
//!
//! A `docker` provisioner starts each node's container with these limits and GPUs; on
//! every target the size is also the nodes' `size` label, which a job's
//! `resources.instance_type` selects.

use crate::resources::{parse_cpu, parse_memory};

/// The node label that carries a target's size (and that `resources.instance_type`
/// selects).
pub const SIZE_LABEL: &str = "size";

/// What one node of a size offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeSize {
    /// CPUs, in thousandths.
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// GPUs.
    pub gpus: u32,
}

const GIB: u64 = 1 << 30;

/// Azure VM sizes: name (upper case), vCPUs, memory in GiB, GPUs.
const AZURE_SIZES: &[(&str, u64, u64, u32)] = &[
    ("STANDARD_D1_V2", 1, 3, 0),
    ("STANDARD_D2_V2", 2, 7, 0),
    ("STANDARD_D3_V2", 4, 14, 0),
    ("STANDARD_D4_V2", 8, 28, 0),
    ("STANDARD_D5_V2", 16, 56, 0),
    ("STANDARD_D11_V2", 2, 14, 0),
    ("STANDARD_D12_V2", 4, 28, 0),
    ("STANDARD_D13_V2", 8, 56, 0),
    ("STANDARD_D14_V2", 16, 112, 0),
    ("STANDARD_DS1_V2", 1, 3, 0),
    ("STANDARD_DS2_V2", 2, 7, 0),
    ("STANDARD_DS3_V2", 4, 14, 0),
    ("STANDARD_DS4_V2", 8, 28, 0),
    ("STANDARD_DS5_V2", 16, 56, 0),
    ("STANDARD_DS11_V2", 2, 14, 0),
    ("STANDARD_DS12_V2", 4, 28, 0),
    ("STANDARD_DS13_V2", 8, 56, 0),
    ("STANDARD_DS14_V2", 16, 112, 0),
    ("STANDARD_D2_V3", 2, 8, 0),
    ("STANDARD_D4_V3", 4, 16, 0),
    ("STANDARD_D8_V3", 8, 32, 0),
    ("STANDARD_D16_V3", 16, 64, 0),
    ("STANDARD_D2S_V3", 2, 8, 0),
    ("STANDARD_D4S_V3", 4, 16, 0),
    ("STANDARD_D8S_V3", 8, 32, 0),
    ("STANDARD_D16S_V3", 16, 64, 0),
    ("STANDARD_D32S_V3", 32, 128, 0),
    ("STANDARD_E4S_V3", 4, 32, 0),
    ("STANDARD_E8S_V3", 8, 64, 0),
    ("STANDARD_E16S_V3", 16, 128, 0),
    ("STANDARD_F2S_V2", 2, 4, 0),
    ("STANDARD_F4S_V2", 4, 8, 0),
    ("STANDARD_F8S_V2", 8, 16, 0),
    ("STANDARD_F16S_V2", 16, 32, 0),
    ("STANDARD_NC6", 6, 56, 1),
    ("STANDARD_NC12", 12, 112, 2),
    ("STANDARD_NC24", 24, 224, 4),
    ("STANDARD_NC6S_V2", 6, 112, 1),
    ("STANDARD_NC12S_V2", 12, 224, 2),
    ("STANDARD_NC24S_V2", 24, 448, 4),
    ("STANDARD_NC6S_V3", 6, 112, 1),
    ("STANDARD_NC12S_V3", 12, 224, 2),
    ("STANDARD_NC24S_V3", 24, 448, 4),
    ("STANDARD_NC4AS_T4_V3", 4, 28, 1),
    ("STANDARD_NC8AS_T4_V3", 8, 56, 1),
    ("STANDARD_NC16AS_T4_V3", 16, 110, 1),
    ("STANDARD_NC64AS_T4_V3", 64, 440, 4),
    ("STANDARD_NC24ADS_A100_V4", 24, 220, 1),
    ("STANDARD_NC48ADS_A100_V4", 48, 440, 2),
    ("STANDARD_NC96ADS_A100_V4", 96, 880, 4),
    ("STANDARD_ND6S", 6, 112, 1),
    ("STANDARD_ND12S", 12, 224, 2),
    ("STANDARD_ND24S", 24, 448, 4),
    ("STANDARD_ND40RS_V2", 40, 672, 8),
    ("STANDARD_ND96ASR_V4", 96, 900, 8),
    ("STANDARD_ND96AMSR_A100_V4", 96, 1900, 8),
    ("STANDARD_NV6", 6, 56, 1),
    ("STANDARD_NV12", 12, 112, 2),
    ("STANDARD_NV24", 24, 224, 4),
    ("STANDARD_NV12S_V3", 12, 112, 1),
    ("STANDARD_NV24S_V3", 24, 224, 2),
    ("STANDARD_NV48S_V3", 48, 448, 4),
];

/// What `size` means, when muster knows: an Azure VM size from the table, or
/// `cpu=N,memory=M,gpus=G`. `Ok(None)` for a name muster does not know (a label only);
/// an error for a `key=value` form with a bad key or value.
pub fn node_size(size: &str) -> Result<Option<NodeSize>, String> {
    let s = size.trim();
    if s.contains('=') {
        return explicit(s).map(Some);
    }
    let upper = s.to_ascii_uppercase();
    Ok(AZURE_SIZES
        .iter()
        .find(|(name, ..)| *name == upper)
        .map(|&(_, cpus, gib, gpus)| NodeSize {
            cpu_millis: cpus * 1000,
            memory_bytes: gib * GIB,
            gpus,
        }))
}

/// `cpu=4,memory=16g,gpus=1`.
fn explicit(s: &str) -> Result<NodeSize, String> {
    let mut size = NodeSize {
        cpu_millis: 0,
        memory_bytes: 0,
        gpus: 0,
    };
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = part.split_once('=').ok_or_else(|| {
            format!("{part:?} is not key=value: write e.g. cpu=4,memory=16g,gpus=1")
        })?;
        match key.trim() {
            "cpu" | "cpus" => size.cpu_millis = parse_cpu(value)?,
            "memory" => size.memory_bytes = parse_memory(value)?,
            "gpus" | "gpu" => {
                size.gpus = value
                    .trim()
                    .parse()
                    .map_err(|_| format!("gpus={value}: write a whole number of GPUs"))?
            }
            other => {
                return Err(format!(
                    "unknown size key {other:?}: use cpu, memory and gpus (e.g. cpu=4,memory=16g,gpus=1)"
                ));
            }
        }
    }
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_names_are_known_whatever_their_case() {
        assert_eq!(
            node_size("Standard_NC6s_v3"),
            Ok(Some(NodeSize {
                cpu_millis: 6000,
                memory_bytes: 112 * GIB,
                gpus: 1
            }))
        );
        assert_eq!(node_size("STANDARD_DS3_v2").unwrap().unwrap().gpus, 0);
        assert_eq!(node_size("my-big-box"), Ok(None));
    }

    #[test]
    fn muster_sizes_name_cpu_memory_and_gpus() {
        assert_eq!(
            node_size("cpu=1.5, memory=512m"),
            Ok(Some(NodeSize {
                cpu_millis: 1500,
                memory_bytes: 512 << 20,
                gpus: 0
            }))
        );
        assert_eq!(node_size("gpus=2").unwrap().unwrap().gpus, 2);
        let e = node_size("cpu=4,disk=10g").unwrap_err();
        assert!(e.contains("unknown size key \"disk\""), "{e}");
        assert!(
            node_size("cpu=lots")
                .unwrap_err()
                .contains("not a CPU amount")
        );
        assert!(node_size("gpus=1.5").unwrap_err().contains("whole number"));
    }
}
