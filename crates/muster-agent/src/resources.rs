//! What this machine offers: CPU and memory from sysinfo, GPUs from a [`GpuProbe`].

use muster_core::Gpu;
use nvml_wrapper::Nvml;

/// What a GPU probe found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct GpuReport {
    /// Healthy GPUs, by UUID.
    pub gpus: Vec<Gpu>,
    /// Driver version, when known.
    pub driver_version: Option<String>,
    /// CUDA driver version, when known.
    pub cuda_version: Option<String>,
    /// Why there are no GPUs, or which were left out, in words.
    pub note: Option<String>,
}

/// A source of GPU facts: NVML on a real machine, a fake in tests.
pub trait GpuProbe: Send + Sync + std::fmt::Debug {
    /// Looks at the GPUs now (called at start and periodically).
    fn probe(&self) -> GpuReport;
}

/// No GPUs at all.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoGpus;

impl GpuProbe for NoGpus {
    fn probe(&self) -> GpuReport {
        GpuReport::default()
    }
}

/// GPUs through NVML (libnvidia-ml, loaded at run time). Without a driver: zero GPUs and
/// a note saying so; never a crash.
#[derive(Debug, Clone, Copy, Default)]
pub struct NvmlProbe;

impl GpuProbe for NvmlProbe {
    fn probe(&self) -> GpuReport {
        let nvml = match Nvml::init() {
            Ok(n) => n,
            Err(e) => {
                return GpuReport {
                    note: Some(format!("NVML is not available ({e}); offering 0 GPUs")),
                    ..GpuReport::default()
                };
            }
        };
        let mut report = GpuReport {
            driver_version: nvml.sys_driver_version().ok(),
            cuda_version: nvml
                .sys_cuda_driver_version()
                .ok()
                .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10)),
            ..GpuReport::default()
        };
        let count = nvml.device_count().unwrap_or(0);
        let mut skipped = Vec::new();
        for i in 0..count {
            let device = match nvml.device_by_index(i) {
                Ok(d) => d,
                Err(e) => {
                    skipped.push(format!("GPU {i}: {e}"));
                    continue;
                }
            };
            match (device.uuid(), device.name(), device.memory_info()) {
                (Ok(uuid), Ok(model), Ok(mem)) => report.gpus.push(Gpu {
                    uuid,
                    model,
                    memory_bytes: mem.total,
                }),
                (uuid, _, _) => skipped.push(format!(
                    "GPU {i} ({}) is unavailable",
                    uuid.unwrap_or_else(|_| "unknown uuid".into())
                )),
            }
        }
        report.gpus.sort();
        if !skipped.is_empty() {
            report.note = Some(format!("left out: {}", skipped.join("; ")));
        }
        report
    }
}

/// CPU millicores and memory bytes of this machine.
pub fn host_capacity() -> (u64, u64) {
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get() as u64)
        .unwrap_or(1);
    let memory = match sysinfo::System::new() {
        Ok(mut sys) => {
            sys.refresh_memory();
            sys.total_memory()
        }
        Err(e) => {
            tracing::warn!(cause = %e, "cannot read the machine's memory; offering no memory limit");
            0
        }
    };
    (cpus * 1000, memory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvml_without_a_driver_reports_zero_gpus_and_says_why() {
        let report = NvmlProbe.probe();
        if report.gpus.is_empty() {
            assert!(report.note.is_some() || report.driver_version.is_some());
        }
        let (cpu, mem) = host_capacity();
        assert!(cpu >= 1000 && mem > 0);
    }
}
