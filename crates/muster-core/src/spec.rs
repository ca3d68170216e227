//! The run spec, and Azure ML v2 command-job YAML (`type: command`) parsing.
//!
//! A job file is parsed into a [`JobFile`] (as written, unknown keys rejected with their
//! path), the CLI applies its flags on top, and [`JobFile::into_run_spec`] substitutes
//! `${{inputs.x}}` / `${{outputs.x}}`, applies defaults and validates, giving the
//! normalized [`RunSpec`] that the server stores. The server calls [`RunSpec::validate`]
//! again on every submission: the CLI is a convenience, not the enforcer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::names::{validate_compute_name, validate_experiment_name};
use crate::resources::{Resources, parse_cpu, parse_memory};
use crate::snapshot::{GitInfo, is_sha256_hex};

/// Default `max_attempts` of a run (first attempt plus two restarts).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;
/// The default compute target.
pub const DEFAULT_COMPUTE: &str = "local";
/// The compute a job names to run on its workspace's serverless compute target (Azure
/// ML's serverless compute; here a target of the farm an operator chose).
pub const SERVERLESS: &str = "serverless";
/// The longest command accepted, in bytes.
pub const MAX_COMMAND_BYTES: usize = 64 * 1024;

/// The longest environment variable value: Linux refuses to start a process with a longer
/// string (`MAX_ARG_STRLEN`, 128 KiB).
pub const MAX_ENV_VALUE_BYTES: usize = 128 * 1024;

/// The most bytes all of a run's environment variables may take together.
pub const MAX_ENV_TOTAL_BYTES: usize = 1024 * 1024;

/// A bad job or compute spec: which field, what is wrong and what to do.
///
/// It travels in apply results between servers; it also decodes from the plain message
/// older servers sent (as a document-level error with that message).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SpecError {
    /// The dotted path of the field (`resources.instance_count`), or empty for the document.
    pub path: String,
    /// What is wrong and what to do.
    pub message: String,
    /// 1-based line and column in the YAML text, when known.
    pub location: Option<(usize, usize)>,
}

impl SpecError {
    /// An error about one field.
    pub fn field(path: impl Into<String>, message: impl Into<String>) -> SpecError {
        SpecError {
            path: path.into(),
            message: message.into(),
            location: None,
        }
    }
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        write!(f, "{}", self.message)?;
        if let Some((line, col)) = self.location {
            write!(f, " (line {line}, column {col})")?;
        }
        Ok(())
    }
}

impl std::error::Error for SpecError {}

impl<'de> Deserialize<'de> for SpecError {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<SpecError, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Wire {
            Message(String),
            Fields {
                path: String,
                message: String,
                #[serde(default)]
                location: Option<(usize, usize)>,
            },
        }
        Ok(match Wire::deserialize(d)? {
            Wire::Message(message) => SpecError::field("", message),
            Wire::Fields {
                path,
                message,
                location,
            } => SpecError {
                path,
                message,
                location,
            },
        })
    }
}

impl SpecError {
    /// The same error about a field nested under `prefix` (`jobs.train` + `command` gives
    /// `jobs.train.command`).
    pub fn under(self, prefix: &str) -> SpecError {
        let path = if self.path.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{}", self.path)
        };
        SpecError { path, ..self }
    }
}

/// The largest YAML document muster reads (job, sweep, pipeline, compute files).
pub const MAX_YAML_BYTES: usize = 2 << 20;

/// The deepest nesting a YAML document may have (block indentation levels plus flow `[`/`{`).
pub const MAX_YAML_DEPTH: usize = 100;

/// The most aliases (`*name`) a YAML document may use: each may expand a whole subtree.
pub const MAX_YAML_ALIASES: usize = 100;

/// Refuses, before any parser runs, a YAML document too large, too deeply nested or with too
/// many aliases to be a real job file: such input makes a parser run for minutes (a
/// 100,000-level nested mapping) or expand without bound (alias "billion laughs"). A cheap
/// line scan: block depth is the stack of indentations, flow depth the open brackets
/// outside quotes (quotes are taken to close on their line, which can only over-count).
pub fn check_yaml_limits(text: &str) -> Result<(), SpecError> {
    if text.len() > MAX_YAML_BYTES {
        return Err(SpecError::field(
            "",
            format!(
                "the file is {} bytes, more than the {MAX_YAML_BYTES} muster reads: split it, or keep data in files the job reads",
                text.len()
            ),
        ));
    }
    let (mut indents, mut flow, mut aliases) = (Vec::<usize>::new(), 0usize, 0usize);
    for (n, line) in text.lines().enumerate() {
        let content = line.trim_start_matches(' ');
        if content.is_empty() || content.starts_with('#') {
            continue;
        }
        let indent = line.len() - content.len();
        if flow == 0 {
            while indents.last().is_some_and(|top| *top > indent) {
                indents.pop();
            }
            if indents.last().is_none_or(|top| *top < indent) {
                indents.push(indent);
            }
        }
        let mut quote = None;
        let mut prev = ' ';
        for c in content.chars() {
            match (quote, c) {
                (Some(q), c) if c == q && prev != '\\' => quote = None,
                (Some(_), _) => {}
                (None, '#') if prev == ' ' => break,
                (None, '\'' | '"') => quote = Some(c),
                (None, '[' | '{') => flow += 1,
                (None, ']' | '}') => flow = flow.saturating_sub(1),
                (None, '*') if prev == ' ' || prev == '[' || prev == ',' => aliases += 1,
                _ => {}
            }
            if indents.len() + flow > MAX_YAML_DEPTH {
                return Err(SpecError {
                    path: String::new(),
                    message: format!(
                        "nested more than {MAX_YAML_DEPTH} levels deep: no job file needs that; flatten it"
                    ),
                    location: Some((n + 1, 1)),
                });
            }
            prev = c;
        }
    }
    if aliases > MAX_YAML_ALIASES {
        return Err(SpecError::field(
            "",
            format!(
                "{aliases} aliases (*name) is more than the {MAX_YAML_ALIASES} muster expands: write the values out"
            ),
        ));
    }
    Ok(())
}

/// Parses YAML into `T`, naming the full path of a bad or unknown key and its position;
/// a document over [`check_yaml_limits`] is refused before it is parsed.
pub(crate) fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    check_yaml_limits(text)?;
    parse_checked_yaml(text)
}

/// [`parse_yaml`] of a document that passed [`check_yaml_limits`].
fn parse_checked_yaml<T: DeserializeOwned>(text: &str) -> Result<T, SpecError> {
    if text.trim().is_empty() {
        return Err(SpecError::field("", "the file is empty"));
    }
    let de = yaml_serde::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        let location = inner.location().map(|l| (l.line(), l.column()));
        let raw = inner.to_string();
        // yaml_serde appends " at line L column C"; we report the location ourselves.
        let raw = raw.split(" at line ").next().unwrap_or(&raw).to_string();
        let path = if path == "." { String::new() } else { path };
        let (path, message) = if let Some(at) = raw.find("unknown field `") {
            // serde_path_to_error's path already ends with the unknown key.
            let rest = &raw[at + "unknown field `".len()..];
            let expected = rest.split("expected ").nth(1).unwrap_or_default();
            let hint = if expected.is_empty() {
                String::new()
            } else {
                format!("; expected {expected}")
            };
            (
                path,
                format!("unknown key: remove it or fix its spelling{hint}"),
            )
        } else {
            // yaml_serde prefixes some messages with the YAML path; we report it ourselves.
            let message = match raw.split_once(": ") {
                Some((prefix, rest)) if !path.is_empty() && path.starts_with(prefix) => {
                    rest.to_string()
                }
                _ => raw,
            };
            (path, message)
        };
        // A quote left open makes the parser run to the end of the file and say so there;
        // the line to fix is where the quote opened.
        if message.contains("end of stream")
            && let Some((line, column)) = unclosed_quote(text)
        {
            return SpecError {
                path,
                message: "this quote is never closed: close it where its value ends".to_string(),
                location: Some((line, column)),
            };
        }
        SpecError {
            path,
            message,
            location,
        }
    })
}

/// Where a quoted YAML value opens that is never closed: (line, column), 1-based. A quote
/// opens a value when it is the value's first character (after `key: `, `- ` or the
/// indentation); a quote inside a plain value (`echo it's`) is text. Double-quoted values
/// take `\"` escapes and single-quoted ones `''`; both may span lines.
fn unclosed_quote(text: &str) -> Option<(usize, usize)> {
    let mut open: Option<(char, usize, usize)> = None;
    for (n, line) in text.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut i = 0;
        // Outside a quote: find where this line's value starts.
        if open.is_none() {
            let indent = chars.iter().take_while(|c| c.is_whitespace()).count();
            i = indent;
            loop {
                if chars.get(i) == Some(&'-') && chars.get(i + 1).is_none_or(|c| *c == ' ') {
                    i += 1;
                    while chars.get(i) == Some(&' ') {
                        i += 1;
                    }
                    continue;
                }
                break;
            }
            if !matches!(chars.get(i), Some('"' | '\'')) {
                // `key: value`: the value starts after the first `: ` outside quotes.
                let Some(colon) = (i..chars.len())
                    .find(|&k| chars[k] == ':' && chars.get(k + 1).is_none_or(|c| *c == ' '))
                else {
                    continue;
                };
                if chars[i..colon].contains(&'#') {
                    continue;
                }
                i = colon + 1;
                while chars.get(i) == Some(&' ') {
                    i += 1;
                }
            }
            match chars.get(i) {
                Some(&q @ ('"' | '\'')) => {
                    open = Some((q, n + 1, i + 1));
                    i += 1;
                }
                _ => continue,
            }
        }
        // Inside a quote: look for its end.
        let (q, ..) = open.expect("set above");
        while i < chars.len() {
            match (q, chars[i]) {
                ('"', '\\') => i += 1,
                ('\'', '\'') if chars.get(i + 1) == Some(&'\'') => i += 1,
                (q, c) if c == q => {
                    open = None;
                    break;
                }
                _ => {}
            }
            i += 1;
        }
    }
    open.map(|(_, line, column)| (line, column))
}

