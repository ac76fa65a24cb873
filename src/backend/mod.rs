//! Backend actors: the only code that changes the world outside the log (processes today;
//! Kubernetes, cloud instances and SSH hosts later).
//!
//! The contract every backend keeps, whatever it drives:
//!
//! - **Observe** what exists for an owner. Everything a backend makes carries the Switchyard
//!   instance id and its owner (an entity: kind and id), so it finds its own by them after a
//!   crash, and leaves everything else alone.
//! - **Plan** what to do from the owner's recorded state and what was observed: pure, in the
//!   domain (`domain::sessions::plan` for sessions), table-tested.
//! - **Execute** each action under an idempotency key, (owner, step): a step executed twice
//!   with one key acts once, and the second call answers what the first did.
//! - **Report** outcomes back as commands to the owner. The owner records the intent before
//!   the effect and the outcome after, so a crash in between is settled by observing.
//!
//! Every call runs in a span whose parent is the trace stored on the event that caused it, with
//! errors recorded on the span. Calls take as long as they take; they run in reactions' jobs,
//! never in an entity actor's mailbox.

pub mod process;

use std::time::Duration;

use tokio::io::AsyncWriteExt;

/// Who a resource belongs to: this Switchyard (its instance id) and one entity.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Owner {
    pub instance: String,
    pub kind: String,
    pub id: String,
}

/// The idempotency key of one step: the same owner and step name, the same effect.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct StepKey {
    pub owner: Owner,
    /// Names the resource the step makes, unique within the owner (a component's name).
    pub name: String,
}

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The request can never succeed as given (a program that does not exist, a bad name):
    /// the owner should record it as a failure, not retry.
    #[error("{what}: {reason}")]
    Refused { what: String, reason: String },
    /// The backend may not do it (Kubernetes RBAC): the owner records it as a failure; an
    /// operator grants what is missing.
    #[error("{what}: forbidden: {reason}")]
    Forbidden { what: String, reason: String },
    /// The backend is out of reach or overloaded, even after retries: retry later.
    #[error("{what} is unavailable: {reason}")]
    Unavailable { what: String, reason: String },
    /// The backend itself failed (a disk, a permission): retry later.
    #[error("{what}")]
    Failed {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl BackendError {
    pub fn failed(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
        let what = what.into();
        move |source| BackendError::Failed { what, source }
    }
}

pub type Result<T, E = BackendError> = std::result::Result<T, E>;

/// Writes a secret (a private key) to `path` whole, readable by its owner only from the start:
/// written aside, created with mode 0600, then moved into place.
pub async fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    let partial = path.with_extension("partial");
    let what = format!("cannot write {}", path.display());
    let _ = tokio::fs::remove_file(&partial).await;
    let mut file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .await
        .map_err(BackendError::failed(what.clone()))?;
    file.write_all(bytes)
        .await
        .map_err(BackendError::failed(what.clone()))?;
    file.sync_all()
        .await
        .map_err(BackendError::failed(what.clone()))?;
    tokio::fs::rename(&partial, path)
        .await
        .map_err(BackendError::failed(what))
}

/// Removes `dir` and everything in it; one that is gone is removed.
pub async fn remove_dir(dir: &std::path::Path) -> Result<()> {
    match tokio::fs::remove_dir_all(dir).await {
        Ok(()) => Ok(()),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(err) => Err(BackendError::Failed {
            what: format!("cannot delete {}", dir.display()),
            source: err,
        }),
    }
}

/// Whether a TCP connection to `address` succeeds within `timeout`: a readiness check.
pub async fn tcp_ready(address: &str, timeout: Duration) -> std::result::Result<(), String> {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(address)).await {
        Ok(Ok(mut stream)) => {
            let _ = stream.shutdown().await;
            Ok(())
        }
        Ok(Err(err)) => Err(format!("cannot connect to {address}: {err}")),
        Err(_) => Err(format!("no connection to {address} within {timeout:?}")),
    }
}
