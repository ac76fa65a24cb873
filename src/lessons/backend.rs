//! Lesson backends: what the scheduler delegates create, modify and delete to.
//!
//! A backend starts a lesson's endpoints (idempotently: starting what it has already starts
//! nothing), says what it has of a lesson, gives the SSH access its configuration scripts run
//! with, deletes everything of a lesson in one call, and lists the lessons it has anything of
//! (for orphan pruning). Everything it creates carries this Switchyard's instance id.
//!
//! [`LocalBackend`], the embedded default, runs each endpoint as local processes through the
//! process backend: an ssh presentation is a real OpenSSH `sshd` on a loopback port, with its
//! own host key (made by `ssh-keygen` when it first starts) and the lesson's key as the only
//! authorized one; an http presentation is the endpoint's command, or Python's `http.server`
//! over the endpoint's home directory. A login on an endpoint lands in that endpoint's home
//! directory (`<dir>/data/<instance>/<lesson>/<endpoint>`), so what one endpoint's script writes
//! is that endpoint's own.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::{LineEnding, PublicKey};

use crate::backend::process::{ProcessBackend, ProcessSpec, ProcessState};
use crate::backend::{BackendError, Owner, Result, StepKey};
use crate::domain::Aggregate;
use crate::domain::lessons::catalog::{Endpoint, Lesson, PresentationKind};
use crate::domain::lessons::plan::Seen;
use crate::domain::lessons::{EndpointName, LiveLesson, LiveLessonId, LiveSessionId};
use crate::subject::encode_token;

/// How the scheduler logs in to a lesson's endpoints to configure them.
#[derive(Clone)]
pub struct Access {
    pub user: String,
    pub key: Arc<PrivateKey>,
    /// Where the private key is, for people (`ssh -i`), if it is in a file.
    pub key_file: Option<PathBuf>,
}

/// The contract every lesson backend keeps.
pub trait LessonBackend: Send + Sync + 'static {
    /// The backend's name, as configuration selects it.
    fn name(&self) -> &'static str;

    /// What it has of each endpoint of `lesson`; an endpoint it has nothing of is absent.
    fn observe<'a>(
        &'a self,
        id: &'a LiveLessonId,
        lesson: &'a Lesson,
    ) -> BoxFuture<'a, Result<BTreeMap<EndpointName, Seen>>>;

    /// Starts what it does not have of `endpoint` (`session` holds the lesson).
    fn start<'a>(
        &'a self,
        id: &'a LiveLessonId,
        session: &'a LiveSessionId,
        lesson: &'a Lesson,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Result<()>>;

    /// The access configuration scripts run with (made with the lesson's first endpoint).
    fn access<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<Access>>;

    /// The host key `endpoint` presents, if the backend knows it.
    fn host_key<'a>(
        &'a self,
        id: &'a LiveLessonId,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Option<PublicKey>>;

    /// The command that opens a shell on an endpoint's ssh presentation at `address`, for people.
    fn ssh_command(&self, id: &LiveLessonId, address: &str) -> String;

    /// Stops and deletes everything of `id`; deleting what is gone succeeds.
    fn delete<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<()>>;

    /// The lessons it has anything of, and when each last changed.
    fn lessons(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>>;
}

/// The embedded default: local processes on loopback ports.
#[derive(Clone)]
pub struct LocalBackend {
    processes: ProcessBackend,
    data: PathBuf,
    user: String,
}

/// What starts an endpoint's sshd: its host key once, its configuration, then sshd itself.
pub(crate) const SSHD: &str = r#"set -e
[ -f host_key ] || ssh-keygen -q -t ed25519 -N '' -C "$SWITCHYARD_ENDPOINT" -f host_key
cat > sshd_config <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $PWD/host_key
AuthorizedKeysFile $SWITCHYARD_KEYS
PidFile none
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
ForceCommand "$SWITCHYARD_LOGIN"
EOF
exec "$SWITCHYARD_SSHD" -D -e -f "$PWD/sshd_config"
"#;

/// What a login on an endpoint runs (`login-<endpoint>`, next to the endpoint's home): the
/// command asked for, or a shell, in the endpoint's home.
fn login_script(endpoint: &EndpointName) -> String {
    format!(
        "#!/bin/sh\ncd \"$(dirname \"$0\")/{endpoint}\" || exit 1\nHOME=\"$PWD\"\nexport HOME\n\
         if [ -n \"$SSH_ORIGINAL_COMMAND\" ]; then exec /bin/sh -c \"$SSH_ORIGINAL_COMMAND\"; fi\n\
         exec /bin/sh -l\n"
    )
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Sshd { port: u16 },
    Http { port: u16 },
    Command { ports: Vec<u16> },
}

