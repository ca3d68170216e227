//! What Linux's `/proc` says of a process: the CPU it used and its resident memory, for the
//! benchmarks' idle-CPU and memory figures.

/// User plus system CPU of process `pid` so far, in clock ticks (`USER_HZ`, 100 a second on
/// Linux), from `/proc/PID/stat` (fields 14 and 15, read after the command name, which may
/// hold spaces).
pub fn cpu_ticks(pid: u32) -> anyhow::Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .unwrap_or("")
        .split_whitespace()
        .collect();
    anyhow::ensure!(fields.len() > 12, "/proc/{pid}/stat is short");
    Ok(fields[11].parse::<u64>()? + fields[12].parse::<u64>()?)
}

/// Clock ticks per second of [`cpu_ticks`] (`USER_HZ`).
pub const TICKS_PER_SEC: f64 = 100.0;

/// Resident memory of process `pid`, in bytes (`VmRSS` of `/proc/PID/status`).
pub fn rss_bytes(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmRSS in /proc/{pid}/status"))?;
    Ok(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_used_cpu_and_holds_memory() {
        let me = std::process::id();
        let before = cpu_ticks(me).unwrap();
        let mut x = 0u64;
        let start = std::time::Instant::now();
        while start.elapsed() < std::time::Duration::from_millis(50) {
            x = x.wrapping_add(std::hint::black_box(1));
        }
        assert!(x > 0);
        assert!(cpu_ticks(me).unwrap() >= before);
        assert!(rss_bytes(me).unwrap() > 1 << 20);
    }
}
