//! `muster secret ...`: a workspace's secrets, as `az keyvault secret set|list|delete`. A
//! value is read from standard input (`--value-stdin`, the default) or a file
//! (`--from-file`), never from the command line (where `ps` and shell history would keep
//! it), and is never printed: `list` shows names, who set them and when.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use muster_client::status;
use muster_proto::v1;
use serde_json::json;

use crate::cli::OutputFormat;
use crate::output::{print_json, table, time};

/// `muster secret`.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Set (or replace) a secret of the workspace (operators): runs that name it in
    /// `secrets:` read it at /run/secrets/NAME, or a variable set to ${{secrets.NAME}}.
    Set {
        /// Its name: letters, digits and '_', not starting with a digit.
        name: String,
        /// Read the value from standard input (the default).
        #[arg(long, conflicts_with = "from_file")]
        value_stdin: bool,
        /// Read the value from this file.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
    },
    /// The secrets of the workspaces you may read: names, who set them and when, never values.
    List,
    /// Delete a secret (operators); runs that name it can no longer be submitted.
    Delete {
        /// Its name.
        name: String,
    },
}

/// Runs a `muster secret` command.
pub async fn run(server: &str, output: OutputFormat, cmd: SecretCommand) -> anyhow::Result<()> {
    let workspace = crate::workspace().unwrap_or_default().to_string();
    match cmd {
        SecretCommand::Set {
            name,
            value_stdin: _,
            from_file,
        } => {
            let value = match &from_file {
                Some(path) => std::fs::read(path)
                    .with_context(|| format!("--from-file: cannot read {}", path.display()))?,
                None => {
                    let mut buf = Vec::new();
                    std::io::stdin()
                        .read_to_end(&mut buf)
                        .context("--value-stdin: cannot read standard input")?;
                    buf
                }
            };
            if value.is_empty() {
                anyhow::bail!(
                    "the value of secret {name} is empty: pipe it in (`printf %s VALUE | muster secret set {name}`) or give --from-file FILE"
                );
            }
            let mut c = crate::connect(server).await?;
            let s = c
                .secrets
                .set_secret(v1::SetSecretRequest {
                    workspace,
                    name,
                    value,
                })
                .await
                .map_err(status)?
                .into_inner();
            match output {
                OutputFormat::Json => print_json(&info_json(&s)),
                OutputFormat::Table => println!(
                    "Set secret {} in workspace {} (version {}); runs name it with `secrets: [{}]`",
                    s.name, s.workspace, s.version, s.name
                ),
            }
        }
        SecretCommand::List => {
            let mut c = crate::connect(server).await?;
            let list = c
                .secrets
                .list_secrets(v1::ListSecretsRequest { workspace })
                .await
                .map_err(status)?
                .into_inner()
                .secrets;
            match output {
                OutputFormat::Json => {
                    print_json(&json!(list.iter().map(info_json).collect::<Vec<_>>()))
                }
                OutputFormat::Table => {
                    let mut t = table(&["NAME", "WORKSPACE", "VERSION", "SET BY", "SET AT"]);
                    for s in &list {
                        t.add_row(vec![
                            s.name.clone(),
                            s.workspace.clone(),
                            s.version.to_string(),
                            s.set_by.clone(),
                            time(s.set_at_ms),
                        ]);
                    }
                    println!("{t}");
                }
            }
        }
        SecretCommand::Delete { name } => {
            let mut c = crate::connect(server).await?;
            c.secrets
                .delete_secret(v1::DeleteSecretRequest {
                    workspace: workspace.clone(),
                    name: name.clone(),
                })
                .await
                .map_err(status)?;
            if output == OutputFormat::Table {
                let w = if workspace.is_empty() {
                    "default"
                } else {
                    &workspace
                };
                println!("Deleted secret {name} of workspace {w}");
            } else {
                print_json(&json!({"deleted": name}));
            }
        }
    }
    Ok(())
}

fn info_json(s: &v1::SecretInfo) -> serde_json::Value {
    json!({"name": s.name, "workspace": s.workspace, "version": s.version,
        "set_by": s.set_by, "set_at": time(s.set_at_ms)})
}
