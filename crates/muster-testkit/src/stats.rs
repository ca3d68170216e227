//! Percentiles for the benchmarks' latency figures.

use std::time::Duration;

/// p50 and p99 of `samples` in milliseconds, by nearest rank (p99 of fewer than 100
/// samples is their maximum); NaN for none.
pub fn p50_p99_ms(mut samples: Vec<Duration>) -> (f64, f64) {
    if samples.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    samples.sort();
    let at =
        |q: f64| samples[((samples.len() as f64 * q).ceil() as usize).clamp(1, samples.len()) - 1];
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    (ms(at(0.5)), ms(at(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(p50_p99_ms(v), (50.0, 99.0));
        let few: Vec<Duration> = [3, 1, 2].map(Duration::from_millis).to_vec();
        assert_eq!(p50_p99_ms(few), (2.0, 3.0));
        assert!(p50_p99_ms(Vec::new()).0.is_nan());
    }
}
