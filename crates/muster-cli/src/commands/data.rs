//! `muster data ...`: data assets, as `az ml data create|list|show`. A local path is
//! uploaded first (a folder, or a `uri_file`'s one file, as a snapshot); an http(s) URL is
//! recorded as it is and fetched by the agents of the runs that use it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use muster_client::status;
use muster_proto::v1;
use serde::Deserialize;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::output::{print_json, table, time};
use crate::snapshot;

/// `muster data`.
#[derive(Debug, Subcommand)]
pub enum DataCommand {
    /// Make a version of a data asset from a local file or folder, or an http(s) URL.
    #[command(disable_version_flag = true)]
    Create(DataCreateArgs),
    /// The data assets of the workspaces you may read.
    List,
    /// One data asset: NAME:VERSION, NAME@latest or NAME.
    Show {
        /// The asset.
        asset: String,
    },
}

/// `muster datastore`.
#[derive(Debug, Subcommand)]
pub enum DatastoreCommand {
    /// Name a folder every node of the workspace sees at one path (operators).
    Create {
        /// The name jobs use: `azureml://datastores/NAME/paths/...`.
        name: String,
        /// The absolute path of the shared folder on every node.
        #[arg(long)]
        path: String,
    },
    /// The datastores of the workspaces you may read.
    List,
}