/// The processes of an endpoint, by step name (`<endpoint>.<what>`).
fn parts(endpoint: &Endpoint) -> Vec<(String, Part)> {
    let mut parts = Vec::new();
    for p in &endpoint.presentations {
        if p.kind == PresentationKind::Ssh {
            parts.push((
                format!("{}.{}", endpoint.name, p.name),
                Part::Sshd { port: p.port },
            ));
        }
    }
    let served: Vec<u16> = endpoint
        .presentations
        .iter()
        .filter(|p| p.kind == PresentationKind::Http)
        .map(|p| p.port)
        .chain(endpoint.additional_ports.iter().copied())
        .collect();
    if endpoint.command.is_empty() {
        for p in &endpoint.presentations {
            if p.kind == PresentationKind::Http {
                parts.push((
                    format!("{}.{}", endpoint.name, p.name),
                    Part::Http { port: p.port },
                ));
            }
        }
    } else if !served.is_empty() {
        parts.push((
            format!("{}.command", endpoint.name),
            Part::Command { ports: served },
        ));
    }
    parts
}

/// OpenSSH's `sshd`, where Debian puts it or on `PATH`.
pub fn sshd_binary() -> Option<PathBuf> {
    ["/usr/sbin/sshd", "/usr/local/sbin/sshd"]
        .into_iter()
        .map(PathBuf::from)
        .chain(
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join("sshd"))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default(),
        )
        .find(|p| p.is_file())
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackendError {
    BackendError::failed(what.into())
}

impl LocalBackend {
    /// Keeps its processes in `<dir>/processes` and lessons' keys and homes in `<dir>/data`.
    pub fn new(dir: &Path, instance: &str, stop_grace: Duration) -> Self {
        Self {
            processes: ProcessBackend::new(dir.join("processes"), instance, stop_grace),
            data: dir.join("data").join(encode_token(instance)),
            user: current_user(),
        }
    }

    fn owner(&self, id: &LiveLessonId) -> Owner {
        self.processes.owner(LiveLesson::KIND, id.as_str())
    }

    /// The lesson's own directory: its key, and a home per endpoint.
    pub fn lesson_dir(&self, id: &LiveLessonId) -> PathBuf {
        self.data.join(id.as_str())
    }

    fn key_file(&self, id: &LiveLessonId) -> PathBuf {
        self.lesson_dir(id).join("id_ed25519")
    }

