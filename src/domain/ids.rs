//! Typed identifiers, each validated once at the edge.
//!
//! Entity ids are any printable text (dots, slashes, unicode): `skia-rpi-001.example.com` must work.
//! They are encoded into NATS subject tokens by `crate::subject`, never here.

use std::fmt;

/// The longest entity id accepted, in bytes. Encoded ids can triple in length and NATS subjects
/// should stay well under the server's 4 KiB control-line limit.
pub const MAX_ID_BYTES: usize = 256;

/// The longest command id or principal accepted, in bytes.
pub const MAX_TOKEN_BYTES: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{what} must not be empty")]
    Empty { what: &'static str },
    #[error("{what} is {len} bytes long, the limit is {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    #[error("{what} contains a control character at byte {at}")]
    ControlCharacter { what: &'static str, at: usize },
    #[error("{what} must not start or end with white space")]
    SurroundingWhitespace { what: &'static str },
    #[error("{what} must be {rule}")]
    Pattern {
        what: &'static str,
        rule: &'static str,
    },
}

/// Checks the rules every id shares: non-empty, bounded, printable, no surrounding white space.
pub fn validate_text(what: &'static str, value: &str, max: usize) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { what });
    }
    if value.len() > max {
        return Err(IdError::TooLong {
            what,
            len: value.len(),
            max,
        });
    }
    if let Some((at, _)) = value.char_indices().find(|(_, c)| c.is_control()) {
        return Err(IdError::ControlCharacter { what, at });
    }
    if value.trim() != value {
        return Err(IdError::SurroundingWhitespace { what });
    }
    Ok(())
}

/// An identifier of one entity of one kind.
pub trait EntityId:
    Clone + fmt::Debug + fmt::Display + Eq + std::hash::Hash + Ord + Send + Sync + Unpin + 'static
{
    fn parse(value: &str) -> Result<Self, IdError>;
    fn as_str(&self) -> &str;
}

/// A DNS label's shape: lower-case letters, digits and '-', starting and ending with a letter
/// or digit (the length is the id's own limit).
pub fn dns_label(value: &str) -> bool {
    let bytes = value.as_bytes();
    let edge = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    bytes.first().is_some_and(edge)
        && bytes.last().is_some_and(edge)
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Declares a validated string newtype: serde and JSON Schema go through the same check.
/// Every one is printable text within a length; with `shape`, it must also pass a function,
/// which JSON Schema states as `pattern`.
#[macro_export]
macro_rules! text_id {
    ($(#[$meta:meta])* $name:ident, $what:literal, $max:expr) => {
        $crate::text_id!(@impl $(#[$meta])* $name, $what, $max,
            |_: &str| true,
            "printable text without control characters or surrounding white space",
            "^[^\\s\\x00-\\x1f\\x7f-\\x9f]([^\\x00-\\x1f\\x7f-\\x9f]*[^\\s\\x00-\\x1f\\x7f-\\x9f])?$");
    };
    ($(#[$meta:meta])* $name:ident, $what:literal, $max:expr, dns_label) => {
        $crate::text_id!(@impl $(#[$meta])* $name, $what, $max,
            $crate::domain::ids::dns_label,
            "lower-case letters, digits and '-', starting and ending with a letter or digit",
            "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$");
    };
    (
        $(#[$meta:meta])* $name:ident, $what:literal, $max:expr,
        shape = $shape:expr, rule = $rule:literal, pattern = $pattern:literal
    ) => {
        $crate::text_id!(@impl $(#[$meta])* $name, $what, $max, $shape, $rule, $pattern);
    };
    (@impl $(#[$meta:meta])* $name:ident, $what:literal, $max:expr,
        $shape:expr, $rule:literal, $pattern:literal) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Result<Self, $crate::domain::ids::IdError> {
                let value = value.into();
                $crate::domain::ids::validate_text($what, &value, $max)?;
                let shape: fn(&str) -> bool = $shape;
                if !shape(&value) {
                    return Err($crate::domain::ids::IdError::Pattern { what: $what, rule: $rule });
                }
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl TryFrom<String> for $name {
            type Error = $crate::domain::ids::IdError;
            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::new(value)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl std::str::FromStr for $name {
            type Err = $crate::domain::ids::IdError;
            fn from_str(value: &str) -> Result<Self, Self::Err> {
                Self::new(value)
            }
        }

        impl schemars::JsonSchema for $name {
            fn schema_name() -> std::borrow::Cow<'static, str> {
                stringify!($name).into()
            }
            fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
                schemars::json_schema!({
                    "type": "string",
                    "description": concat!("A ", $what, ": ", $rule, "."),
                    "minLength": 1,
                    "maxLength": $max,
                    "pattern": $pattern
                })
            }
        }
    };
}

/// Declares a [`text_id!`] that is also an [`EntityId`].
#[macro_export]
macro_rules! entity_id {
    ($(#[$meta:meta])* $name:ident, $what:literal) => {
        $crate::text_id!($(#[$meta])* $name, $what, $crate::domain::ids::MAX_ID_BYTES);

        impl $crate::domain::ids::EntityId for $name {
            fn parse(value: &str) -> Result<Self, $crate::domain::ids::IdError> {
                Self::new(value)
            }
            fn as_str(&self) -> &str {
                &self.0
            }
        }
    };
}

text_id!(
    /// Identifies one command across retries: the same id means the same command, applied once.
    CommandId,
    "command id",
    MAX_TOKEN_BYTES
);

text_id!(
    /// Who asked for a change, as recorded on its events.
    Principal,
    "principal",
    MAX_TOKEN_BYTES
);

impl Principal {
    pub fn anonymous() -> Self {
        Self("anonymous".to_owned())
    }

    /// The control plane itself, for commands issued by reapers and reconcilers.
    pub fn system() -> Self {
        Self("switchyard".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    entity_id!(TestId, "test id");

    #[test]
    fn ids_accept_dots_slashes_and_unicode() {
        for ok in [
            "skia-rpi-001.example.com",
            "rack/4/slot 2",
            "ünïcødé-机器",
            "a",
        ] {
            assert!(TestId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn ids_reject_empty_control_and_padding() {
        assert_eq!(TestId::new(""), Err(IdError::Empty { what: "test id" }));
        assert!(matches!(
            TestId::new("a\nb"),
            Err(IdError::ControlCharacter { at: 1, .. })
        ));
        assert!(matches!(
            TestId::new(" a"),
            Err(IdError::SurroundingWhitespace { .. })
        ));
        assert!(matches!(
            TestId::new("x".repeat(257)),
            Err(IdError::TooLong { len: 257, .. })
        ));
        assert!(TestId::new("x".repeat(256)).is_ok());
    }

    #[test]
    fn ids_validate_when_deserialized() {
        let err = serde_json::from_str::<TestId>("\"\\u0000\"").unwrap_err();
        assert!(err.to_string().contains("control character"), "{err}");
        let id: TestId = serde_json::from_str("\"a.b\"").unwrap();
        assert_eq!(id.as_str(), "a.b");
    }
}