/// A distributed-training setup (DESIGN.md section 9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Distribution {
    /// torch.distributed: `MASTER_ADDR`, `WORLD_SIZE`, `RANK`, ...
    Pytorch {
        /// Processes started per instance (default 1).
        process_count_per_instance: u32,
    },
    /// MPI: a hostfile with `slots`; the launcher runs on rank 0.
    Mpi {
        /// Processes (slots) per instance.
        process_count_per_instance: u32,
    },
    /// TensorFlow: `TF_CONFIG`.
    Tensorflow {
        /// Workers (default: instance_count).
        worker_count: u32,
        /// Parameter servers (default 0).
        parameter_server_count: u32,
    },
}

/// How the run's process is started: a container image, or the node's own userland.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    /// A container image; `None` runs in the node's userland (user-managed environment).
    pub image: Option<String>,
    /// A registered environment reference as written (`azureml:name@version`, prefix removed).
    pub name: Option<String>,
    /// A conda file named by the job, recorded for reference (muster does not build images).
    pub conda_file: Option<String>,
}

/// What a declared job output is: a folder (`uri_folder`, and Azure ML's model and
/// table types, which are folders too) or one file (`uri_file`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputKind {
    /// `outputs/<name>/` exists before the command starts.
    UriFolder,
    /// `outputs/<name>` is a file the command writes (`outputs/` exists).
    UriFile,
}

impl OutputKind {
    /// Azure ML's output `type`: `uri_file` is a file, every other type a folder.
    pub fn parse(kind: Option<&str>) -> Result<OutputKind, String> {
        match kind {
            None | Some("uri_folder" | "mlflow_model" | "custom_model" | "mltable") => {
                Ok(OutputKind::UriFolder)
            }
            Some("uri_file") => Ok(OutputKind::UriFile),
            Some(other) => Err(format!(
                "unknown output type {other:?}: use uri_folder, uri_file, mlflow_model, custom_model or mltable"
            )),
        }
    }

    /// The type as written: `uri_folder` or `uri_file`.
    pub fn as_str(self) -> &'static str {
        match self {
            OutputKind::UriFolder => "uri_folder",
            OutputKind::UriFile => "uri_file",
        }
    }
}

/// Where a run's code comes from: a snapshot manifest in the blob store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRef {
    /// SHA-256 of the manifest blob.
    pub manifest: String,
    /// Number of files.
    pub files: u64,
    /// Total bytes.
    pub bytes: u64,
    /// The git state of the source directory, when it was a work tree.
    pub git: Option<GitInfo>,
}

impl CodeRef {
    /// A reference to a snapshot known only by its manifest (an uploaded input, a data
    /// asset's or a registered component's code): the counts are not known here.
    pub fn stored(manifest: &str) -> CodeRef {
        CodeRef {
            manifest: manifest.to_string(),
            files: 0,
            bytes: 0,
            git: None,
        }
    }
}

/// A run as the server stores it: normalized, substituted, validated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSpec {
    /// The shell command (run with `sh -c`), inputs already substituted.
    pub command: String,
    /// The compute target.
    pub compute: String,
    /// The experiment.
    pub experiment: String,
    /// A friendly name.
    pub display_name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Free-form tags.
    pub tags: BTreeMap<String, String>,
    /// Image or node userland.
    pub environment: Environment,
    /// Variables set in the run's environment.
    pub environment_variables: BTreeMap<String, String>,
    /// The inputs as resolved (literal values, or data paths), for display and reuse.
    pub inputs: BTreeMap<String, String>,
    /// Nodes the run spans (a gang).
    pub instance_count: u32,
    /// What one instance needs.
    pub resources: Resources,
    /// Shared memory for the container, in bytes (Azure ML's default is 2g).
    pub shm_size: Option<u64>,
    /// Distributed-training setup.
    pub distribution: Option<Distribution>,
    /// Wall-clock limit of one attempt in seconds; the run ends TimedOut past it.
    pub timeout_s: Option<u64>,
    /// Higher runs first (`low` = -100, `normal` = 0, `high` = 100).
    pub priority: i32,
    /// Attempts before the run fails for good.
    pub max_attempts: u32,
    /// The code snapshot, if any.
    pub code: Option<CodeRef>,
    /// Node labels every instance's node must carry (`key: value`, all must match).
    /// Absent in logs written before it existed, which decode as "any node".
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// The workspace the run belongs to (the one the submitter named; its compute target
    /// must be in it). Absent in logs written before workspaces existed (the default).
    #[serde(
        default = "crate::access::default_workspace",
        skip_serializing_if = "crate::access::is_default_workspace"
    )]
    pub workspace: String,
    /// The declared outputs (`${{outputs.NAME}}` is `outputs/NAME`); a folder output's
    /// folder is made before the command starts, and all of them are kept with the run.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, OutputKind>,
    /// What the job asked for that muster reads but does not act on, one sentence each
    /// naming the key: printed at submit and shown with the run.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    /// The compute the job named when the server chose another for it (`serverless`,
    /// resolved to the workspace's serverless compute target).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_compute: Option<String>,
    /// `uri_file` inputs given by an http(s) URL: name → URL. The agent fetches each
    /// (through the node's cache) to `inputs/<name>/<file name>` before the command starts;
    /// that path is what `${{inputs.<name>}}` became.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub url_inputs: BTreeMap<String, String>,
    /// Local inputs uploaded with the submit: name → snapshot manifest, placed at
    /// `inputs/<name>/` before the command starts (a `uri_file` is the one file in it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub snapshot_inputs: BTreeMap<String, String>,
    /// Inputs on a datastore: name → (datastore, path inside it), as the job named them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub datastore_inputs: BTreeMap<String, (String, String)>,
    /// The same inputs as host paths, set by the server from its datastores (never by the
    /// submitter): placed read-only at `inputs/<name>`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_inputs: BTreeMap<String, String>,
    /// Inputs that are registered outputs of earlier runs: name → `ARCHIVE/FOLDER`,
    /// placed at `inputs/<name>` like a pipeline step's upstream output.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_inputs: BTreeMap<String, String>,
    /// Outputs to register as data assets when the run completes: output → (asset name,
    /// version; `None`: the next number).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub output_assets: BTreeMap<String, (String, Option<String>)>,
    /// Inputs in `mode: download`: each gets a writable copy of its own (in a container
    /// too). The others are in Azure ML's default `ro_mount`: read-only (a container's
    /// workspace is mounted read-only, and its uploaded inputs are linked from the node's
    /// cache instead of copied; a process's files are made read-only).
    #[serde(default, skip_serializing_if = "BTreeSet::is_empty")]
    pub download_inputs: BTreeSet<String>,
    /// Azure ML's `resources.instance_type`: the node size the run asks for. On a target
    /// whose nodes have sizes the server turns it into a `size` node selector
    /// ([`crate::compute::ComputeSpec::place_instance_type`]); elsewhere it is a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    /// Seconds between periodic checkpoints (`checkpoint: {interval: 10m}`): the agent
    /// uploads `MUSTER_CHECKPOINT_DIR` this often while the attempt runs, besides at its
    /// end. `None`: only at the end (preempted or otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_interval_s: Option<u64>,
}

/// The shortest periodic checkpoint interval a job may ask for, in seconds.
pub const MIN_CHECKPOINT_INTERVAL_S: u64 = 10;
/// The longest, in seconds (a week).
pub const MAX_CHECKPOINT_INTERVAL_S: u64 = 7 * 24 * 3600;

/// Parses a checkpoint interval: a whole number of seconds, or a number with a unit
/// (`90s`, `10m`, `2h`, `1d`), between [`MIN_CHECKPOINT_INTERVAL_S`] and
/// [`MAX_CHECKPOINT_INTERVAL_S`]. The error says what to write (the caller names the field).
pub fn parse_checkpoint_interval(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let unit_s: u64 = match unit.trim() {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => 0,
    };
    let seconds = digits
        .parse::<u64>()
        .ok()
        .filter(|_| unit_s > 0)
        .and_then(|n| n.checked_mul(unit_s))
        .ok_or_else(|| {
            format!(
                "{text:?} is not a duration: write seconds or a number with s, m, h or d (`10m`)"
            )
        })?;
    if !(MIN_CHECKPOINT_INTERVAL_S..=MAX_CHECKPOINT_INTERVAL_S).contains(&seconds) {
        return Err(format!(
            "{text:?} is outside {MIN_CHECKPOINT_INTERVAL_S}s to 7d: checkpoint less often, or leave `interval` out to checkpoint only when an attempt ends"
        ));
    }
    Ok(seconds)
}

/// How the CLI names a local input it uploaded: `muster-blob://MANIFEST` for a folder,
/// `muster-blob://MANIFEST/FILE` for one file (a `uri_file`).
pub const BLOB_SCHEME: &str = "muster-blob://";

