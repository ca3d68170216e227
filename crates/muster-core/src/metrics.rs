//! Metrics a run logs: parsing metric lines, and the per-metric [`Series`] kept for a run.
//!
//! A run logs a named numeric metric with a step, from any language and with no client
//! library, in either of two equivalent forms:
//!
//! 1. **JSON lines** appended to the file named by the `MUSTER_METRICS_FILE` environment
//!    variable, one object per line:
//!
//!    ```text
//!    {"name": "loss", "value": 0.25, "step": 3}
//!    ```
//!
//! 2. **stdout lines** of this form (the prefix starts the line; fields are `key=value`
//!    separated by spaces, in any order):
//!
//!    ```text
//!    ##muster[metric] name=loss value=0.25 step=3
//!    ```
//!
//!    From a shell: `echo "##muster[metric] name=loss value=$LOSS step=$EPOCH"`; from Python:
//!    `print(f"##muster[metric] name=loss value={loss} step={epoch}", flush=True)`. The
//!    `##muster[` prefix is unlikely to occur in ordinary output, and a line that does not
//!    start with it is ordinary log output, never a metric.
//!
//! In both forms `step` is optional (a non-negative integer): when absent the point takes
//! the step after the metric's last one (0 for the first), so each logged value is one
//! Azure ML "interval". `name` is 1 to [`MAX_NAME_BYTES`] bytes with no whitespace, control
//! characters or `=`; `value` is a finite number (NaN and infinities are rejected).
//!
//! A malformed line is never fatal: the parsers return a [`MetricLineError`] that says what
//! is wrong, and [`MetricsLog`] counts it beside the points it keeps. No input makes
//! a parser panic (a property test feeds arbitrary strings).
//!
//! A [`Series`] keeps one metric's points in arrival order, with its last and best values,
//! and encodes to a compact binary form ([`Series::encode`]: a zig-zag varint step delta and
//! the 8 value bytes per point, about 9 bytes a point) for the server's metric store.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The prefix of a metric line on stdout.
pub const STDOUT_PREFIX: &str = "##muster[metric]";
/// The longest metric name accepted, in bytes.
pub const MAX_NAME_BYTES: usize = 255;
/// The longest metric line looked at, in bytes; longer lines are malformed.
pub const MAX_LINE_BYTES: usize = 4096;

/// Whether a larger or a smaller metric value is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    /// Larger is better (accuracy).
    Maximize,
    /// Smaller is better (loss).
    Minimize,
}

impl Goal {
    /// True when `a` is strictly better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Goal::Maximize => a > b,
            Goal::Minimize => a < b,
        }
    }

    /// The better of two values.
    pub fn best_of(self, a: f64, b: f64) -> f64 {
        if self.better(b, a) { b } else { a }
    }
}

impl fmt::Display for Goal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Goal::Maximize => "maximize",
            Goal::Minimize => "minimize",
        })
    }
}

/// One logged point as parsed; `step` is `None` when the line gave none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MetricPoint {
    /// The metric's name.
    pub name: String,
    /// The value (finite).
    pub value: f64,
    /// The step, when given.
    pub step: Option<u64>,
}

/// Why a metric line was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetricLineError {
    /// What is wrong and what to do.
    pub message: String,
}

impl MetricLineError {
    fn new(message: impl Into<String>) -> MetricLineError {
        MetricLineError {
            message: message.into(),
        }
    }
}

impl fmt::Display for MetricLineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed metric line: {}", self.message)
    }
}

impl std::error::Error for MetricLineError {}

/// Checks a metric name: 1 to [`MAX_NAME_BYTES`] bytes, no whitespace, control character or `=`.
pub fn validate_name(name: &str) -> Result<(), String> {
    check_name(name).map_err(|e| e.message)
}

fn check_name(name: &str) -> Result<(), MetricLineError> {
    if name.is_empty() {
        return Err(MetricLineError::new("the metric name is empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(MetricLineError::new(format!(
            "the metric name is {} bytes, longer than {MAX_NAME_BYTES}",
            name.len()
        )));
    }
    if name
        .chars()
        .any(|c| c.is_whitespace() || c.is_control() || c == '=')
    {
        return Err(MetricLineError::new(format!(
            "metric name {name:?} contains whitespace, a control character or '='"
        )));
    }
    Ok(())
}

fn check_value(value: f64) -> Result<f64, MetricLineError> {
    if value.is_finite() {
        Ok(value)
    } else {
        Err(MetricLineError::new(format!(
            "value {value} is not a finite number"
        )))
    }
}

