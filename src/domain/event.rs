//! Versioned events: every event type has a name and a schema version, and old versions are
//! upcast to the current one when read.
//!
//! An aggregate lists its events once with [`event_set!`](crate::event_set); the table names each
//! type, its current version, and the older versions with the struct that decodes them. Upcasts
//! are plain `From<Old> for New` impls next to the structs.

use schemars::{Schema, SchemaGenerator};
use serde::Serialize;
use serde::de::DeserializeOwned;

/// The name and schema version of one event type, e.g. `counter.created` v2.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct EventType {
    pub name: &'static str,
    pub version: u16,
}

/// A serde format the store encodes event data with. Implemented by the codec adapter; the
/// domain only names it, so no encoding library leaks in here.
pub trait Format {
    fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, FormatError>;
    fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError>;
}

/// Why a format could not encode or decode a value; carries the format library's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct FormatError(pub String);

#[derive(Debug, thiserror::Error)]
pub enum EventCodecError {
    #[error("unknown event type {name} version {version}")]
    UnknownType { name: String, version: u16 },
    #[error("malformed data for event {name} version {version}")]
    Malformed {
        name: String,
        version: u16,
        #[source]
        source: FormatError,
    },
    #[error("cannot encode event {name}")]
    Encode {
        name: &'static str,
        #[source]
        source: FormatError,
    },
}

/// The events of one aggregate: a closed enum with a versioned wire form per variant.
pub trait DomainEvent: Clone + std::fmt::Debug + PartialEq + Send + Sync + 'static {
    /// Every event type and version this enum can decode, current and old.
    fn known_types() -> Vec<EventType>;
    /// The type of this event at its current schema version.
    fn event_type(&self) -> EventType;
    fn encode<F: Format>(&self) -> Result<Vec<u8>, EventCodecError>;
    /// Decodes the data of `name` at `version`, upcasting old versions to the current one.
    fn decode<F: Format>(name: &str, version: u16, data: &[u8]) -> Result<Self, EventCodecError>;
    /// The JSON Schema of the data of `name` at `version`, for `schemas/`.
    fn schema(name: &str, version: u16, generator: &mut SchemaGenerator) -> Option<Schema>;
}

/// Declares an aggregate's event enum and its [`DomainEvent`] impl from one table:
///
/// ```ignore
/// event_set! {
///     pub enum CounterEvent {
///         Created(Created) = "counter.created" @ 2 older { 1 => CreatedV1 },
///         Added(Added) = "counter.added" @ 1,
///     }
/// }
/// ```
///
/// Each `older` struct must implement `Into` the current struct: that is the upcast.
#[macro_export]
macro_rules! event_set {
    (
        $(#[$meta:meta])*
        pub enum $name:ident {
            $(
                $(#[$vmeta:meta])*
                $variant:ident($data:ty) = $type_name:literal @ $version:literal
                $(older { $($old_version:literal => $old:ty),+ $(,)? })?
            ),+ $(,)?
        }
    ) => {
        $(#[$meta])*
        #[derive(Clone, Debug, PartialEq)]
        pub enum $name {
            $( $(#[$vmeta])* $variant($data), )+
        }

        impl $crate::domain::event::DomainEvent for $name {
            fn known_types() -> Vec<$crate::domain::event::EventType> {
                vec![$(
                    $crate::domain::event::EventType { name: $type_name, version: $version },
                    $($( $crate::domain::event::EventType { name: $type_name, version: $old_version }, )+)?
                )+]
            }

            fn event_type(&self) -> $crate::domain::event::EventType {
                match self {
                    $( Self::$variant(_) => $crate::domain::event::EventType { name: $type_name, version: $version }, )+
                }
            }

            fn encode<F: $crate::domain::event::Format>(&self) -> Result<Vec<u8>, $crate::domain::event::EventCodecError> {
                match self {
                    $( Self::$variant(data) => F::encode(data).map_err(|source| {
                        $crate::domain::event::EventCodecError::Encode { name: $type_name, source }
                    }), )+
                }
            }

            fn decode<F: $crate::domain::event::Format>(
                name: &str,
                version: u16,
                data: &[u8],
            ) -> Result<Self, $crate::domain::event::EventCodecError> {
                let malformed = |source| $crate::domain::event::EventCodecError::Malformed {
                    name: name.to_owned(),
                    version,
                    source,
                };
                $(
                    if name == $type_name {
                        if version == $version {
                            return F::decode::<$data>(data).map(Self::$variant).map_err(malformed);
                        }
                        $($(
                            if version == $old_version {
                                return F::decode::<$old>(data)
                                    .map(|old| Self::$variant(<$data>::from(old)))
                                    .map_err(malformed);
                            }
                        )+)?
                    }
                )+
                Err($crate::domain::event::EventCodecError::UnknownType { name: name.to_owned(), version })
            }

            fn schema(
                name: &str,
                version: u16,
                generator: &mut schemars::SchemaGenerator,
            ) -> Option<schemars::Schema> {
                $(
                    if name == $type_name {
                        if version == $version {
                            return Some(generator.root_schema_for::<$data>());
                        }
                        $($(
                            if version == $old_version {
                                return Some(generator.root_schema_for::<$old>());
                            }
                        )+)?
                    }
                )+
                None
            }
        }
    };
}
