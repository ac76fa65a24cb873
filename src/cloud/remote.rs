//! Session components on cloud instances: the process backend's contract kept over the SSH
//! executor. On the instance, a component is a directory
//! `$SWITCHYARD_HOME/sessions/<session>/<component>/` made once (its `mkdir` is the step's
//! idempotency key, as on the process backend), holding `port` (its `PORT`), `pid` (its own
//! session and process group, written by itself), `out` (stdout and stderr) and, once it ends,
//! `exit`. Removing a session stops every group (SIGTERM, then SIGKILL after the grace) and
//! deletes the directory.
//!
//! [`Routed`] is the sessions' backend when cloud pools exist: components placed on a cloud
//! pool's machines (workers) go to [`RemoteSessions`], every other to the configured backend.
//! Which machine a component is on comes from the session's own record (its placement).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use super::ssh::Executor;
use crate::backend::{BackendError, Result};
use crate::domain::sessions::plan::Observed;
use crate::domain::sessions::session::Session;
use crate::domain::sessions::spec::ComponentSpec;
use crate::domain::sessions::{ComponentName, MachineName, PoolName, SessionId};
use crate::runtime::{Clock, EntityTable, ProjectionHandle};
use crate::sessions::backend::{Chunk, SessionBackend};
use crate::subject::encode_token;

/// Where a machine (a worker) is reached: its executor and the host its components listen on.
pub trait Machines: Send + Sync + 'static {
    fn reach(&self, machine: &MachineName) -> Option<(Arc<Executor>, String)>;
    /// Every machine reachable now.
    fn all(&self) -> Vec<MachineName>;
}

/// The directory of a session on an instance, as a shell expression.
fn session_dir(session: &SessionId) -> String {
    format!(
        "\"${{SWITCHYARD_HOME:-/var/lib/switchyard}}/sessions/\"{}",
        quote(&encode_token(session.as_str()))
    )
}

/// The directory of a session's component on an instance, as a shell expression.
fn component_dir(session: &SessionId, component: &ComponentName) -> String {
    format!(
        "{}/{}",
        session_dir(session),
        quote(&encode_token(component.as_str()))
    )
}

/// `text` as one shell word.
pub fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// Starts a component unless its directory exists; prints its port either way.
const START: &str = r#"set -e
mkdir -p "$base"
dir="$base/$component"
if ! mkdir "$dir" 2>/dev/null; then
  for _ in 1 2 3 4 5 6 7 8 9 10; do [ -f "$dir/port" ] && break; sleep 0.1; done
  cat "$dir/port"; exit 0
fi
cd "$dir"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])' 2>/dev/null \
  || echo $((20000 + $(od -An -N2 -tu2 /dev/urandom) % 40000)))
echo "$port" > port.tmp && mv port.tmp port
PORT=$port; export PORT
setsid sh -c 'echo $$ > pid.tmp && mv pid.tmp pid; "$@" >> out 2>&1 < /dev/null; echo $? > exit.tmp; mv exit.tmp exit' sh "$@" > /dev/null 2>&1 < /dev/null &
i=0; while [ ! -f pid ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
echo "$port"
"#;

/// One line per component: `<name> <port> running|exited <code>|vanished`.
const OBSERVE: &str = r#"[ -d "$base" ] || exit 0
for dir in "$base"/*/; do
  [ -d "$dir" ] || continue
  name=$(basename "$dir")
  port=$(cat "$dir/port" 2>/dev/null || echo 0)
  pid=$(cat "$dir/pid" 2>/dev/null || echo)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then echo "$name $port running"
  elif [ -f "$dir/exit" ]; then echo "$name $port exited $(cat "$dir/exit")"
  elif [ -z "$pid" ]; then echo "$name $port running"
  else echo "$name $port vanished"; fi
done
"#;

/// Stops every component's group, then deletes the session's directory.
const REMOVE: &str = r#"[ -d "$base" ] || exit 0
groups=$(cat "$base"/*/pid 2>/dev/null || true)
for g in $groups; do kill -TERM -"$g" 2>/dev/null || true; done
i=0
while [ $i -lt "$grace" ]; do
  alive=0; for g in $groups; do kill -0 -"$g" 2>/dev/null && alive=1; done
  [ $alive = 0 ] && break; sleep 0.1; i=$((i + 1))
