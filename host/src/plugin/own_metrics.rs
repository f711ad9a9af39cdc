//! The metrics an aggregator (WIT 0.2 `metrics`) defines for itself, per plugin on a route:
//! declared names, their series, and the policy's bound on series. Pure; `/metrics` renders
//! them as `edgebridge_plugin_<plugin>_<name>` with the labels `plugin`, `route` and the
//! plugin's own.

use std::collections::BTreeMap;

/// Kind of a plugin metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets.
    Histogram,
}

/// The value of one series.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// A counter's or a gauge's value.
    Number(f64),
    /// A histogram: cumulative counts per upper bound, sum and count.
    Histogram {
        /// Observations at or below each bucket's bound.
        counts: Vec<u64>,
        /// Sum of the observations.
        sum: f64,
        /// Number of observations.
        count: u64,
    },
}

/// One declared metric and its series.
#[derive(Debug, Clone)]
pub struct Declared {
    /// Its name as declared (without prefix or suffix).
    pub name: String,
    /// Help text.
    pub help: String,
    /// Kind.
    pub kind: Kind,
    /// Names of its own labels.
    pub labels: Vec<String>,
    /// A histogram's upper bounds.
    pub buckets: Vec<f64>,
    /// Its series by label values.
    pub series: BTreeMap<Vec<String>, Value>,
}

/// Prometheus' default histogram bounds.
const DEFAULT_BUCKETS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Most metrics a plugin may declare on a route.
pub const MAX_METRICS: usize = 64;
const MAX_LABELS: usize = 4;
const MAX_NAME: usize = 64;
const MAX_LABEL_VALUE: usize = 128;
const MAX_BUCKETS: usize = 32;

/// The metrics of one plugin on one route.
#[derive(Debug, Default)]
pub struct OwnMetrics {
    /// Declared metrics; a handle is an index.
    pub declared: Vec<Declared>,
    /// Series over all metrics.
    series: usize,
    /// Updates refused because a new series would exceed the policy's `metrics.maxSeries`.
    pub refused: u64,
}

fn valid_name(name: &str) -> bool {
    let mut chars = name.chars();
    name.len() <= MAX_NAME
        && chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

impl OwnMetrics {
    /// Declares a metric (see the WIT `metrics.declare`); its handle.
    pub fn declare(
        &mut self,
        name: &str,
        help: &str,
        kind: Kind,
        labels: Vec<String>,
        buckets: Vec<f64>,
    ) -> Result<u32, String> {
        if !valid_name(name) {
            return Err(format!(
                "metric name {name:?} must be [a-z][a-z0-9_]*, at most {MAX_NAME} bytes"
            ));
        }
        if ["_total", "_count", "_sum", "_bucket"]
            .iter()
            .any(|s| name.ends_with(s))
        {
            return Err(format!(
                "metric name {name:?} must not end in _total, _count, _sum or _bucket (the exposition adds them)"
            ));
        }
        if labels.len() > MAX_LABELS {
            return Err(format!(
                "at most {MAX_LABELS} labels, {name:?} has {}",
                labels.len()
            ));
        }
        for l in &labels {
            if !valid_name(l) || l == "plugin" || l == "route" {
                return Err(format!(
                    "label name {l:?} must be [a-z][a-z0-9_]* and not plugin or route"
                ));
            }
        }
        let buckets = match kind {
            Kind::Histogram if buckets.is_empty() => DEFAULT_BUCKETS.to_vec(),
            Kind::Histogram => {
                if buckets.len() > MAX_BUCKETS
                    || buckets.iter().any(|b| !b.is_finite())
                    || buckets.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(format!(
                        "buckets of {name:?} must be at most {MAX_BUCKETS} finite bounds, strictly ascending"
                    ));
                }
                buckets
            }
            _ => Vec::new(),
        };
        if let Some(i) = self.declared.iter().position(|d| d.name == name) {
            let d = &self.declared[i];
            if d.kind == kind && d.labels == labels {
                return Ok(i as u32);
            }
            return Err(format!(
                "metric {name:?} is already declared with another kind or labels"
            ));
        }
        if self.declared.len() >= MAX_METRICS {
            return Err(format!(
                "at most {MAX_METRICS} metrics per plugin on a route"
            ));
        }
        self.declared.push(Declared {
            name: name.to_string(),
            help: help.chars().take(256).collect(),
            kind,
            labels,
            buckets,
            series: BTreeMap::new(),
        });
        Ok((self.declared.len() - 1) as u32)
    }

    /// Applies an update to one series; `max_series` is the policy's bound.
    pub fn update(
        &mut self,
        metric: u32,
        values: Vec<String>,
        op: Op,
        max_series: usize,
    ) -> Result<(), String> {
        let Some(d) = self.declared.get_mut(metric as usize) else {
            return Err(format!("no metric with handle {metric}"));
        };
        if values.len() != d.labels.len() {
            return Err(format!(
                "{} takes {} label values, {} given",
                d.name,
                d.labels.len(),
                values.len()
            ));
        }
        if values.iter().any(|v| v.len() > MAX_LABEL_VALUE) {
            return Err(format!("label values are at most {MAX_LABEL_VALUE} bytes"));
        }
        match (d.kind, op) {
            (Kind::Counter, Op::Add(v)) if v >= 0.0 && v.is_finite() => {}
            (Kind::Counter, Op::Add(_)) => {
                return Err(format!("{}: a counter only adds finite values ≥ 0", d.name));
            }
            (Kind::Gauge, Op::Add(_) | Op::Set(_)) | (Kind::Histogram, Op::Observe(_)) => {}
            _ => {
                return Err(format!(
                    "{} is a {:?}: {} does not apply",
                    d.name,
                    d.kind,
                    op.name()
                ));
            }
        }
        if !d.series.contains_key(&values) {
            if self.series >= max_series {
                self.refused += 1;
                return Err(format!(
                    "the policy allows {max_series} series (metrics.maxSeries); a new one for {} is refused",
                    d.name
                ));
            }
            self.series += 1;
            let empty = match d.kind {
                Kind::Histogram => Value::Histogram {
                    counts: vec![0; d.buckets.len()],
                    sum: 0.0,
                    count: 0,
                },
                _ => Value::Number(0.0),
            };
            d.series.insert(values.clone(), empty);
        }
        let v = d.series.get_mut(&values).expect("inserted");
        match (v, op) {
            (Value::Number(n), Op::Add(x)) => *n += x,
            (Value::Number(n), Op::Set(x)) => *n = x,
            (Value::Histogram { counts, sum, count }, Op::Observe(x)) => {
                for (c, b) in counts.iter_mut().zip(&d.buckets) {
                    if x <= *b {
                        *c += 1;
                    }
                }
                *sum += x;
                *count += 1;
            }
            _ => unreachable!("checked above"),
        }
        Ok(())
    }
}

