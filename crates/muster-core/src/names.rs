//! Naming rules shared by the CLI, the server and the YAML parsers.

use thiserror::Error;

/// A name that breaks a naming rule; the message says which rule and how to fix it.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("invalid {what} name {name:?}: {rule}")]
pub struct NameError {
    /// What was being named ("compute target", "experiment", ...).
    pub what: &'static str,
    /// The rejected name.
    pub name: String,
    /// The rule it breaks, phrased as what to do.
    pub rule: String,
}

/// Validates a compute target name with Azure ML's rule: 3–24 characters, letters, digits
/// and `-`, starting with a letter, and every `-` followed later by at least one letter.
pub fn validate_compute_name(name: &str) -> Result<(), NameError> {
    let err = |rule: &str| NameError {
        what: "compute target",
        name: name.to_string(),
        rule: rule.to_string(),
    };
    let len = name.chars().count();
    if !(3..=24).contains(&len) {
        return Err(err(&format!("use 3 to 24 characters (this one has {len})")));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        return Err(err("start with a letter"));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        return Err(err(&format!(
            "use only letters, digits and '-' (found {bad:?})"
        )));
    }
    if let Some(last_dash) = name.rfind('-')
        && !name[last_dash..].chars().any(|c| c.is_ascii_alphabetic())
    {
        return Err(err("a '-' must be followed later by at least one letter"));
    }
    Ok(())
}

/// Validates an experiment name: 1–255 characters, letters, digits, `-`, `_` and `.`,
/// starting with a letter or digit (Azure ML's experiment rule).
pub fn validate_experiment_name(name: &str) -> Result<(), NameError> {
    validate_label("experiment", name, 255)
}

/// Validates a node name (a hostname-like label): 1–63 characters, letters, digits, `-`,
/// `_` and `.`, starting with a letter or digit.
pub fn validate_node_name(name: &str) -> Result<(), NameError> {
    validate_label("node", name, 63)
}

/// Validates a job output's name (it becomes the folder `outputs/<name>`): 1–255
/// letters, digits, `-`, `_` and `.`, starting with a letter or digit, so it can never
/// leave `outputs/`.
pub fn validate_output_name(name: &str) -> Result<(), NameError> {
    validate_label("output", name, 255)
}

/// Validates a job input's name (it becomes the folder `inputs/<name>`), with the rule of
/// [`validate_output_name`].
pub fn validate_input_name(name: &str) -> Result<(), NameError> {
    validate_label("input", name, 255)
}

/// 1 to `max` letters, digits, `-`, `_` and `.`, starting with a letter or digit.
fn validate_label(what: &'static str, name: &str, max: usize) -> Result<(), NameError> {
    let err = |rule: String| NameError {
        what,
        name: name.to_string(),
        rule,
    };
    if name.is_empty() || name.len() > max {
        return Err(err(format!("use 1 to {max} characters")));
    }
    if !name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        return Err(err("start with a letter or digit".into()));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(err(format!(
            "use only letters, digits, '-', '_' and '.' (found {bad:?})"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compute_names_follow_azure_ml() {
        for ok in [
            "cpu",
            "gpu-cluster",
            "a1-b",
            "Local",
            "abcdefghijklmnopqrstuvwx",
        ] {
            assert_eq!(validate_compute_name(ok), Ok(()), "{ok}");
        }
        for bad in [
            "ab",
            "1gpu",
            "gpu_cluster",
            "gpu-1",
            "abcdefghijklmnopqrstuvwxy",
            "-abc",
            "gpu cluster",
        ] {
            let e = validate_compute_name(bad).unwrap_err();
            assert_eq!(e.name, bad);
            assert!(e.to_string().contains("invalid compute target name"), "{e}");
        }
        assert!(
            validate_compute_name("gpu-1")
                .unwrap_err()
                .rule
                .contains("followed later by at least one letter")
        );
    }

    #[test]
    fn experiment_and_node_names() {
        assert!(validate_experiment_name("mnist_v2.1").is_ok());
        assert!(validate_experiment_name("").is_err());
        assert!(validate_experiment_name("_x").is_err());
        assert!(validate_experiment_name("a b").is_err());
        assert!(validate_node_name("gpu-node-01.lab").is_ok());
        assert!(validate_node_name("no/slash").is_err());
    }
}
