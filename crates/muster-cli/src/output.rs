//! How results are printed: tables for people (comfy-table), JSON for scripts.

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use muster_proto::{Word, v1};
use serde_json::{Value, json};

/// RFC 3339 time of Unix milliseconds.
pub fn time(ms: u64) -> String {
    humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

/// What `local` nodes (`muster dev`'s agent) offer instead of a CPU or memory figure: they
/// run everything they are given, so their capacity is recorded as zero.
pub const NO_LIMIT: &str = "no limit (runs here are not packed)";

/// Millicores as CPUs, e.g. `1.5`.
pub fn cpus(millis: u64) -> String {
    format!("{:.1}", millis as f64 / 1000.0)
}

fn opt_time(ms: Option<u64>) -> Value {
    ms.map(|t| Value::String(time(t))).unwrap_or(Value::Null)
}

/// A run as JSON: id, experiment, compute, state, attempt, exit_code, created_at,
/// started_at, finished_at, nodes, and the rest of what a script may want.
pub fn run_json(r: &v1::Run) -> Value {
    let spec = r.spec.clone().unwrap_or_default();
    let nodes: Vec<String> = r
        .attempts
        .last()
        .map(|a| {
            a.placements
                .iter()
                .map(|p| {
                    if p.node_name.is_empty() {
                        p.node_id.clone()
                    } else {
                        p.node_name.clone()
                    }
                })
                .collect()
        })
        .unwrap_or_default();
    json!({
        "id": r.id,
        "experiment": spec.experiment,
        "compute": spec.compute,
        "state": v1::RunState::word_of(r.state),
        "attempt": r.attempt,
        "exit_code": r.exit_code,
        "created_at": time(r.created_at_ms),
        "started_at": opt_time(r.started_at_ms),
        "finished_at": opt_time(r.finished_at_ms),
        "nodes": nodes,
        "archive": (!r.archive.is_empty()).then_some(&r.archive),
        "display_name": spec.display_name,
        "command": spec.command,
        "image": spec.image,
        "priority": spec.priority,
        "instance_count": spec.instance_count,
        "message": r.message,
        "requested_compute": spec.requested_compute,
        "outputs": spec.outputs.iter().collect::<std::collections::BTreeMap<_, _>>(),
        "warnings": spec.warnings,
        "code": spec.code.as_ref().map(|c| json!({
            "manifest": c.manifest, "files": c.files, "bytes": c.bytes,
            "git": c.git.as_ref().map(|g| json!({"commit": g.commit, "branch": g.branch, "dirty": g.dirty})),
        })),
        "attempts": r.attempts.iter().map(|a| json!({
            "number": a.number,
            "state": v1::AttemptState::word_of(a.state),
            "end": attempt_end(a),
            "exit_code": a.exit_code,
            "message": a.message,
            "placed_at": time(a.placed_at_ms),
            "started_at": opt_time(a.started_at_ms),
            "finished_at": opt_time(a.finished_at_ms),
            "nodes": a.placements.iter().map(|p| p.node_name.clone()).collect::<Vec<_>>(),
            "outputs": a.outputs,
            "resumed_from": a.resumed_from.as_ref().map(checkpoint_json),
        })).collect::<Vec<_>>(),
        "checkpoint": r.checkpoint.as_ref().map(checkpoint_json),
        "checkpoint_interval_s": spec.checkpoint_interval_s,
    })
}

/// A checkpoint as JSON: the attempt that took it, its number there, what is in it, when
/// it was taken (`periodic`, `preempted`, `ended`), its archive and when it was recorded.
fn checkpoint_json(c: &v1::Checkpoint) -> Value {
    json!({
        "attempt": c.attempt,
        "seq": c.seq,
        "files": c.files,
        "bytes": c.bytes,
        "cause": v1::CheckpointCause::word_of(c.cause),
        "sha256": c.sha256,
        "recorded_at": time(c.at_ms),
    })
}

/// `12 files, 3.4 KiB, taken when preempted`.
fn checkpoint_summary(c: &v1::Checkpoint) -> String {
    let taken = match muster_proto::decode_enum::<
        v1::CheckpointCause,
        muster_core::state::CheckpointCause,
    >(c.cause)
    {
        Ok(cause) => cause.describe().to_string(),
        Err(_) => format!("taken ({})", v1::CheckpointCause::word_of(c.cause)),
    };
    format!(
        "{}, {}, {taken}",
        crate::snapshot::count(c.files, "file"),
        muster_core::state::human_bytes(c.bytes)
    )
}

/// How an attempt ended, once it did.
fn attempt_end(a: &v1::Attempt) -> Option<std::borrow::Cow<'static, str>> {
    (a.end != i32::from(v1::AttemptEnd::Unspecified)).then(|| v1::AttemptEnd::word_of(a.end))
}

