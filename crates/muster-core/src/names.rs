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
    // Every rule it breaks, at once: one fix instead of one try per rule.
    let mut broken = Vec::new();
    let len = name.chars().count();
    if !(3..=24).contains(&len) {
        broken.push(format!("use 3 to 24 characters (this one has {len})"));
    }
    if !name.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
        broken.push("start with a letter".to_string());
    }
    if let Some(found) = odd_chars(name, |c| c.is_ascii_alphanumeric() || c == '-') {
        broken.push(format!("use only letters, digits and '-' (found {found})"));
    }
    if let Some(last_dash) = name.rfind('-')
        && !name[last_dash..].chars().any(|c| c.is_ascii_alphabetic())
    {
        broken.push("a '-' must be followed later by at least one letter".to_string());
    }
    if broken.is_empty() {
        return Ok(());
    }
    Err(NameError {
        what: "compute target",
        name: name.to_string(),
        rule: broken.join("; "),
    })
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
    let mut broken = Vec::new();
    if name.is_empty() || name.len() > max {
        broken.push(format!("use 1 to {max} characters"));
    }
    if !name.is_empty()
        && !name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
    {
        broken.push("start with a letter or digit".to_string());
    }
    if let Some(found) = odd_chars(name, |c| {
        c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
    }) {
        broken.push(format!(
            "use only letters, digits, '-', '_' and '.' (found {found})"
        ));
    }
    if broken.is_empty() {
        return Ok(());
    }
    Err(NameError {
        what,
        name: name.to_string(),
        rule: broken.join("; "),
    })
}

/// The characters of `name` that `allowed` refuses, each once in the order they come
/// (`'_', ' '`), or `None` when there are none.
fn odd_chars(name: &str, allowed: impl Fn(char) -> bool) -> Option<String> {
    let mut odd: Vec<char> = Vec::new();
    for c in name.chars().filter(|c| !allowed(*c)) {
        if !odd.contains(&c) {
            odd.push(c);
        }
    }
    (!odd.is_empty()).then(|| {
        odd.iter()
            .map(|c| format!("{c:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    })
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
        // Every broken rule is named at once.
        assert_eq!(
            validate_compute_name("1_gpu pool-2").unwrap_err().rule,
            "start with a letter; use only letters, digits and '-' (found '_', ' '); a '-' must be followed later by at least one letter"
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