fn check_len(line: &str) -> Result<(), MetricLineError> {
    if line.len() > MAX_LINE_BYTES {
        return Err(MetricLineError::new(format!(
            "the line is {} bytes, longer than {MAX_LINE_BYTES}",
            line.len()
        )));
    }
    Ok(())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonLine {
    name: String,
    value: f64,
    #[serde(default)]
    step: Option<u64>,
    /// MLflow's wall-clock timestamp (ms); accepted and not kept (the server stamps arrival).
    #[serde(default)]
    #[allow(dead_code)]
    timestamp: Option<u64>,
}

/// Parses one line of a `MUSTER_METRICS_FILE`. A blank line gives `Ok(None)`.
pub fn parse_json_line(line: &str) -> Result<Option<MetricPoint>, MetricLineError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(None);
    }
    check_len(line)?;
    let parsed: JsonLine = serde_json::from_str(line).map_err(|e| {
        MetricLineError::new(format!(
            "{e}; write {{\"name\": \"loss\", \"value\": 0.25, \"step\": 3}}"
        ))
    })?;
    check_name(&parsed.name)?;
    Ok(Some(MetricPoint {
        name: parsed.name,
        value: check_value(parsed.value)?,
        step: parsed.step,
    }))
}

/// Parses one stdout line. `None`: not a metric line (ordinary output); `Some(Err)`: a line
/// starting with [`STDOUT_PREFIX`] that is malformed.
pub fn parse_stdout_line(line: &str) -> Option<Result<MetricPoint, MetricLineError>> {
    let line = line.trim_end_matches(['\n', '\r']);
    let rest = line.trim_start().strip_prefix(STDOUT_PREFIX)?;
    Some(parse_stdout_fields(line, rest))
}

fn parse_stdout_fields(line: &str, rest: &str) -> Result<MetricPoint, MetricLineError> {
    check_len(line)?;
    if !rest.is_empty() && !rest.starts_with([' ', '\t']) {
        return Err(MetricLineError::new(format!(
            "put a space after {STDOUT_PREFIX}"
        )));
    }
    let (mut name, mut value, mut step) = (None, None, None);
    for field in rest.split_whitespace() {
        let (key, val) = field.split_once('=').ok_or_else(|| {
            MetricLineError::new(format!(
                "{field:?} is not key=value; write {STDOUT_PREFIX} name=loss value=0.25 step=3"
            ))
        })?;
        let slot_taken = match key {
            "name" => name.replace(val).is_some(),
            "value" => value.replace(val).is_some(),
            "step" => step.replace(val).is_some(),
            other => {
                return Err(MetricLineError::new(format!(
                    "unknown field {other:?}: use name, value and step"
                )));
            }
        };
        if slot_taken {
            return Err(MetricLineError::new(format!("field {key:?} given twice")));
        }
    }
    let name = name.ok_or_else(|| MetricLineError::new("missing name=..."))?;
    check_name(name)?;
    let value = value.ok_or_else(|| MetricLineError::new("missing value=..."))?;
    let value = value
        .parse::<f64>()
        .map_err(|_| MetricLineError::new(format!("value {value:?} is not a number")))?;
    let step = step
        .map(|s| {
            s.parse::<u64>().map_err(|_| {
                MetricLineError::new(format!("step {s:?} is not a non-negative integer"))
            })
        })
        .transpose()?;
    Ok(MetricPoint {
        name: name.to_string(),
        value: check_value(value)?,
        step,
    })
}

/// One metric's points of one run, in arrival order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Series {
    /// `(step, value)` in arrival order.
    points: Vec<(u64, f64)>,
}

/// Why bytes do not decode as a [`Series`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt metric series: {0}")]
pub struct SeriesDecodeError(String);

impl Series {
    /// An empty series.
    pub const fn new() -> Series {
        Series { points: Vec::new() }
    }

    /// A series of these values at steps 0, 1, 2, ...
    pub fn from_values(values: impl IntoIterator<Item = f64>) -> Series {
        let mut s = Series::new();
        for v in values {
            s.push(None, v);
        }
        s
    }

    /// Appends a point; a missing step becomes the last step + 1 (0 for the first point).
    pub fn push(&mut self, step: Option<u64>, value: f64) {
        let step = step.unwrap_or_else(|| match self.points.last() {
            Some((s, _)) => s.saturating_add(1),
            None => 0,
        });
        self.points.push((step, value));
    }

    /// The points, `(step, value)`, in arrival order.
    pub fn points(&self) -> &[(u64, f64)] {
        &self.points
    }

