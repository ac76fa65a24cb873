//! The driver contract (seed 003, arvados `lib/cloud/interfaces.go`): a driver, chosen by name
//! in configuration, makes an instance set from its configuration and an instance-set id; the
//! set creates, lists (filtered by tags), destroys and re-tags instances, and may verify an
//! instance's host key. Errors are typed ([`DriverError`]) so the throttles know what to hold.
//!
//! [`super::stub::StubDriver`] is the tests' and benchmarks' driver.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::domain::Timestamp;
use crate::domain::cloud::throttle::{CapacityScope, DriverErrorKind};

/// The tags Switchyard puts on every instance it creates (arvados's `InstanceSetID`,
/// `InstanceType`, `IdleBehavior` and `InstanceSecret`). An instance set adopts what carries
/// its id and leaves everything else alone.
pub mod tag {
    pub const INSTANCE_SET: &str = "switchyard-instance-set";
    pub const INSTANCE_TYPE: &str = "switchyard-instance-type";
    pub const IDLE_BEHAVIOR: &str = "switchyard-idle-behavior";
    pub const INSTANCE_SECRET: &str = "switchyard-instance-secret";
}

/// What to create.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceSpec {
    pub instance_type: String,
    pub image: String,
    pub tags: BTreeMap<String, String>,
    /// Run once when it boots (it writes the instance secret); under 1 KiB.
    pub init_command: String,
    /// The one key that may log in (an OpenSSH public key line).
    pub public_key: String,
}

/// An instance, as the driver lists it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub instance_type: String,
    pub tags: BTreeMap<String, String>,
    /// `host:port` of its SSH server, once it has one.
    pub address: Option<String>,
    pub remote_user: String,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DriverError {
    #[error("rate limited until {earliest_retry}: {message}")]
    RateLimited {
        earliest_retry: Timestamp,
        message: String,
    },
    #[error("at quota: {message}")]
    Quota { message: String },
    #[error("no capacity for {scope:?}: {message}")]
    Capacity {
        scope: CapacityScope,
        message: String,
    },
    #[error("not implemented by this driver")]
    NotImplemented,
    #[error("{message}")]
    Failed { message: String },
    #[error("unknown driver {name:?}; known: {known}")]
    UnknownDriver { name: String, known: String },
    #[error("invalid driver configuration: {message}")]
    InvalidConfig { message: String },
}

impl DriverError {
    /// What the throttles make of it.
    pub fn kind(&self) -> DriverErrorKind {
        match self {
            DriverError::RateLimited { earliest_retry, .. } => DriverErrorKind::RateLimited {
                earliest_retry: *earliest_retry,
            },
            DriverError::Quota { .. } => DriverErrorKind::Quota,
            DriverError::Capacity { scope, .. } => DriverErrorKind::Capacity {
                scope: scope.clone(),
            },
            DriverError::NotImplemented => DriverErrorKind::NotImplemented,
            DriverError::Failed { .. }
            | DriverError::UnknownDriver { .. }
            | DriverError::InvalidConfig { .. } => DriverErrorKind::Other,
        }
    }
}

pub type Result<T, E = DriverError> = std::result::Result<T, E>;

/// One set of instances, owned by one instance-set id.
pub trait InstanceSet: Send + Sync + 'static {
    fn create<'a>(&'a self, spec: &'a InstanceSpec) -> BoxFuture<'a, Result<Instance>>;
    /// The instances carrying every one of `tags`.
    fn instances<'a>(
        &'a self,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Vec<Instance>>>;
    fn destroy<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<()>>;
    fn set_tags<'a>(
        &'a self,
        id: &'a str,
        tags: &'a BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<()>>;
    /// Whether `host_key` (an OpenSSH public key line) is the instance's; `NotImplemented`
    /// when the driver cannot tell (the instance secret is checked instead).
    fn verify_host_key<'a>(&'a self, id: &'a str, host_key: &'a str) -> BoxFuture<'a, Result<()>>;
    /// Releases what the set holds in this process (not the instances).
    fn stop(&self);
}

/// Makes instance sets.
pub trait Driver: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    fn instance_set(
        &self,
        config: &serde_json::Value,
        set_id: &str,
    ) -> Result<Arc<dyn InstanceSet>>;
}

/// What every driver requires of an instance-set id: that there is one.
pub fn check_set_id(set_id: &str) -> Result<()> {
    if set_id.is_empty() {
        return Err(DriverError::InvalidConfig {
            message: "an instance set needs an id".into(),
        });
    }
    Ok(())
}

/// The drivers configuration may name.
#[derive(Clone, Default)]
pub struct Registry {
    drivers: BTreeMap<&'static str, Arc<dyn Driver>>,
}

impl Registry {
    pub fn register(&mut self, driver: Arc<dyn Driver>) {
        self.drivers.insert(driver.name(), driver);
    }

    pub fn get(&self, name: &str) -> Result<Arc<dyn Driver>> {
        self.drivers
            .get(name)
            .cloned()
            .ok_or_else(|| DriverError::UnknownDriver {
                name: name.to_owned(),
                known: self.drivers.keys().copied().collect::<Vec<_>>().join(", "),
            })
    }
}

/// The operations a driver is called for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Operation {
    Create,
    Instances,
    Destroy,
    SetTags,
    VerifyHostKey,
}

/// A driver's `driver_config`, parsed: `null` is `{}`; unknown fields are refused.
pub fn parse_config<T: serde::de::DeserializeOwned>(
    driver: &str,
    config: &serde_json::Value,
) -> Result<T> {
    let config = if config.is_null() {
        serde_json::json!({})
    } else {
        config.clone()
    };
    serde_json::from_value(config).map_err(|err| DriverError::InvalidConfig {
        message: format!("{driver}: {err}"),
    })
}
