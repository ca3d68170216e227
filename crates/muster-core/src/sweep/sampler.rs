//! Samplers: which parameters trial `i` gets.
//!
//! - **random**: each parameter drawn independently from its distribution with the
//!   generator for `(seed, i)`, so trial `i`'s parameters depend only on the seed and `i`.
//! - **grid**: trial `i` is the `i`-th combination of the full cartesian product of the
//!   `choice` values (and `randint`'s `0..upper`), the last parameter (in name order)
//!   varying fastest; continuous distributions are an error naming the parameter.
//! - **bayesian**: TPE, the Tree-structured Parzen Estimator (Bergstra et al., 2011, as in
//!   hyperopt and Optuna), with [`TpeConfig`]'s parameters. The trials finished so far are
//!   split at the `gamma` quantile of the primary metric into good and bad; per parameter,
//!   in the distribution's underlying space (the logarithm for log variants, before
//!   q-rounding), a Parzen estimator with Gaussian kernels is fitted to each group (`l(x)`
//!   to the good, `g(x)` to the bad, each with the prior as one more component, bandwidths
//!   from the distance to the neighbouring points, clipped, and truncated to the bounds;
//!   categorical parameters get smoothed counts). `n_candidates` candidates are drawn from
//!   `l` and the one maximizing `l(x) / g(x)` is taken. While fewer than `n_startup` trials
//!   have a result, TPE samples like random. Parameters are modelled independently.
//!   Draws use the generator for `(seed, i)`, so trial `i`'s parameters depend only on
//!   the seed, `i` and the results given.

use std::collections::BTreeMap;

use super::space::{Distribution, Internal, ParamValue, SweepRng};
use super::{Goal, Params, Sampling};
use crate::spec::SpecError;

/// TPE's parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TpeConfig {
    /// Trials with a result before TPE starts modelling (random until then).
    pub n_startup: usize,
    /// The quantile splitting good from bad results: the best `ceil(gamma * n)` are good.
    pub gamma: f64,
    /// Candidates drawn from `l(x)` per trial.
    pub n_candidates: usize,
    /// Weight of the prior component in each Parzen estimator (observations weigh 1).
    pub prior_weight: f64,
}

impl Default for TpeConfig {
    /// hyperopt's defaults, with Optuna's 10 startup trials: `gamma` 0.25, 24 candidates,
    /// prior weight 1.
    fn default() -> TpeConfig {
        TpeConfig {
            n_startup: 10,
            gamma: 0.25,
            n_candidates: 24,
            prior_weight: 1.0,
        }
    }
}

/// A finished trial as the samplers see it.
#[derive(Debug, Clone, Copy)]
pub struct Observation<'a> {
    /// Its parameters.
    pub params: &'a Params,
    /// Its result: the best value of the primary metric it logged.
    pub value: f64,
}

/// Trial `index`'s parameters drawn independently (random sampling).
pub fn sample_random(space: &BTreeMap<String, Distribution>, seed: u64, index: u32) -> Params {
    let mut rng = SweepRng::new(seed, u64::from(index));
    space
        .iter()
        .map(|(name, d)| (name.clone(), d.sample(&mut rng)))
        .collect()
}

/// The most values one `randint` parameter may contribute to a grid.
pub const MAX_GRID_AXIS: i64 = 100_000;

/// The grid's axes: each parameter's values. Errors name a parameter that is not discrete.
pub fn grid_axes(
    space: &BTreeMap<String, Distribution>,
) -> Result<Vec<(String, Vec<ParamValue>)>, SpecError> {
    space
        .iter()
        .map(|(name, d)| match d {
            Distribution::Choice { values } => Ok((name.clone(), values.clone())),
            Distribution::Randint { upper } if *upper <= MAX_GRID_AXIS => {
                Ok((name.clone(), (0..*upper).map(ParamValue::Int).collect()))
            }
            Distribution::Randint { upper } => Err(SpecError::field(
                format!("search_space.{name}"),
                format!(
                    "randint({upper}) has more than {MAX_GRID_AXIS} values to enumerate: use choice with the values to try, or random sampling"
                ),
            )),
            other => Err(SpecError::field(
                format!("search_space.{name}"),
                format!(
                    "grid sampling enumerates discrete values, and {} is continuous: use `type: choice` with the values to try, or random or bayesian sampling",
                    other.kind()
                ),
            )),
        })
        .collect()
}