    /// The lesson's key pair, made once: the private key (0600) and `authorized_keys`.
    async fn ensure_key(&self, id: &LiveLessonId) -> Result<()> {
        let dir = self.lesson_dir(id);
        let path = self.key_file(id);
        if tokio::fs::metadata(&path).await.is_ok() {
            return Ok(());
        }
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(io(format!("cannot create {}", dir.display())))?;
        let key = crate::tunnel::keys::generate().map_err(|e| BackendError::Refused {
            what: "cannot make the lesson's key".into(),
            reason: e.to_string(),
        })?;
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| BackendError::Refused {
                what: "cannot encode the lesson's key".into(),
                reason: e.to_string(),
            })?;
        let public = crate::tunnel::keys::canonical(key.public_key()).map_err(|e| {
            BackendError::Refused {
                what: "cannot encode the lesson's key".into(),
                reason: e.to_string(),
            }
        })?;
        tokio::fs::write(dir.join("authorized_keys"), format!("{public}\n"))
            .await
            .map_err(io("cannot write authorized_keys"))?;
        crate::backend::write_private(&path, private.as_bytes()).await
    }

    async fn prepare_home(&self, id: &LiveLessonId, endpoint: &EndpointName) -> Result<PathBuf> {
        let dir = self.lesson_dir(id);
        let home = dir.join(endpoint.as_str());
        tokio::fs::create_dir_all(&home)
            .await
            .map_err(io(format!("cannot create {}", home.display())))?;
        let login = dir.join(format!("login-{endpoint}"));
        if tokio::fs::metadata(&login).await.is_err() {
            let partial = dir.join(format!("login-{endpoint}.partial"));
            tokio::fs::write(&partial, login_script(endpoint))
                .await
                .map_err(io("cannot write the login script"))?;
            tokio::fs::set_permissions(&partial, std::fs::Permissions::from_mode(0o755))
                .await
                .map_err(io("cannot write the login script"))?;
            tokio::fs::rename(&partial, &login)
                .await
                .map_err(io("cannot write the login script"))?;
        }
        Ok(home)
    }

    async fn start_endpoint(
        &self,
        id: &LiveLessonId,
        lesson: &Lesson,
        name: &EndpointName,
    ) -> Result<()> {
        let Some(endpoint) = lesson.endpoint(name) else {
            return Err(BackendError::Refused {
                what: format!("cannot start endpoint {name}"),
                reason: "the lesson has no such endpoint".into(),
            });
        };
        let parts = parts(endpoint);
        if parts.is_empty() {
            return Err(BackendError::Refused {
                what: format!("cannot start endpoint {name}"),
                reason: "it has only additional ports and no command: the local backend has \
                         nothing to serve them"
                    .into(),
            });
        }
        self.ensure_key(id).await?;
        let home = self.prepare_home(id, name).await?;
        let dir = self.lesson_dir(id);
        for (step, part) in parts {
            let mut env = BTreeMap::from([
                ("SWITCHYARD_LESSON".to_owned(), id.to_string()),
                ("SWITCHYARD_ENDPOINT".to_owned(), name.to_string()),
            ]);
            let spec = match &part {
                Part::Sshd { .. } => {
                    let Some(sshd) = sshd_binary() else {
                        return Err(BackendError::Refused {
                            what: format!("cannot start the sshd of endpoint {name}"),
                            reason: "OpenSSH's sshd is not installed (Debian: openssh-server)"
                                .into(),
                        });
                    };
                    if nix::unistd::geteuid().is_root() {
                        // OpenSSH's privilege separation directory, missing where the service
                        // never ran.
                        let _ = tokio::fs::create_dir_all("/run/sshd").await;
                    }
                    env.insert("SWITCHYARD_SSHD".into(), sshd.display().to_string());
                    env.insert(
                        "SWITCHYARD_KEYS".into(),
                        dir.join("authorized_keys").display().to_string(),
                    );
                    env.insert(
                        "SWITCHYARD_LOGIN".into(),
                        dir.join(format!("login-{name}")).display().to_string(),
                    );
                    ProcessSpec {
                        command: "/bin/sh".into(),
                        args: vec!["-c".into(), SSHD.into()],
                        env,
                        ports: Vec::new(),
                    }
                }
                Part::Http { .. } => ProcessSpec {
                    command: "/bin/sh".into(),
                    args: vec![
                        "-c".into(),
                        r#"exec python3 -m http.server --bind 127.0.0.1 --directory "$SWITCHYARD_HOME" "$PORT""#.into(),
                    ],
                    env: {
                        env.insert("SWITCHYARD_HOME".into(), home.display().to_string());
                        env
                    },
                    ports: Vec::new(),
                },
                Part::Command { ports } => {
                    // `PORT` is its first port; every port is `PORT_<the lesson's port>`.
                    let first = ports.first().copied().unwrap_or_default();
                    let mut args = vec![
                        "-c".into(),
                        format!("PORT=\"$PORT_{first}\"; export PORT; exec \"$0\" \"$@\""),
                    ];
                    args.extend(endpoint.command.iter().cloned());
                    env.insert("HOME".into(), home.display().to_string());
                    ProcessSpec {
                        command: "/bin/sh".into(),
                        args,
                        env,
                        ports: ports.iter().map(u16::to_string).collect(),
                    }
                }
            };
            let key = StepKey {
                owner: self.owner(id),
                name: step,
            };
            self.processes.start(&key, &spec).await?;
        }
        Ok(())
    }

    async fn observe_lesson(
        &self,
        id: &LiveLessonId,
        lesson: &Lesson,
    ) -> Result<BTreeMap<EndpointName, Seen>> {
        let owner = self.owner(id);
        let found: BTreeMap<String, _> = self
            .processes
            .observe(&owner)
            .await?
            .into_iter()
            .map(|p| (p.name.clone(), p))
            .collect();
        let mut seen = BTreeMap::new();
        for endpoint in &lesson.endpoints {
            let parts = parts(endpoint);
            let mut addresses = BTreeMap::new();
            let mut present = 0;
            let mut failed = None;
            for (step, part) in &parts {
                let Some(process) = found.get(step) else {
                    continue;
                };
                present += 1;
                let why = match &process.state {
                    ProcessState::Running => None,
                    ProcessState::Exited(code) => Some(format!("{step} exited with code {code}")),
                    ProcessState::Vanished(why) => Some(format!("{step} is gone: {why}")),
                };
                if let Some(why) = why {
                    if failed.is_none() {
                        let key = StepKey {
                            owner: owner.clone(),
                            name: step.clone(),
                        };
                        failed = Some((why, self.tail(&key).await));
                    }
                    continue;
                }
                match part {
                    Part::Sshd { port } | Part::Http { port } => {
                        if let Some(address) = &process.address {
                            addresses.insert(*port, address.clone());
                        }
                    }
                    Part::Command { ports } => {
                        for port in ports {
                            if let Some(local) = process.ports.get(&port.to_string()) {
                                addresses.insert(*port, format!("127.0.0.1:{local}"));
                            }
                        }
                    }
                }
            }
            let state = if let Some((why, output)) = failed {
                Seen::Failed { why, output }
            } else if present == 0 {
                continue;
            } else if present < parts.len() {
                Seen::Partial
            } else {
                Seen::Running { addresses }
            };
            seen.insert(endpoint.name.clone(), state);
        }
        Ok(seen)
    }

    /// The end of a step's output.
    async fn tail(&self, key: &StepKey) -> String {
        const MAX: u64 = 8192;
        let length = match self.processes.output(key, 0, 0).await {
            Ok(Some((_, length))) => length,
            _ => return String::new(),
        };
        match self
            .processes
            .output(key, length.saturating_sub(MAX), MAX as usize)
            .await
        {
            Ok(Some((data, _))) => String::from_utf8_lossy(&data).into_owned(),
            _ => String::new(),
        }
    }
}