/// `arg` as one word for `sh -c`, quoted only when it needs it.
pub fn shell_quote(arg: &str) -> String {
    let safe = !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c));
    if safe {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Whether `url` is an http(s) URL an input (or a data asset) may name.
pub fn is_input_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    (lower.starts_with("http://") || lower.starts_with("https://"))
        && url.len() <= MAX_INPUT_URL_BYTES
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The keys the warnings name (the text before each first `:`), for tests.
#[cfg(test)]
pub(crate) fn warned_keys(warnings: &[String]) -> Vec<&str> {
    warnings
        .iter()
        .map(|w| w.split(':').next().unwrap_or_default())
        .collect()
}

/// The longest URL an input may have.
pub const MAX_INPUT_URL_BYTES: usize = 2048;

/// Where a `uri_file` input fetched from `url` is placed, relative to the working
/// directory: `inputs/<name>/<the URL's last path segment>` (`data` when it has none).
pub fn url_input_path(name: &str, url: &str) -> String {
    let path = url
        .split_once("://")
        .map_or(url, |(_, rest)| rest)
        .split(['?', '#'])
        .next()
        .unwrap_or_default();
    let file = path
        .split_once('/')
        .map(|(_, p)| p)
        .unwrap_or_default()
        .rsplit('/')
        .next()
        .filter(|f| {
            !f.is_empty()
                && *f != "."
                && *f != ".."
                && f.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.+".contains(c))
        })
        .unwrap_or("data");
    format!("inputs/{name}/{file}")
}

/// How a data input reaches the command (Azure ML's input `mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InputMode {
    /// `ro_mount`, the default: read-only at `inputs/NAME`.
    ReadOnly,
    /// `download`: a writable copy of its own.
    Download,
    /// `direct`: the URI itself (an http(s) URL is then not fetched).
    Direct,
}

/// Reads input `name`'s `mode:` for data from `source`. Modes for outputs and unknown
/// modes are errors; what muster cannot do for this kind of data is a warning saying
/// what it does instead.
fn input_mode(
    name: &str,
    mode: Option<&str>,
    source: &DataPath<'_>,
    warnings: &mut Vec<String>,
) -> Result<InputMode, SpecError> {
    let field = format!("inputs.{name}.mode");
    let given = mode.is_some();
    let mode = match mode {
        None | Some("ro_mount") => InputMode::ReadOnly,
        Some("download") => InputMode::Download,
        Some("direct") => InputMode::Direct,
        Some(m @ ("eval_mount" | "eval_download")) => {
            warnings.push(format!(
                "{field}: {m} is for mltable inputs; muster reads it as {}",
                &m[5..]
            ));
            if m == "eval_mount" {
                InputMode::ReadOnly
            } else {
                InputMode::Download
            }
        }
        Some(m @ ("rw_mount" | "upload")) => {
            return Err(SpecError::field(
                field,
                format!(
                    "{m} is a mode for outputs: an input is ro_mount (the default), download or direct"
                ),
            ));
        }
        Some(other) => {
            return Err(SpecError::field(
                field,
                format!(
                    "{other:?} is not an input mode: use ro_mount (the default), download or direct"
                ),
            ));
        }
    };
    let instead = match (source, mode) {
        (DataPath::Url(_), InputMode::ReadOnly) if given => Some(
            "an http(s) input is downloaded, not mounted (read-only in a container, as the rest of the workspace)",
        ),
        (DataPath::Datastore(..), InputMode::Download) => Some(
            "a datastore input is the shared folder, mounted read-only (a link for a process), not copied",
        ),
        (DataPath::Datastore(..) | DataPath::Blob(..) | DataPath::Output(_), InputMode::Direct) => {
            Some(
                "the data is placed at inputs/NAME as for ro_mount; only an http(s) input is passed as its URI",
            )
        }
        _ => None,
    };
    if let Some(what) = instead {
        let mode_word = match mode {
            InputMode::ReadOnly => "ro_mount",
            InputMode::Download => "download",
            InputMode::Direct => "direct",
        };
        warnings.push(format!(
            "{field}: {mode_word}: {}",
            what.replace("NAME", name)
        ));
    }
    Ok(mode)
}

/// What a data input's `path` is, by its scheme.
enum DataPath<'a> {
    /// `http://` or `https://`.
    Url(&'a str),
    /// A storage service muster cannot reach, and what to do instead.
    Unreachable(String),
    /// `azureml:NAME@VERSION` or `azureml:NAME:VERSION`: a data asset.
    Asset,
    /// A local input the CLI uploaded: its manifest, and the file for a `uri_file`.
    Blob(&'a str, Option<&'a str>),
    /// A folder or file on a datastore: its name and the path inside it.
    Datastore(&'a str, &'a str),
    /// A registered output: `ARCHIVE/FOLDER`.
    Output(&'a str),
    /// Anything else: a path as written.
    Local,
}

fn data_path(path: &str) -> DataPath<'_> {
    if let Some(identity) = path.strip_prefix(crate::data::OUTPUT_SCHEME) {
        return DataPath::Output(identity);
    }
    if let Some(rest) = path.strip_prefix(BLOB_SCHEME) {
        let (manifest, file) = match rest.split_once('/') {
            Some((m, f)) => (m, Some(f)),
            None => (rest, None),
        };
        return DataPath::Blob(manifest, file);
    }
    let lower = path.to_ascii_lowercase();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        return DataPath::Url(path);
    }
    for scheme in [
        "wasbs://", "wasb://", "abfss://", "abfs://", "adl://", "s3://", "gs://",
    ] {
        if lower.starts_with(scheme) {
            return DataPath::Unreachable(format!(
                "muster cannot read {scheme} storage: copy the data to a file system the nodes share and give its path, or give an https URL of the file"
            ));
        }
    }
    match crate::data::parse_datastore_uri(path) {
        Some(Ok((store, rel))) => return DataPath::Datastore(store, rel),
        Some(Err(why)) => return DataPath::Unreachable(why),
        None => {}
    }
    if lower.starts_with("azureml://") {
        return DataPath::Unreachable(
            "give a datastore as azureml://datastores/NAME/paths/PATH (muster datastore list), or an https URL of the file".into(),
        );
    }
    if lower.starts_with("azureml:") {
        return DataPath::Asset;
    }
    DataPath::Local
}

impl RunSpec {
    /// A minimal spec: `command` on `local`, experiment `default`.
    pub fn new(command: impl Into<String>) -> RunSpec {
        RunSpec {
            command: command.into(),
            compute: DEFAULT_COMPUTE.to_string(),
            experiment: "default".to_string(),
            display_name: None,
            description: None,
            tags: BTreeMap::new(),
            environment: Environment::default(),
            environment_variables: BTreeMap::new(),
            inputs: BTreeMap::new(),
            instance_count: 1,
            resources: Resources::default(),
            shm_size: None,
            distribution: None,
            timeout_s: None,
            priority: 0,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            code: None,
            node_selector: BTreeMap::new(),
            workspace: crate::access::default_workspace(),
            outputs: BTreeMap::new(),
            warnings: Vec::new(),
            requested_compute: None,
            url_inputs: BTreeMap::new(),
            snapshot_inputs: BTreeMap::new(),
            datastore_inputs: BTreeMap::new(),
            host_inputs: BTreeMap::new(),
            output_inputs: BTreeMap::new(),
            output_assets: BTreeMap::new(),
            download_inputs: BTreeSet::new(),
            instance_type: None,
            checkpoint_interval_s: None,
        }
    }

