//! MQTT topic names and topic filters: validation and matching (pure, no I/O).

/// Largest topic length MQTT can encode (a two-byte length prefix).
pub const MAX_TOPIC_LEN: usize = 65_535;

/// Why a topic or filter is invalid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// Empty string.
    #[error("must not be empty")]
    Empty,
    /// Longer than MQTT allows.
    #[error("is {0} bytes long, more than MQTT's 65535")]
    TooLong(usize),
    /// Contains U+0000.
    #[error("contains a NUL character")]
    Nul,
    /// A topic name (not a filter) contains `+` or `#`.
    #[error("contains a wildcard ('+' or '#'), which only a source filter may have")]
    Wildcard,
    /// `#` used anywhere but as the whole last level.
    #[error("'#' must be the last level and stand alone in it (e.g. \"a/#\")")]
    MisplacedHash,
    /// `+` sharing a level with other characters.
    #[error("'+' must stand alone in its level (e.g. \"a/+/b\")")]
    MisplacedPlus,
}

fn common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > MAX_TOPIC_LEN {
        return Err(TopicError::TooLong(s.len()));
    }
    if s.contains('\0') {
        return Err(TopicError::Nul);
    }
    Ok(())
}

/// Checks a topic name that messages are published to: no wildcards.
pub fn validate_name(s: &str) -> Result<(), TopicError> {
    common(s)?;
    if s.contains(['+', '#']) {
        return Err(TopicError::Wildcard);
    }
    Ok(())
}

/// Checks a topic filter that is subscribed to: `+` and `#` allowed where MQTT allows them.
pub fn validate_filter(s: &str) -> Result<(), TopicError> {
    common(s)?;
    let levels: Vec<&str> = s.split('/').collect();
    let last = levels.len() - 1;
    for (i, level) in levels.iter().enumerate() {
        if level.contains('#') && (*level != "#" || i != last) {
            return Err(TopicError::MisplacedHash);
        }
        if level.contains('+') && *level != "+" {
            return Err(TopicError::MisplacedPlus);
        }
    }
    Ok(())
}

/// Whether `topic` (a valid topic name) matches `filter` (a valid filter), following MQTT
/// rules: `+` matches one level, `#` matches the parent level and everything below, and
/// topics starting with `$` are not matched by a filter starting with a wildcard.
pub fn matches(filter: &str, topic: &str) -> bool {
    // One pass over the bytes, level by level (runs for every message: no iterators, no
    // allocation). `/` is ASCII, so byte positions are always character boundaries.
    let (f, t) = (filter.as_bytes(), topic.as_bytes());
    if t.first() == Some(&b'$') && matches!(f.first(), Some(b'+' | b'#')) {
        return false;
    }
    let (mut i, mut j) = (0, 0);
    loop {
        // Here both are at the start of a level.
        match f.get(i) {
            Some(b'#') => return true,
            Some(b'+') => {
                i += 1;
                while j < t.len() && t[j] != b'/' {
                    j += 1;
                }
            }
            _ => {
                while i < f.len() && f[i] != b'/' {
                    if t.get(j) != Some(&f[i]) {
                        return false;
                    }
                    i += 1;
                    j += 1;
                }
                if j < t.len() && t[j] != b'/' {
                    return false;
                }
            }
        }
        match (i == f.len(), j == t.len()) {
            (true, true) => return true,
            (true, false) => return false,
            // `a/#` also matches `a`.
            (false, true) => return &f[i..] == b"/#",
            (false, false) => {
                i += 1;
                j += 1;
            }
        }
    }
}

/// A topic (or any text from outside) for a message: at most 100 characters, longer ones cut
/// with their length given, so that a 70,000-byte topic does not fill a log line.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 100;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX).collect();
        format!("{head}… ({} bytes)", s.len())
    }
}

/// The filter to subscribe to for a shared subscription group.
pub fn shared_filter(group: &str, filter: &str) -> String {
    format!("$share/{group}/{filter}")
}

