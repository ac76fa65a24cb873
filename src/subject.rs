//! NATS subjects: the one module that builds them, and the reversible encoding of entity ids
//! into subject tokens (and KV keys).
//!
//! Layout, under a configurable prefix (default `sy`):
//! - `<prefix>.evt.<kind>.<entity>`: events, one subject per entity (the consistency boundary);
//! - `<prefix>.api.<kind>.<verb>`: request/reply commands and queries;
//! - `<prefix>.cmd.<kind>.<verb>`: fire-and-forget commands, captured by a work-queue stream;
//! - `<prefix>.result.<command>`: the outcome of each fire-and-forget command (core NATS).
//!
//! An id token keeps `A-Z a-z 0-9 - _` and writes every other byte of its UTF-8 form as `=XX`
//! (upper-case hex), so `skia-rpi-001.example.com` becomes `skia-rpi-001=2Eexample=2Ecom`. The
//! result is a valid subject token and a valid KV key, and decoding accepts only that canonical
//! form, so the mapping is a bijection.

use std::fmt::Write;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject prefix {prefix:?} is not dot-separated tokens of A-Z a-z 0-9 - _")]
    InvalidPrefix { prefix: String },
    #[error("token {token:?} is empty")]
    EmptyToken { token: String },
    #[error("token {token:?} has a stray or malformed escape at byte {at}")]
    BadEscape { token: String, at: usize },
    #[error("token {token:?} escapes a byte that is written plainly, at byte {at}")]
    NonCanonical { token: String, at: usize },
    #[error("token {token:?} does not decode to UTF-8")]
    NotUtf8 { token: String },
}

fn is_plain(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'-' || b == b'_'
}

/// Encodes any string into one subject token; empty input gives an empty (invalid) token, so
/// callers validate ids first.
pub fn encode_token(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for &b in id.as_bytes() {
        if is_plain(b) {
            out.push(b as char);
        } else {
            // Writing into a String cannot fail.
            let _ = write!(out, "={b:02X}");
        }
    }
    out
}

/// The inverse of [`encode_token`], strict: only canonical encodings decode.
pub fn decode_token(token: &str) -> Result<String, SubjectError> {
    if token.is_empty() {
        return Err(SubjectError::EmptyToken {
            token: token.to_owned(),
        });
    }
    let bytes = token.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_plain(b) {
            out.push(b);
            i += 1;
            continue;
        }
        let bad = || SubjectError::BadEscape {
            token: token.to_owned(),
            at: i,
        };
        if b != b'=' || i + 3 > bytes.len() {
            return Err(bad());
        }
        let hex = &bytes[i + 1..i + 3];
        if !hex
            .iter()
            .all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h))
        {
            return Err(bad());
        }
        let text = std::str::from_utf8(hex).map_err(|_| bad())?;
        let value = u8::from_str_radix(text, 16).map_err(|_| bad())?;
        if is_plain(value) {
            return Err(SubjectError::NonCanonical {
                token: token.to_owned(),
                at: i,
            });
        }
        out.push(value);
        i += 3;
    }
    String::from_utf8(out).map_err(|_| SubjectError::NotUtf8 {
        token: token.to_owned(),
    })
}

/// Builds and parses every subject Switchyard uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subjects {
    prefix: String,
}

/// The default prefix, `sy`.
impl Default for Subjects {
    fn default() -> Self {
        Self {
            prefix: "sy".to_owned(),
        }
    }
}