    /// Checks every field the server relies on; the error names the field.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.command.trim().is_empty() {
            return Err(SpecError::field(
                "command",
                "missing: give the command to run (in the YAML, or after `--` on the command line)",
            ));
        }
        if self.command.len() > MAX_COMMAND_BYTES {
            return Err(SpecError::field(
                "command",
                format!(
                    "{} bytes is longer than the {MAX_COMMAND_BYTES}-byte limit: put the script in the code directory",
                    self.command.len()
                ),
            ));
        }
        if self.command.contains("${{") {
            return Err(SpecError::field(
                "command",
                "an unresolved ${{...}} reference remains: define the input it names",
            ));
        }
        validate_compute_name(&self.compute)
            .map_err(|e| SpecError::field("compute", e.to_string()))?;
        validate_experiment_name(&self.experiment)
            .map_err(|e| SpecError::field("experiment_name", e.to_string()))?;
        if self.command.contains('\0') {
            return Err(SpecError::field(
                "command",
                "contains a NUL byte, which no process can be given: remove it",
            ));
        }
        let mut env_bytes = 0;
        for (key, value) in &self.environment_variables {
            if !is_env_name(key) {
                return Err(SpecError::field(
                    format!("environment_variables.{key}"),
                    "not a valid variable name: use letters, digits and '_', not starting with a digit",
                ));
            }
            if value.contains('\0') {
                return Err(SpecError::field(
                    format!("environment_variables.{key}"),
                    "the value contains a NUL byte, which no process can be given: remove it",
                ));
            }
            if value.len() > MAX_ENV_VALUE_BYTES {
                return Err(SpecError::field(
                    format!("environment_variables.{key}"),
                    format!(
                        "the value is {} bytes, more than the {MAX_ENV_VALUE_BYTES} a process accepts: put it in a file in the code directory",
                        value.len()
                    ),
                ));
            }
            env_bytes += key.len() + value.len() + 2;
        }
        if env_bytes > MAX_ENV_TOTAL_BYTES {
            return Err(SpecError::field(
                "environment_variables",
                format!(
                    "{env_bytes} bytes in all is more than the {MAX_ENV_TOTAL_BYTES}-byte limit: put large values in files in the code directory"
                ),
            ));
        }
        if self.instance_count == 0 {
            return Err(SpecError::field(
                "resources.instance_count",
                "must be at least 1",
            ));
        }
        if self.instance_count > 1024 {
            return Err(SpecError::field(
                "resources.instance_count",
                format!(
                    "{} is more than the 1024 nodes one run may span",
                    self.instance_count
                ),
            ));
        }
        if self.max_attempts == 0 {
            return Err(SpecError::field("max_attempts", "must be at least 1"));
        }
        if let Some(s) = self.checkpoint_interval_s
            && !(MIN_CHECKPOINT_INTERVAL_S..=MAX_CHECKPOINT_INTERVAL_S).contains(&s)
        {
            return Err(SpecError::field(
                "checkpoint.interval",
                format!(
                    "{s} seconds is outside {MIN_CHECKPOINT_INTERVAL_S}s to 7d: checkpoint less often, or leave it out to checkpoint only when an attempt ends"
                ),
            ));
        }
        if self.timeout_s == Some(0) {
            return Err(SpecError::field(
                "limits.timeout",
                "must be at least 1 second (leave it out for no limit)",
            ));
        }
        if let Some(image) = &self.environment.image
            && (image.trim().is_empty() || image.chars().any(char::is_whitespace))
        {
            return Err(SpecError::field(
                "environment.image",
                format!("{image:?} is not an image reference"),
            ));
        }
        match &self.distribution {
            Some(Distribution::Mpi {
                process_count_per_instance: 0,
            })
            | Some(Distribution::Pytorch {
                process_count_per_instance: 0,
            }) => {
                return Err(SpecError::field(
                    "distribution.process_count_per_instance",
                    "must be at least 1",
                ));
            }
            _ => {}
        }
        for key in self.node_selector.keys() {
            if key.is_empty() || key.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(SpecError::field(
                    format!("node_selector.{key}"),
                    "not a label name: use a non-empty name without spaces",
                ));
            }
        }
        for name in self.outputs.keys() {
            crate::names::validate_output_name(name)
                .map_err(|e| SpecError::field(format!("outputs.{name}"), e.to_string()))?;
        }
        for (name, url) in &self.url_inputs {
            crate::names::validate_input_name(name)
                .map_err(|e| SpecError::field(format!("inputs.{name}"), e.to_string()))?;
            if !is_input_url(url) {
                return Err(SpecError::field(
                    format!("inputs.{name}.path"),
                    format!("not an http(s) URL of at most {MAX_INPUT_URL_BYTES} bytes"),
                ));
            }
        }
        for name in self.datastore_inputs.keys().chain(self.host_inputs.keys()) {
            crate::names::validate_input_name(name)
                .map_err(|e| SpecError::field(format!("inputs.{name}"), e.to_string()))?;
        }
        for (output, (name, version)) in &self.output_assets {
            if !self.outputs.contains_key(output) {
                return Err(SpecError::field(
                    format!("outputs.{output}"),
                    "registers an output the job does not declare",
                ));
            }
            crate::names::validate_input_name(name)
                .map_err(|e| SpecError::field(format!("outputs.{output}.name"), e.to_string()))?;
            if version.as_ref().is_some_and(|v| {
                v.is_empty()
                    || v.len() > 30
                    || !v
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            }) {
                return Err(SpecError::field(
                    format!("outputs.{output}.version"),
                    "use 1 to 30 letters, digits, '-', '_' or '.'",
                ));
            }
        }
        for (name, manifest) in &self.snapshot_inputs {
            crate::names::validate_input_name(name)
                .map_err(|e| SpecError::field(format!("inputs.{name}"), e.to_string()))?;
            if !is_sha256_hex(manifest) {
                return Err(SpecError::field(
                    format!("inputs.{name}.path"),
                    "the uploaded input's manifest is not a SHA-256 digest",
                ));
            }
        }
        for name in &self.download_inputs {
            crate::names::validate_input_name(name)
                .map_err(|e| SpecError::field(format!("inputs.{name}"), e.to_string()))?;
        }
        if self.warnings.len() > 64 || self.warnings.iter().any(|w| w.len() > 1024) {
            return Err(SpecError::field(
                "warnings",
                "at most 64 warnings of 1024 bytes each",
            ));
        }
        if let Some(code) = &self.code
            && !is_sha256_hex(&code.manifest)
        {
            return Err(SpecError::field(
                "code",
                "the snapshot manifest reference is not a SHA-256 digest",
            ));
        }
        Ok(())
    }
}

fn is_env_name(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Parses `low`, `normal`, `high` or an integer.
pub fn parse_priority(s: &str) -> Result<i32, String> {
    match s.trim().to_ascii_lowercase().as_str() {
        "low" => Ok(-100),
        "normal" | "medium" => Ok(0),
        "high" => Ok(100),
        other => other
            .parse::<i32>()
            .map_err(|_| format!("{s:?} is not a priority: use low, normal, high or an integer")),
    }
}

/// Removes Azure ML's `azureml:` prefix from a reference.
pub fn strip_azureml(s: &str) -> &str {
    s.strip_prefix("azureml:").unwrap_or(s)
}

/// A YAML scalar that may be written as a number or a string (`priority: high`, `memory: 4g`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    /// An integer.
    Int(i64),
    /// A float.
    Float(f64),
    /// A boolean.
    Bool(bool),
    /// Text.
    Text(String),
}

impl fmt::Display for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scalar::Int(v) => write!(f, "{v}"),
            Scalar::Float(v) => write!(f, "{v}"),
            Scalar::Bool(v) => write!(f, "{v}"),
            Scalar::Text(v) => write!(f, "{v}"),
        }
    }
}

/// A job input: a literal, or a data reference.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum InputFile {
    /// A literal value.
    Literal(Scalar),
    /// A data input (`uri_folder`, `uri_file`, ...).
    Data(DataInput),
}

/// A data input as written in the YAML.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataInput {
    /// `uri_folder`, `uri_file`, `mltable`, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Where the data is.
    pub path: Option<String>,
    /// `ro_mount`, `download`, ...
    pub mode: Option<String>,
    /// A literal default, for pipeline inputs.
    pub default: Option<Scalar>,
    /// Free text.
    pub description: Option<String>,
}

/// A job output as written in the YAML.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputFile {
    /// `uri_folder`, `uri_file`, ...
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Where the output goes.
    pub path: Option<String>,
    /// `rw_mount`, `upload`, ...
    pub mode: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Register the output as this data asset when the run completes.
    pub name: Option<String>,
    /// The asset's version (default: one more than the latest numbered one).
    pub version: Option<Scalar>,
}

/// `environment:` as a reference string or an inline definition.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum EnvironmentFile {
    /// `azureml:name@version`, or an image reference.
    Reference(String),
    /// `{image: ..., conda_file: ...}`.
    Inline(InlineEnvironment),
}

/// An inline environment.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InlineEnvironment {
    /// The container image.
    pub image: Option<String>,
    /// A conda file.
    pub conda_file: Option<yaml_serde::Value>,
    /// A name.
    pub name: Option<String>,
    /// A version.
    pub version: Option<Scalar>,
    /// Free text.
    pub description: Option<String>,
    /// Tags.
    pub tags: Option<BTreeMap<String, Scalar>>,
    /// Operating system (`linux`).
    pub os_type: Option<String>,
}

/// `distribution:` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributionFile {
    /// `pytorch`, `mpi` or `tensorflow`.
    #[serde(rename = "type")]
    pub kind: String,
    /// pytorch / mpi.
    pub process_count_per_instance: Option<u32>,
    /// tensorflow.
    pub worker_count: Option<u32>,
    /// tensorflow.
    pub parameter_server_count: Option<u32>,
}

/// `resources:` as written: Azure ML's keys plus muster's per-instance requests.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ResourcesFile {
    /// Nodes the run spans.
    pub instance_count: Option<u32>,
    /// Azure ML VM size: the run goes to nodes whose `size` label is this (the nodes of a
    /// compute target with that `size`).
    pub instance_type: Option<String>,
    /// Container shared memory (`2g`).
    pub shm_size: Option<Scalar>,
    /// Azure ML properties; accepted.
    pub properties: Option<yaml_serde::Value>,
    /// Extra docker arguments; not supported (rejected at conversion).
    pub docker_args: Option<String>,
    /// muster: CPUs per instance (`2`, `0.5`, `500m`).
    pub cpu: Option<Scalar>,
    /// muster: memory per instance (`8g`).
    pub memory: Option<Scalar>,
    /// muster: GPUs per instance.
    pub gpus: Option<u32>,
}

/// `limits:` as written.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsFile {
    /// Seconds.
    pub timeout: Option<u64>,
}

/// `checkpoint:` of a job file (muster's own key).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointFile {
    /// How often to take a checkpoint while the attempt runs (`10m`, `600`).
    pub interval: Option<Scalar>,
}

