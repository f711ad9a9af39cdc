//! `fan-out`: splits a JSON array payload into one message per element.
//!
//! Config: `{ "indexTopic": false, "notArray": "pass" }`
//! - `indexTopic`: publish element `i` to `<target>/<i>` instead of `<target>`.
//! - `notArray`: a payload that is not a JSON array is `pass`ed unchanged (default) or `drop`ped.
//!
//! Each element is serialized as JSON. An empty array drops the message.

use edgebridge_plugin_sdk::serde_json::{self, Value};
use edgebridge_plugin_sdk::*;
use serde::Deserialize;

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Config {
    #[serde(default)]
    index_topic: bool,
    #[serde(default)]
    not_array: NotArray,
}

#[derive(Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum NotArray {
    #[default]
    Pass,
    Drop,
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

struct FanOut {
    config: Config,
}

impl Mapper for FanOut {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        Ok(FanOut { config })
    }

    fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String> {
        match split(&ctx.target, &msg.payload, self.config.index_topic) {
            Some(parts) => Ok(Decision::Emit(
                parts
                    .into_iter()
                    .map(|(topic, payload)| Emitted::to(topic).payload(payload))
                    .collect(),
            )),
            None if self.config.not_array == NotArray::Drop => {
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

    #[test]
    fn not_arrays_pass_or_drop_as_configured() {
        let mut p = testing::mapper::<FanOut>(r#"{"notArray": "drop"}"#).unwrap();
        let d = p
            .map_message(Context::default().target("t"), Message::new("t", "{}"))
            .unwrap();
        assert!(matches!(d, Decision::Drop(_)));
        let mut p = testing::mapper::<FanOut>("{}").unwrap();
        let d = p
            .map_message(Context::default().target("t"), Message::new("t", "[1]"))
            .unwrap();
        assert_eq!(d, Decision::Emit(vec![Emitted::to("t").payload("1")]));
        assert!(testing::mapper::<FanOut>(r#"{"notArray": "keep"}"#).is_err());
    }
}
