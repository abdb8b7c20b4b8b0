//! Peer filters: `peers --name REGEX --tag KEY=REGEX --state S`, and the
//! same query parameters on `GET /v1/peers` (like Serf's `members -name
//! -tag -status`).
//!
//! A regex matches the whole name or tag value (it is anchored, as in
//! Serf), so a plain value is an exact match and `web-.*` a prefix match.
//! Regexes are compiled with the `regex` crate, which matches in linear
//! time; a compiled size limit ([`REGEX_SIZE_LIMIT`]) keeps a hostile
//! pattern from costing the node memory. Both the CLI (a usage error, exit
//! 2, before anything is sent) and the API (400) compile through
//! [`anchored`], so they accept and refuse the same patterns.

use proto::control::PeersQuery;
use proto::membership::Peer;
use regex::{Regex, RegexBuilder};

/// Largest compiled regex, in bytes.
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// `pattern`, compiled to match a whole string; the error is one line.
pub fn anchored(pattern: &str) -> Result<Regex, String> {
    RegexBuilder::new(&format!("^(?:{pattern})$"))
        .size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            // The syntax error's last line says what is wrong (the lines
            // before it draw the pattern with a caret).
            regex::Error::Syntax(text) => {
                let what = text.lines().last().unwrap_or("invalid").trim();
                what.strip_prefix("error: ").unwrap_or(what).to_string()
            }
            regex::Error::CompiledTooBig(limit) => {
                format!("the compiled pattern exceeds {limit} bytes")
            }
            other => other.to_string(),
        })
}

/// A [`PeersQuery`], compiled.
#[derive(Debug, Clone)]
pub struct PeerFilter {
    state: Option<String>,
    name: Option<Regex>,
    tags: Vec<(String, Regex)>,
}

impl PeerFilter {
    /// Compiles the query's patterns; the error names the parameter.
    pub fn new(q: &PeersQuery) -> Result<PeerFilter, String> {
        let name = q
            .name
            .as_deref()
            .map(|p| anchored(p).map_err(|e| format!("name: invalid regex: {e}")))
            .transpose()?;
        let tags = q
            .tags
            .iter()
            .map(|(k, p)| {
                anchored(p)
                    .map(|re| (k.clone(), re))
                    .map_err(|e| format!("tag {k}: invalid regex: {e}"))
            })
            .collect::<Result<_, _>>()?;
        Ok(PeerFilter {
            state: q.state.clone(),
            name,
            tags,
        })
    }

    /// Whether `p` passes every part of the filter.
    pub fn matches(&self, p: &Peer) -> bool {
        self.state.as_deref().is_none_or(|s| p.state.as_str() == s)
            && self.name.as_ref().is_none_or(|re| re.is_match(&p.name))
            && self
                .tags
                .iter()
                .all(|(k, re)| p.tags.get(k).is_some_and(|v| re.is_match(v)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_whole_strings() {
        let re = anchored("db").unwrap();
        assert!(re.is_match("db") && !re.is_match("db-1") && !re.is_match("mydb"));
        let re = anchored("web-[0-9]+|api").unwrap();
        assert!(re.is_match("web-12") && re.is_match("api") && !re.is_match("web-"));
        assert!(
            !re.is_match("web-1api"),
            "the alternation is inside the anchors"
        );
    }

    #[test]
    fn bad_patterns_are_one_line_errors() {
        for bad in ["(", "[a-", "a{99999999}"] {
            let e = anchored(bad).unwrap_err();
            assert_eq!(e.lines().count(), 1, "{bad}: {e}");
            assert!(!e.is_empty());
        }
        assert!(anchored("(").unwrap_err().contains("unclosed"));
        let q = PeersQuery {
            tags: vec![("role".into(), "(".into())],
            ..PeersQuery::default()
        };
        assert!(PeerFilter::new(&q)
            .unwrap_err()
            .starts_with("tag role: invalid regex"));
    }
}