/// An Azure ML v2 command job, as written (plus muster's `priority` and `max_attempts`).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    /// The schema URL; ignored.
    #[serde(rename = "$schema")]
    pub schema: Option<String>,
    /// `command` (default); `sweep` and `pipeline` are other job types.
    #[serde(rename = "type")]
    pub kind: Option<String>,
    /// Azure ML's job name; muster assigns run ids itself, so this becomes the display name if none is given.
    pub name: Option<String>,
    /// A friendly name.
    pub display_name: Option<String>,
    /// The experiment.
    pub experiment_name: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// Tags.
    pub tags: Option<BTreeMap<String, Scalar>>,
    /// Azure ML properties; accepted and kept as tags are not.
    pub properties: Option<yaml_serde::Value>,
    /// The command.
    pub command: Option<String>,
    /// The code directory, relative to the YAML file.
    pub code: Option<String>,
    /// The environment.
    pub environment: Option<EnvironmentFile>,
    /// Variables.
    pub environment_variables: Option<BTreeMap<String, Scalar>>,
    /// The compute target.
    pub compute: Option<String>,
    /// Inputs.
    pub inputs: Option<BTreeMap<String, InputFile>>,
    /// Outputs.
    pub outputs: Option<BTreeMap<String, Option<OutputFile>>>,
    /// Distributed-training setup.
    pub distribution: Option<DistributionFile>,
    /// Resources.
    pub resources: Option<ResourcesFile>,
    /// Limits.
    pub limits: Option<LimitsFile>,
    /// muster: `low`, `normal`, `high` or an integer.
    pub priority: Option<Scalar>,
    /// muster: attempts before the run fails for good.
    pub max_attempts: Option<u32>,
    /// muster: only nodes carrying all these labels take the run (`gpu_model: A100`).
    pub node_selector: Option<BTreeMap<String, Scalar>>,
    /// muster: `{interval: 10m}`: upload `MUSTER_CHECKPOINT_DIR` this often as well as
    /// when an attempt ends.
    pub checkpoint: Option<CheckpointFile>,
    /// Azure ML job services (jupyter, tensorboard, ssh); a warning: muster starts none.
    pub services: Option<yaml_serde::Value>,
    /// Azure ML's identity for data access; a warning: the node's own is used.
    pub identity: Option<yaml_serde::Value>,
}

/// Parses an Azure ML v2 command job. Unknown keys are errors naming their path.
pub fn parse_job_yaml(text: &str) -> Result<JobFile, SpecError> {
    check_yaml_limits(text)?;
    // A sweep or pipeline has keys a command job lacks (`jobs:`, `trial:`): say which
    // command takes it before complaining about them.
    if let Ok(yaml_serde::Value::Mapping(m)) = yaml_serde::from_str::<yaml_serde::Value>(text)
        && let Some(other @ ("sweep" | "pipeline")) = m.get("type").and_then(|t| t.as_str())
    {
        return Err(SpecError::field(
            "type",
            format!(
                "a {other} job is submitted with `muster {other} submit`, not `muster run submit`"
            ),
        ));
    }
    let job: JobFile = parse_checked_yaml(text)?;
    match job.kind.as_deref() {
        None | Some("command") => Ok(job),
        Some(other @ ("sweep" | "pipeline")) => Err(SpecError::field(
            "type",
            format!(
                "a {other} job is submitted with `muster {other} submit`, not `muster run submit`"
            ),
        )),
        Some(other) => Err(SpecError::field(
            "type",
            format!("unknown job type {other:?}: use command, sweep or pipeline"),
        )),
    }
}