    /// The values in arrival order (interval 1 is the first).
    pub fn values(&self) -> impl Iterator<Item = f64> + '_ {
        self.points.iter().map(|p| p.1)
    }

    /// Number of points.
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// True when no point was logged.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }

    /// The last point logged.
    pub fn last(&self) -> Option<(u64, f64)> {
        self.points.last().copied()
    }

    /// The best value under `goal`.
    pub fn best(&self, goal: Goal) -> Option<f64> {
        self.values().reduce(|a, b| goal.best_of(a, b))
    }

    /// The compact binary form: varint count, then per point a zig-zag varint of the step
    /// minus the previous step and the value's 8 little-endian bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(2 + self.points.len() * 10);
        put_varint(&mut out, self.points.len() as u64);
        let mut prev = 0u64;
        for &(step, value) in &self.points {
            let delta = step.wrapping_sub(prev) as i64;
            put_varint(&mut out, ((delta << 1) ^ (delta >> 63)) as u64);
            out.extend_from_slice(&value.to_le_bytes());
            prev = step;
        }
        out
    }

    /// Decodes [`Series::encode`]'s form.
    pub fn decode(mut bytes: &[u8]) -> Result<Series, SeriesDecodeError> {
        let n = get_varint(&mut bytes)?;
        if n > (bytes.len() as u64) {
            return Err(SeriesDecodeError(format!(
                "{n} points announced in {} bytes",
                bytes.len()
            )));
        }
        let mut points = Vec::with_capacity(n as usize);
        let mut prev = 0u64;
        for _ in 0..n {
            let z = get_varint(&mut bytes)?;
            let delta = ((z >> 1) as i64) ^ -((z & 1) as i64);
            let step = prev.wrapping_add(delta as u64);
            let (value, rest) = bytes
                .split_first_chunk::<8>()
                .ok_or_else(|| SeriesDecodeError("truncated value".into()))?;
            points.push((step, f64::from_le_bytes(*value)));
            bytes = rest;
            prev = step;
        }
        if !bytes.is_empty() {
            return Err(SeriesDecodeError(format!("{} trailing bytes", bytes.len())));
        }
        Ok(Series { points })
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(bytes: &mut &[u8]) -> Result<u64, SeriesDecodeError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = bytes
            .split_first()
            .ok_or_else(|| SeriesDecodeError("truncated varint".into()))?;
        *bytes = rest;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Ok(v);
        }
    }
    Err(SeriesDecodeError("varint longer than 10 bytes".into()))
}

/// All metrics of one run, with a count of the malformed lines seen.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MetricsLog {
    /// Each metric's series, by name.
    pub series: BTreeMap<String, Series>,
    /// Lines rejected as malformed.
    pub malformed: u64,
    /// The most recent rejection, for `run show`.
    pub last_error: Option<String>,
}

impl MetricsLog {
    /// An empty log.
    pub fn new() -> MetricsLog {
        MetricsLog::default()
    }

    /// Records a parsed point.
    pub fn record(&mut self, point: MetricPoint) {
        self.series
            .entry(point.name)
            .or_default()
            .push(point.step, point.value);
    }

    fn note(&mut self, parsed: Result<Option<MetricPoint>, MetricLineError>) {
        match parsed {
            Ok(Some(p)) => self.record(p),
            Ok(None) => {}
            Err(e) => {
                self.malformed += 1;
                self.last_error = Some(e.message);
            }
        }
    }

    /// Feeds one line of a `MUSTER_METRICS_FILE`.
    pub fn feed_json_line(&mut self, line: &str) {
        self.note(parse_json_line(line));
    }

    /// Feeds one stdout line; ordinary output is ignored.
    pub fn feed_stdout_line(&mut self, line: &str) {
        if let Some(parsed) = parse_stdout_line(line) {
            self.note(parsed.map(Some));
        }
    }

