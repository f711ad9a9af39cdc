//! `topic-template`: rewrites the topic from the source topic's levels.
//!
//! Config: `{ "template": "site/{1}/alerts/{3..}" }` where
//! - `{N}` is level N of the source topic (1-based),
//! - `{N..}` is levels N to the end, joined with `/`,
//! - `{#}` is the whole source topic, `{route}` the route name, `{target}` the route's target.
//!
//! Example: source `factory/+/anomaly/#`, message on `factory/line3/anomaly/heat/high`,
//! template `site/{2}/alerts/{4..}` → `site/line3/alerts/heat/high`. The payload is not copied.

use edgebridge_plugin_sdk::*;
use serde::Deserialize;

#[derive(Debug, Clone, PartialEq)]
enum Part {
    Text(String),
    Level(usize),
    From(usize),
    Whole,
    Route,
    Target,
}

/// Parses a template into parts.
fn parse(template: &str) -> Result<Vec<Part>, String> {
    let mut parts = Vec::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        if open > 0 {
            parts.push(Part::Text(rest[..open].to_string()));
        }
        let close = rest[open..]
            .find('}')
            .ok_or_else(|| format!("unclosed '{{' in template \"{template}\""))?
            + open;
        let key = &rest[open + 1..close];
        parts.push(match key {
            "#" => Part::Whole,
            "route" => Part::Route,
            "target" => Part::Target,
            k if k.ends_with("..") => Part::From(level_number(&k[..k.len() - 2], template)?),
            k => Part::Level(level_number(k, template)?),
        });
        rest = &rest[close + 1..];
    }
    if !rest.is_empty() {
        parts.push(Part::Text(rest.to_string()));
    }
    if parts.is_empty() {
        return Err("template is empty".into());
    }
    Ok(parts)
}

fn level_number(k: &str, template: &str) -> Result<usize, String> {
    match k.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!(
            "\"{{{k}}}\" in template \"{template}\" is not {{N}}, {{N..}}, {{#}}, {{route}} or {{target}} (N from 1)"
        )),
    }
}

/// Renders the template for one topic.
fn render(parts: &[Part], topic: &str, route: &str, target: &str) -> Result<String, String> {
    let levels: Vec<&str> = topic.split('/').collect();
    let mut out = String::new();
    for p in parts {
        match p {
            Part::Text(t) => out.push_str(t),
            Part::Level(n) => out.push_str(
                levels
                    .get(n - 1)
                    .ok_or_else(|| format!("topic \"{topic}\" has no level {n}"))?,
            ),
            Part::From(n) => {
                if *n > levels.len() {
                    return Err(format!("topic \"{topic}\" has no level {n}"));
                }
                out.push_str(&levels[n - 1..].join("/"))
            }
            Part::Whole => out.push_str(topic),
            Part::Route => out.push_str(route),
            Part::Target => out.push_str(target),
        }
    }
    Ok(out)
}

/// The route's `config:`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    template: String,
}

struct TopicTemplate {
    parts: Vec<Part>,
}

impl Mapper for TopicTemplate {
    type Config = Config;

    fn new(config: Config) -> Result<Self, InitError> {
        let parts = parse(&config.template).map_err(InitError::InvalidConfig)?;
        Ok(TopicTemplate { parts })
    }

    fn map_message(&mut self, ctx: Context, msg: Message) -> Result<Decision, String> {
        let topic = render(&self.parts, &msg.topic, &ctx.route, &ctx.target)?;
        Ok(Decision::Emit(vec![Emitted::to(topic)]))
    }
}

export_mapper!(TopicTemplate);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_ranges_and_names_render() {
        let p = parse("site/{2}/alerts/{4..}").unwrap();
        assert_eq!(
            render(&p, "factory/line3/anomaly/heat/high", "r", "t").unwrap(),
            "site/line3/alerts/heat/high"
        );
        let p = parse("{route}/{#}").unwrap();
        assert_eq!(render(&p, "a/b", "alerts", "t").unwrap(), "alerts/a/b");
    }

    #[test]
    fn the_plugin_maps_through_the_sdk() {
        let mut p =
            testing::mapper::<TopicTemplate>(r#"{"template": "site/{2}/{route}"}"#).unwrap();
        let d = p
            .map_message(
                Context::new("alerts", "x"),
                Message::new("factory/line3/heat", "{}"),
            )
            .unwrap();
        assert_eq!(d, Decision::Emit(vec![Emitted::to("site/line3/alerts")]));
        assert!(testing::mapper::<TopicTemplate>("{}").is_err());
        assert!(testing::mapper::<TopicTemplate>(r#"{"template": "{0}"}"#).is_err());
    }

    #[test]
    fn bad_templates_and_missing_levels_are_errors() {
        assert!(parse("a/{0}").is_err());
        assert!(parse("a/{x}").is_err());
        assert!(parse("a/{1").is_err());
        let p = parse("{5}").unwrap();
        assert!(
            render(&p, "a/b", "r", "t")
                .unwrap_err()
                .contains("no level 5")
        );
    }
}
