//! Why a queued run waits, in words a person reads in `muster run show`.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::Millis;
use crate::compute::cores;
use crate::resources::{Resources, format_bytes};
use crate::schedule::Job;
use crate::state::NodeState;

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// `2 nodes with 4 free GPUs, 8 free CPUs and 64 GiB free memory, labelled zone=a`.
pub(super) fn nodes_with(count: u32, r: &Resources, selector: &BTreeMap<String, String>) -> String {
    let mut parts = Vec::new();
    if r.gpus > 0 {
        parts.push(format!(
            "{} free GPU{}",
            r.gpus,
            if r.gpus == 1 { "" } else { "s" }
        ));
    }
    if r.cpu_millis > 0 {
        parts.push(format!("{} free CPUs", cores(r.cpu_millis)));
    }
    if r.memory_bytes > 0 {
        parts.push(format!("{} free memory", format_bytes(r.memory_bytes)));
    }
    let mut out = plural(count as usize, "node", "nodes");
    let any = !parts.is_empty();
    if any {
        let last = parts.pop().expect("not empty");
        out.push_str(" with ");
        if !parts.is_empty() {
            out.push_str(&parts.join(", "));
            out.push_str(" and ");
        }
        out.push_str(&last);
    }
    if !selector.is_empty() {
        out.push_str(if any { ", labelled " } else { " labelled " });
        let labels: Vec<String> = selector.iter().map(|(k, v)| format!("{k}={v}")).collect();
        out.push_str(&labels.join(","));
    }
    out
}

/// `needs 2 nodes with 4 free GPUs; 1 available`, and how many more would have the room
/// but run as many attempts as they may (`capped`).
pub(super) fn needs(job: &Job<'_>, available: usize, capped: usize) -> String {
    let mut out = String::with_capacity(64);
    out.push_str("needs ");
    out.push_str(&nodes_with(job.count, &job.resources, job.selector));
    match available {
        0 => out.push_str("; none available"),
        n => {
            let _ = write!(out, "; {n} available");
        }
    }
    match capped {
        0 => {}
        1 => out.push_str("; 1 node has room but is at its --max-runs limit"),
        n => {
            let _ = write!(
                out,
                "; {n} nodes have room but are at their --max-runs limit"
            );
        }
    }
    out
}

/// `needs 4 nodes with 8 free GPUs; compute gpu-pool has only 3 ready nodes that large`.
pub(super) fn never_fits(job: &Job<'_>, compute: &str, capable: usize) -> String {
    let what = nodes_with(job.count, &job.resources, job.selector);
    match capable {
        0 => format!("needs {what}; no ready node in compute {compute} is that large"),
        n => format!(
            "needs {what}; compute {compute} has only {} that large",
            plural(n, "ready node", "ready nodes")
        ),
    }
}

/// `no ready node in compute gpu-pool (2 draining, 1 lost)`.
pub(super) fn no_ready_node(compute: &str, states: impl Iterator<Item = NodeState>) -> String {
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    for s in states {
        *counts.entry(s.as_str()).or_default() += 1;
    }
    if counts.is_empty() {
        return format!("no ready node in compute {compute}: no node has joined it");
    }
    let parts: Vec<String> = counts.iter().map(|(s, n)| format!("{n} {s}")).collect();
    format!("no ready node in compute {compute} ({})", parts.join(", "))
}

/// `run-a, run-b and 3 more`.
pub(super) fn list(ids: &[&str]) -> String {
    const SHOWN: usize = 3;
    let mut out = ids
        .iter()
        .take(SHOWN)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if ids.len() > SHOWN {
        let _ = write!(out, " and {} more", ids.len() - SHOWN);
    }
    out
}

/// `waiting behind higher-priority run run-abc (gang of 4)`.
pub(super) fn behind(job: &Job<'_>, head: &Job<'_>) -> String {
    let mut out = if head.priority > job.priority {
        format!("waiting behind higher-priority run {}", head.id)
    } else {
        format!("waiting behind earlier run {}", head.id)
    };
    if head.count > 1 {
        let _ = write!(out, " (gang of {})", head.count);
    }
    out
}

/// `restarting after backoff until 2025-06-01 12:00:05 UTC`.
pub(super) fn backoff(until: Millis) -> String {
    format!("restarting after backoff until {}", utc(until))
}

/// Unix milliseconds as `YYYY-MM-DD HH:MM:SS UTC` (proleptic Gregorian calendar).
pub(super) fn utc(ms: Millis) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's civil_from_days, for days since 1970-01-01.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_times_and_sizes() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_748_779_205_000), "2025-06-01 12:00:05 UTC");
        assert_eq!(format_bytes(64 << 30), "64 GiB");
        assert_eq!(format_bytes(3 << 29), "1.5 GiB");
        assert_eq!(format_bytes(512 << 20), "512 MiB");
        assert_eq!(list(&["a", "b"]), "a, b");
        assert_eq!(list(&["a", "b", "c", "d", "e"]), "a, b, c and 2 more");
    }

    #[test]
    fn describes_requests() {
        let r = Resources {
            cpu_millis: 8000,
            memory_bytes: 64 << 30,
            gpus: 4,
        };
        assert_eq!(
            nodes_with(2, &r, &BTreeMap::new()),
            "2 nodes with 4 free GPUs, 8 free CPUs and 64 GiB free memory"
        );
        assert_eq!(
            nodes_with(1, &r.with_gpus(1), &BTreeMap::new()),
            "1 node with 1 free GPU, 8 free CPUs and 64 GiB free memory"
        );
        let sel = BTreeMap::from([("zone".to_string(), "a".to_string())]);
        assert_eq!(
            nodes_with(1, &Resources::default(), &sel),
            "1 node labelled zone=a"
        );
    }
}