/// Runs a `muster datastore` command.
pub async fn datastore(
    server: &str,
    output: OutputFormat,
    cmd: DatastoreCommand,
) -> anyhow::Result<()> {
    let mut c = crate::connect(server).await?;
    let workspace = crate::workspace().unwrap_or_default().to_string();
    let stores = match cmd {
        DatastoreCommand::Create { name, path } => {
            let d = c
                .data
                .create_datastore(v1::CreateDatastoreRequest {
                    datastore: Some(v1::Datastore {
                        name,
                        workspace,
                        path,
                        ..Default::default()
                    }),
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Table {
                println!(
                    "Created datastore {} at {}; jobs read it as `path: azureml://datastores/{}/paths/...`",
                    d.name, d.path, d.name
                );
                return Ok(());
            }
            vec![d]
        }
        DatastoreCommand::List => {
            c.data
                .list_datastores(v1::ListDatastoresRequest { workspace })
                .await
                .map_err(status)?
                .into_inner()
                .datastores
        }
    };
    if output == OutputFormat::Json {
        print_json(&json!(
            stores
                .iter()
                .map(
                    |d| json!({"name": d.name, "workspace": d.workspace, "path": d.path,
                "created_at": time(d.created_at_ms), "created_by": d.created_by})
                )
                .collect::<Vec<_>>()
        ));
    } else {
        let mut t = table(&["NAME", "WORKSPACE", "PATH", "CREATED"]);
        for d in &stores {
            t.add_row(vec![
                d.name.clone(),
                d.workspace.clone(),
                d.path.clone(),
                time(d.created_at_ms),
            ]);
        }
        println!("{t}");
    }
    Ok(())
}

/// `muster data create`.
#[derive(Debug, Args)]
pub struct DataCreateArgs {
    /// An Azure ML data YAML (`type`, `name`, `version`, `path`, `description`).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// The name.
    #[arg(long)]
    pub name: Option<String>,
    /// The version (Azure ML's is required too).
    #[arg(long)]
    pub version: Option<String>,
    /// A local file or folder, or an http(s) URL of one file.
    #[arg(long)]
    pub path: Option<String>,
    /// uri_folder (default) or uri_file.
    #[arg(long = "type")]
    pub kind: Option<String>,
    /// Free text.
    #[arg(long)]
    pub description: Option<String>,
}

/// Azure ML's data YAML, as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DataFile {
    #[serde(rename = "$schema")]
    _schema: Option<String>,
    #[serde(rename = "type")]
    kind: Option<String>,
    name: Option<String>,
    version: Option<muster_core::spec::Scalar>,
    path: Option<String>,
    description: Option<String>,
}

pub async fn run(server: &str, output: OutputFormat, cmd: DataCommand) -> anyhow::Result<()> {
    match cmd {
        DataCommand::Create(args) => create(server, output, args).await,
        DataCommand::List => {
            let mut c = crate::connect(server).await?;
            let assets = c
                .data
                .list_data(v1::ListDataRequest {
                    workspace: crate::workspace().unwrap_or_default().to_string(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .assets;
            if output == OutputFormat::Json {
                print_json(&json!(assets.iter().map(asset_json).collect::<Vec<_>>()));
            } else {
                let mut t = table(&["NAME", "VERSION", "TYPE", "WORKSPACE", "SOURCE", "CREATED"]);
                for a in &assets {
                    t.add_row(vec![
                        a.name.clone(),
                        a.version.clone(),
                        a.r#type.clone(),
                        a.workspace.clone(),
                        source(a),
                        time(a.created_at_ms),
                    ]);
                }
                println!("{t}");
            }
            Ok(())
        }
        DataCommand::Show { asset } => {
            let mut c = crate::connect(server).await?;
            let a = get(&mut c, &asset).await?;
            if output == OutputFormat::Json {
                print_json(&asset_json(&a));
            } else {
                for (k, v) in [
                    ("name", a.name.clone()),
                    ("version", a.version.clone()),
                    ("type", a.r#type.clone()),
                    ("workspace", a.workspace.clone()),
                    ("source", source(&a)),
                    (
                        "created",
                        format!("{} by {}", time(a.created_at_ms), a.created_by),
                    ),
                    ("description", a.description.clone().unwrap_or_default()),
                ] {
                    if !v.is_empty() {
                        println!("{k:<11} {v}");
                    }
                }
            }
            Ok(())
        }
    }
}

/// The asset `reference` names (`NAME:VERSION`, `NAME@latest`, `NAME`; an `azureml:`
/// prefix is dropped) in the workspace of `--workspace`.
pub(crate) async fn get(
    c: &mut muster_client::Clients,
    reference: &str,
) -> anyhow::Result<v1::DataAsset> {
    let reference = muster_core::spec::strip_azureml(reference);
    let (name, version) = muster_core::data::parse_reference(reference)
        .map_err(|e| anyhow::anyhow!("data asset {e}"))?;
    Ok(c.data
        .get_data(v1::GetDataRequest {
            workspace: crate::workspace().unwrap_or_default().to_string(),
            name: name.to_string(),
            version: version.map(str::to_string),
        })
        .await
        .map_err(status)?
        .into_inner())
}

/// `text` (a YAML job) with every `path: azureml:NAME:VERSION` (or `@latest`) replaced by
/// the asset's own path, and a missing sibling `type` set to the asset's. The text comes
/// back as it was when it names no asset (so errors keep their lines).
pub(crate) async fn resolve_asset_paths(server: &str, text: &str) -> anyhow::Result<String> {
    fn refs(v: &yaml_serde::Value, out: &mut Vec<String>) {
        match v {
            yaml_serde::Value::Mapping(m) => {
                if let Some(p) = m.get("path").and_then(|p| p.as_str())
                    && p.starts_with("azureml:")
                    && !p.starts_with("azureml://")
                {
                    out.push(p.to_string());
                }
                m.values().for_each(|v| refs(v, out));
            }
            yaml_serde::Value::Sequence(s) => s.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    fn rewrite(
        v: &mut yaml_serde::Value,
        found: &std::collections::BTreeMap<String, v1::DataAsset>,
    ) {
        match v {
            yaml_serde::Value::Mapping(m) => {
                let asset = m
                    .get("path")
                    .and_then(|p| p.as_str())
                    .and_then(|p| found.get(p))
                    .cloned();
                if let Some(a) = asset {
                    m.insert("path".into(), a.input_path.clone().into());
                    if !m.contains_key("type") {
                        m.insert("type".into(), a.r#type.clone().into());
                    }
                }
                m.values_mut().for_each(|v| rewrite(v, found));
            }
            yaml_serde::Value::Sequence(s) => s.iter_mut().for_each(|v| rewrite(v, found)),
            _ => {}
        }
    }
    if muster_core::spec::check_yaml_limits(text).is_err() {
        return Ok(text.to_string());
    }
    let Ok(mut doc) = yaml_serde::from_str::<yaml_serde::Value>(text) else {
        return Ok(text.to_string());
    };
    let mut wanted = Vec::new();
    refs(&doc, &mut wanted);
    if wanted.is_empty() {
        return Ok(text.to_string());
    }
    let mut c = crate::connect(server).await?;
    let mut found = std::collections::BTreeMap::new();
    for reference in wanted {
        let asset = get(&mut c, &reference)
            .await
            .with_context(|| format!("path: {reference}"))?;
        found.insert(reference, asset);
    }
    rewrite(&mut doc, &found);
    Ok(yaml_serde::to_string(&doc)?)
}

fn source(a: &v1::DataAsset) -> String {
    if let Some(o) = &a.output {
        let (archive, folder) = o.split_once('/').unwrap_or((o, ""));
        return format!(
            "{} (run output {folder}, archive {})",
            a.created_by,
            &archive[..12.min(archive.len())]
        );
    }
    match (&a.url, &a.manifest) {
        (Some(u), _) => u.clone(),
        (None, Some(m)) => format!(
            "stored{} (manifest {})",
            a.file
                .as_ref()
                .map(|f| format!(" file {f}"))
                .unwrap_or_default(),
            &m[..12.min(m.len())]
        ),
        (None, None) => String::new(),
    }
}

fn asset_json(a: &v1::DataAsset) -> serde_json::Value {
    json!({
        "name": a.name, "version": a.version, "type": a.r#type, "workspace": a.workspace,
        "manifest": a.manifest, "file": a.file, "url": a.url, "output": a.output, "description": a.description,
        "created_at": time(a.created_at_ms), "created_by": a.created_by,
    })
}

async fn create(server: &str, output: OutputFormat, args: DataCreateArgs) -> anyhow::Result<()> {
    let (file, base) = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            muster_core::spec::check_yaml_limits(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            let file: DataFile = yaml_serde::from_str(&text)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            (
                file,
                path.parent().map(Path::to_path_buf).unwrap_or_default(),
            )
        }
        None => (DataFile::default(), PathBuf::new()),
    };
    let name = args.name.or(file.name).context("give the asset's --name")?;
    let version = args
        .version
        .or(file.version.map(|v| v.to_string()))
        .context("give the asset's --version (versions never change, so each is named)")?;
    let path = args
        .path
        .or(file.path)
        .context("give the asset's --path: a file, a folder or an http(s) URL")?;
    let kind = args
        .kind
        .or(file.kind)
        .unwrap_or_else(|| "uri_folder".into());
    let description = args.description.or(file.description);
    let mut asset = v1::DataAsset {
        name,
        version,
        workspace: crate::workspace().unwrap_or_default().to_string(),
        r#type: kind.clone(),
        description,
        ..Default::default()
    };
    let lower = path.to_ascii_lowercase();
    let mut list = crate::server_list(server)?;
    let mut snaps = Vec::new();
    if lower.starts_with("http://") || lower.starts_with("https://") {
        asset.url = Some(path.clone());
    } else if path.contains("://") {
        anyhow::bail!(
            "path: muster cannot read {path}: give a local file or folder, or an https URL of a file"
        );
    } else {
        let local = base.join(&path);
        let meta = std::fs::metadata(&local)
            .with_context(|| format!("path: {} does not exist", local.display()))?;
        let snap = match (meta.is_dir(), kind.as_str()) {
            (true, "uri_folder") => snapshot::build(&local, snapshot::DATA_LIMITS)?,
            (false, "uri_file") => snapshot::file_snapshot(&local)?,
            (true, _) => anyhow::bail!(
                "path: {} is a folder: use --type uri_folder",
                local.display()
            ),
            (false, _) => anyhow::bail!("path: {} is a file: use --type uri_file", local.display()),
        };
        asset.file = snap
            .manifest
            .files
            .first()
            .filter(|_| kind == "uri_file")
            .map(|f| f.path.clone());
        snaps.push((local, snap));
    }
    let refs: Vec<&snapshot::Snapshot> = snaps.iter().map(|(_, s)| s).collect();
    if !refs.is_empty() {
        let (stored, stats) = crate::upload_failing_over(&mut list, &refs)
            .await?
            .remove(0);
        if output == OutputFormat::Table {
            eprintln!(
                "{}",
                snapshot::describe(&snaps[0].0, " (data)", &stored, &stats)
            );
        }
        asset.manifest = Some(stored.manifest);
    }
    let req = v1::CreateDataRequest { asset: Some(asset) };
    let made = crate::submit_failing_over(&mut list, &refs, |mut c| {
        let req = req.clone();
        async move { c.data.create_data(req).await }
    })
    .await?;
    if output == OutputFormat::Json {
        print_json(&asset_json(&made));
    } else {
        println!(
            "Created data asset {}:{} ({}); use it as `path: azureml:{}:{}`",
            made.name, made.version, made.r#type, made.name, made.version
        );
    }
    Ok(())
}
