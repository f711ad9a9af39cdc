//! `json-filter`: keeps or drops a message by a field of its JSON payload.
//!
//! Config (every condition given must hold; at least one is required):
//! ```json
//! { "field": "severity", "min": 3 }
//! { "field": "sensor.kind", "equals": "temperature" }
//! { "field": "alarm", "exists": true, "onInvalid": "keep" }
//! ```
//! - `field`: a dotted path into the JSON object (`a.b.c`); required.
//! - `equals`: any JSON value; `min` / `max`: numbers (inclusive); `exists`: true/false.
//! - `onInvalid`: what to do with a payload that is not JSON — `drop` (default) or `keep`.

use edgebridge_plugin_sdk::serde_json::{self, Value};
use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    field: String,
    /// `Some(Value::Null)` for `equals: null`, which `Option<Value>` alone would read as absent.
    #[serde(default, deserialize_with = "present")]
    equals: Option<Value>,
    min: Option<f64>,
    max: Option<f64>,
    exists: Option<bool>,
    #[serde(default)]
    on_invalid: OnInvalid,
}

fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    Value::deserialize(d).map(Some)
}

#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
enum OnInvalid {
    #[default]
    Drop,
    Keep,
}

#[derive(Debug, Clone)]
struct Rule {
    field: Vec<String>,
    equals: Option<Value>,
    min: Option<f64>,
    max: Option<f64>,
    exists: Option<bool>,
    keep_invalid: bool,
}

fn rule_from(cfg: Config) -> Result<Rule, String> {
    if cfg.equals.is_none() && cfg.min.is_none() && cfg.max.is_none() && cfg.exists.is_none() {
        return Err("give at least one condition: equals, min, max or exists".into());
    }
    Ok(Rule {
        field: cfg.field.split('.').map(str::to_string).collect(),
        equals: cfg.equals,
        min: cfg.min,
        max: cfg.max,
        exists: cfg.exists,
        keep_invalid: matches!(cfg.on_invalid, OnInvalid::Keep),
    })
}

fn keep(rule: &Rule, payload: &[u8]) -> bool {
    let Ok(doc) = serde_json::from_slice::<Value>(payload) else {
        return rule.keep_invalid;
    };
    let mut v = Some(&doc);
    for part in &rule.field {
        v = v.and_then(|x| x.get(part));
    }
    if let Some(want) = rule.exists
        && v.is_some() != want
    {
        return false;
    }
    if let Some(eq) = &rule.equals
        && v != Some(eq)
    {
        return false;
    }
    let n = v.and_then(Value::as_f64);
    if let Some(min) = rule.min
        && !n.is_some_and(|n| n >= min)
    {
        return false;
    }
    if let Some(max) = rule.max
        && !n.is_some_and(|n| n <= max)
    {
        return false;
    }
    true
}

struct JsonFilter {
    rule: Rule,
}

impl Filter for JsonFilter {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        let rule = rule_from(config).map_err(InitError::InvalidConfig)?;
        Ok(JsonFilter { rule })
    }

    fn keep(&mut self, _ctx: Context, msg: Message) -> Result<bool, String> {
        Ok(keep(&self.rule, &msg.payload))
    }
}

export_filter!(JsonFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        testing::filter::<JsonFilter>(json).unwrap().rule
    }

    #[test]
    fn min_max_equals_and_exists() {
        let r = rule(r#"{"field":"severity","min":3}"#);
        assert!(keep(&r, br#"{"severity":4}"#));
        assert!(!keep(&r, br#"{"severity":2}"#));
        assert!(!keep(&r, br#"{"other":9}"#));
        assert!(!keep(&r, b"not json"));
        let r = rule(r#"{"field":"a.b","equals":"x","onInvalid":"keep"}"#);
        assert!(keep(&r, br#"{"a":{"b":"x"}}"#));
        assert!(!keep(&r, br#"{"a":{"b":"y"}}"#));
        assert!(keep(&r, b"\xff"));
        let r = rule(r#"{"field":"alarm","exists":false}"#);
        assert!(keep(&r, br#"{"x":1}"#));
        assert!(!keep(&r, br#"{"alarm":1}"#));
        let r = rule(r#"{"field":"a","equals":null}"#);
        assert!(keep(&r, br#"{"a":null}"#));
        assert!(!keep(&r, br#"{"b":1}"#));
    }

    #[test]
    fn bad_configs_are_refused() {
        for bad in [
            r#"{}"#,
            r#"{"field":"a"}"#,
            r#"{"field":"a","min":"x"}"#,
            r#"{"field":"a","mni":1}"#,
            r#"{"field":"a","exists":true,"onInvalid":"maybe"}"#,
        ] {
            assert!(testing::filter::<JsonFilter>(bad).is_err(), "{bad}");
        }
    }
}