impl Subjects {
    pub fn new(prefix: &str) -> Result<Self, SubjectError> {
        let valid = !prefix.is_empty()
            && prefix
                .split('.')
                .all(|t| !t.is_empty() && t.bytes().all(is_plain));
        if !valid {
            return Err(SubjectError::InvalidPrefix {
                prefix: prefix.to_owned(),
            });
        }
        Ok(Self {
            prefix: prefix.to_owned(),
        })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn event(&self, kind: &str, id: &str) -> String {
        format!("{}.evt.{kind}.{}", self.prefix, encode_token(id))
    }

    pub fn events_of_kind(&self, kind: &str) -> String {
        format!("{}.evt.{kind}.*", self.prefix)
    }

    pub fn all_events(&self) -> String {
        format!("{}.evt.>", self.prefix)
    }

    pub fn api(&self, kind: &str, verb: &str) -> String {
        format!("{}.api.{kind}.{verb}", self.prefix)
    }

    pub fn all_api(&self) -> String {
        format!("{}.api.>", self.prefix)
    }

    pub fn command(&self, kind: &str, verb: &str) -> String {
        format!("{}.cmd.{kind}.{verb}", self.prefix)
    }

    pub fn all_commands(&self) -> String {
        format!("{}.cmd.>", self.prefix)
    }

    /// Where requests for the shards of `replica` are forwarded: `<prefix>.replica.<replica>.
    /// api.<kind>.<verb>` (a caller's request, as it came) and `...entity.<kind>` (a command
    /// or read of one entity, from another replica).
    pub fn replica(&self, replica: &str) -> String {
        format!("{}.replica.{replica}", self.prefix)
    }

    pub fn replica_api(&self, replica: &str, kind: &str, verb: &str) -> String {
        format!("{}.replica.{replica}.api.{kind}.{verb}", self.prefix)
    }

    pub fn replica_entity(&self, replica: &str, kind: &str) -> String {
        format!("{}.replica.{replica}.entity.{kind}", self.prefix)
    }

    /// `(channel, rest)` of a subject under `<prefix>.replica.<replica>.`: `("api",
    /// "<kind>.<verb>")` or `("entity", "<kind>")`.
    pub fn parse_replica<'a>(&self, subject: &'a str, replica: &str) -> Option<(&'a str, &'a str)> {
        let rest = self.strip(subject, "replica")?;
        let rest = rest.strip_prefix(replica)?.strip_prefix('.')?;
        rest.split_once('.')
    }

    pub fn result(&self, command_id: &str) -> String {
        format!("{}.result.{}", self.prefix, encode_token(command_id))
    }

    /// `(kind, entity id)` of an event subject.
    pub fn parse_event(&self, subject: &str) -> Option<(String, String)> {
        let rest = self.strip(subject, "evt")?;
        let (kind, token) = rest.split_once('.')?;
        if token.contains('.') {
            return None;
        }
        Some((kind.to_owned(), decode_token(token).ok()?))
    }

    /// `(kind, verb)` of an API subject (`api`) or a fire-and-forget one (`cmd`).
    pub fn parse_route<'a>(&self, subject: &'a str, channel: &str) -> Option<(&'a str, &'a str)> {
        let rest = self.strip(subject, channel)?;
        let (kind, verb) = rest.split_once('.')?;
        (!verb.contains('.') && !kind.is_empty() && !verb.is_empty()).then_some((kind, verb))
    }

    /// `(account, kind, verb)` of a fire-and-forget subject: `<prefix>.cmd.<kind>.<verb>`, or
    /// `<prefix>.cmd.<account>.<kind>.<verb>` when it came through another account's import
    /// that names the account (see `deploy/`).
    pub fn parse_command<'a>(
        &self,
        subject: &'a str,
    ) -> Option<(Option<&'a str>, &'a str, &'a str)> {
        let rest = self.strip(subject, "cmd")?;
        let tokens: Vec<&str> = rest.split('.').collect();
        if tokens.iter().any(|t| t.is_empty()) {
            return None;
        }
        match tokens[..] {
            [kind, verb] => Some((None, kind, verb)),
            [account, kind, verb] => Some((Some(account), kind, verb)),
            _ => None,
        }
    }

    fn strip<'a>(&self, subject: &'a str, channel: &str) -> Option<&'a str> {
        subject
            .strip_prefix(self.prefix.as_str())?
            .strip_prefix('.')?
            .strip_prefix(channel)?
            .strip_prefix('.')
    }
}

/// The snapshot KV key of an entity: `<kind>.<token>`.
pub fn snapshot_key(kind: &str, id: &str) -> String {
    format!("{kind}.{}", encode_token(id))
}