/// An update of a series.
#[derive(Debug, Clone, Copy)]
pub enum Op {
    /// Add (counter, gauge).
    Add(f64),
    /// Set (gauge).
    Set(f64),
    /// Observe (histogram).
    Observe(f64),
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Add(_) => "add",
            Op::Set(_) => "set",
            Op::Observe(_) => "observe",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_kinds_and_the_series_bound_are_enforced() {
        let mut m = OwnMetrics::default();
        assert!(m.declare("Bad", "", Kind::Counter, vec![], vec![]).is_err());
        assert!(
            m.declare("x_total", "", Kind::Counter, vec![], vec![])
                .is_err()
        );
        assert!(
            m.declare("x", "", Kind::Counter, vec!["route".into()], vec![])
                .is_err()
        );
        let c = m
            .declare("windows", "h", Kind::Counter, vec!["topic".into()], vec![])
            .unwrap();
        assert_eq!(
            m.declare("windows", "h", Kind::Counter, vec!["topic".into()], vec![]),
            Ok(c),
            "declaring again returns the same handle"
        );
        assert!(
            m.declare("windows", "h", Kind::Gauge, vec!["topic".into()], vec![])
                .is_err()
        );
        m.update(c, vec!["a".into()], Op::Add(2.0), 2).unwrap();
        m.update(c, vec!["a".into()], Op::Add(1.0), 2).unwrap();
        m.update(c, vec!["b".into()], Op::Add(1.0), 2).unwrap();
        let e = m.update(c, vec!["c".into()], Op::Add(1.0), 2).unwrap_err();
        assert!(e.contains("maxSeries"), "{e}");
        assert_eq!(m.refused, 1);
        assert!(m.update(c, vec!["a".into()], Op::Add(-1.0), 2).is_err());
        assert!(m.update(c, vec!["a".into()], Op::Set(1.0), 2).is_err());
        assert!(m.update(c, vec![], Op::Add(1.0), 2).is_err());
        assert_eq!(
            m.declared[0].series[&vec!["a".to_string()]],
            Value::Number(3.0)
        );
        let h = m
            .declare("lag", "", Kind::Histogram, vec![], vec![1.0, 2.0])
            .unwrap();
        assert!(m.update(h, vec![], Op::Observe(1.5), 3).is_ok());
        assert_eq!(
            m.declared[1].series[&Vec::<String>::new()],
            Value::Histogram {
                counts: vec![0, 1],
                sum: 1.5,
                count: 1
            }
        );
        assert!(
            m.declare("bad", "", Kind::Histogram, vec![], vec![2.0, 1.0])
                .is_err()
        );
    }
}
