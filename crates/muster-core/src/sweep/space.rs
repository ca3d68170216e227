//! The search space: parameter distributions with Azure ML's definitions, and the seeded
//! random number generator every sampler uses.

use std::fmt;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// One parameter value given to a trial.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamValue {
    /// A boolean choice.
    Bool(bool),
    /// An integer (randint, or an integer choice).
    Int(i64),
    /// A number.
    Float(f64),
    /// A text choice.
    Text(String),
}

impl fmt::Display for ParamValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParamValue::Bool(v) => write!(f, "{v}"),
            ParamValue::Int(v) => write!(f, "{v}"),
            ParamValue::Float(v) => write!(f, "{v}"),
            ParamValue::Text(v) => write!(f, "{v}"),
        }
    }
}

impl ParamValue {
    /// The value as a number, when it is one.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            ParamValue::Int(v) => Some(*v as f64),
            ParamValue::Float(v) => Some(*v),
            _ => None,
        }
    }
}

/// A parameter's distribution, with Azure ML's definitions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Distribution {
    /// One of `values`, uniformly.
    Choice {
        /// The values.
        values: Vec<ParamValue>,
    },
    /// An integer in `0..upper` (upper excluded).
    Randint {
        /// The exclusive upper bound.
        upper: i64,
    },
    /// `uniform(min, max)`.
    Uniform {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
    },
    /// `round(uniform(min, max) / q) * q`.
    Quniform {
        /// Lower bound.
        min: f64,
        /// Upper bound.
        max: f64,
        /// The quantum.
        q: f64,
    },
    /// `exp(uniform(min, max))`: the logarithm is uniform.
    Loguniform {
        /// Lower bound of the logarithm.
        min: f64,
        /// Upper bound of the logarithm.
        max: f64,
    },
    /// `round(exp(uniform(min, max)) / q) * q`.
    Qloguniform {
        /// Lower bound of the logarithm.
        min: f64,
        /// Upper bound of the logarithm.
        max: f64,
        /// The quantum.
        q: f64,
    },
    /// `normal(mu, sigma)`.
    Normal {
        /// Mean.
        mu: f64,
        /// Standard deviation.
        sigma: f64,
    },
    /// `round(normal(mu, sigma) / q) * q`.
    Qnormal {
        /// Mean.
        mu: f64,
        /// Standard deviation.
        sigma: f64,
        /// The quantum.
        q: f64,
    },
    /// `exp(normal(mu, sigma))`.
    Lognormal {
        /// Mean of the logarithm.
        mu: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
    },
    /// `round(exp(normal(mu, sigma)) / q) * q`.
    Qlognormal {
        /// Mean of the logarithm.
        mu: f64,
        /// Standard deviation of the logarithm.
        sigma: f64,
        /// The quantum.
        q: f64,
    },
}

/// How a distribution looks in its underlying ("internal") space, where the samplers work:
/// the logarithm for the log variants, before q-rounding.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Internal {
    /// An index into `n` categories.
    Categorical(usize),
    /// `uniform(low, high)` underneath.
    Bounded { low: f64, high: f64 },
    /// `normal(mu, sigma)` underneath.
    Gaussian { mu: f64, sigma: f64 },
}

fn q_round(x: f64, q: Option<f64>) -> f64 {
    match q {
        Some(q) => (x / q).round() * q,
        None => x,
    }
}