done
for g in $groups; do kill -KILL -"$g" 2>/dev/null || true; done
rm -rf "$base"
"#;

/// The output's length, then up to `max` bytes of it from `offset`.
const OUTPUT: &str = r#"[ -d "$dir" ] || exit 3
[ -f "$dir/out" ] || { echo 0; exit 0; }
wc -c < "$dir/out"
tail -c +$((offset + 1)) "$dir/out" | head -c "$max"
"#;

/// Ends every component on the instance (each leads its own process group) and deletes the
/// sessions' directories: what a machine's end, or a static host's release, does to them.
pub const END_ALL: &str = r#"home="${SWITCHYARD_HOME:-/var/lib/switchyard}"
for g in $(cat "$home"/sessions/*/*/pid 2>/dev/null); do kill -KILL -"$g" 2>/dev/null || true; done
rm -rf "$home/sessions"
"#;

/// Every session directory with its age in seconds.
const SESSIONS: &str = r#"root="${SWITCHYARD_HOME:-/var/lib/switchyard}/sessions"
[ -d "$root" ] || exit 0
now=$(date +%s)
for dir in "$root"/*/; do [ -d "$dir" ] && echo "$(basename "$dir") $((now - $(stat -c %Y "$dir")))"; done
"#;

/// Components on the instances of cloud pools, over SSH.
pub struct RemoteSessions {
    machines: Arc<dyn Machines>,
    sessions: ProjectionHandle<EntityTable<Session>>,
    stop_grace: Duration,
    clock: Clock,
}

fn unavailable(what: impl Into<String>, reason: impl std::fmt::Display) -> BackendError {
    BackendError::Unavailable {
        what: what.into(),
        reason: reason.to_string(),
    }
}

impl RemoteSessions {
    pub fn new(
        machines: Arc<dyn Machines>,
        sessions: ProjectionHandle<EntityTable<Session>>,
        stop_grace: Duration,
        clock: Clock,
    ) -> Self {
        Self {
            machines,
            sessions,
            stop_grace,
            clock,
        }
    }

    fn reach(&self, machine: &MachineName) -> Result<(Arc<Executor>, String)> {
        self.machines.reach(machine).ok_or_else(|| {
            unavailable(
                format!("machine {machine}"),
                "it is not a ready worker of a cloud pool",
            )
        })
    }

    /// Runs `script` on `machine` with `variables` set before it; its stdout, or why not.
    async fn run(
        &self,
        machine: &MachineName,
        variables: &[(&str, String)],
        script: &str,
        args: &[String],
    ) -> Result<(Option<u32>, Vec<u8>)> {
        let (executor, _) = self.reach(machine)?;
        let mut command = String::new();
        for (name, value) in variables {
            command.push_str(&format!("{name}={}; ", value));
        }
        command.push_str(&format!("set -- {}; ", join(args)));
        command.push_str(script);
        let output = executor
            .execute(&format!("sh -c {} sh", quote(&command)), b"")
            .await
            .map_err(|e| unavailable(format!("machine {machine}"), e))?;
        Ok((output.status, output.stdout))
    }

    /// The machines the session's components are on, by component.
    async fn placement(&self, session: &SessionId) -> BTreeMap<ComponentName, MachineName> {
        self.placed(session).await.unwrap_or_default()
    }

    /// The same; none when the log has no such session.
    async fn placed(&self, session: &SessionId) -> Option<BTreeMap<ComponentName, MachineName>> {
        let id = session.clone();
        self.sessions
            .ask(move |table, _| match table.get(&id).map(|row| &row.state) {
                Some(Session::Present(record)) => Some(
                    record
                        .placement
                        .iter()
                        .map(|(c, p)| (c.clone(), p.machine.clone()))
                        .collect(),
                ),
                _ => None,
            })
            .await
            .ok()
            .flatten()
    }

    async fn observe_on(
        &self,
        session: &SessionId,
        machine: &MachineName,
    ) -> Result<BTreeMap<ComponentName, Observed>> {
        let (_, host) = self.reach(machine)?;
        let (_, out) = self
            .run(machine, &[("base", session_dir(session))], OBSERVE, &[])
            .await?;
        let mut found = BTreeMap::new();
        for line in String::from_utf8_lossy(&out).lines() {
            let mut words = line.split_whitespace();
            let (Some(name), Some(port), Some(state)) = (words.next(), words.next(), words.next())
            else {
                continue;
            };
            let Ok(name) =
                ComponentName::new(crate::subject::decode_token(name).unwrap_or_default())
            else {
                continue;
            };
            let address = format!("{host}:{port}");
            let seen = match state {
                "running" => Observed::Running { address },
                "exited" => Observed::Exited {
                    address,
                    code: words.next().and_then(|c| c.parse().ok()).unwrap_or(-1),
                },
                _ => Observed::Vanished {
                    address: Some(address),
                    why: format!("its process on {machine} is gone and left no exit code"),
                },
            };
            found.insert(name, seen);
        }
        Ok(found)
    }
}

/// Words as one shell list.
fn join(words: &[String]) -> String {
    words.iter().map(|w| quote(w)).collect::<Vec<_>>().join(" ")
}

impl SessionBackend for RemoteSessions {
    fn name(&self) -> &'static str {
        "cloud"
    }

    fn observe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<BTreeMap<ComponentName, Observed>>> {
        Box::pin(async move {
            let machines: BTreeSet<MachineName> =
                self.placement(session).await.into_values().collect();
            let mut found = BTreeMap::new();
            for machine in machines {
                if self.machines.reach(&machine).is_none() {
                    continue;
                }
                found.extend(self.observe_on(session, &machine).await?);
            }
            Ok(found)
        })
    }

    fn start<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentSpec,
        machine: Option<&'a MachineName>,
        env: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            let Some(machine) = machine else {
                return Err(BackendError::Refused {
                    what: format!("cannot start component {}", component.name),
                    reason: "a cloud pool's component needs a machine".into(),
                });
            };
            let (_, host) = self.reach(machine)?;
            let variables = [
                ("base", session_dir(session)),
                ("component", quote(&encode_token(component.name.as_str()))),
            ];
            // Its variables reach the component alone, through env(1), never the script
            // (a variable named `base` or `component` cannot move where it runs).
            let mut args = vec!["env".to_owned()];
            args.extend(
                env.into_iter()
                    .map(|(name, value)| format!("{name}={value}")),
            );
            args.push(component.command.clone());
            args.extend(component.args.iter().cloned());
            let (status, out) = self.run(machine, &variables, START, &args).await?;
            if status != Some(0) {
                return Err(unavailable(
                    format!("cannot start component {} on {machine}", component.name),
                    format!("the start script exited with {status:?}"),
                ));
            }
            let port = String::from_utf8_lossy(&out).trim().to_owned();
            Ok((!port.is_empty()).then(|| format!("{host}:{port}")))
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
            let placement = self.placement(session).await;
            let Some(machine) = placement.get(component) else {
                return Err(format!("component {component} has no machine"));
            };
            let dir = component_dir(session, component);
            let mut script = format!("cd {dir} && PORT=$(cat port) && export PORT && ");
            for (name, value) in env {
                script.push_str(&format!("{name}={}; export {name}; ", quote(value)));
            }
            script.push_str("exec \"$@\"");
            let mut words = vec![command.to_owned()];
            words.extend(args.iter().cloned());
            match tokio::time::timeout(timeout, self.run(machine, &[], &script, &words)).await {
                Ok(Ok((Some(0), _))) => Ok(()),
                Ok(Ok((status, _))) => Err(format!("the check {command} exited with {status:?}")),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!("the check {command} took longer than {timeout:?}")),
            }
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
            let placement = self.placement(session).await;
            let Some(machine) = placement.get(component) else {
                return Ok(None);
            };
            let dir = component_dir(session, component);
            let (status, out) = self
                .run(
                    machine,
                    &[
                        ("dir", dir),
                        ("offset", offset.to_string()),
                        ("max", max.to_string()),
                    ],
                    OUTPUT,
                    &[],
                )
                .await?;
            if status == Some(3) {
                return Ok(None);
            }
            let split = out.iter().position(|b| *b == b'\n').unwrap_or(out.len());
            let length = String::from_utf8_lossy(&out[..split])
                .trim()
                .parse::<u64>()
                .unwrap_or(0);
            let data = out.get(split + 1..).unwrap_or_default().to_vec();
            Ok(Some((data, length)))
        })
    }

    fn remove<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // An orphan the log does not know: wherever it may be.
            let machines: BTreeSet<MachineName> = match self.placed(session).await {
                Some(placed) => placed.into_values().collect(),
                None => self.machines.all().into_iter().collect(),
            };
            let grace = (self.stop_grace.as_millis() / 100).max(1).to_string();
            for machine in machines {
                // A machine that is gone took the session's processes with it.
                if self.machines.reach(&machine).is_none() {
                    continue;
                }
                self.run(
                    &machine,
                    &[("base", session_dir(session)), ("grace", grace.clone())],
                    REMOVE,
                    &[],
                )
                .await?;
            }
            Ok(())
        })
    }

    fn sessions(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            let nanos = u64::try_from((self.clock)().unix_nanos()).unwrap_or(0);
            let now = SystemTime::UNIX_EPOCH + Duration::from_nanos(nanos);
            let mut found = Vec::new();
            for machine in self.machines.all() {
                let Ok((_, out)) = self.run(&machine, &[], SESSIONS, &[]).await else {
                    continue;
                };
                for line in String::from_utf8_lossy(&out).lines() {
                    let Some((name, age)) = line.split_once(' ') else {
                        continue;
                    };
                    let (Ok(id), Ok(age)) = (
                        crate::subject::decode_token(name),
                        age.trim().parse::<u64>(),
                    ) else {
                        continue;
                    };
                    let at = now
                        .checked_sub(Duration::from_secs(age))
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    found.push((id, at));
                }
            }
            Ok(found)
        })
    }
}

/// Where the remote backend is put once the cloud capability has started (after sessions).
#[derive(Clone, Default)]
pub struct RemoteSlot(pub Arc<OnceLock<Arc<dyn SessionBackend>>>);

/// The sessions' backend with cloud pools: by pool, remote or the configured one.
pub struct Routed {
    pub local: Arc<dyn SessionBackend>,
    pub remote: RemoteSlot,
    pub cloud_pools: BTreeSet<PoolName>,
    pub sessions: ProjectionHandle<EntityTable<Session>>,
}

impl Routed {
    fn remote(&self) -> Result<&Arc<dyn SessionBackend>> {
        self.remote.0.get().ok_or_else(|| {
            unavailable(
                "the cloud pools' backend",
                "the cloud capability has not started",
            )
        })
    }

    /// The backend of `component` of `session`: the remote one if it was placed on a cloud
    /// pool.
    async fn of(
        &self,
        session: &SessionId,
        component: &ComponentName,
    ) -> Result<&Arc<dyn SessionBackend>> {
        let (id, component) = (session.clone(), component.clone());
        let pools = self.cloud_pools.clone();
        let on_cloud = self
            .sessions
            .ask(move |table, _| match table.get(&id).map(|row| &row.state) {
                Some(Session::Present(record)) => record
                    .placement
                    .get(&component)
                    .is_some_and(|p| pools.contains(&p.pool)),
                _ => false,
            })
            .await
            .unwrap_or(false);
        if on_cloud {
            self.remote()
        } else {
            Ok(&self.local)
        }
    }
}

impl SessionBackend for Routed {
    fn name(&self) -> &'static str {
        self.local.name()
    }

    fn observe<'a>(
        &'a self,
        session: &'a SessionId,
    ) -> BoxFuture<'a, Result<BTreeMap<ComponentName, Observed>>> {
        Box::pin(async move {
            let mut found = self.local.observe(session).await?;
            found.extend(self.remote()?.observe(session).await?);
            Ok(found)
        })
    }

    fn start<'a>(
        &'a self,
        session: &'a SessionId,
        component: &'a ComponentSpec,
        machine: Option<&'a MachineName>,
        env: BTreeMap<String, String>,
    ) -> BoxFuture<'a, Result<Option<String>>> {
        Box::pin(async move {
            if self.cloud_pools.contains(&component.pool) {
                self.remote()?.start(session, component, machine, env).await
            } else {
                self.local.start(session, component, machine, env).await
            }
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
            let backend = self
                .of(session, component)
                .await
                .map_err(|e| e.to_string())?;
            backend
                .check(session, component, command, args, env, timeout)
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
            let backend = self.of(session, component).await?;
            backend.output(session, component, offset, max).await
        })
    }

    fn remove<'a>(&'a self, session: &'a SessionId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.local.remove(session).await?;
            self.remote()?.remove(session).await
        })
    }

    fn sessions(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            let mut found = self.local.sessions().await?;
            found.extend(self.remote()?.sessions().await?);
            Ok(found)
        })
    }
}
