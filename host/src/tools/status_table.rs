//! `edgebridge status`: the `/status` JSON as a table a person reads at a glance (the CLI's
//! rendering, apart from [`crate::status`], which only computes the document).

use std::time::Duration;

use serde_json::Value;

/// Prints `/status` documents as a table a person reads at a glance: one row per route
/// client (states, counts, messages per second between `before` and `now`, last error), then
/// the plugin versions and the last reload.
pub fn render(now: &Value, before: Option<&Value>, interval: Duration) -> String {
    let mut out = String::new();
    let get = |v: &Value, k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
    out.push_str(&format!(
        "edgebridge {}  up {}s  {}  {}\n",
        now["version"].as_str().unwrap_or("?"),
        get(now, "uptime_seconds"),
        if now["healthy"].as_bool() == Some(true) {
            "healthy".to_string()
        } else {
            format!("UNHEALTHY: {}", now["health"].as_str().unwrap_or(""))
        },
        if now["ready"].as_bool() == Some(true) {
            "ready"
        } else {
            "NOT READY"
        },
    ));
    let rows: Vec<Vec<String>> = now["route_clients"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|c| {
            let id = c["client_id"].as_str().unwrap_or("");
            let rate = before
                .and_then(|b| b["route_clients"].as_array())
                .and_then(|l| l.iter().find(|x| x["client_id"] == c["client_id"]))
                .map(|b| {
                    let d = get(c, "forwarded").saturating_sub(get(b, "forwarded"));
                    format!("{:.0}", d as f64 / interval.as_secs_f64().max(0.001))
                })
                .unwrap_or_else(|| "-".into());
            let dropped: u64 = c["dropped"]
                .as_object()
                .map(|m| m.values().filter_map(Value::as_u64).sum())
                .unwrap_or(0);
            let state = |s: &Value| {
                format!(
                    "{} {}",
                    s["side"].as_str().unwrap_or(""),
                    s["state"].as_str().unwrap_or("")
                )
            };
            let error = [&c["source"], &c["target"]]
                .iter()
                .filter_map(|s| s["last_error"]["message"].as_str())
                .next()
                .unwrap_or("")
                .chars()
                .take(60)
                .collect::<String>();
            let waiting = c["waiting_for_plugin"]
                .as_str()
                .map(|p| format!("waits for plugin {p}"))
                .unwrap_or(error);
            vec![
                c["route"].as_str().unwrap_or("").to_string(),
                id.to_string(),
                state(&c["source"]),
                state(&c["target"]),
                get(c, "received").to_string(),
                get(c, "forwarded").to_string(),
                dropped.to_string(),
                get(c, "in_flight").to_string(),
                c["spool"]["messages"]
                    .as_u64()
                    .map_or("-".to_string(), |n| n.to_string()),
                rate,
                waiting,
            ]
        })
        .collect();
    let header: Vec<String> = [
        "ROUTE",
        "CLIENT",
        "SOURCE",
        "TARGET",
        "RECEIVED",
        "FORWARDED",
        "DROPPED",
        "IN FLIGHT",
        "SPOOLED",
        "MSG/S",
        "LAST ERROR",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let widths: Vec<usize> = (0..header.len())
        .map(|i| {
            rows.iter()
                .map(|r| r[i].chars().count())
                .chain([header[i].len()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let line: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    let mut plugins: Vec<String> = Vec::new();
    for c in now["route_clients"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for p in c["plugins"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let line = if p["loaded"].as_bool() == Some(true) {
                format!(
                    "plugin {} v{}  sha256 {}  loaded {}",
                    p["name"].as_str().unwrap_or(""),
                    p["version"],
                    p["sha256"]
                        .as_str()
                        .unwrap_or("")
                        .chars()
                        .take(16)
                        .collect::<String>(),
                    p["loaded_at"].as_str().unwrap_or("")
                )
            } else {
                format!("plugin {} not loaded", p["name"].as_str().unwrap_or(""))
            };
            if !plugins.contains(&line) {
                plugins.push(line);
            }
        }
    }
    for p in plugins {
        out.push_str(&p);
        out.push('\n');
    }
    if let Some(r) = now["config"]["last_reload"].as_object() {
        out.push_str(&format!(
            "last reload {} {}: {}\n",
            r["at"].as_str().unwrap_or(""),
            if r["ok"].as_bool() == Some(true) {
                "applied"
            } else {
                "REFUSED"
            },
            r["summary"].as_str().unwrap_or("")
        ));
        for e in r["errors"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            out.push_str(&format!("  {}\n", e.as_str().unwrap_or("")));
        }
    }
    out
}