/// Replaces `${{inputs.x}}` and `${{outputs.x}}` in `command`. `field` names the field in errors.
pub fn substitute(
    field: &str,
    command: &str,
    lookup: impl Fn(&str, &str) -> Option<String>,
) -> Result<String, SpecError> {
    let mut out = String::with_capacity(command.len());
    let mut rest = command;
    while let Some(start) = rest.find("${{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 3..];
        let end = after
            .find("}}")
            .ok_or_else(|| SpecError::field(field, "a `${{` is not closed with `}}`"))?;
        let expr = after[..end].trim();
        let (scope, name) = expr.split_once('.').ok_or_else(|| {
            SpecError::field(
                field,
                format!("`${{{{{expr}}}}}` is not of the form ${{{{inputs.NAME}}}}"),
            )
        })?;
        let value = lookup(scope, name).ok_or_else(|| {
            SpecError::field(
                field,
                match scope {
                    "inputs" | "outputs" => format!(
                        "`${{{{{expr}}}}}` names {scope}.{name}, which the job does not define: add it under `{scope}:`"
                    ),
                    "search_space" => format!(
                        "`${{{{{expr}}}}}` is only meaningful in a sweep's trial: submit it with `muster sweep submit`"
                    ),
                    _ => format!("`${{{{{expr}}}}}`: unknown scope {scope:?}; use inputs or outputs"),
                },
            )
        })?;
        out.push_str(&value);
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

impl JobFile {
    /// The declared outputs and their kinds. An output's `path` (a datastore to write
    /// to) cannot be honoured: muster keeps outputs with the run.
    fn declared_outputs(
        &self,
        warnings: &mut Vec<String>,
    ) -> Result<BTreeMap<String, OutputKind>, SpecError> {
        let mut out = BTreeMap::new();
        for (name, output) in self.outputs.clone().unwrap_or_default() {
            let field = format!("outputs.{name}");
            crate::names::validate_output_name(&name)
                .map_err(|e| SpecError::field(&field, e.to_string()))?;
            let output = output.unwrap_or_default();
            let kind = OutputKind::parse(output.kind.as_deref())
                .map_err(|e| SpecError::field(format!("{field}.type"), e))?;
            if let Some(path) = &output.path {
                return Err(SpecError::field(
                    format!("{field}.path"),
                    format!(
                        "muster keeps outputs with the run and cannot write them to {path}: remove path, and fetch the output with `muster run download RUN --output-name {name}`"
                    ),
                ));
            }
            match output.mode.as_deref() {
                None | Some("rw_mount" | "upload") => {}
                Some(other) => warnings.push(format!(
                    "{field}.mode: {other} is not used; muster writes outputs to a local folder and keeps them with the run when it ends (as upload)"
                )),
            }
            out.insert(name, kind);
        }
        Ok(out)
    }

    /// The outputs to register as data assets (`name:`, optional `version:`); only folder
    /// outputs can be, and a version without a name is an error.
    fn output_assets(&self) -> Result<BTreeMap<String, (String, Option<String>)>, SpecError> {
        let mut out = BTreeMap::new();
        for (output, file) in self.outputs.clone().unwrap_or_default() {
            let Some(file) = file else { continue };
            let field = format!("outputs.{output}");
            match (file.name, file.version) {
                (None, None) => {}
                (None, Some(_)) => {
                    return Err(SpecError::field(
                        format!("{field}.version"),
                        "a version needs the asset's name: add name",
                    ));
                }
                (Some(name), version) => {
                    crate::names::validate_input_name(&name)
                        .map_err(|e| SpecError::field(format!("{field}.name"), e.to_string()))?;
                    if OutputKind::parse(file.kind.as_deref()) == Ok(OutputKind::UriFile) {
                        return Err(SpecError::field(
                            format!("{field}.name"),
                            "only folder outputs are registered as data assets: use type: uri_folder",
                        ));
                    }
                    out.insert(output, (name, version.map(|v| v.to_string())));
                }
            }
        }
        Ok(out)
    }

    /// A warning for each key this job sets that muster reads but does not act on.
    fn unused_keys(&self) -> Vec<String> {
        let mut w = Vec::new();
        if self.properties.is_some() {
            w.push("properties: not kept; use tags for what should stay with the run".into());
        }
        if self.services.is_some() {
            w.push("services: muster starts no job services (jupyter, tensorboard, ssh); follow the run with `muster run logs --follow`".into());
        }
        if self.identity.is_some() {
            w.push("identity: not used; the run reaches what the node it runs on can reach".into());
        }
        if self
            .resources
            .as_ref()
            .is_some_and(|r| r.properties.is_some())
        {
            w.push("resources.properties: not used".into());
        }
        match &self.environment {
            Some(EnvironmentFile::Reference(r)) if r.starts_with("azureml:") => {
                w.push(format!("environment: muster has no registered environments yet, so {r} is not used and the run uses the node's own interpreter; give an image (environment: IMAGE) to run in a container"));
            }
            Some(EnvironmentFile::Inline(e)) if e.conda_file.is_some() => {
                let with = match &e.image {
                    Some(i) => format!("the image {i} as it is"),
                    None => "the node's own interpreter".into(),
                };
                w.push(format!("environment.conda_file: muster does not build environments yet, so the run uses {with}; install the dependencies in the image"));
            }
            _ => {}
        }
        w
    }

    /// Normalizes the job into a run spec: defaults, substitution, validation.
    /// `default_experiment` is used when the job names none (the CLI passes the code
    /// directory's name, as Azure ML does).
    pub fn into_run_spec(self, default_experiment: &str) -> Result<RunSpec, SpecError> {
        let command = self.command.clone().ok_or_else(|| {
            SpecError::field(
                "command",
                "missing: give the command to run (in the YAML, or after `--` on the command line)",
            )
        })?;
        if let Some(EnvironmentFile::Inline(e)) = &self.environment
            && let Some(os) = e
                .os_type
                .as_deref()
                .filter(|o| !o.eq_ignore_ascii_case("linux"))
        {
            return Err(SpecError::field(
                "environment.os_type",
                format!(
                    "muster runs Linux containers and processes only, not {os}: remove os_type or set linux"
                ),
            ));
        }
        let mut warnings = self.unused_keys();
        let mut url_inputs = BTreeMap::new();
        let mut snapshot_inputs = BTreeMap::new();
        let mut datastore_inputs = BTreeMap::new();
        let mut output_inputs = BTreeMap::new();
        let mut download_inputs = BTreeSet::new();
        let mut inputs = BTreeMap::new();
        for (name, input) in self.inputs.clone().unwrap_or_default() {
            let value = match input {
                InputFile::Literal(v) => v.to_string(),
                InputFile::Data(d) => match (d.path, d.default) {
                    (Some(p), _) => {
                        let source = data_path(&p);
                        let mode = input_mode(&name, d.mode.as_deref(), &source, &mut warnings)?;
                        if mode == InputMode::Download
                            && matches!(source, DataPath::Blob(..) | DataPath::Output(_))
                        {
                            download_inputs.insert(name.clone());
                        }
                        match source {
                            DataPath::Url(url) if mode == InputMode::Direct => url.to_string(),
                            DataPath::Url(url) => {
                                if d.kind.as_deref().is_some_and(|k| k != "uri_file") {
                                    return Err(SpecError::field(
                                        format!("inputs.{name}.type"),
                                        "an http(s) URL names one file: use type: uri_file",
                                    ));
                                }
                                url_inputs.insert(name.clone(), url.to_string());
                                url_input_path(&name, url)
                            }
                            DataPath::Unreachable(why) => {
                                return Err(SpecError::field(format!("inputs.{name}.path"), why));
                            }
                            DataPath::Output(identity) => {
                                let ok = identity.split_once('/').is_some_and(|(a, f)| {
                                    is_sha256_hex(a)
                                        && crate::names::validate_output_name(f).is_ok()
                                });
                                if !ok {
                                    return Err(SpecError::field(
                                        format!("inputs.{name}.path"),
                                        format!("{p:?} is not a registered output"),
                                    ));
                                }
                                output_inputs.insert(name.clone(), identity.to_string());
                                format!("inputs/{name}")
                            }
                            DataPath::Datastore(store, rel) => {
                                datastore_inputs
                                    .insert(name.clone(), (store.to_string(), rel.to_string()));
                                format!("inputs/{name}")
                            }
                            DataPath::Blob(manifest, file) => {
                                if !is_sha256_hex(manifest)
                                    || file.is_some_and(|f| {
                                        f.contains('/')
                                            || !crate::snapshot::is_safe_relative_path(f)
                                    })
                                {
                                    return Err(SpecError::field(
                                        format!("inputs.{name}.path"),
                                        format!(
                                            "{p:?} is not {BLOB_SCHEME}SHA256 or {BLOB_SCHEME}SHA256/FILE"
                                        ),
                                    ));
                                }
                                snapshot_inputs.insert(name.clone(), manifest.to_string());
                                match file {
                                    Some(f) => format!("inputs/{name}/{f}"),
                                    None => format!("inputs/{name}"),
                                }
                            }
                            DataPath::Asset => {
                                warnings.push(format!(
                                "inputs.{name}: the data asset {p} was not resolved (the muster CLI resolves assets when it submits), so ${{{{inputs.{name}}}}} is {} as written",
                                strip_azureml(&p)
                            ));
                                strip_azureml(&p).to_string()
                            }
                            DataPath::Local => {
                                warnings.push(format!(
                                "inputs.{name}: a local path is uploaded by the muster CLI when it submits (run, sweep or pipeline); here ${{{{inputs.{name}}}}} is {p} as written, so the nodes must see it there (or put the data in the code folder, or make it a data asset)"
                            ));
                                p
                            }
                        }
                    }
                    (None, Some(v)) => v.to_string(),
                    (None, None) => {
                        return Err(SpecError::field(
                            format!("inputs.{name}"),
                            "a data input needs a `path`",
                        ));
                    }
                },
            };
            inputs.insert(name, value);
        }
        let outputs = self.declared_outputs(&mut warnings)?;
        let output_assets = self.output_assets()?;
        let command = substitute("command", &command, |scope, name| match scope {
            "inputs" => inputs.get(name).cloned(),
            "outputs" => outputs
                .contains_key(name)
                .then(|| format!("outputs/{name}")),
            _ => None,
        })?;

        let mut spec = RunSpec::new(command);
        if let Some(c) = self.compute {
            spec.compute = strip_azureml(&c).to_string();
        }
        spec.experiment = self
            .experiment_name
            .unwrap_or_else(|| default_experiment.to_string());
        spec.display_name = self.display_name.or(self.name);
        spec.description = self.description;
        spec.tags = self
            .tags
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        spec.environment_variables = self
            .environment_variables
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.to_string()))
            .collect();
        spec.inputs = inputs;
        spec.outputs = outputs;
        spec.warnings = warnings;
        spec.url_inputs = url_inputs;
        spec.snapshot_inputs = snapshot_inputs;
        spec.datastore_inputs = datastore_inputs;
        spec.output_inputs = output_inputs;
        spec.download_inputs = download_inputs;
        spec.output_assets = output_assets;
        spec.environment = match self.environment {
            None => Environment::default(),
            Some(EnvironmentFile::Reference(r)) if r.starts_with("azureml:") => Environment {
                name: Some(strip_azureml(&r).to_string()),
                ..Environment::default()
            },
            Some(EnvironmentFile::Reference(r)) => Environment {
                image: Some(r),
                ..Environment::default()
            },
            Some(EnvironmentFile::Inline(e)) => Environment {
                image: e.image,
                name: e.name,
                conda_file: e.conda_file.map(|c| match c {
                    yaml_serde::Value::String(s) => s,
                    other => yaml_serde::to_string(&other).unwrap_or_default(),
                }),
            },
        };
        spec.instance_type = self
            .resources
            .as_ref()
            .and_then(|r| r.instance_type.clone());
        if let Some(r) = self.resources {
            if let Some(n) = r.instance_count {
                spec.instance_count = n;
            }
            if r.docker_args.is_some() {
                return Err(SpecError::field(
                    "resources.docker_args",
                    "muster does not pass raw docker arguments: use resources.shm_size, cpu, memory and gpus",
                ));
            }
            if let Some(s) = r.shm_size {
                spec.shm_size = Some(
                    parse_memory(&s.to_string())
                        .map_err(|e| SpecError::field("resources.shm_size", e))?,
                );
            }
            let more_than_zero = |field: &str, v: u64| {
                if v == 0 {
                    Err(SpecError::field(
                        field,
                        "must be more than 0: leave it out to request none",
                    ))
                } else {
                    Ok(v)
                }
            };
            if let Some(c) = r.cpu {
                let millis =
                    parse_cpu(&c.to_string()).map_err(|e| SpecError::field("resources.cpu", e))?;
                spec.resources.cpu_millis = more_than_zero("resources.cpu", millis)?;
            }
            if let Some(m) = r.memory {
                let bytes = parse_memory(&m.to_string())
                    .map_err(|e| SpecError::field("resources.memory", e))?;
                spec.resources.memory_bytes = more_than_zero("resources.memory", bytes)?;
            }
            if let Some(g) = r.gpus {
                spec.resources.gpus = g;
            }
        }
        if let Some(d) = self.distribution {
            spec.distribution = Some(match d.kind.to_ascii_lowercase().as_str() {
                "pytorch" => Distribution::Pytorch {
                    process_count_per_instance: d.process_count_per_instance.unwrap_or(1),
                },
                "mpi" => Distribution::Mpi {
                    process_count_per_instance: d.process_count_per_instance.ok_or_else(|| {
                        SpecError::field(
                            "distribution.process_count_per_instance",
                            "missing: an mpi distribution needs process_count_per_instance",
                        )
                    })?,
                },
                "tensorflow" => Distribution::Tensorflow {
                    worker_count: d.worker_count.unwrap_or(spec.instance_count),
                    parameter_server_count: d.parameter_server_count.unwrap_or(0),
                },
                other => {
                    return Err(SpecError::field(
                        "distribution.type",
                        format!("unknown distribution {other:?}: use pytorch, mpi or tensorflow"),
                    ));
                }
            });
        }
        if let Some(l) = self.limits {
            spec.timeout_s = l.timeout;
        }
        if let Some(p) = self.priority {
            spec.priority =
                parse_priority(&p.to_string()).map_err(|e| SpecError::field("priority", e))?;
        }
        if let Some(m) = self.max_attempts {
            spec.max_attempts = m;
        }
        if let Some(interval) = self.checkpoint.and_then(|c| c.interval) {
            spec.checkpoint_interval_s = Some(
                parse_checkpoint_interval(&interval.to_string())
                    .map_err(|e| SpecError::field("checkpoint.interval", e))?,
            );
        }
        if let Some(selector) = self.node_selector {
            spec.node_selector = selector
                .into_iter()
                .map(|(k, v)| (k, v.to_string()))
                .collect();
        }
        spec.validate()?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_azure_ml_pytorch_job() {
        let text =
            include_str!("../../../../shared/formats/v2_command_job_pytorch_distributed.yml");
        let job = parse_job_yaml(text).unwrap();
        assert_eq!(job.code.as_deref(), Some("src"));
        let spec = job.into_run_spec("fallback").unwrap();
        assert_eq!(
            spec.command,
            "python train.py --epochs 1 --learning-rate 0.2 --data-dir cifar-10-example@latest"
        );
        assert_eq!(spec.compute, "gpu-cluster");
        assert_eq!(spec.experiment, "pytorch-cifar-distributed-example");
        assert_eq!(spec.instance_count, 2);
        assert_eq!(
            spec.distribution,
            Some(Distribution::Pytorch {
                process_count_per_instance: 1
            })
        );
        assert_eq!(
            spec.environment.name.as_deref(),
            Some("AzureML-acpt-pytorch-2.8-cuda12.6@latest")
        );
    }

    #[test]
    fn unknown_keys_name_their_full_path() {
        let e = parse_job_yaml("command: echo\nresources:\n  instance_cont: 2\n").unwrap_err();
        assert_eq!(e.path, "resources.instance_cont");
        assert!(e.message.contains("unknown key"), "{e}");
        assert_eq!(e.location.map(|l| l.0), Some(3));
        let e = parse_job_yaml("command: echo\nfoo: 1\n").unwrap_err();
        assert_eq!(e.path, "foo");
    }

    #[test]
    fn malformed_yaml_reports_line_and_column() {
        let e = parse_job_yaml("command: echo\n  bad: [1\n").unwrap_err();
        assert!(e.location.is_some(), "{e}");
        assert!(e.to_string().contains("line"), "{e}");
    }

    #[test]
    fn missing_command_and_bad_fields_are_named() {
        let e = parse_job_yaml("compute: local\n")
            .unwrap()
            .into_run_spec("x")
            .unwrap_err();
        assert_eq!(e.path, "command");
        let e = parse_job_yaml("command: echo\ncompute: gpu_1\n")
            .unwrap()
            .into_run_spec("x")
            .unwrap_err();
        assert_eq!(e.path, "compute");
        let e = parse_job_yaml("command: echo ${{inputs.nope}}\n")
            .unwrap()
            .into_run_spec("x")
            .unwrap_err();
        assert_eq!(e.path, "command");
        assert!(e.message.contains("inputs.nope"), "{e}");
        let e = parse_job_yaml("command: echo\ndistribution:\n  type: mpi\n")
            .unwrap()
            .into_run_spec("x")
            .unwrap_err();
        assert_eq!(e.path, "distribution.process_count_per_instance");
        let e = parse_job_yaml("type: sweep\n").unwrap_err();
        assert_eq!(e.path, "type");
        // A whole pipeline (with its `jobs:`) points at `muster pipeline submit`.
        let e = parse_job_yaml("type: pipeline\njobs:\n  a:\n    command: echo\n").unwrap_err();
        assert_eq!(e.path, "type");
        assert!(e.to_string().contains("muster pipeline submit"), "{e}");
        // Even with the keys only a sweep or pipeline has.
        let e = parse_job_yaml("type: sweep\ntrial:\n  command: echo\n").unwrap_err();
        assert!(e.message.contains("muster sweep submit"), "{e}");
        let e = parse_job_yaml("type: pipeline\njobs: {}\n").unwrap_err();
        assert!(e.message.contains("muster pipeline submit"), "{e}");
    }

    #[test]
    fn yaml_too_deep_too_large_or_alias_heavy_is_refused_before_parsing() {
        let started = std::time::Instant::now();
        let flow = format!(
            "command: echo\nx: {}1{}\n",
            "{a: ".repeat(100_000),
            "}".repeat(100_000)
        );
        let e = parse_job_yaml(&flow).unwrap_err();
        assert!(e.message.contains("nested more than"), "{e}");
        let block: String = (0..1_000)
            .map(|d| format!("{}a{d}:\n", " ".repeat(d)))
            .collect();
        let e = parse_job_yaml(&format!("command: echo\nx:\n{block}")).unwrap_err();
        assert!(e.message.contains("nested more than"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        let e = parse_job_yaml(&format!(
            "command: echo\n# {}\n",
            "x".repeat(MAX_YAML_BYTES)
        ))
        .unwrap_err();
        assert!(e.message.contains("bytes, more than"), "{e}");
        let laughs: String = (0..200).map(|i| format!("  - *a{}\n", i % 2)).collect();
        let e = parse_job_yaml(&format!(
            "command: echo\nv: &a0 [1]\nw: &a1 [2]\nlist:\n{laughs}"
        ))
        .unwrap_err();
        assert!(e.message.contains("aliases"), "{e}");
        // Real files pass: brackets and quotes in commands, a multi-line script, comments.
        parse_job_yaml(
            "command: >-\n  python -c \"print({'a': [1, 2]})\" # [not a bracket\n  && echo don't\nenvironment_variables:\n  A: '[x'\n",
        )
        .unwrap();
        let nested: String = (0..30)
            .map(|d| format!("{}if x:\n", "  ".repeat(d + 1)))
            .collect();
        parse_job_yaml(&format!("command: |\n{nested}")).unwrap();
        // And so does every real Azure ML file among the fixtures.
        let fixtures = concat!(env!("CARGO_MANIFEST_DIR"), "/../../../shared/formats");
        let mut checked = 0;
        for entry in std::fs::read_dir(fixtures).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "yml" || e == "yaml") {
                let text = std::fs::read_to_string(&path).unwrap();
                check_yaml_limits(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} fixtures in {fixtures}");
    }

    #[test]
    fn values_no_process_can_take_are_refused_at_submit() {
        let refused = |yaml: &str| {
            parse_job_yaml(yaml)
                .unwrap()
                .into_run_spec("x")
                .unwrap_err()
        };
        let e = refused("command: echo\nenvironment_variables:\n  A: \"x\\0y\"\n");
        assert_eq!(e.path, "environment_variables.A");
        assert!(e.message.contains("NUL"), "{e}");
        let big = "v".repeat(MAX_ENV_VALUE_BYTES + 1);
        let e = refused(&format!(
            "command: echo\nenvironment_variables:\n  BIG: {big}\n"
        ));
        assert_eq!(e.path, "environment_variables.BIG");
        assert!(e.message.contains("put it in a file"), "{e}");
        let many: String = (0..10)
            .map(|i| format!("  V{i}: {}\n", "v".repeat(MAX_ENV_VALUE_BYTES)))
            .collect();
        let e = refused(&format!("command: echo\nenvironment_variables:\n{many}"));
        assert_eq!(e.path, "environment_variables");
        let e = refused("command: \"echo \\0\"\n");
        assert_eq!(e.path, "command");
        for (yaml, path) in [
            ("cpu: 0m", "resources.cpu"),
            ("cpu: 0", "resources.cpu"),
            ("memory: 0g", "resources.memory"),
        ] {
            let e = refused(&format!("command: echo\nresources:\n  {yaml}\n"));
            assert_eq!(e.path, path, "{yaml}");
            assert!(e.message.contains("more than 0"), "{e}");
        }
    }

    #[test]
    fn checkpoint_interval_parses_and_bad_ones_name_the_field() {
        let spec = |yaml: &str| {
            parse_job_yaml(&format!("command: echo\n{yaml}")).and_then(|j| j.into_run_spec("exp"))
        };
        assert_eq!(spec("").unwrap().checkpoint_interval_s, None);
        for (yaml, seconds) in [
            ("checkpoint:\n  interval: 10m\n", 600),
            ("checkpoint:\n  interval: 90\n", 90),
            ("checkpoint:\n  interval: 2h\n", 7200),
            ("checkpoint:\n  interval: 45s\n", 45),
        ] {
            assert_eq!(
                spec(yaml).unwrap().checkpoint_interval_s,
                Some(seconds),
                "{yaml}"
            );
        }
        // No interval: checkpoints only when an attempt ends.
        assert_eq!(
            spec("checkpoint: {}\n").unwrap().checkpoint_interval_s,
            None
        );
        for bad in ["10 minutes", "ten", "5s", "-1m", "30d", "1.5h"] {
            let e = spec(&format!("checkpoint:\n  interval: {bad}\n")).unwrap_err();
            assert_eq!(e.path, "checkpoint.interval", "{bad}: {e}");
            assert!(e.message.contains(bad), "{bad}: {e}");
        }
        let e = spec("checkpoint:\n  every: 10m\n").unwrap_err();
        assert_eq!(e.path, "checkpoint.every", "{e}");
        // A spec that did not come from a job file is checked the same way.
        let mut s = RunSpec::new("echo");
        s.checkpoint_interval_s = Some(1);
        assert_eq!(s.validate().unwrap_err().path, "checkpoint.interval");
    }

    #[test]
    fn muster_additions_parse() {
        let spec = parse_job_yaml(
            "command: python t.py --out ${{outputs.model}}\npriority: high\nmax_attempts: 5\nresources:\n  cpu: 2\n  memory: 4g\n  gpus: 1\n  shm_size: 2g\noutputs:\n  model:\n    type: uri_folder\nlimits:\n  timeout: 60\nenvironment:\n  image: busybox:latest\nenvironment_variables:\n  SEED: 7\nnode_selector:\n  gpu_model: A100\n  zone: 2\n",
        )
        .unwrap()
        .into_run_spec("exp")
        .unwrap();
        assert_eq!(spec.command, "python t.py --out outputs/model");
        assert_eq!(spec.priority, 100);
        assert_eq!(spec.max_attempts, 5);
        assert_eq!(
            spec.resources,
            Resources {
                cpu_millis: 2000,
                memory_bytes: 4 << 30,
                gpus: 1
            }
        );
        assert_eq!(spec.shm_size, Some(2 << 30));
        assert_eq!(spec.timeout_s, Some(60));
        assert_eq!(spec.environment.image.as_deref(), Some("busybox:latest"));
        assert_eq!(spec.environment_variables["SEED"], "7");
        assert_eq!(spec.experiment, "exp");
        assert_eq!(
            spec.node_selector,
            BTreeMap::from([
                ("gpu_model".to_string(), "A100".to_string()),
                ("zone".to_string(), "2".to_string())
            ])
        );
    }

    #[test]
    fn a_node_selector_label_with_a_space_names_its_path() {
        let e = parse_job_yaml("command: echo\nnode_selector:\n  \"gpu model\": A100\n")
            .unwrap()
            .into_run_spec("exp")
            .unwrap_err();
        assert_eq!(e.path, "node_selector.gpu model");
    }

    #[test]
    fn declared_outputs_are_kept_with_their_kind() {
        let spec = parse_job_yaml(
            "command: python t.py --model ${{outputs.model}} --report ${{outputs.report}}\noutputs:\n  model:\n    type: mlflow_model\n    mode: rw_mount\n  report:\n    type: uri_file\n  untyped:\n",
        )
        .unwrap()
        .into_run_spec("exp")
        .unwrap();
        assert_eq!(
            spec.command,
            "python t.py --model outputs/model --report outputs/report"
        );
        assert_eq!(
            spec.outputs,
            BTreeMap::from([
                ("model".to_string(), OutputKind::UriFolder),
                ("report".to_string(), OutputKind::UriFile),
                ("untyped".to_string(), OutputKind::UriFolder),
            ])
        );
        assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
        spec.validate().unwrap();
    }

    #[test]
    fn an_output_muster_cannot_honour_is_an_error_naming_it() {
        let e = parse_job_yaml(
            "command: echo\noutputs:\n  m:\n    type: uri_folder\n    path: azureml://datastores/blob/paths/m\n",
        )
        .unwrap()
        .into_run_spec("exp")
        .unwrap_err();
        assert_eq!(e.path, "outputs.m.path");
        assert!(
            e.message
                .contains("muster run download RUN --output-name m"),
            "{e}"
        );
        let e = parse_job_yaml("command: echo\noutputs:\n  m:\n    type: triton_model\n")
            .unwrap()
            .into_run_spec("exp")
            .unwrap_err();
        assert_eq!(e.path, "outputs.m.type");
        // A name that would leave outputs/.
        let e = parse_job_yaml("command: echo\noutputs:\n  ../up:\n")
            .unwrap()
            .into_run_spec("exp")
            .unwrap_err();
        assert_eq!(e.path, "outputs.../up");
        let e =
            parse_job_yaml("command: echo\nenvironment:\n  image: busybox\n  os_type: windows\n")
                .unwrap()
                .into_run_spec("exp")
                .unwrap_err();
        assert_eq!(e.path, "environment.os_type");
    }

    #[test]
    fn an_unclosed_quote_is_found_where_it_opens() {
        let e = parse_job_yaml(
            "command: echo it's fine\ndisplay_name: \"unterminated\nexperiment_name: x\nresources:\n  cpu: 1\n",
        )
        .unwrap_err();
        assert_eq!(e.location, Some((2, 15)), "{e}");
        assert!(e.to_string().contains("never closed"), "{e}");
        assert_eq!(
            unclosed_quote("a: 'it''s'\nb: \"x\\\"y\"\nc:\n  - 'open\n"),
            Some((4, 5))
        );
        assert_eq!(unclosed_quote("a: \"two\n  lines\"\nb: c\n"), None);
    }

    #[test]
    fn keys_muster_does_not_act_on_are_warnings_naming_them() {
        let spec = parse_job_yaml(concat!(
            "command: python train.py --data ${{inputs.data}}\n",
            "inputs:\n  data:\n    type: uri_folder\n    path: azureml:iris@1\n",
            "environment:\n  image: python:3.12\n  conda_file: conda.yml\n",
            "resources:\n  instance_type: Standard_NC6\n",
            "services:\n  my_jupyter:\n    type: jupyter_lab\n",
            "identity:\n  type: user_identity\n",
            "properties:\n  a: b\n",
            "outputs:\n  o:\n    mode: direct\n",
        ))
        .unwrap()
        .into_run_spec("exp")
        .unwrap();
        assert_eq!(
            warned_keys(&spec.warnings),
            [
                "properties",
                "services",
                "identity",
                "environment.conda_file",
                "inputs.data",
                "outputs.o.mode",
            ]
        );
        // instance_type is the server's to act on, by the target's sizes.
        assert_eq!(spec.instance_type.as_deref(), Some("Standard_NC6"));
        assert!(
            spec.warnings[3].contains("python:3.12 as it is"),
            "{:?}",
            spec.warnings
        );
        let named = parse_job_yaml("command: echo\nenvironment: azureml:sklearn-env@latest\n")
            .unwrap()
            .into_run_spec("exp")
            .unwrap();
        assert!(
            named.warnings[0].contains("node's own interpreter"),
            "{:?}",
            named.warnings
        );
    }

    #[test]
    fn input_modes_are_read_only_by_default_and_named_when_muster_cannot_honour_them() {
        let blob = format!("{BLOB_SCHEME}{}", "a".repeat(64));
        let job = |mode: &str, path: &str| {
            parse_job_yaml(&format!(
                "command: cat ${{{{inputs.d}}}}\ninputs:\n  d:\n    type: uri_file\n    path: {path}\n{mode}"
            ))
            .unwrap()
            .into_run_spec("exp")
        };
        // ro_mount, written or not: read-only, no warning.
        for mode in ["", "    mode: ro_mount\n"] {
            let spec = job(mode, &blob).unwrap();
            assert!(
                spec.download_inputs.is_empty() && spec.warnings.is_empty(),
                "{spec:?}"
            );
        }
        let spec = job("    mode: download\n", &blob).unwrap();
        assert_eq!(spec.download_inputs, BTreeSet::from(["d".to_string()]));
        spec.validate().unwrap();
        // direct passes a URL as it is, fetching nothing.
        let spec = job("    mode: direct\n", "https://example.org/iris.csv").unwrap();
        assert_eq!(spec.command, "cat https://example.org/iris.csv");
        assert!(
            spec.url_inputs.is_empty() && spec.warnings.is_empty(),
            "{spec:?}"
        );
        // What muster cannot do is a warning that says what it does.
        let spec = job("    mode: ro_mount\n", "https://example.org/iris.csv").unwrap();
        assert!(
            spec.warnings[0].starts_with("inputs.d.mode: ro_mount: an http(s) input is downloaded"),
            "{:?}",
            spec.warnings
        );
        let spec = job(
            "    mode: download\n",
            "azureml://datastores/shared/paths/x",
        )
        .unwrap();
        assert!(
            spec.warnings[0].contains("mounted read-only"),
            "{:?}",
            spec.warnings
        );
        assert!(spec.download_inputs.is_empty());
        let spec = job("    mode: direct\n", &blob).unwrap();
        assert!(
            spec.warnings[0].contains("placed at inputs/d as for ro_mount"),
            "{:?}",
            spec.warnings
        );
        let spec = job("    mode: eval_download\n", &blob).unwrap();
        assert!(
            spec.warnings[0].contains("reads it as download"),
            "{:?}",
            spec.warnings
        );
        assert_eq!(spec.download_inputs.len(), 1);
        // Output modes and unknown words are errors.
        let e = job("    mode: rw_mount\n", &blob).unwrap_err();
        assert_eq!(e.path, "inputs.d.mode");
        assert!(e.message.contains("a mode for outputs"), "{e}");
        let e = job("    mode: mount\n", &blob).unwrap_err();
        assert!(e.message.contains("\"mount\" is not an input mode"), "{e}");
    }

    #[test]
    fn url_inputs_are_fetched_files_and_unreachable_storage_is_an_error() {
        let spec = parse_job_yaml(concat!(
            "command: wc -l ${{inputs.iris}} ${{inputs.bare}}\n",
            "inputs:\n",
            "  iris:\n    type: uri_file\n    path: https://example.org/datasets/iris.csv?sv=1\n",
            "  bare:\n    path: http://127.0.0.1:8080/\n",
        ))
        .unwrap()
        .into_run_spec("exp")
        .unwrap();
        assert_eq!(spec.command, "wc -l inputs/iris/iris.csv inputs/bare/data");
        assert_eq!(
            spec.url_inputs.get("iris").map(String::as_str),
            Some("https://example.org/datasets/iris.csv?sv=1")
        );
        assert!(spec.warnings.is_empty(), "{:?}", spec.warnings);
        spec.validate().unwrap();
        for (path, kind, field) in [
            ("https://example.org/d/", "uri_folder", "inputs.d.type"),
            (
                "wasbs://data@acct.blob.core.windows.net/iris.csv",
                "uri_file",
                "inputs.d.path",
            ),
            (
                "azureml://datastores/workspaceblobstore/paths/../etc",
                "uri_file",
                "inputs.d.path",
            ),
            (
                "azureml://subscriptions/x/datastores/y/paths/z",
                "uri_file",
                "inputs.d.path",
            ),
        ] {
            let e = parse_job_yaml(&format!(
                "command: cat ${{{{inputs.d}}}}\ninputs:\n  d:\n    type: {kind}\n    path: {path}\n"
            ))
            .unwrap()
            .into_run_spec("exp")
            .unwrap_err();
            assert_eq!(e.path, field, "{path}: {e}");
        }
        assert_eq!(url_input_path("x", "https://h/a/../..?q"), "inputs/x/data");
        let on_store = parse_job_yaml(
            "command: ls ${{inputs.d}}\ninputs:\n  d:\n    type: uri_folder\n    path: azureml://datastores/shared/paths/imagenet/train/\n",
        )
        .unwrap()
        .into_run_spec("exp")
        .unwrap();
        assert_eq!(on_store.command, "ls inputs/d");
        assert_eq!(
            on_store.datastore_inputs.get("d"),
            Some(&("shared".to_string(), "imagenet/train".to_string()))
        );
    }
}