/// A new table with muster's look.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    t
}

/// The runs table.
pub fn runs_table(runs: &[v1::Run]) -> Table {
    let mut t = table(&[
        "ID",
        "EXPERIMENT",
        "COMPUTE",
        "STATE",
        "ATTEMPT",
        "EXIT",
        "CREATED",
        "NAME",
    ]);
    for r in runs {
        let spec = r.spec.clone().unwrap_or_default();
        t.add_row(vec![
            r.id.clone(),
            spec.experiment,
            spec.compute,
            v1::RunState::word_of(r.state).into_owned(),
            r.attempt.to_string(),
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
            time(r.created_at_ms),
            spec.display_name.unwrap_or_default(),
        ]);
    }
    t
}

/// One run, as key/value lines.
pub fn run_details(r: &v1::Run) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let mut lines = vec![
        ("id", r.id.clone()),
        ("state", v1::RunState::word_of(r.state).into_owned()),
        ("experiment", spec.experiment.clone()),
        (
            "compute",
            match &spec.requested_compute {
                Some(asked) => format!("{} (for {asked})", spec.compute),
                None => spec.compute.clone(),
            },
        ),
        ("command", spec.command.clone()),
        ("attempt", r.attempt.to_string()),
        (
            "exit code",
            r.exit_code.map(|c| c.to_string()).unwrap_or_default(),
        ),
        ("created", time(r.created_at_ms)),
        ("started", r.started_at_ms.map(time).unwrap_or_default()),
        ("finished", r.finished_at_ms.map(time).unwrap_or_default()),
    ];
    if let Some(n) = &spec.display_name {
        lines.push(("name", n.clone()));
    }
    if let Some(m) = &r.message {
        lines.push(("message", m.clone()));
    }
    if !r.archive.is_empty() {
        lines.push((
            "archived",
            format!(
                "out of the cluster state by retention (archive {}); run list no longer shows it",
                &r.archive[..12.min(r.archive.len())]
            ),
        ));
    }
    if let Some(i) = &spec.image {
        lines.push(("image", i.clone()));
    }
    if !spec.outputs.is_empty() {
        let mut outputs: Vec<String> = spec
            .outputs
            .iter()
            .map(|(name, kind)| format!("{name} ({kind})"))
            .collect();
        outputs.sort();
        lines.push(("outputs", outputs.join(", ")));
    }
    for w in &spec.warnings {
        lines.push(("warning", w.clone()));
    }
    if let Some(c) = &spec.code {
        let mut code = format!(
            "{}, {} (manifest {})",
            crate::snapshot::count(c.files, "file"),
            crate::snapshot::human_bytes(c.bytes),
            &c.manifest[..12.min(c.manifest.len())]
        );
        if let Some(g) = &c.git {
            code.push_str(&format!(
                "; git {}{}{}",
                &g.commit[..12.min(g.commit.len())],
                g.branch
                    .as_ref()
                    .map(|b| format!(" on {b}"))
                    .unwrap_or_default(),
                if g.dirty { " (dirty)" } else { "" }
            ));
        }
        lines.push(("code", code));
    }
    for a in &r.attempts {
        let nodes: Vec<String> = a.placements.iter().map(|p| p.node_name.clone()).collect();
        lines.push((
            "attempt",
            format!(
                "#{} {}{} on {}{}",
                a.number,
                attempt_end(a).unwrap_or_else(|| v1::AttemptState::word_of(a.state)),
                a.exit_code
                    .map(|c| format!(" (exit {c})"))
                    .unwrap_or_default(),
                nodes.join(", "),
                a.message
                    .as_ref()
                    .map(|m| format!(": {m}"))
                    .unwrap_or_default()
            ),
        ));
        match &a.resumed_from {
            Some(c) => lines.push((
                "checkpoint",
                format!(
                    "attempt {}: resumed from the checkpoint of attempt {} ({})",
                    a.number,
                    c.attempt,
                    checkpoint_summary(c)
                ),
            )),
            None if a.number > 1 => lines.push((
                "checkpoint",
                format!(
                    "attempt {}: started from scratch (the run had no checkpoint)",
                    a.number
                ),
            )),
            None => {}
        }
    }
    if let Some(c) = &r.checkpoint {
        lines.push((
            "checkpoint",
            format!(
                "latest: attempt {}'s ({})",
                c.attempt,
                checkpoint_summary(c)
            ),
        ));
    }
    lines
        .into_iter()
        .map(|(k, v)| format!("{k:<11} {v}\n"))
        .collect()
}

