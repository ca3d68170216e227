//! Resources: what a node offers and what one instance of a run asks for.

use serde::{Deserialize, Serialize};

/// One GPU as the agent found it (NVML) or as a fake probe describes it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Gpu {
    /// The device UUID (`GPU-…`), stable across reboots; GPUs are assigned by UUID.
    pub uuid: String,
    /// Product name, e.g. "NVIDIA A100-SXM4-80GB".
    pub model: String,
    /// Total device memory in bytes.
    pub memory_bytes: u64,
}

/// What a node offers to muster (may be less than the machine has: the rest stays reserved).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    /// CPU in millicores (1000 = one core).
    pub cpu_millis: u64,
    /// Memory in bytes.
    pub memory_bytes: u64,
    /// The GPUs, sorted by UUID.
    pub gpus: Vec<Gpu>,
    /// At most this many attempts at once (0: no cap beyond CPU, memory and GPUs). An
    /// agent sets it (`muster agent --max-runs`; `muster dev` defaults to 4 per CPU), so
    /// a node with no resource limits still does not start a thousand runs at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub max_runs: u32,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// What one instance of a run asks for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Resources {
    /// CPU in millicores; 0 means "no reservation".
    pub cpu_millis: u64,
    /// Memory in bytes; 0 means "no reservation".
    pub memory_bytes: u64,
    /// Whole GPUs.
    pub gpus: u32,
}

impl Resources {
    /// Adds `other` to `self` (saturating).
    pub fn add(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_add(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_add(other.memory_bytes);
        self.gpus = self.gpus.saturating_add(other.gpus);
    }

    /// The same request with a different GPU count.
    pub fn with_gpus(self, gpus: u32) -> Resources {
        Resources { gpus, ..self }
    }

    /// Subtracts `other` from `self` (saturating at zero).
    pub fn sub(&mut self, other: &Resources) {
        self.cpu_millis = self.cpu_millis.saturating_sub(other.cpu_millis);
        self.memory_bytes = self.memory_bytes.saturating_sub(other.memory_bytes);
        self.gpus = self.gpus.saturating_sub(other.gpus);
    }
}

/// Parses a memory size such as `512m`, `4g`, `4GiB`, `1.5G` or a plain byte count.
/// Suffixes are binary (k = 1024), as Docker and Slurm read them.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| format!("{text:?} is not a size: write e.g. 512m, 4g or 16GiB"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "ki" | "kib" => 1 << 10,
        "m" | "mb" | "mi" | "mib" => 1 << 20,
        "g" | "gb" | "gi" | "gib" => 1 << 30,
        "t" | "tb" | "ti" | "tib" => 1 << 40,
        other => {
            return Err(format!(
                "{text:?} has an unknown unit {other:?}: use k, m, g or t"
            ));
        }
    };
    let bytes = value * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// Parses a CPU amount: `2`, `0.5` or `500m` (millicores).
pub fn parse_cpu(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let bad = || format!("{text:?} is not a CPU amount: write e.g. 2, 0.5 or 500m");
    if let Some(m) = t.strip_suffix('m') {
        return m.parse::<u64>().map_err(|_| bad());
    }
    let cores: f64 = t.parse().map_err(|_| bad())?;
    if !cores.is_finite() || !(0.0..=1e9).contains(&cores) {
        return Err(bad());
    }
    Ok((cores * 1000.0).round() as u64)
}

/// Bytes in binary units, as people read memory sizes: `100 B`, `32 MiB`, `1.5 GiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut value = b as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if value.fract() == 0.0 {
        format!("{value} {}", UNITS[unit])
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sizes() {
        assert_eq!(parse_memory("512m"), Ok(512 << 20));
        assert_eq!(parse_memory("4g"), Ok(4 << 30));
        assert_eq!(parse_memory("4GiB"), Ok(4 << 30));
        assert_eq!(parse_memory("1.5G"), Ok(3 << 29));
        assert_eq!(parse_memory("100"), Ok(100));
        assert!(parse_memory("lots").is_err());
        assert!(parse_memory("4x").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn parses_cpu() {
        assert_eq!(parse_cpu("2"), Ok(2000));
        assert_eq!(parse_cpu("0.5"), Ok(500));
        assert_eq!(parse_cpu("250m"), Ok(250));
        assert!(parse_cpu("two").is_err());
    }
}
