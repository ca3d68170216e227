//! `muster run metrics ID [--follow] [--name N]`, and the metrics part of `muster run show`.

use futures::StreamExt;
use muster_proto::v1;
use serde_json::{Value, json};

use crate::cli::OutputFormat;
use crate::connect;
use crate::output::{print_json, run_details, run_json, table};
use muster_client::{Clients, status};

/// `muster run metrics`: every point of the run's metrics (or one metric's); with
/// `follow`, points as they arrive until the run ends.
pub async fn run_metrics(
    server: &str,
    output: OutputFormat,
    id: &str,
    follow: bool,
    name: Option<String>,
) -> anyhow::Result<i32> {
    let mut c = connect(server).await?;
    if follow {
        return follow_metrics(&mut c, output, id, name).await;
    }
    let m = c
        .metrics
        .get_run_metrics(v1::GetRunMetricsRequest {
            run_id: id.to_string(),
            name: name.clone(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    if output == OutputFormat::Json {
        print_json(&metrics_json(&m));
        return Ok(0);
    }
    if m.series.iter().all(|s| s.steps.is_empty()) {
        match &name {
            Some(n) => println!("Run {id} has logged no points of metric {n}."),
            None => println!(
                "Run {id} has logged no metrics. A run logs them as JSON lines appended to $MUSTER_METRICS_FILE or as `##muster[metric] name=NAME value=VALUE step=STEP` lines on stdout."
            ),
        }
    } else {
        let mut t = table(&["METRIC", "STEP", "VALUE"]);
        for s in &m.series {
            for (step, value) in s.steps.iter().zip(&s.values) {
                t.add_row(vec![s.name.clone(), step.to_string(), value.to_string()]);
            }
        }
        println!("{t}");
    }
    note_malformed(&m);
    Ok(0)
}

async fn follow_metrics(
    c: &mut Clients,
    output: OutputFormat,
    id: &str,
    name: Option<String>,
) -> anyhow::Result<i32> {
    let mut stream = c
        .metrics
        .stream_run_metrics(v1::StreamRunMetricsRequest {
            run_id: id.to_string(),
            name,
            follow: true,
        })
        .await
        .map_err(status)?
        .into_inner();
    if output == OutputFormat::Table {
        println!("{:<24} {:>10}  VALUE", "METRIC", "STEP");
    }
    let mut malformed = 0;
    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.map_err(status)?;
        for s in &m.series {
            for (step, value) in s.steps.iter().zip(&s.values) {
                match output {
                    OutputFormat::Json => {
                        println!("{}", json!({"name": s.name, "step": step, "value": value}))
                    }
                    OutputFormat::Table => println!("{:<24} {:>10}  {value}", s.name, step),
                }
            }
        }
        if m.malformed > malformed {
            malformed = m.malformed;
            eprintln!(
                "{} malformed metric line(s) so far; the last: {}",
                m.malformed,
                m.last_error.clone().unwrap_or_default()
            );
        }
        if m.ended {
            last = Some(m);
        }
    }
    if last.is_none() {
        anyhow::bail!(
            "the server ended the metrics stream before run {id} ended; run the command again to see the rest"
        );
    }
    Ok(0)
}

fn note_malformed(m: &v1::RunMetrics) {
    if m.malformed > 0 {
        eprintln!(
            "{} malformed metric line(s) were skipped; the last: {}",
            m.malformed,
            m.last_error.clone().unwrap_or_default()
        );
    }
}

/// The JSON form: each metric's points, and the malformed-line count.
pub fn metrics_json(m: &v1::RunMetrics) -> Value {
    let metrics: serde_json::Map<String, Value> = m
        .series
        .iter()
        .map(|s| {
            let points: Vec<Value> = s
                .steps
                .iter()
                .zip(&s.values)
                .map(|(step, value)| json!({"step": step, "value": value}))
                .collect();
            (s.name.clone(), Value::Array(points))
        })
        .collect();
    json!({
        "run_id": m.run_id,
        "metrics": metrics,
        "malformed": m.malformed,
        "last_error": m.last_error,
        "ended": m.ended,
    })
}

/// The last point of each metric of a run, for `run show` (`None` if the server could not
/// say: `run show` still shows the run).
pub async fn last_values(c: &mut Clients, id: &str) -> Option<v1::RunMetrics> {
    c.metrics
        .get_run_metrics(v1::GetRunMetricsRequest {
            run_id: id.to_string(),
            last_only: true,
            ..Default::default()
        })
        .await
        .ok()
        .map(|r| r.into_inner())
}

/// `run show`: the run, then the last value of each metric and the malformed-line count.
pub fn print_run_with_metrics(output: OutputFormat, run: &v1::Run, m: Option<&v1::RunMetrics>) {
    if output == OutputFormat::Json {
        let mut v = run_json(run);
        if let (Some(m), Some(obj)) = (m, v.as_object_mut()) {
            let last: serde_json::Map<String, Value> = m
                .series
                .iter()
                .filter_map(|s| {
                    let step = *s.steps.last()?;
                    let value = *s.values.last()?;
                    Some((s.name.clone(), json!({"step": step, "value": value})))
                })
                .collect();
            obj.insert(
                "metrics".into(),
                json!({"last": last, "malformed": m.malformed, "last_error": m.last_error}),
            );
        }
        print_json(&v);
        return;
    }
    print!("{}", run_details(run));
    let Some(m) = m else { return };
    for s in &m.series {
        if let (Some(step), Some(value)) = (s.steps.last(), s.values.last()) {
            println!("{:<11} {} = {value} (step {step})", "metric", s.name);
        }
    }
    if m.malformed > 0 {
        println!(
            "{:<11} {} malformed line(s); the last: {}",
            "metrics",
            m.malformed,
            m.last_error.clone().unwrap_or_default()
        );
    }
}