/// A failed command's error as `-o json` prints it (on stderr, one line):
/// `{"error": {"code": "invalid_argument", "message": "...", "field": "inputs.x.path"}}`.
/// `code` is the server's gRPC code when a server refused, `unavailable` when none
/// answered, else `error`; `field` is the setting the message names first (after a file
/// name), when it names one.
pub fn error_json(e: &anyhow::Error) -> Value {
    let code = e
        .chain()
        .find_map(|c| c.downcast_ref::<muster_client::ClientError>())
        .map(|c| match c.code() {
            Some(code) => grpc_code_word(code),
            None if c.is_retryable() => "unavailable".to_string(),
            None => "error".to_string(),
        })
        .unwrap_or_else(|| "error".to_string());
    let message = format!("{e:#}");
    let field = message
        .split(": ")
        .find(|part| {
            !(part.ends_with(".yml")
                || part.ends_with(".yaml")
                || part.ends_with(".runconfig")
                || part.starts_with("error"))
        })
        .filter(|part| {
            !part.is_empty()
                && part.len() <= 200
                && part.chars().all(|c| {
                    c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '[' | ']' | '$')
                })
                && part
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '$' || c == '-')
        })
        .map(str::to_string);
    serde_json::json!({"error": {"code": code, "message": message, "field": field}})
}

/// `invalid_argument`, `not_found`, … as gRPC spells its codes.
fn grpc_code_word(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut word = String::new();
    for (i, ch) in debug.chars().enumerate() {
        if ch.is_ascii_uppercase() && i > 0 {
            word.push('_');
        }
        word.push(ch.to_ascii_lowercase());
    }
    word
}

/// Prints JSON.
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).expect("JSON prints"));
}

#[cfg(test)]
mod error_tests {
    use super::*;

    #[test]
    fn json_errors_carry_the_code_the_message_and_the_field() {
        let refused = anyhow::Error::new(muster_client::status(tonic::Status::invalid_argument(
            "resources.gpus: the run asks for 8 GPUs",
        )));
        let v = error_json(&refused);
        assert_eq!(v["error"]["code"], "invalid_argument");
        assert_eq!(v["error"]["field"], "resources.gpus");
        let parse = anyhow::anyhow!("job.yml: inputs.x.path: ./nope does not exist");
        let v = error_json(&parse);
        assert_eq!(v["error"]["code"], "error");
        assert_eq!(v["error"]["field"], "inputs.x.path");
        assert_eq!(
            v["error"]["message"],
            "job.yml: inputs.x.path: ./nope does not exist"
        );
        let plain = anyhow::anyhow!("cannot read job.yml");
        assert!(error_json(&plain)["error"]["field"].is_null());
        assert_eq!(
            grpc_code_word(tonic::Code::FailedPrecondition),
            "failed_precondition"
        );
    }
}