impl LessonBackend for LocalBackend {
    fn name(&self) -> &'static str {
        "local"
    }

    fn observe<'a>(
        &'a self,
        id: &'a LiveLessonId,
        lesson: &'a Lesson,
    ) -> BoxFuture<'a, Result<BTreeMap<EndpointName, Seen>>> {
        Box::pin(self.observe_lesson(id, lesson))
    }

    fn start<'a>(
        &'a self,
        id: &'a LiveLessonId,
        _session: &'a LiveSessionId,
        lesson: &'a Lesson,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(self.start_endpoint(id, lesson, endpoint))
    }

    fn access<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<Access>> {
        Box::pin(async move {
            self.ensure_key(id).await?;
            let path = self.key_file(id);
            let key =
                russh::keys::load_secret_key(&path, None).map_err(|e| BackendError::Refused {
                    what: format!("cannot read the lesson's key {}", path.display()),
                    reason: e.to_string(),
                })?;
            Ok(Access {
                user: self.user.clone(),
                key: Arc::new(key),
                key_file: Some(path),
            })
        })
    }

    fn host_key<'a>(
        &'a self,
        id: &'a LiveLessonId,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Option<PublicKey>> {
        Box::pin(async move {
            // The host key its sshd made, in the step directory of its ssh presentation.
            let lesson_owner = self.owner(id);
            let prefix = format!("{endpoint}.");
            for process in self.processes.observe(&lesson_owner).await.ok()? {
                if !process.name.starts_with(&prefix) {
                    continue;
                }
                let key = StepKey {
                    owner: lesson_owner.clone(),
                    name: process.name,
                };
                let path = self.processes.resource_dir(&key).join("host_key.pub");
                if let Ok(text) = tokio::fs::read_to_string(&path).await {
                    return crate::tunnel::keys::parse_public(&text).ok();
                }
            }
            None
        })
    }

    fn ssh_command(&self, id: &LiveLessonId, address: &str) -> String {
        ssh_command(&self.key_file(id), &self.user, address)
    }

    fn delete<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            self.processes.remove(&self.owner(id)).await?;
            let dir = self.lesson_dir(id);
            crate::backend::remove_dir(&dir).await
        })
    }

    fn lessons(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            let mut found: BTreeMap<String, SystemTime> = self
                .processes
                .owners(LiveLesson::KIND)
                .await?
                .into_iter()
                .map(|(owner, at)| (owner.id, at))
                .collect();
            if let Ok(mut entries) = tokio::fs::read_dir(&self.data).await {
                while let Ok(Some(entry)) = entries.next_entry().await {
                    let Ok(name) = entry.file_name().into_string() else {
                        continue;
                    };
                    let at = entry
                        .metadata()
                        .await
                        .and_then(|m| m.modified())
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    let slot = found.entry(name).or_insert(at);
                    *slot = (*slot).max(at);
                }
            }
            Ok(found.into_iter().collect())
        })
    }
}

/// The command that opens a shell as `user` on the ssh server at `address` with `key_file`.
pub fn ssh_command(key_file: &Path, user: &str, address: &str) -> String {
    let (host, port) = address.rsplit_once(':').unwrap_or((address, "22"));
    format!(
        "ssh -i {} -p {port} -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null {user}@{host}",
        key_file.display()
    )
}

/// The user this Switchyard runs as: who logs in to local endpoints.
fn current_user() -> String {
    nix::unistd::User::from_uid(nix::unistd::getuid())
        .ok()
        .flatten()
        .map(|u| u.name)
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "root".to_owned())
}