/// The number of grid points (saturating).
pub fn grid_size(axes: &[(String, Vec<ParamValue>)]) -> u64 {
    axes.iter()
        .fold(1u64, |n, (_, v)| n.saturating_mul(v.len() as u64))
}

/// The `index`-th grid point, or `None` past the end.
pub fn grid_point(axes: &[(String, Vec<ParamValue>)], index: u64) -> Option<Params> {
    if index >= grid_size(axes) {
        return None;
    }
    let mut rest = index;
    let mut out = Params::new();
    for (name, values) in axes.iter().rev() {
        let n = values.len() as u64;
        out.insert(name.clone(), values[(rest % n) as usize].clone());
        rest /= n;
    }
    Some(out)
}

/// Trial `index`'s parameters under `sampling`, given the results so far (used by
/// bayesian only). `None`: the grid is exhausted.
pub fn sample(
    sampling: &Sampling,
    space: &BTreeMap<String, Distribution>,
    goal: Goal,
    observations: &[Observation<'_>],
    seed: u64,
    index: u32,
) -> Option<Params> {
    match sampling {
        Sampling::Random { .. } => Some(sample_random(space, seed, index)),
        Sampling::Grid => grid_axes(space)
            .ok()
            .and_then(|axes| grid_point(&axes, u64::from(index))),
        Sampling::Bayesian => Some(sample_tpe(
            space,
            goal,
            observations,
            seed,
            index,
            &TpeConfig::default(),
        )),
    }
}

/// Trial `index`'s parameters by TPE (see the module docs).
pub fn sample_tpe(
    space: &BTreeMap<String, Distribution>,
    goal: Goal,
    observations: &[Observation<'_>],
    seed: u64,
    index: u32,
    config: &TpeConfig,
) -> Params {
    let usable: Vec<&Observation<'_>> = observations
        .iter()
        .filter(|o| o.value.is_finite())
        .collect();
    if usable.len() < config.n_startup.max(2) {
        return sample_random(space, seed, index);
    }
    let mut rng = SweepRng::new(seed, u64::from(index));
    // Smaller loss is better; the sort is stable so equal results keep trial order.
    let mut ranked: Vec<(f64, &Params)> = usable
        .iter()
        .map(|o| {
            let loss = match goal {
                Goal::Minimize => o.value,
                Goal::Maximize => -o.value,
            };
            (loss, o.params)
        })
        .collect();
    ranked.sort_by(|a, b| a.0.total_cmp(&b.0));
    let n_good = ((config.gamma * ranked.len() as f64).ceil() as usize).clamp(1, ranked.len() - 1);
    let (good, bad) = ranked.split_at(n_good);

    let models: Vec<(&String, &Distribution, Model, Model)> = space
        .iter()
        .map(|(name, d)| {
            let points = |group: &[(f64, &Params)]| -> Vec<f64> {
                group
                    .iter()
                    .filter_map(|(_, p)| p.get(name).and_then(|v| d.internal_of(v)))
                    .collect()
            };
            let internal = d.internal();
            (
                name,
                d,
                Model::fit(internal, &points(good), config.prior_weight),
                Model::fit(internal, &points(bad), config.prior_weight),
            )
        })
        .collect();

    let mut best: Option<(f64, Vec<f64>)> = None;
    for _ in 0..config.n_candidates.max(1) {
        let xs: Vec<f64> = models.iter().map(|m| m.2.sample(&mut rng)).collect();
        let score: f64 = models
            .iter()
            .zip(&xs)
            .map(|(m, &x)| m.2.log_density(x) - m.3.log_density(x))
            .sum();
        if best.as_ref().is_none_or(|b| score > b.0) {
            best = Some((score, xs));
        }
    }
    let (_, xs) = best.expect("at least one candidate");
    models
        .iter()
        .zip(xs)
        .map(|(m, x)| (m.0.clone(), m.1.value_at(x)))
        .collect()
}

/// A Parzen estimator over one parameter's underlying space.
#[derive(Debug, Clone)]
enum Model {
    /// Category probabilities.
    Categorical(Vec<f64>),
    /// A mixture of Gaussians `(weight, mu, sigma)`, truncated to `[low, high]` if bounded.
    Mixture {
        components: Vec<(f64, f64, f64)>,
        bounds: Option<(f64, f64)>,
    },
}

impl Model {
    fn fit(internal: Internal, points: &[f64], prior_weight: f64) -> Model {
        match internal {
            Internal::Categorical(k) => {
                let mut counts = vec![prior_weight; k];
                for &p in points {
                    let i = (p.max(0.0) as usize).min(k - 1);
                    counts[i] += 1.0;
                }
                let total: f64 = counts.iter().sum();
                Model::Categorical(counts.into_iter().map(|c| c / total).collect())
            }
            Internal::Bounded { low, high } => {
                let span = high - low;
                Model::mixture(
                    points,
                    (low + high) / 2.0,
                    span,
                    prior_weight,
                    Some((low, high)),
                )
            }
            Internal::Gaussian { mu, sigma } => {
                Model::mixture(points, mu, sigma, prior_weight, None)
            }
        }
    }

    /// hyperopt's adaptive Parzen estimator: the prior `N(prior_mu, prior_sigma)` plus one
    /// kernel per point whose width is the larger distance to its sorted neighbours, clipped
    /// to `[prior_sigma / min(100, n + 1), prior_sigma]`.
    fn mixture(
        points: &[f64],
        prior_mu: f64,
        prior_sigma: f64,
        prior_weight: f64,
        bounds: Option<(f64, f64)>,
    ) -> Model {
        let mut sorted: Vec<(f64, bool)> = points.iter().map(|&p| (p, false)).collect();
        sorted.push((prior_mu, true));
        sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
        let n = points.len();
        let min_sigma = prior_sigma / (100.0f64).min(n as f64 + 1.0);
        let mut components = Vec::with_capacity(sorted.len());
        for (i, &(mu, is_prior)) in sorted.iter().enumerate() {
            if is_prior {
                components.push((prior_weight, prior_mu, prior_sigma));
                continue;
            }
            let left = if i > 0 {
                mu - sorted[i - 1].0
            } else {
                f64::NAN
            };
            let right = if i + 1 < sorted.len() {
                sorted[i + 1].0 - mu
            } else {
                f64::NAN
            };
            let width = left.max(right); // max ignores a NaN side
            let width = if width.is_finite() {
                width
            } else {
                prior_sigma
            };
            components.push((1.0, mu, width.clamp(min_sigma, prior_sigma)));
        }
        Model::Mixture { components, bounds }
    }

    fn sample(&self, rng: &mut SweepRng) -> f64 {
        match self {
            Model::Categorical(p) => {
                let mut u = rng.unit();
                for (i, &pi) in p.iter().enumerate() {
                    if u < pi {
                        return i as f64;
                    }
                    u -= pi;
                }
                (p.len() - 1) as f64
            }
            Model::Mixture { components, bounds } => {
                let total: f64 = components.iter().map(|c| c.0).sum();
                let mut u = rng.unit() * total;
                let mut chosen = components[components.len() - 1];
                for &c in components {
                    if u < c.0 {
                        chosen = c;
                        break;
                    }
                    u -= c.0;
                }
                let (_, mu, sigma) = chosen;
                match bounds {
                    None => mu + sigma * rng.standard_normal(),
                    Some((low, high)) => {
                        for _ in 0..64 {
                            let x = mu + sigma * rng.standard_normal();
                            if (*low..*high).contains(&x) {
                                return x;
                            }
                        }
                        mu.clamp(*low, *high)
                    }
                }
            }
        }
    }

    fn log_density(&self, x: f64) -> f64 {
        match self {
            Model::Categorical(p) => {
                let i = (x.max(0.0) as usize).min(p.len() - 1);
                p[i].ln()
            }
            Model::Mixture { components, bounds } => {
                let total: f64 = components.iter().map(|c| c.0).sum();
                let density: f64 = components
                    .iter()
                    .map(|&(w, mu, sigma)| {
                        let mass = match bounds {
                            Some((low, high)) => {
                                normal_cdf((high - mu) / sigma) - normal_cdf((low - mu) / sigma)
                            }
                            None => 1.0,
                        };
                        w * normal_pdf((x - mu) / sigma) / sigma / mass.max(1e-12)
                    })
                    .sum::<f64>()
                    / total;
                density.max(1e-300).ln()
            }
        }
    }
}

fn normal_pdf(z: f64) -> f64 {
    (-0.5 * z * z).exp() / (std::f64::consts::TAU).sqrt()
}

/// Φ(z), by Abramowitz and Stegun 7.1.26 (absolute error below 1.5e-7).
fn normal_cdf(z: f64) -> f64 {
    let x = z.abs() / std::f64::consts::SQRT_2;
    let t = 1.0 / (1.0 + 0.327_591_1 * x);
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let erf = 1.0 - poly * (-x * x).exp();
    if z >= 0.0 {
        0.5 * (1.0 + erf)
    } else {
        0.5 * (1.0 - erf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn space(d: Distribution) -> BTreeMap<String, Distribution> {
        BTreeMap::from([("x".to_string(), d)])
    }

    fn draws(d: Distribution, n: u32, seed: u64) -> Vec<f64> {
        let s = space(d);
        (0..n)
            .map(|i| sample_random(&s, seed, i)["x"].as_f64().unwrap())
            .collect()
    }

    /// The Kolmogorov-Smirnov statistic of `xs` against the uniform CDF on `[low, high]`.
    fn ks_uniform(mut xs: Vec<f64>, low: f64, high: f64) -> f64 {
        xs.sort_by(f64::total_cmp);
        let n = xs.len() as f64;
        xs.iter()
            .enumerate()
            .map(|(i, &x)| {
                let f = ((x - low) / (high - low)).clamp(0.0, 1.0);
                (f - i as f64 / n).abs().max(((i + 1) as f64 / n - f).abs())
            })
            .fold(0.0, f64::max)
    }

    /// KS critical value at alpha = 0.001 is 1.95 / sqrt(n).
    fn ks_critical(n: usize) -> f64 {
        1.95 / (n as f64).sqrt()
    }

    #[test]
    fn uniform_is_uniform_on_its_bounds() {
        let xs = draws(
            Distribution::Uniform {
                min: -2.0,
                max: 3.0,
            },
            4000,
            1,
        );
        assert!(xs.iter().all(|x| (-2.0..3.0).contains(x)));
        let d = ks_uniform(xs, -2.0, 3.0);
        assert!(d < ks_critical(4000), "KS {d}");
    }

    #[test]
    fn loguniforms_log_is_uniform() {
        // Azure ML: loguniform(min, max) = exp(uniform(min, max)).
        let xs = draws(
            Distribution::Loguniform {
                min: -6.0,
                max: 0.0,
            },
            4000,
            2,
        );
        assert!(xs.iter().all(|&x| x > (-6.0f64).exp() && x < 1.0));
        let logs: Vec<f64> = xs.iter().map(|x| x.ln()).collect();
        let d = ks_uniform(logs, -6.0, 0.0);
        assert!(d < ks_critical(4000), "KS {d}");
        // The values themselves are far from uniform on [e^-6, 1].
        let d = ks_uniform(xs, (-6.0f64).exp(), 1.0);
        assert!(d > 0.3, "KS {d}");
    }

    #[test]
    fn q_variants_round_to_q() {
        for (d, q) in [
            (
                Distribution::Quniform {
                    min: 0.0,
                    max: 10.0,
                    q: 0.5,
                },
                0.5,
            ),
            (
                Distribution::Qloguniform {
                    min: 0.0,
                    max: 4.0,
                    q: 2.0,
                },
                2.0,
            ),
            (
                Distribution::Qnormal {
                    mu: 0.0,
                    sigma: 10.0,
                    q: 3.0,
                },
                3.0,
            ),
            (
                Distribution::Qlognormal {
                    mu: 1.0,
                    sigma: 1.0,
                    q: 0.25,
                },
                0.25,
            ),
        ] {
            let xs = draws(d.clone(), 500, 3);
            for x in &xs {
                let k = x / q;
                assert!((k - k.round()).abs() < 1e-9, "{d:?}: {x}");
            }
            let distinct: std::collections::BTreeSet<u64> =
                xs.iter().map(|x| x.to_bits()).collect();
            assert!(distinct.len() > 3, "{d:?} collapsed");
        }
        // quniform(0, 10, 0.5) covers 0, 0.5, ..., 10: 21 values, each about equally often
        // except the two ends (half-width buckets).
        let xs = draws(
            Distribution::Quniform {
                min: 0.0,
                max: 10.0,
                q: 0.5,
            },
            4200,
            4,
        );
        let mut counts = BTreeMap::<i64, u32>::new();
        for x in xs {
            *counts.entry((x * 2.0).round() as i64).or_default() += 1;
        }
        assert_eq!(counts.len(), 21);
        for (k, c) in &counts {
            let expect = if *k == 0 || *k == 20 { 105.0 } else { 210.0 };
            assert!((f64::from(*c) - expect).abs() < expect * 0.35, "{k}: {c}");
        }
    }

    #[test]
    fn normal_and_lognormal_have_the_right_moments() {
        let xs = draws(
            Distribution::Normal {
                mu: 3.0,
                sigma: 2.0,
            },
            8000,
            5,
        );
        let mean = xs.iter().sum::<f64>() / xs.len() as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
        assert!((mean - 3.0).abs() < 0.1, "{mean}");
        assert!((var.sqrt() - 2.0).abs() < 0.1, "{var}");
        let logs: Vec<f64> = draws(
            Distribution::Lognormal {
                mu: -1.0,
                sigma: 0.5,
            },
            8000,
            6,
        )
        .into_iter()
        .map(f64::ln)
        .collect();
        let mean = logs.iter().sum::<f64>() / logs.len() as f64;
        assert!((mean + 1.0).abs() < 0.05, "{mean}");
    }

    #[test]
    fn randint_and_choice_cover_their_values_evenly() {
        let s = space(Distribution::Randint { upper: 5 });
        let mut counts = [0u32; 5];
        for i in 0..5000 {
            match &sample_random(&s, 7, i)["x"] {
                ParamValue::Int(v) => counts[*v as usize] += 1,
                other => panic!("{other:?}"),
            }
        }
        assert!(
            counts.iter().all(|&c| (800..1200).contains(&c)),
            "{counts:?}"
        );
        let s = space(Distribution::Choice {
            values: vec![ParamValue::Text("a".into()), ParamValue::Text("b".into())],
        });
        let a = (0..2000)
            .filter(|&i| sample_random(&s, 8, i)["x"] == ParamValue::Text("a".into()))
            .count();
        assert!((850..1150).contains(&a), "{a}");
    }

    #[test]
    fn random_sampling_is_deterministic_per_seed_and_index() {
        let s: BTreeMap<String, Distribution> = [
            (
                "a".to_string(),
                Distribution::Uniform { min: 0.0, max: 1.0 },
            ),
            (
                "b".to_string(),
                Distribution::Normal {
                    mu: 0.0,
                    sigma: 1.0,
                },
            ),
        ]
        .into();
        assert_eq!(sample_random(&s, 42, 3), sample_random(&s, 42, 3));
        assert_ne!(sample_random(&s, 42, 3), sample_random(&s, 42, 4));
        assert_ne!(sample_random(&s, 42, 3), sample_random(&s, 43, 3));
        // Pinned: ChaCha8's stream is fixed across versions and platforms, so a sweep
        // recorded by one build replays identically on another. If this changes, the
        // generator changed, and sweeps in flight would draw other parameters.
        let x = sample_random(&s, 42, 0)["a"].as_f64().unwrap();
        assert_eq!(x.to_bits(), 0x3fe5_d217_f6a7_2bab, "{x}");
    }

    #[test]
    fn grid_covers_the_full_product_once() {
        let s: BTreeMap<String, Distribution> = [
            (
                "a".to_string(),
                Distribution::Choice {
                    values: vec![ParamValue::Int(1), ParamValue::Int(2), ParamValue::Int(3)],
                },
            ),
            (
                "b".to_string(),
                Distribution::Choice {
                    values: vec![ParamValue::Text("x".into()), ParamValue::Text("y".into())],
                },
            ),
            ("c".to_string(), Distribution::Randint { upper: 2 }),
        ]
        .into();
        let axes = grid_axes(&s).unwrap();
        assert_eq!(grid_size(&axes), 12);
        let points: Vec<Params> = (0..12).map(|i| grid_point(&axes, i).unwrap()).collect();
        let distinct: std::collections::BTreeSet<String> =
            points.iter().map(|p| format!("{p:?}")).collect();
        assert_eq!(distinct.len(), 12);
        assert_eq!(grid_point(&axes, 12), None);
        assert_eq!(
            points[1],
            Params::from([
                ("a".to_string(), ParamValue::Int(1)),
                ("b".to_string(), ParamValue::Text("x".into())),
                ("c".to_string(), ParamValue::Int(1)),
            ])
        );
        let e = grid_axes(&space(Distribution::Loguniform { min: 0.0, max: 1.0 })).unwrap_err();
        assert_eq!(e.path, "search_space.x");
        assert!(e.message.contains("loguniform"), "{e}");
    }

    fn quadratic(x: f64) -> f64 {
        (x - 1.3).powi(2)
    }

    /// Runs `trials` sequential trials of `sampling` on the quadratic; returns the best loss.
    fn optimize(sampling: &Sampling, seed: u64, trials: u32) -> f64 {
        let s = space(Distribution::Uniform {
            min: -10.0,
            max: 10.0,
        });
        let mut history: Vec<(Params, f64)> = Vec::new();
        for i in 0..trials {
            let obs: Vec<Observation<'_>> = history
                .iter()
                .map(|(p, v)| Observation {
                    params: p,
                    value: *v,
                })
                .collect();
            let p = sample(sampling, &s, Goal::Minimize, &obs, seed, i).unwrap();
            let v = quadratic(p["x"].as_f64().unwrap());
            history.push((p, v));
        }
        history.iter().map(|h| h.1).fold(f64::INFINITY, f64::min)
    }

    #[test]
    fn tpe_beats_random_on_a_quadratic() {
        let seeds = 0..20u64;
        let trials = 40;
        let random: f64 = seeds
            .clone()
            .map(|s| optimize(&Sampling::Random { seed: None }, s, trials))
            .sum::<f64>()
            / 20.0;
        let tpe: f64 = seeds
            .clone()
            .map(|s| optimize(&Sampling::Bayesian, s, trials))
            .sum::<f64>()
            / 20.0;
        // Mean best loss: TPE must be clearly better, not just equal.
        assert!(tpe < random * 0.5, "tpe {tpe} random {random}");
        // And it wins on most seeds, not through one lucky run.
        let wins = seeds
            .filter(|&s| {
                optimize(&Sampling::Bayesian, s, trials)
                    < optimize(&Sampling::Random { seed: None }, s, trials)
            })
            .count();
        assert!(wins >= 12, "TPE won {wins} of 20");
    }

    #[test]
    fn tpe_is_random_until_startup_and_deterministic_after() {
        let s = space(Distribution::Uniform { min: 0.0, max: 1.0 });
        let cfg = TpeConfig::default();
        assert_eq!(
            sample_tpe(&s, Goal::Maximize, &[], 9, 3, &cfg),
            sample_random(&s, 9, 3)
        );
        let history: Vec<(Params, f64)> = (0..12)
            .map(|i| {
                let p = sample_random(&s, 1, i);
                let v = p["x"].as_f64().unwrap();
                (p, v)
            })
            .collect();
        let obs: Vec<Observation<'_>> = history
            .iter()
            .map(|(p, v)| Observation {
                params: p,
                value: *v,
            })
            .collect();
        let a = sample_tpe(&s, Goal::Maximize, &obs, 9, 12, &cfg);
        assert_eq!(a, sample_tpe(&s, Goal::Maximize, &obs, 9, 12, &cfg));
        // Maximizing x on [0, 1], the model proposes near the best seen.
        let good: Vec<f64> = (20..40)
            .map(|i| {
                sample_tpe(&s, Goal::Maximize, &obs, 9, i, &cfg)["x"]
                    .as_f64()
                    .unwrap()
            })
            .collect();
        let mean = good.iter().sum::<f64>() / good.len() as f64;
        assert!(mean > 0.6, "{mean}");
    }

    #[test]
    fn tpe_handles_every_distribution() {
        let s: BTreeMap<String, Distribution> = [
            (
                "c".to_string(),
                Distribution::Choice {
                    values: vec![ParamValue::Int(1), ParamValue::Int(2)],
                },
            ),
            ("r".to_string(), Distribution::Randint { upper: 4 }),
            (
                "u".to_string(),
                Distribution::Quniform {
                    min: 0.0,
                    max: 1.0,
                    q: 0.1,
                },
            ),
            (
                "l".to_string(),
                Distribution::Qloguniform {
                    min: 0.0,
                    max: 2.0,
                    q: 1.0,
                },
            ),
            (
                "n".to_string(),
                Distribution::Qnormal {
                    mu: 0.0,
                    sigma: 1.0,
                    q: 0.5,
                },
            ),
            (
                "g".to_string(),
                Distribution::Lognormal {
                    mu: 0.0,
                    sigma: 1.0,
                },
            ),
        ]
        .into();
        let history: Vec<(Params, f64)> = (0..15)
            .map(|i| (sample_random(&s, 2, i), f64::from(i)))
            .collect();
        let obs: Vec<Observation<'_>> = history
            .iter()
            .map(|(p, v)| Observation {
                params: p,
                value: *v,
            })
            .collect();
        for i in 15..30 {
            let p = sample_tpe(&s, Goal::Minimize, &obs, 2, i, &TpeConfig::default());
            assert_eq!(p.len(), 6);
            let r = p["r"].as_f64().unwrap();
            assert!((0.0..4.0).contains(&r) && r.fract() == 0.0, "{r}");
            let u = p["u"].as_f64().unwrap();
            assert!((-0.05..=1.05).contains(&u), "{u}");
            assert!(p["g"].as_f64().unwrap() > 0.0);
        }
    }
}
