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

/// XIDs caused by applications, not by the GPU (the Kubernetes device plugin's list):
/// they do not make a GPU unhealthy.
const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// How long a GPU that reported a critical XID error stays withdrawn; with no new error in
/// that time it is offered again, without restarting the agent.
pub const XID_QUARANTINE: std::time::Duration = std::time::Duration::from_secs(300);

/// How long a node whose NVML could not be loaded waits before it tries again (a driver
/// installed meanwhile is found within this, without restarting the agent).
pub const NVML_RETRY: std::time::Duration = std::time::Duration::from_secs(600);

/// GPUs through NVML (libnvidia-ml, loaded at run time). Without a driver: zero GPUs and
/// a note saying so; never a crash. Health: devices NVML cannot query are left out, and a
/// device that reports a critical XID error is withdrawn for [`XID_QUARANTINE`].
#[derive(Debug, Default)]
pub struct NvmlProbe {
    state: std::sync::Mutex<NvmlState>,
}

#[derive(Default)]
struct NvmlState {
    /// NVML, initialized once and kept for the process (its event set borrows it).
    nvml: Option<&'static Nvml>,
    events: Option<nvml_wrapper::EventSet<'static>>,
    xid_note: Option<String>,
    /// Why NVML could not be loaded, and when that was found: it is tried again only after
    /// [`NVML_RETRY`], so a node without a driver does not search for the library on every
    /// probe.
    missing: Option<(String, std::time::Instant)>,
    /// UUID → (last critical XID, when).
    unhealthy: std::collections::HashMap<String, (u64, std::time::Instant)>,
}

impl std::fmt::Debug for NvmlState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NvmlState")
            .field("initialized", &self.nvml.is_some())
            .field("xid_events", &self.events.is_some())
            .field("unhealthy", &self.unhealthy)
            .finish()
    }
}

impl NvmlProbe {
    /// A probe; NVML is loaded on first use.
    pub fn new() -> NvmlProbe {
        NvmlProbe::default()
    }
}

impl NvmlState {
    /// NVML, loaded on first use; the error is why the library cannot be used (no driver).
    fn nvml(&mut self) -> Result<&'static Nvml, nvml_wrapper::error::NvmlError> {
        if let Some(n) = self.nvml {
            return Ok(n);
        }
        let nvml: &'static Nvml = Box::leak(Box::new(Nvml::init()?));
        self.nvml = Some(nvml);
        match nvml.create_event_set() {
            Ok(mut set) => {
                let count = nvml.device_count().unwrap_or(0);
                for i in 0..count {
                    let Ok(device) = nvml.device_by_index(i) else {
                        continue;
                    };
                    match device.register_events(
                        nvml_wrapper::bitmasks::event::EventTypes::CRITICAL_XID_ERROR,
                        set,
                    ) {
                        Ok(s) => set = s,
                        Err(e) => {
                            self.xid_note = Some(format!(
                                "XID error events unavailable ({}); health is judged by device queries only",
                                e.error
                            ));
                            return Ok(nvml);
                        }
                    }
                }
                self.events = Some(set);
            }
            Err(e) => {
                self.xid_note = Some(format!(
                    "XID error events unavailable ({e}); health is judged by device queries only"
                ))
            }
        }
        Ok(nvml)
    }

    /// Takes the XID events that arrived since the last probe (bounded).
    fn drain_xids(&mut self) {
        let Some(events) = &self.events else { return };
        for _ in 0..1024 {
            let Ok(data) = events.wait(0) else { break };
            let xid = match data.event_data {
                Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
                _ => 0,
            };
            if APPLICATION_XIDS.contains(&xid) {
                continue;
            }
            if let Ok(uuid) = data.device.uuid() {
                tracing::warn!(gpu = %uuid, xid, "GPU reported a critical XID error; withdrawing it");
                self.unhealthy
                    .insert(uuid, (xid, std::time::Instant::now()));
            }
        }
        self.unhealthy
            .retain(|_, (_, at)| at.elapsed() < XID_QUARANTINE);
    }
}

impl GpuProbe for NvmlProbe {
    fn probe(&self) -> GpuReport {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let unavailable = |why: &str| GpuReport {
            note: Some(format!("NVML is not available ({why}); offering 0 GPUs")),
            ..GpuReport::default()
        };
        if let Some((why, at)) = &state.missing
            && at.elapsed() < NVML_RETRY
        {
            return unavailable(why);
        }
        let nvml = match state.nvml() {
            Ok(n) => {
                state.missing = None;
                n
            }
            Err(e) => {
                let why = e.to_string();
                state.missing = Some((why.clone(), std::time::Instant::now()));
                return unavailable(&why);
            }
        };
        state.drain_xids();
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
                (Ok(uuid), Ok(model), Ok(mem)) => {
                    if let Some((xid, _)) = state.unhealthy.get(&uuid) {
                        skipped.push(format!(
                            "{uuid}: critical XID {xid} within the last {} s",
                            XID_QUARANTINE.as_secs()
                        ));
                        continue;
                    }
                    report.gpus.push(Gpu {
                        uuid,
                        model,
                        memory_bytes: mem.total,
                    })
                }
                (uuid, _, _) => skipped.push(format!(
                    "GPU {i} ({}) is unavailable",
                    uuid.unwrap_or_else(|_| "unknown uuid".into())
                )),
            }
        }
        report.gpus.sort();
        let mut notes = Vec::new();
        if !skipped.is_empty() {
            notes.push(format!("left out: {}", skipped.join("; ")));
        }
        if let Some(n) = &state.xid_note {
            notes.push(n.clone());
        }
        report.note = (!notes.is_empty()).then(|| notes.join("; "));
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
        let report = NvmlProbe::new().probe();
        if report.gpus.is_empty() {
            assert!(report.note.is_some() || report.driver_version.is_some());
        }
        let (cpu, mem) = host_capacity();
        assert!(cpu >= 1000 && mem > 0);
    }

    #[test]
    fn a_missing_nvml_is_remembered_until_the_retry_time() {
        let probe = NvmlProbe::new();
        let first = probe.probe();
        let missing = probe.state.lock().unwrap().missing.clone();
        let Some((why, found_at)) = missing else {
            // This machine has a driver: nothing to remember.
            assert!(
                first.driver_version.is_some() || !first.gpus.is_empty() || first.note.is_some()
            );
            return;
        };
        // The next probe answers from memory with the same reason, without loading again.
        let second = probe.probe();
        assert_eq!(second.note, first.note);
        assert!(second.note.unwrap().contains(&why));
        let (_, at) = probe.state.lock().unwrap().missing.clone().unwrap();
        assert_eq!(at, found_at, "not tried again before NVML_RETRY");
    }
}
