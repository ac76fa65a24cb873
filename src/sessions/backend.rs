//! Session backends: what the executor delegates a session's components to.
//!
//! A backend starts a component (idempotently: what it has already started is not started
//! again), says what it has of a session's components, runs a readiness command, reads a
//! component's output, removes everything of a session, and lists the sessions it has
//! anything of (for pruning). Everything it makes carries this Switchyard's instance id.
//!
//! [`LocalSessions`], the embedded default, runs each component as a local process through the
//! process backend; `super::kubernetes` runs each as a pod.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use crate::backend::Result;
use crate::backend::process::{ProcessBackend, ProcessSpec, ProcessState};
use crate::backend::{Owner, StepKey};
use crate::domain::Aggregate;
use crate::domain::sessions::plan::Observed;
use crate::domain::sessions::session::Session;
use crate::domain::sessions::spec::ComponentSpec;
use crate::domain::sessions::{ComponentName, MachineName, SessionId};

/// Some bytes of a component's output, and its whole length.
pub type Chunk = (Vec<u8>, u64);

/// The contract every session backend keeps.
pub trait SessionBackend: Send + Sync + 'static {
    /// The backend's name, as configuration selects it.
    fn name(&self) -> &'static str;

    /// What it has of each component of `session`; one it has nothing of is absent.
    fn observe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<BTreeMap<ComponentName, Observed>>>;

    /// Starts `component` with `env` added on `machine` (the scheduler's placement), unless it
    /// has it already; its address, once known (a backend that learns it later reports it
    /// through [`observe`](Self::observe)).
    fn start<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentSpec,
        machine: Option<&'a MachineName>,
        env: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Option<String>>>;

    /// Runs a readiness command for `component`; why it failed.
    fn check<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentName,
        command: &'a str,
        args: &'a [String],
        env: &'a BTreeMap<String, String>,
        timeout: Duration,
    ) -> BoxFuture<'a, std::result::Result<(), String>>;

    /// Up to `max` bytes of `component`'s output from `offset`, and its whole length; none if
    /// the backend has nothing of it.
    fn output<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentName,
        offset: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<Chunk>>>;

    /// Stops and removes everything of `session`; removing what is gone succeeds.
    fn remove<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, Result<()>>;

    /// The sessions it has anything of, and when each last changed.
    fn sessions(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>>;
}

/// The embedded default: each component a local process (the process backend).
#[derive(Clone)]
pub struct LocalSessions {
    processes: ProcessBackend,
}

impl LocalSessions {
    pub fn new(processes: ProcessBackend) -> Self {
        Self { processes }
    }

    fn owner(&self, session: &SessionId) -> Owner {
        self.processes.owner(Session::KIND, session.as_str())
    }

    fn key(&self, session: &SessionId, component: &ComponentName) -> StepKey {
        StepKey {
            owner: self.owner(session),
            name: component.to_string(),
        }
    }
}

impl SessionBackend for LocalSessions {
    fn name(&self) -> &'static str {
        "local"
    }

    fn observe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<BTreeMap<ComponentName, Observed>>> {
        Box::pin(async move {
            let found = self.processes.observe(&self.owner(session)).await?;
            Ok(found
                .into_iter()
                .filter_map(|p| {
                    let name = ComponentName::new(p.name.clone()).ok()?;
                    let seen = match p.state {
                        ProcessState::Running => Observed::Running {
                            address: p.address.unwrap_or_default(),
                        },
                        ProcessState::Exited(code) => Observed::Exited {
                            address: p.address.unwrap_or_default(),
                            code,
                        },
                        ProcessState::Vanished(why) => Observed::Vanished {
                            address: p.address,
                            why,
                        },
                    };
                    Some((name, seen))
                })
                .collect())
        })
    }

    fn start<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentSpec,
        // Every machine of the process backend is this host.
        _machine: Option<&'a MachineName>,
        env: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let process = ProcessSpec {
                command: component.command.clone(),
                args: component.args.clone(),
                env,
                ports: Vec::new(),
            };
            let started = self
                .processes
                .start(&self.key(session, &component.name), &process)
                .await?;
            Ok(started.address)
        })
    }

    fn check<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentName,
        command: &'a str,
        args: &'a [String],
        env: &'a BTreeMap<String, String>,
        timeout: Duration,
    ) -> BoxFuture<'a, std::result::Result<(), String>> {
        Box::pin(async move {
            self.processes
                .check(&self.key(session, component), command, args, env, timeout)
                .await
        })
    }

    fn output<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentName,
        offset: u64,
        max: usize,
    ) -> BoxFuture<'a, Result<Option<Chunk>>> {
        Box::pin(async move {
            self.processes
                .output(&self.key(session, component), offset, max)
                .await
        })
    }

    fn remove<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move { self.processes.remove(&self.owner(session)).await })
    }

    fn sessions(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            Ok(self
                .processes
                .owners(Session::KIND)
                .await?
                .into_iter()
                .map(|(owner, at)| (owner.id, at))
                .collect())
        })
    }
}
