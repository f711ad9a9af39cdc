//! `fan-out`: splits a JSON array payload into one message per element.
//!
//! Config: `{ "indexTopic": false, "notArray": "pass" }`
//! - `indexTopic`: publish element `i` to `<target>/<i>` instead of `<target>`.
//! - `notArray`: a payload that is not a JSON array is `pass`ed unchanged (default) or `drop`ped.
//!
//! Each element is serialized as JSON. An empty array drops the message.

use std::cell::Cell;

use edgebridge_mapper_sdk::*;

thread_local! {
    static INDEX_TOPIC: Cell<bool> = const { Cell::new(false) };
    static DROP_NOT_ARRAY: Cell<bool> = const { Cell::new(false) };
}

/// The messages for one payload, or `None` when it is not a JSON array.
pub fn split(target: &str, payload: &[u8], index_topic: bool) -> Option<Vec<(String, Vec<u8>)>> {
    let Ok(Value::Array(items)) = serde_json::from_slice::<Value>(payload) else {
        return None;
    };
    Some(
        items
            .iter()
            .enumerate()
            .map(|(i, item)| {
                let topic = if index_topic {
                    format!("{target}/{i}")
                } else {
                    target.to_string()
                };
                (topic, item.to_string().into_bytes())
            })
            .collect(),
    )
}

struct FanOut;

impl Mapper for FanOut {
    fn init(config: String) -> Result<(), InitError> {
        let cfg = parse_config(&config)?;
        let obj = cfg
            .as_object()
            .ok_or_else(|| InitError::InvalidConfig("config must be a mapping".into()))?;
        for (k, v) in obj {
            match (k.as_str(), v) {
                ("indexTopic", Value::Bool(b)) => INDEX_TOPIC.with(|c| c.set(*b)),
                ("notArray", Value::String(s)) if s == "pass" || s == "drop" => {
                    DROP_NOT_ARRAY.with(|c| c.set(s == "drop"))
                }
                _ => {
                    return Err(InitError::InvalidConfig(format!(
                        "`{k}`: expected indexTopic: true|false or notArray: pass|drop"
                    )));
                }
            }
        }
        Ok(())
    }

    fn map_message(ctx: Context, msg: Message) -> Result<Decision, String> {
        match split(&ctx.target, &msg.payload, INDEX_TOPIC.with(Cell::get)) {
            Some(parts) => Ok(Decision::Emit(
                parts
                    .into_iter()
                    .map(|(topic, payload)| Emitted::to(topic).with_payload(payload))
                    .collect(),
            )),
            None if DROP_NOT_ARRAY.with(Cell::get) => {
                Ok(Decision::Drop("payload is not a JSON array".into()))
            }
            None => Ok(Decision::Pass),
        }
    }
}

export_mapper!(FanOut);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arrays_split_and_other_payloads_do_not() {
        let parts = split("t", br#"[1,{"a":2},"x"]"#, true).unwrap();
        assert_eq!(parts[1], ("t/1".to_string(), br#"{"a":2}"#.to_vec()));
        assert_eq!(parts.len(), 3);
        assert!(split("t", br#"{"a":1}"#, false).is_none());
        assert_eq!(split("t", b"[]", false).unwrap().len(), 0);
    }
}
