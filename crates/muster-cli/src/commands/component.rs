//! `muster component ...`: register command components, as `az ml component create`, so
//! pipeline steps name them `component: azureml:NAME:VERSION` (or `@latest`). The
//! component's `code` folder is uploaded when it is registered and runs with every step
//! that uses it.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use muster_client::status;
use muster_proto::v1;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::output::{print_json, table, time};
use crate::snapshot::{self, SnapshotLimits};

/// `muster component`.
#[derive(Debug, Subcommand)]
pub enum ComponentCommand {
    /// Register a version of a command component from its YAML.
    #[command(disable_version_flag = true)]
    Create(ComponentCreateArgs),
    /// The components of the workspaces you may read.
    List,
    /// One component: NAME:VERSION, NAME@latest or NAME; prints its YAML.
    Show {
        /// The component.
        component: String,
    },
}

/// `muster component create`.
#[derive(Debug, Args)]
pub struct ComponentCreateArgs {
    /// The component YAML (`type: command`, `name`, `version`, `inputs`, `outputs`,
    /// `code`, `environment`, `command`).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// Overrides the file's `name`.
    #[arg(long)]
    pub name: Option<String>,
    /// Overrides the file's `version`.
    #[arg(long)]
    pub version: Option<String>,
}

pub async fn run(server: &str, output: OutputFormat, cmd: ComponentCommand) -> anyhow::Result<()> {
    let workspace = crate::workspace().unwrap_or_default().to_string();
    match cmd {
        ComponentCommand::Create(args) => create(server, output, args, workspace).await,
        ComponentCommand::List => {
            let mut c = crate::connect(server).await?;
            let list = c
                .components
                .list_components(v1::ListComponentsRequest { workspace })
                .await
                .map_err(status)?
                .into_inner()
                .components;
            if output == OutputFormat::Json {
                print_json(&json!(list.iter().map(component_json).collect::<Vec<_>>()));
            } else {
                let mut t = table(&["NAME", "VERSION", "WORKSPACE", "CODE", "CREATED"]);
                for c in &list {
                    t.add_row(vec![
                        c.name.clone(),
                        c.version.clone(),
                        c.workspace.clone(),
                        c.code
                            .as_deref()
                            .map(|m| m[..12.min(m.len())].to_string())
                            .unwrap_or_default(),
                        time(c.created_at_ms),
                    ]);
                }
                println!("{t}");
            }
            Ok(())
        }
        ComponentCommand::Show { component } => {
            let reference = muster_core::spec::strip_azureml(&component);
            let (name, version) = muster_core::data::parse_reference(reference)
                .map_err(|e| anyhow::anyhow!("component {e}"))?;
            let mut c = crate::connect(server).await?;
            let found = c
                .components
                .get_component(v1::GetComponentRequest {
                    workspace,
                    name: name.to_string(),
                    version: version.map(str::to_string),
                })
                .await
                .map_err(status)?
                .into_inner();
            if output == OutputFormat::Json {
                print_json(&component_json(&found));
            } else {
                println!(
                    "# {}:{} ({}, by {})",
                    found.name,
                    found.version,
                    time(found.created_at_ms),
                    found.created_by
                );
                print!("{}", found.yaml);
            }
            Ok(())
        }
    }
}

fn component_json(c: &v1::Component) -> serde_json::Value {
    json!({
        "name": c.name, "version": c.version, "workspace": c.workspace, "code": c.code,
        "created_at": time(c.created_at_ms), "created_by": c.created_by, "yaml": c.yaml,
    })
}

async fn create(
    server: &str,
    output: OutputFormat,
    args: ComponentCreateArgs,
    workspace: String,
) -> anyhow::Result<()> {
    let path = &args.file;
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    muster_core::spec::check_yaml_limits(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let mut doc: yaml_serde::Value =
        yaml_serde::from_str(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    let field = |k: &str| {
        doc.get(k).and_then(|v| match v {
            yaml_serde::Value::String(s) => Some(s.clone()),
            yaml_serde::Value::Number(n) => Some(n.to_string()),
            _ => None,
        })
    };
    let name = args
        .name
        .or(field("name"))
        .context("the component needs a name (in the file, or --name)")?;
    let version = args.version.or(field("version")).context(
        "the component needs a version (in the file, or --version): versions never change",
    )?;
    // The code is stored now; the registered YAML leaves `code` out.
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let code_dir = field("code").map(|c| base.join(c));
    if let yaml_serde::Value::Mapping(m) = &mut doc {
        m.remove("code");
    }
    let yaml = yaml_serde::to_string(&doc)?;
    let mut list = crate::server_list(server)?;
    let snap = match &code_dir {
        Some(dir) => vec![snapshot::build(dir, SnapshotLimits::default())?],
        None => Vec::new(),
    };
    let refs: Vec<&snapshot::Snapshot> = snap.iter().collect();
    let mut code = None;
    if let Some(dir) = &code_dir {
        let (stored, stats) = crate::upload_failing_over(&mut list, &refs)
            .await?
            .remove(0);
        if output == OutputFormat::Table {
            eprintln!(
                "{}",
                snapshot::describe(dir, " (component)", &stored, &stats)
            );
        }
        code = Some(stored.manifest);
    }
    let req = v1::CreateComponentRequest {
        component: Some(v1::Component {
            name,
            version,
            workspace,
            yaml,
            code,
            ..Default::default()
        }),
    };
    let made = crate::submit_failing_over(&mut list, &refs, |mut c| {
        let req = req.clone();
        async move { c.components.create_component(req).await }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    if output == OutputFormat::Json {
        print_json(&component_json(&made));
    } else {
        println!(
            "Registered component {}:{}; pipeline steps use it as `component: azureml:{}:{}`",
            made.name, made.version, made.name, made.version
        );
    }
    Ok(())
}