    /// The last value of each metric, for `run show`.
    pub fn last_values(&self) -> BTreeMap<&str, f64> {
        self.series
            .iter()
            .filter_map(|(k, s)| s.last().map(|(_, v)| (k.as_str(), v)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn json_lines_parse_with_and_without_step() {
        let p = parse_json_line(r#"{"name":"loss","value":0.25,"step":3}"#)
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            MetricPoint {
                name: "loss".into(),
                value: 0.25,
                step: Some(3)
            }
        );
        let p = parse_json_line(r#" {"name":"acc","value":1} "#)
            .unwrap()
            .unwrap();
        assert_eq!(p.step, None);
        assert_eq!(p.value, 1.0);
        assert_eq!(parse_json_line("   ").unwrap(), None);
    }

    #[test]
    fn malformed_json_lines_say_what_is_wrong() {
        for (line, needle) in [
            (r#"{"name":"loss"}"#, "value"),
            (r#"{"name":"","value":1}"#, "empty"),
            (r#"{"name":"a b","value":1}"#, "whitespace"),
            (r#"{"name":"a","value":"x"}"#, "invalid type"),
            (r#"{"name":"a","value":1,"step":-1}"#, "invalid value"),
            (r#"{"name":"a","value":1,"extra":1}"#, "unknown field"),
            ("not json", "expected"),
            (r#"{"name":"a","value":1e999}"#, ""),
        ] {
            let e = parse_json_line(line).unwrap_err();
            assert!(e.message.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn stdout_lines_parse_in_any_order() {
        let p = parse_stdout_line("##muster[metric] name=loss value=0.25 step=3\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            p,
            MetricPoint {
                name: "loss".into(),
                value: 0.25,
                step: Some(3)
            }
        );
        let p = parse_stdout_line("  ##muster[metric]\tstep=7 value=-1e-3 name=val/acc")
            .unwrap()
            .unwrap();
        assert_eq!(
            (p.name.as_str(), p.value, p.step),
            ("val/acc", -1e-3, Some(7))
        );
        assert_eq!(parse_stdout_line("epoch 3 loss=0.25"), None);
        assert_eq!(parse_stdout_line(""), None);
    }

    #[test]
    fn malformed_stdout_lines_are_errors_not_output() {
        for (line, needle) in [
            ("##muster[metric]", "missing name"),
            ("##muster[metric] name=a", "missing value"),
            ("##muster[metric] name=a value=abc", "not a number"),
            ("##muster[metric] name=a value=nan", "finite"),
            ("##muster[metric] name=a value=1 step=1.5", "non-negative"),
            ("##muster[metric] name=a value=1 name=b", "twice"),
            ("##muster[metric] name=a value=1 color=red", "unknown field"),
            ("##muster[metric] loss", "key=value"),
            ("##muster[metric]name=a value=1", "space after"),
        ] {
            let e = parse_stdout_line(line).unwrap().unwrap_err();
            assert!(e.message.contains(needle), "{line}: {e}");
        }
    }

    #[test]
    fn the_log_counts_malformed_lines_and_keeps_the_rest() {
        let mut log = MetricsLog::new();
        log.feed_json_line(r#"{"name":"loss","value":0.5}"#);
        log.feed_json_line("garbage");
        log.feed_json_line(r#"{"name":"loss","value":0.25}"#);
        log.feed_stdout_line("hello world");
        log.feed_stdout_line("##muster[metric] name=loss value=0.125 step=10");
        log.feed_stdout_line("##muster[metric] name=acc value=oops");
        assert_eq!(log.malformed, 2);
        assert!(log.last_error.as_deref().unwrap().contains("oops"));
        let loss = &log.series["loss"];
        assert_eq!(loss.points(), &[(0, 0.5), (1, 0.25), (10, 0.125)]);
        assert_eq!(log.last_values(), BTreeMap::from([("loss", 0.125)]));
    }

    #[test]
    fn series_best_follows_the_goal() {
        let s = Series::from_values([0.3, 0.9, 0.1, 0.5]);
        assert_eq!(s.best(Goal::Maximize), Some(0.9));
        assert_eq!(s.best(Goal::Minimize), Some(0.1));
        assert_eq!(s.last(), Some((3, 0.5)));
        assert_eq!(Series::new().best(Goal::Maximize), None);
    }

    #[test]
    fn the_compact_form_is_about_nine_bytes_a_point() {
        let s = Series::from_values((0..1000).map(|i| f64::from(i) * 0.5));
        let bytes = s.encode();
        assert!(bytes.len() <= 2 + 9 * 1000, "{}", bytes.len());
        assert_eq!(Series::decode(&bytes).unwrap(), s);
        assert!(Series::decode(&bytes[..bytes.len() - 1]).is_err());
        assert!(Series::decode(&[0xff; 11]).is_err());
    }

    proptest! {
        #[test]
        fn no_string_makes_a_parser_panic(line in ".*") {
            let _ = parse_json_line(&line);
            let _ = parse_stdout_line(&line);
            let prefixed = format!("{STDOUT_PREFIX} {line}");
            prop_assert!(parse_stdout_line(&prefixed).is_some());
        }

        #[test]
        fn no_bytes_make_decode_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Series::decode(&bytes);
        }

        #[test]
        fn series_round_trip(points in proptest::collection::vec((any::<u64>(), -1e300f64..1e300), 0..50)) {
            let mut s = Series::new();
            for (step, v) in &points {
                s.push(Some(*step), *v);
            }
            prop_assert_eq!(Series::decode(&s.encode()).unwrap(), s);
        }

        #[test]
        fn printed_points_parse_back(name in "[a-zA-Z_/.]{1,20}", value in -1e12f64..1e12, step in any::<u64>()) {
            let line = format!("{STDOUT_PREFIX} name={name} value={value} step={step}");
            let p = parse_stdout_line(&line).unwrap().unwrap();
            prop_assert_eq!(p, MetricPoint { name: name.clone(), value, step: Some(step) });
            let json = serde_json::json!({"name": name, "value": value, "step": step}).to_string();
            let p = parse_json_line(&json).unwrap().unwrap();
            // Exact: muster-core enables serde_json's float_roundtrip.
            prop_assert_eq!(p.value, value);
        }
    }
}
