//! Azure ML v1 run configurations (`.azureml/NAME.runconfig`, YAML despite the name), as
//! `az ml run submit-script -c NAME` reads them: turned into the v2 [`JobFile`] the rest
//! of muster takes, so command-line flags override them the same way.
//!
//! What maps: `script` and `arguments` (run with `environment.python.interpreterPath`),
//! `command`, `target`, `framework`, `communicator` with `mpi.processCountPerNode` and
//! `tensorflow`'s counts, `nodeCount`, `maxRunDurationSeconds`,
//! `environment.environmentVariables`, `environment.docker` (`enabled` + `baseImage`,
//! `shmSize`), and `history.snapshotProject`. What muster reads but cannot act on yet
//! (conda-managed environments, datasets, run-based clusters) is a warning naming the key;
//! what it can never honour (PySpark, raw docker arguments, a Dockerfile) is an error.
//! Sections of frameworks the run does not use (`spark`, `hdi`, `databricks`) are ignored,
//! as Azure ML ignores them; an unknown key is an error naming its path.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::spec::{
    DistributionFile, EnvironmentFile, JobFile, LimitsFile, ResourcesFile, Scalar, SpecError,
    parse_yaml, shell_quote,
};

/// A v1 run configuration as muster takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The job it describes, in v2 terms.
    pub job: JobFile,
    /// Keys muster read but does not act on, one sentence each naming the key.
    pub warnings: Vec<String>,
    /// `history.snapshotProject` (default true): whether the project is snapshotted.
    pub snapshot: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct File {
    script: Option<String>,
    command: Option<Command>,
    arguments: Option<Vec<Scalar>>,
    target: Option<String>,
    framework: Option<String>,
    communicator: Option<String>,
    max_run_duration_seconds: Option<u64>,
    node_count: Option<u32>,
    priority: Option<yaml_serde::Value>,
    environment: Option<Environment>,
    history: Option<History>,
    spark: Option<yaml_serde::Value>,
    hdi: Option<yaml_serde::Value>,
    tensorflow: Option<Tensorflow>,
    mpi: Option<Mpi>,
    py_torch: Option<yaml_serde::Value>,
    parallel_task: Option<yaml_serde::Value>,
    data_references: Option<yaml_serde::Value>,
    data: Option<BTreeMap<String, yaml_serde::Value>>,
    output_data: Option<yaml_serde::Value>,
    datacaches: Option<yaml_serde::Value>,
    source_directory_data_store: Option<yaml_serde::Value>,
    #[serde(alias = "amlCompute")]
    amlcompute: Option<AmlCompute>,
    kubernetescompute: Option<yaml_serde::Value>,
    services: Option<yaml_serde::Value>,
    credential_passthrough: Option<yaml_serde::Value>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Command {
    Line(String),
    Words(Vec<Scalar>),
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Environment {
    name: Option<String>,
    version: Option<Scalar>,
    environment_variables: Option<BTreeMap<String, Scalar>>,
    python: Option<Python>,
    docker: Option<Docker>,
    spark: Option<yaml_serde::Value>,
    databricks: Option<yaml_serde::Value>,
    r: Option<yaml_serde::Value>,
    inferencing_stack_version: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Python {
    user_managed_dependencies: Option<bool>,
    interpreter_path: Option<String>,
    conda_dependencies_file: Option<String>,
    conda_dependencies: Option<yaml_serde::Value>,
    base_conda_environment: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Docker {
    enabled: Option<bool>,
    base_image: Option<String>,
    base_dockerfile: Option<String>,
    shared_volumes: Option<bool>,
    shm_size: Option<Scalar>,
    arguments: Option<Vec<Scalar>>,
    base_image_registry: Option<yaml_serde::Value>,
    platform: Option<yaml_serde::Value>,
    build_context: Option<yaml_serde::Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct History {
    output_collection: Option<bool>,
    snapshot_project: Option<bool>,
    directories_to_watch: Option<Vec<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Tensorflow {
    worker_count: Option<u32>,
    parameter_server_count: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Mpi {
    process_count_per_node: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct AmlCompute {
    vm_size: Option<String>,
    vm_priority: Option<String>,
    retain_cluster: Option<bool>,
    name: Option<String>,
    cluster_max_node_count: Option<u32>,
}

/// True for a value that says nothing: absent, null, or an empty list or map.
fn is_empty(v: &Option<yaml_serde::Value>) -> bool {
    match v {
        None | Some(yaml_serde::Value::Null) => true,
        Some(yaml_serde::Value::Sequence(s)) => s.is_empty(),
        Some(yaml_serde::Value::Mapping(m)) => m.is_empty(),
        Some(_) => false,
    }
}

/// Parses a v1 run configuration. Every error names the key (camelCase, as written).
pub fn parse_runconfig(text: &str) -> Result<RunConfig, SpecError> {
    let file: File = parse_yaml(text)?;
    let mut warnings = Vec::new();
    let mut job = JobFile::default();
    let env = file.environment.unwrap_or_default();
    let python = env.python.unwrap_or_default();
    let docker = env.docker.unwrap_or_default();

    let framework = file
        .framework
        .as_deref()
        .unwrap_or("python")
        .to_ascii_lowercase();
    match framework.as_str() {
        "python" | "pytorch" | "tensorflow" | "pythonmpi" => {}
        "pyspark" => {
            return Err(SpecError::field(
                "framework",
                "PySpark is not supported: muster runs Python, PyTorch and TensorFlow jobs",
            ));
        }
        other => {
            return Err(SpecError::field(
                "framework",
                format!("{other:?} is not supported: use Python, PyTorch, TensorFlow or PythonMpi"),
            ));
        }
    }

    let interpreter = python
        .interpreter_path
        .clone()
        .unwrap_or_else(|| "python".into());
    let arguments: Vec<String> = file
        .arguments
        .unwrap_or_default()
        .iter()
        .map(Scalar::to_string)
        .collect();
    job.command = Some(match (file.command, &file.script) {
        (Some(Command::Line(line)), _) => line,
        (Some(Command::Words(words)), _) => words
            .iter()
            .map(|w| shell_quote(&w.to_string()))
            .collect::<Vec<_>>()
            .join(" "),
        (None, Some(script)) => std::iter::once(shell_quote(&interpreter))
            .chain(std::iter::once(shell_quote(script)))
            .chain(arguments.iter().map(|a| shell_quote(a)))
            .collect::<Vec<_>>()
            .join(" "),
        (None, None) => {
            return Err(SpecError::field(
                "script",
                "missing: name the script to run (or give command)",
            ));
        }
    });
    for a in arguments
        .iter()
        .filter(|a| a.starts_with("DatasetConsumptionConfig:"))
    {
        warnings.push(format!(
            "arguments: {a} stands for a dataset muster does not fetch yet; it is passed as written"
        ));
    }

    match file.target.as_deref() {
        None | Some("") => {}
        Some("amlcompute") => {
            return Err(SpecError::field(
                "target",
                "amlcompute makes a cluster for one run in Azure ML; muster runs on existing targets: create one with `muster compute create` and name it in target",
            ));
        }
        Some(t) => job.compute = Some(t.to_string()),
    }

    let per_node = file.mpi.and_then(|m| m.process_count_per_node).unwrap_or(1);
    let communicator = file
        .communicator
        .as_deref()
        .unwrap_or("none")
        .to_ascii_lowercase();
    job.distribution = match communicator.as_str() {
        "none" | "" => None,
        "openmpi" | "intelmpi" | "mpi" => Some(DistributionFile {
            kind: "mpi".into(),
            process_count_per_instance: Some(per_node),
            ..DistributionFile::default()
        }),
        "gloo" | "nccl" => Some(DistributionFile {
            kind: "pytorch".into(),
            process_count_per_instance: Some(per_node),
            ..DistributionFile::default()
        }),
        "parameterserver" => {
            let tf = file.tensorflow.unwrap_or_default();
            Some(DistributionFile {
                kind: "tensorflow".into(),
                worker_count: tf.worker_count,
                parameter_server_count: tf.parameter_server_count,
                ..DistributionFile::default()
            })
        }
        other => {
            return Err(SpecError::field(
                "communicator",
                format!(
                    "{other:?} is not a communicator muster knows: use None, OpenMpi, IntelMpi, Mpi, Gloo, Nccl or ParameterServer"
                ),
            ));
        }
    };

    let mut resources = ResourcesFile {
        instance_count: file.node_count,
        ..ResourcesFile::default()
    };
    if let Some(t) = file.max_run_duration_seconds {
        job.limits = Some(LimitsFile { timeout: Some(t) });
    }
    job.environment_variables = env.environment_variables;

    // The container: docker.enabled with a base image; a Dockerfile is not built yet.
    if let Some(dockerfile) = docker.base_dockerfile.filter(|d| !d.trim().is_empty()) {
        return Err(SpecError::field(
            "environment.docker.baseDockerfile",
            format!(
                "muster does not build images yet ({} bytes of Dockerfile): build it, then name the image in environment.docker.baseImage",
                dockerfile.len()
            ),
        ));
    }
    if docker.arguments.as_ref().is_some_and(|a| !a.is_empty()) {
        return Err(SpecError::field(
            "environment.docker.arguments",
            "muster does not pass raw docker arguments: use shmSize here, or resources.cpu, memory and gpus in a v2 job",
        ));
    }
    let image = match (docker.enabled, docker.base_image) {
        (Some(true), Some(image)) => Some(image),
        (Some(true), None) => {
            return Err(SpecError::field(
                "environment.docker.baseImage",
                "missing: docker.enabled is true, so name the image to run in",
            ));
        }
        (_, Some(image)) => {
            warnings.push(format!(
                "environment.docker.baseImage: {image} is not used because environment.docker.enabled is false; the run uses the node's own interpreter"
            ));
            None
        }
        (_, None) => None,
    };
    if let Some(shm) = docker.shm_size {
        resources.shm_size = Some(shm);
    }
    if python.user_managed_dependencies != Some(true) {
        let deps = python
            .conda_dependencies_file
            .clone()
            .map(|f| format!(" (install {f}'s packages in it)"))
            .unwrap_or_default();
        if python.conda_dependencies_file.is_some() || python.conda_dependencies.is_some() {
            let uses = image
                .as_ref()
                .map(|i| format!("the image {i} as it is"))
                .unwrap_or_else(|| "the node's own interpreter".into());
            warnings.push(format!(
                "environment.python.userManagedDependencies: muster does not build conda environments yet, so the run uses {uses}{deps}"
            ));
        }
    }
    job.environment = image.map(EnvironmentFile::Reference);
    job.resources = Some(resources);

    let history = file.history.unwrap_or_default();
    if history.output_collection == Some(false) {
        warnings.push(
            "history.outputCollection: false is not used; muster always keeps outputs/ and the log"
                .into(),
        );
    }
    if history
        .directories_to_watch
        .as_ref()
        .is_some_and(|d| d.iter().any(|d| d != "logs"))
    {
        warnings.push(
            "history.directoriesToWatch: only logs is watched; muster streams the run's output and keeps logs/ and outputs/ when it ends".into(),
        );
    }
    for (name, _) in file.data.unwrap_or_default() {
        warnings.push(format!(
            "data.{name}: muster does not fetch datasets yet; the run gets nothing for it"
        ));
    }
    for (key, value) in [
        ("dataReferences", &file.data_references),
        ("outputData", &file.output_data),
        ("datacaches", &file.datacaches),
        (
            "sourceDirectoryDataStore",
            &file.source_directory_data_store,
        ),
        ("priority", &file.priority),
        ("pyTorch", &file.py_torch),
        ("parallelTask", &file.parallel_task),
        ("kubernetescompute", &file.kubernetescompute),
        ("services", &file.services),
        ("credentialPassthrough", &file.credential_passthrough),
    ] {
        if !is_empty(value) {
            warnings.push(format!("{key}: not used by muster"));
        }
    }
    if let Some(a) = file.amlcompute
        && (a.vm_size.is_some()
            || a.cluster_max_node_count.is_some()
            || a.vm_priority.is_some()
            || a.name.is_some()
            || a.retain_cluster == Some(true))
    {
        warnings.push(
            "amlcompute: muster does not make a cluster per run; create one with `muster compute create` and name it in target".into(),
        );
    }
    // Registration details of the environment and the sections of frameworks this run does
    // not use say nothing about how it runs.
    let _ = (
        env.name,
        env.version,
        env.spark,
        env.databricks,
        env.r,
        env.inferencing_stack_version,
        python.base_conda_environment,
        docker.shared_volumes,
        docker.base_image_registry,
        docker.platform,
        docker.build_context,
        file.spark,
        file.hdi,
    );
    Ok(RunConfig {
        job,
        warnings,
        snapshot: history.snapshot_project != Some(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: &str = include_str!("../../../../shared/formats/mlops_mnist.runconfig.yml");

    #[test]
    fn the_seed_runconfig_becomes_a_job_with_its_warnings() {
        let rc = parse_runconfig(SEED).unwrap();
        assert_eq!(
            rc.job.command.as_deref(),
            Some("python train.py --data-folder DatasetConsumptionConfig:mnist")
        );
        assert_eq!(rc.job.compute.as_deref(), Some("cpu-cluster"));
        assert!(rc.job.distribution.is_none(), "communicator None");
        let spec = rc.job.clone().into_run_spec("exp").unwrap();
        assert_eq!(spec.instance_count, 4);
        assert_eq!(spec.shm_size, Some(2 << 30));
        assert_eq!(spec.environment.image, None, "docker.enabled is false");
        assert_eq!(
            spec.environment_variables
                .get("EXAMPLE_ENV_VAR")
                .map(String::as_str),
            Some("EXAMPLE_VALUE")
        );
        assert!(rc.snapshot);
        assert_eq!(
            crate::spec::warned_keys(&rc.warnings),
            [
                "arguments",
                "environment.docker.baseImage",
                "environment.python.userManagedDependencies",
                "data.mnist",
            ],
            "{:?}",
            rc.warnings
        );
    }

    #[test]
    fn docker_mpi_and_limits_map_to_their_v2_keys() {
        let rc = parse_runconfig(
            "script: train.py\narguments: [--epochs, 3, 'a b']\ntarget: gpus\nframework: PyTorch\ncommunicator: OpenMpi\nnodeCount: 2\nmaxRunDurationSeconds: 600\nmpi:\n  processCountPerNode: 4\nenvironment:\n  python:\n    userManagedDependencies: true\n    interpreterPath: /opt/py/bin/python3\n  docker:\n    enabled: true\n    baseImage: trainer:1\nhistory:\n  snapshotProject: false\n",
        )
        .unwrap();
        assert!(rc.warnings.is_empty(), "{:?}", rc.warnings);
        assert!(!rc.snapshot);
        let spec = rc.job.into_run_spec("exp").unwrap();
        assert_eq!(
            spec.command,
            "/opt/py/bin/python3 train.py --epochs 3 'a b'"
        );
        assert_eq!(spec.environment.image.as_deref(), Some("trainer:1"));
        assert_eq!(spec.timeout_s, Some(600));
        assert_eq!(spec.instance_count, 2);
        assert_eq!(
            spec.distribution,
            Some(crate::spec::Distribution::Mpi {
                process_count_per_instance: 4
            })
        );
    }

    #[test]
    fn what_muster_cannot_honour_is_an_error_naming_the_key() {
        for (text, path) in [
            ("script: a.py\nframework: PySpark\n", "framework"),
            ("script: a.py\ntarget: amlcompute\n", "target"),
            ("script: a.py\ncommunicator: Smoke\n", "communicator"),
            (
                "script: a.py\nenvironment:\n  docker:\n    enabled: true\n    baseDockerfile: FROM x\n",
                "environment.docker.baseDockerfile",
            ),
            (
                "script: a.py\nenvironment:\n  docker:\n    arguments: [--privileged]\n",
                "environment.docker.arguments",
            ),
            ("arguments: [a]\n", "script"),
        ] {
            let e = parse_runconfig(text).unwrap_err();
            assert_eq!(e.path, path, "{text}: {e}");
        }
        let e = parse_runconfig("script: a.py\nenvironment:\n  pythn: {}\n").unwrap_err();
        assert_eq!(e.path, "environment.pythn", "{e}");
    }
}