/// MQTT 5 §4.7's level-by-level definition of a match, straight from the specification's
/// wording: the reference [`matches`] is checked against (exhaustively in a unit test, and by
/// the `topic` fuzz target). Slower; not used on the message path.
pub fn matches_by_definition(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let (mut f, mut t) = (filter.split('/'), topic.split('/'));
    loop {
        match (f.next(), t.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(tl)) if fl == tl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_text_is_shortened_with_its_length() {
        assert_eq!(shorten("a/b"), "a/b");
        let long = "x".repeat(70_000);
        let s = shorten(&long);
        assert!(s.ends_with("… (70000 bytes)") && s.len() < 130, "{s}");
    }

    #[test]
    fn names_with_wildcards_are_rejected() {
        assert_eq!(validate_name("a/+/b"), Err(TopicError::Wildcard));
        assert_eq!(validate_name("a/#"), Err(TopicError::Wildcard));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert!(validate_name("factory/telemetry/alert").is_ok());
        assert!(validate_name("/").is_ok());
    }

    #[test]
    fn filters_follow_mqtt_wildcard_placement() {
        assert!(validate_filter("#").is_ok());
        assert!(validate_filter("a/+/b/#").is_ok());
        assert!(validate_filter("+").is_ok());
        assert_eq!(validate_filter("a/#/b"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a#"), Err(TopicError::MisplacedHash));
        assert_eq!(validate_filter("a/b+"), Err(TopicError::MisplacedPlus));
        assert_eq!(validate_filter("a\0b"), Err(TopicError::Nul));
        assert_eq!(
            validate_filter(&"x".repeat(70_000)),
            Err(TopicError::TooLong(70_000))
        );
    }

    #[test]
    fn matching_follows_the_mqtt_rules() {
        assert!(matches("telemetry/#", "telemetry/furnace/temperature"));
        assert!(matches("telemetry/#", "telemetry"));
        assert!(matches(
            "telemetry/+/temperature",
            "telemetry/furnace/temperature"
        ));
        assert!(!matches(
            "telemetry/+/temperature",
            "telemetry/a/b/temperature"
        ));
        assert!(matches("a/+", "a/"));
        assert!(!matches("a/b", "a/b/c"));
        assert!(!matches("a/b/c", "a/b"));
        assert!(matches("#", "anything/at/all"));
        assert!(!matches("#", "$SYS/broker/uptime"));
        assert!(!matches("+/broker", "$SYS/broker"));
        assert!(matches("$SYS/#", "$SYS/broker"));
    }

    /// Every filter and topic of up to 3 levels over a small alphabet (empty levels and `$`
    /// included): the fast matcher agrees with the definition on all of them.
    #[test]
    fn the_byte_matcher_agrees_with_the_definition_exhaustively() {
        let levels = ["", "a", "ab", "b", "$s"];
        let mut topics = vec![];
        for n in 1..=3u32 {
            for k in 0..levels.len().pow(n) {
                let mut parts = vec![];
                let mut x = k;
                for _ in 0..n {
                    parts.push(levels[x % levels.len()]);
                    x /= levels.len();
                }
                topics.push(parts.join("/"));
            }
        }
        let mut filters = topics.clone();
        for t in &topics {
            let parts: Vec<&str> = t.split('/').collect();
            for i in 0..parts.len() {
                let mut p = parts.clone();
                p[i] = "+";
                filters.push(p.join("/"));
                filters.push(format!(
                    "{}#",
                    p[..i].iter().map(|l| format!("{l}/")).collect::<String>()
                ));
            }
        }
        let mut checked = 0;
        for f in filters.iter().filter(|f| validate_filter(f).is_ok()) {
            for t in topics.iter().filter(|t| validate_name(t).is_ok()) {
                assert_eq!(
                    matches(f, t),
                    matches_by_definition(f, t),
                    "filter {f:?} topic {t:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 50_000, "{checked}");
    }
}