impl Distribution {
    /// Azure ML's name of the distribution (`loguniform`).
    pub fn kind(&self) -> &'static str {
        match self {
            Distribution::Choice { .. } => "choice",
            Distribution::Randint { .. } => "randint",
            Distribution::Uniform { .. } => "uniform",
            Distribution::Quniform { .. } => "quniform",
            Distribution::Loguniform { .. } => "loguniform",
            Distribution::Qloguniform { .. } => "qloguniform",
            Distribution::Normal { .. } => "normal",
            Distribution::Qnormal { .. } => "qnormal",
            Distribution::Lognormal { .. } => "lognormal",
            Distribution::Qlognormal { .. } => "qlognormal",
        }
    }

    /// Checks the parameters (`min < max`, `sigma > 0`, `q > 0`, ...); the message says what to fix.
    pub fn validate(&self) -> Result<(), String> {
        let finite = |vals: &[f64]| vals.iter().all(|v| v.is_finite());
        match self {
            Distribution::Choice { values } if values.is_empty() => {
                Err("choice needs at least one value".into())
            }
            Distribution::Choice { values } => {
                match values
                    .iter()
                    .find(|v| matches!(v, ParamValue::Float(f) if !f.is_finite()))
                {
                    Some(v) => Err(format!("choice value {v} is not a finite number")),
                    None => Ok(()),
                }
            }
            Distribution::Randint { upper } if *upper < 1 => Err(format!(
                "randint's upper must be at least 1 (values are 0..upper), not {upper}"
            )),
            Distribution::Randint { .. } => Ok(()),
            Distribution::Uniform { min, max }
            | Distribution::Quniform { min, max, .. }
            | Distribution::Loguniform { min, max }
            | Distribution::Qloguniform { min, max, .. } => {
                if !finite(&[*min, *max]) || min >= max {
                    return Err(format!(
                        "min_value ({min}) must be less than max_value ({max})"
                    ));
                }
                if matches!(
                    self,
                    Distribution::Loguniform { .. } | Distribution::Qloguniform { .. }
                ) && *max > 700.0
                {
                    return Err(format!(
                        "max_value {max} is the logarithm of the upper bound (values are exp(uniform(min, max))); exp({max}) overflows: did you mean ln({max})?"
                    ));
                }
                self.check_q()
            }
            Distribution::Normal { mu, sigma }
            | Distribution::Qnormal { mu, sigma, .. }
            | Distribution::Lognormal { mu, sigma }
            | Distribution::Qlognormal { mu, sigma, .. } => {
                if !finite(&[*mu, *sigma]) || *sigma <= 0.0 {
                    return Err(format!("sigma must be a positive number, not {sigma}"));
                }
                self.check_q()
            }
        }
    }

    fn q(&self) -> Option<f64> {
        match self {
            Distribution::Quniform { q, .. }
            | Distribution::Qloguniform { q, .. }
            | Distribution::Qnormal { q, .. }
            | Distribution::Qlognormal { q, .. } => Some(*q),
            _ => None,
        }
    }

    fn check_q(&self) -> Result<(), String> {
        match self.q() {
            Some(q) if !(q.is_finite() && q > 0.0) => {
                Err(format!("q must be a positive number, not {q}"))
            }
            _ => Ok(()),
        }
    }

    fn is_log(&self) -> bool {
        matches!(
            self,
            Distribution::Loguniform { .. }
                | Distribution::Qloguniform { .. }
                | Distribution::Lognormal { .. }
                | Distribution::Qlognormal { .. }
        )
    }

    /// The underlying space the samplers work in.
    pub(crate) fn internal(&self) -> Internal {
        match self {
            Distribution::Choice { values } => Internal::Categorical(values.len()),
            Distribution::Randint { upper } => Internal::Bounded {
                low: 0.0,
                high: *upper as f64,
            },
            Distribution::Uniform { min, max }
            | Distribution::Quniform { min, max, .. }
            | Distribution::Loguniform { min, max }
            | Distribution::Qloguniform { min, max, .. } => Internal::Bounded {
                low: *min,
                high: *max,
            },
            Distribution::Normal { mu, sigma }
            | Distribution::Qnormal { mu, sigma, .. }
            | Distribution::Lognormal { mu, sigma }
            | Distribution::Qlognormal { mu, sigma, .. } => Internal::Gaussian {
                mu: *mu,
                sigma: *sigma,
            },
        }
    }

    /// Maps a point of the underlying space to the value a trial gets.
    pub(crate) fn value_at(&self, x: f64) -> ParamValue {
        match self {
            Distribution::Choice { values } => {
                let i = (x.max(0.0) as usize).min(values.len() - 1);
                values[i].clone()
            }
            Distribution::Randint { upper } => {
                ParamValue::Int((x.floor() as i64).clamp(0, upper - 1))
            }
            _ => {
                let v = if self.is_log() { x.exp() } else { x };
                ParamValue::Float(q_round(v, self.q()))
            }
        }
    }

    /// Maps a trial's value back to the underlying space (`None`: not a value of this
    /// distribution, e.g. after a resubmission with another space).
    pub(crate) fn internal_of(&self, value: &ParamValue) -> Option<f64> {
        match self {
            Distribution::Choice { values } => {
                values.iter().position(|v| v == value).map(|i| i as f64)
            }
            Distribution::Randint { .. } => value.as_f64().map(|v| v + 0.5),
            _ => {
                let v = value.as_f64()?;
                if self.is_log() {
                    // q-rounding may give 0; take the smallest positive value instead.
                    Some(v.max(f64::MIN_POSITIVE).ln())
                } else {
                    Some(v)
                }
            }
        }
    }

    /// Draws one value with Azure ML's definition.
    pub fn sample(&self, rng: &mut SweepRng) -> ParamValue {
        let x = match self.internal() {
            Internal::Categorical(n) => rng.index(n) as f64,
            Internal::Bounded { low, high } => low + rng.unit() * (high - low),
            Internal::Gaussian { mu, sigma } => mu + sigma * rng.standard_normal(),
        };
        self.value_at(x)
    }
}

/// The seeded random number generator of the samplers: ChaCha8 (`rand_chacha`), whose
/// output for a given seed and stream is fixed across versions and platforms (unlike
/// `rand::rngs::StdRng`, which documents that it may change), so every replica and every
/// future leader draws the same parameters for the same seed and trial.
#[derive(Debug, Clone)]
pub struct SweepRng(ChaCha8Rng);

impl SweepRng {
    /// The generator for `(seed, stream)`; a sampler uses one stream per trial index so a
    /// trial's draws depend only on the seed and its index.
    pub fn new(seed: u64, stream: u64) -> SweepRng {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(stream);
        SweepRng(rng)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0.random::<f64>()
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn index(&mut self, n: usize) -> usize {
        self.0.random_range(0..n)
    }

    /// A standard normal draw (Box-Muller).
    pub fn standard_normal(&mut self) -> f64 {
        let u1 = 1.0 - self.unit(); // (0, 1]
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }
}
