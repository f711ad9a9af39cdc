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

use std::cell::RefCell;

use edgebridge_filter_sdk::*;

#[derive(Debug, Clone, Default)]
struct Rule {
    field: Vec<String>,
    equals: Option<Value>,
    min: Option<f64>,
    max: Option<f64>,
    exists: Option<bool>,
    keep_invalid: bool,
}

thread_local! {
    static RULE: RefCell<Rule> = RefCell::new(Rule::default());
}

fn rule_from(cfg: &Value) -> Result<Rule, String> {
    let obj = cfg.as_object().ok_or("config must be a mapping")?;
    for key in obj.keys() {
        if !["field", "equals", "min", "max", "exists", "onInvalid"].contains(&key.as_str()) {
            return Err(format!(
                "unknown field `{key}`; expected field, equals, min, max, exists, onInvalid"
            ));
        }
    }
    let field = obj
        .get("field")
        .and_then(Value::as_str)
        .ok_or("`field` (a string) is required")?;
    let number = |k: &str| -> Result<Option<f64>, String> {
        match obj.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or(format!("`{k}` must be a number")),
        }
    };
    let rule = Rule {
        field: field.split('.').map(str::to_string).collect(),
        equals: obj.get("equals").cloned(),
        min: number("min")?,
        max: number("max")?,
        exists: match obj.get("exists") {
            None => None,
            Some(v) => Some(v.as_bool().ok_or("`exists` must be true or false")?),
        },
        keep_invalid: match obj.get("onInvalid").map(|v| v.as_str()) {
            None | Some(Some("drop")) => false,
            Some(Some("keep")) => true,
            _ => return Err("`onInvalid` must be \"drop\" or \"keep\"".into()),
        },
    };
    if rule.equals.is_none() && rule.min.is_none() && rule.max.is_none() && rule.exists.is_none() {
        return Err("give at least one condition: equals, min, max or exists".into());
    }
    Ok(rule)
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

struct JsonFilter;

impl Filter for JsonFilter {
    fn init(config: String) -> Result<(), InitError> {
        let rule = rule_from(&parse_config(&config)?).map_err(InitError::InvalidConfig)?;
        RULE.with(|r| *r.borrow_mut() = rule);
        Ok(())
    }

    fn keep(_ctx: Context, msg: Message) -> Result<bool, String> {
        Ok(RULE.with(|r| keep(&r.borrow(), &msg.payload)))
    }
}

export_filter!(JsonFilter);

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(json: &str) -> Rule {
        rule_from(&serde_json::from_str(json).unwrap()).unwrap()
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
    }

    #[test]
    fn bad_configs_are_refused() {
        for bad in [
            r#"{}"#,
            r#"{"field":"a"}"#,
            r#"{"field":"a","min":"x"}"#,
            r#"{"field":"a","mni":1}"#,
        ] {
            assert!(
                rule_from(&serde_json::from_str(bad).unwrap()).is_err(),
                "{bad}"
            );
        }
    }
}