/// Checks an entity kind: a lower-case subject token.
pub fn valid_kind(kind: &str) -> bool {
    let mut bytes = kind.bytes();
    bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// Whether `subject` matches the NATS subject `filter` (`*` is one token, a final `>` one or
/// more), as the server would decide.
pub fn matches(filter: &str, subject: &str) -> bool {
    let mut subject = subject.split('.');
    for token in filter.split('.') {
        match (token, subject.next()) {
            (">", Some(_)) => return true,
            ("*", Some(_)) => {}
            (token, Some(actual)) if token == actual => {}
            _ => return false,
        }
    }
    subject.next().is_none()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn filters_match_as_the_server_does() {
        for (filter, subject, expected) in [
            ("sy.evt.>", "sy.evt.pod.p1", true),
            ("sy.evt.>", "sy.evt", false),
            ("sy.evt.pod.*", "sy.evt.pod.p1", true),
            ("sy.evt.pod.*", "sy.evt.pod.p1.x", false),
            ("sy.evt.pod.*", "sy.evt.meeting_point.p1", false),
            ("sy.evt.pod.*", "sy.evt.pod", false),
            ("sy.evt.pod.p1", "sy.evt.pod.p1", true),
            ("sy.evt.pod.p1", "sy.evt.pod.p2", false),
            ("sy.*.pod.>", "sy.evt.pod.a.b", true),
        ] {
            assert_eq!(matches(filter, subject), expected, "{filter} ~ {subject}");
        }
    }

    #[test]
    fn machine_ids_with_dots_encode_to_one_token() {
        let token = encode_token("skia-rpi-001.example.com");
        assert_eq!(token, "skia-rpi-001=2Eexample=2Ecom");
        assert_eq!(decode_token(&token).unwrap(), "skia-rpi-001.example.com");
    }

    #[test]
    fn decoding_rejects_non_canonical_and_malformed_tokens() {
        assert!(matches!(
            decode_token("=41"),
            Err(SubjectError::NonCanonical { .. })
        ));
        assert!(matches!(
            decode_token("=2e"),
            Err(SubjectError::BadEscape { .. })
        ));
        assert!(matches!(
            decode_token("a="),
            Err(SubjectError::BadEscape { .. })
        ));
        assert!(matches!(
            decode_token("a.b"),
            Err(SubjectError::BadEscape { .. })
        ));
        assert!(matches!(
            decode_token("=FF"),
            Err(SubjectError::NotUtf8 { .. })
        ));
        assert!(matches!(
            decode_token(""),
            Err(SubjectError::EmptyToken { .. })
        ));
    }

    #[test]
    fn subjects_parse_back() {
        let s = Subjects::new("sy").unwrap();
        let subject = s.event("counter", "a.b c/ü");
        assert_eq!(
            s.parse_event(&subject),
            Some(("counter".into(), "a.b c/ü".into()))
        );
        assert_eq!(
            s.parse_route("sy.api.counter.add", "api"),
            Some(("counter", "add"))
        );
        assert_eq!(s.parse_route("sy.api.counter.add.x", "api"), None);
        assert_eq!(s.parse_route("sy.cmd.counter.add", "api"), None);
        assert_eq!(
            s.parse_command("sy.cmd.counter.add"),
            Some((None, "counter", "add"))
        );
        assert_eq!(
            s.parse_command("sy.cmd.APP.counter.add"),
            Some((Some("APP"), "counter", "add"))
        );
        assert_eq!(s.parse_command("sy.cmd.a.b.c.d"), None);
        assert_eq!(s.parse_command("sy.cmd.counter..add"), None);
        assert!(Subjects::new("bad prefix").is_err());
        assert!(Subjects::new("a..b").is_err());
        assert!(Subjects::new("tenant-1.sy").is_ok());
    }

    proptest! {
        #[test]
        fn any_string_round_trips_through_a_valid_token(id in any::<String>().prop_filter("non-empty", |s| !s.is_empty())) {
            let token = encode_token(&id);
            prop_assert!(token.bytes().all(|b| is_plain(b) || b == b'=' || b.is_ascii_hexdigit()));
            prop_assert!(!token.contains('.') && !token.contains('*') && !token.contains('>'));
            prop_assert_eq!(decode_token(&token).unwrap(), id);
        }

        #[test]
        fn decoding_arbitrary_text_never_panics_and_is_canonical(token in "[=A-Za-z0-9._ -]{0,24}") {
            if let Ok(id) = decode_token(&token) {
                prop_assert_eq!(encode_token(&id), token);
            }
        }
    }
}
