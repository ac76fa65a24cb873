//! The process backend: each resource is a local process in a process group of its own, with
//! its output in a file and its exit code left behind, so that a Switchyard that restarts (or
//! another replica on the same machine) observes it without having started it.
//!
//! What it started is recorded on disk, which is its label:
//! `<dir>/<instance>/<kind>/<owner>/<name>/` holds `label.json` (instance, owner, name, what
//! runs, its port), `pid` (the process group's leader, written by the process itself), `out`
//! (stdout and stderr) and, once it exits, `exit` (its code). The directory is created before
//! the process is started and only if it did not exist: that is the step's idempotency key, so
//! one step never starts two processes, even across a crash.
//!
//! A process is started through `/bin/sh` as a small supervisor that records its pid, runs the
//! command with its output appended to `out`, and writes the exit code once it ends. Stopping
//! sends SIGTERM to the whole group, then SIGKILL after `stop_grace`: nothing it started in its
//! group survives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

use super::{BackendError, Owner, Result, StepKey};
use crate::subject::{decode_token, encode_token};

/// The supervisor: `$0` is the resource's directory, the rest is the command.
const SUPERVISOR: &str = r#"dir="$0"
echo $$ > "$dir/pid.tmp" && mv "$dir/pid.tmp" "$dir/pid"
"$@" >> "$dir/out" 2>&1 < /dev/null
code=$?
echo $code > "$dir/exit.tmp" && mv "$dir/exit.tmp" "$dir/exit"
"#;

/// The variable that names a process's step in its own environment: how a pid is recognised
/// as still being ours after a restart (pids are reused).
const STEP_VARIABLE: &str = "SWITCHYARD_STEP";

/// What to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessSpec {
    pub command: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
    /// More ports to allocate besides `PORT`, by name: each is given as `PORT_<name>`.
    pub ports: Vec<String>,
}

/// What the backend finds of one resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ProcessState {
    Running,
    Exited(i32),
    /// Recorded, but no process runs and none left an exit code, and why.
    Vanished(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub name: String,
    /// `127.0.0.1:<port>`: the port it was given (its `PORT`).
    pub address: Option<String>,
    pub state: ProcessState,
    /// Its process group, while known.
    pub group: Option<i32>,
    /// The ports it was given besides `PORT`, by name.
    pub ports: BTreeMap<String, u16>,
}

/// What `label.json` says.
#[derive(Debug, Serialize, Deserialize)]
struct Label {
    instance: String,
    kind: String,
    owner: String,
    name: String,
    command: String,
    args: Vec<String>,
    port: u16,
    #[serde(default)]
    ports: BTreeMap<String, u16>,
}

#[derive(Debug, Clone)]
pub struct ProcessBackend {
    root: PathBuf,
    instance: String,
    stop_grace: Duration,
}

/// How long `start` waits for the supervisor to record its pid.
const PID_WAIT: Duration = Duration::from_secs(5);

impl ProcessBackend {
    pub fn new(
        root: impl Into<PathBuf>,
        instance: impl Into<String>,
        stop_grace: Duration,
    ) -> Self {
        Self {
            root: root.into(),
            instance: instance.into(),
            stop_grace,
        }
    }

    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// An owner of this instance.
    pub fn owner(&self, kind: &str, id: &str) -> Owner {
        Owner {
            instance: self.instance.clone(),
            kind: kind.to_owned(),
            id: id.to_owned(),
        }
    }

    fn kind_dir(&self, kind: &str) -> PathBuf {
        self.root
            .join(encode_token(&self.instance))
            .join(encode_token(kind))
    }

    fn owner_dir(&self, owner: &Owner) -> PathBuf {
        self.kind_dir(&owner.kind).join(encode_token(&owner.id))
    }

    /// The directory of `key`'s resource (its working directory): files it writes are there.
    pub fn resource_dir(&self, key: &StepKey) -> PathBuf {
        self.owner_dir(&key.owner).join(encode_token(&key.name))
    }

    /// Starts `spec` for `key`, unless this key started something already: then it answers
    /// what that is, and starts nothing.
    pub async fn start(&self, key: &StepKey, spec: &ProcessSpec) -> Result<Process> {
        let dir = self.resource_dir(key);
        let parent = self.owner_dir(&key.owner);
        tokio::fs::create_dir_all(&parent)
            .await
            .map_err(BackendError::failed(format!(
                "cannot create {}",
                parent.display()
            )))?;
        // A program that is not there can never run: said before anything is recorded.
        if tokio::fs::metadata(&dir).await.is_err()
            && !findable(&spec.command, spec.env.get("PATH"))
        {
            return Err(BackendError::Refused {
                what: format!("cannot start {:?}", spec.command),
                reason: "no such program on PATH".to_owned(),
            });
        }
        match tokio::fs::create_dir(&dir).await {
            Ok(()) => {}
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok(observe_one(&dir, &key.name).await);
            }
            Err(err) => {
                return Err(BackendError::Failed {
                    what: format!("cannot create {}", dir.display()),
                    source: err,
                });
            }
        }
        let mut allocated = free_ports(1 + spec.ports.len())
            .map_err(BackendError::failed("cannot find a free port"))?
            .into_iter();
        let port = allocated.next().unwrap_or_default();
        let ports: BTreeMap<String, u16> = spec.ports.iter().cloned().zip(allocated).collect();
        let label = Label {
            instance: key.owner.instance.clone(),
            kind: key.owner.kind.clone(),
            owner: key.owner.id.clone(),
            name: key.name.clone(),
            command: spec.command.clone(),
            args: spec.args.clone(),
            port,
            ports: ports.clone(),
        };
        write_atomic(
            &dir.join("label.json"),
            &serde_json::to_vec(&label).unwrap_or_default(),
        )
        .await
        .map_err(BackendError::failed("cannot record what the process is"))?;
        let mut command = tokio::process::Command::new("/bin/sh");
        command
            .arg("-c")
            .arg(SUPERVISOR)
            .arg(&dir)
            .arg(&spec.command)
            .args(&spec.args)
            .envs(&spec.env)
            .env("PORT", port.to_string())
            .envs(
                ports
                    .iter()
                    .map(|(name, port)| (format!("PORT_{name}"), port.to_string())),
            )
            .env(STEP_VARIABLE, step_value(&dir))
            .current_dir(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            // Its own group: stopped as a whole, and untouched by signals sent to ours.
            .process_group(0)
            .kill_on_drop(false);
        let mut child = command
            .spawn()
            .map_err(BackendError::failed("cannot start /bin/sh"))?;
        // Reap it whenever it ends; its exit code is in the file either way.
        tokio::spawn(async move {
            let _ = child.wait().await;
        });
        let deadline = tokio::time::Instant::now() + PID_WAIT;
        while tokio::fs::metadata(dir.join("pid")).await.is_err()
            && tokio::time::Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let process = observe_one(&dir, &key.name).await;
        Ok(process)
    }

    /// Everything this backend has of `owner`, by name.
    pub async fn observe(&self, owner: &Owner) -> Result<Vec<Process>> {
        let mut found = Vec::new();
        for (name, entry) in list(&self.owner_dir(owner)).await? {
            found.push(observe_one(&entry.path(), &name).await);
        }
        found.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(found)
    }

    /// Up to `max` bytes of a resource's output from `offset`, and its whole length; `None`
    /// if it has none.
    pub async fn output(
        &self,
        key: &StepKey,
        offset: u64,
        max: usize,
    ) -> Result<Option<(Vec<u8>, u64)>> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let path = self.resource_dir(key).join("out");
        let mut file = match tokio::fs::File::open(&path).await {
            Ok(file) => file,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                return Ok(self.exists(key).await.then(|| (Vec::new(), 0)));
            }
            Err(err) => {
                return Err(BackendError::Failed {
                    what: format!("cannot open {}", path.display()),
                    source: err,
                });
            }
        };
        let failed = BackendError::failed(format!("cannot read {}", path.display()));
        let length = file.metadata().await.map_err(failed)?.len();
        let mut data = Vec::new();
        if offset < length {
            file.seek(std::io::SeekFrom::Start(offset))
                .await
                .map_err(BackendError::failed(format!(
                    "cannot read {}",
                    path.display()
                )))?;
            file.take(max as u64)
                .read_to_end(&mut data)
                .await
                .map_err(BackendError::failed(format!(
                    "cannot read {}",
                    path.display()
                )))?;
        }
        Ok(Some((data, length)))
    }

    async fn exists(&self, key: &StepKey) -> bool {
        tokio::fs::metadata(self.resource_dir(key)).await.is_ok()
    }

    /// Stops every process of `owner` (SIGTERM to each of their process groups, SIGKILL after
    /// the grace) and deletes what was recorded of them. Removing what is gone already succeeds.
    /// The processes are found by the step named in their environment, so one whose
    /// supervisor died, or that moved to a group of its own, is found too.
    pub async fn remove(&self, owner: &Owner) -> Result<()> {
        let prefix = format!("{}/", step_value(&self.owner_dir(owner)));
        let groups = groups_of(&prefix).await;
        for group in &groups {
            let _ = killpg(Pid::from_raw(*group), Signal::SIGTERM);
        }
        // Alive means a process of the step still runs: a zombie (exited, its parent gone and
        // init yet to reap it) has no environment, so the scan no longer finds it.
        let deadline = tokio::time::Instant::now() + self.stop_grace;
        let mut running = groups.clone();
        while !running.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
            running = groups_of(&prefix).await;
        }
        for group in &running {
            tracing::info!(
                group,
                "process group still running after the grace; killing it"
            );
            let _ = killpg(Pid::from_raw(*group), Signal::SIGKILL);
        }
        // Stragglers started meanwhile by what was just stopped.
        for group in groups_of(&prefix).await {
            let _ = killpg(Pid::from_raw(group), Signal::SIGKILL);
        }
        let dir = self.owner_dir(owner);
        match tokio::fs::remove_dir_all(&dir).await {
            Ok(()) => Ok(()),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(err) => Err(BackendError::Failed {
                what: format!("cannot delete {}", dir.display()),
                source: err,
            }),
        }
    }

    /// The owners of `kind` this instance has anything of, and when each was last changed.
    pub async fn owners(&self, kind: &str) -> Result<Vec<(Owner, SystemTime)>> {
        let mut owners = Vec::new();
        for (id, entry) in list(&self.kind_dir(kind)).await? {
            let modified = entry
                .metadata()
                .await
                .and_then(|m| m.modified())
                .unwrap_or(SystemTime::UNIX_EPOCH);
            owners.push((self.owner(kind, &id), modified));
        }
        Ok(owners)
    }

    /// Runs a readiness command with the resource's environment; `Ok` if it exits 0 within
    /// `timeout`.
    pub async fn check(
        &self,
        key: &StepKey,
        command: &str,
        args: &[String],
        env: &BTreeMap<String, String>,
        timeout: Duration,
    ) -> std::result::Result<(), String> {
        let dir = self.resource_dir(key);
        let mut check = tokio::process::Command::new(command);
        check
            .args(args)
            .envs(env)
            .current_dir(if dir.is_dir() {
                dir
            } else {
                std::env::temp_dir()
            })
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true);
        if let Some(port) = self.port(key).await {
            check.env("PORT", port.to_string());
        }
        let child = check
            .spawn()
            .map_err(|e| format!("cannot run the check {command}: {e}"))?;
        match tokio::time::timeout(timeout, child.wait_with_output()).await {
            Ok(Ok(output)) if output.status.success() => Ok(()),
            Ok(Ok(output)) => Err(format!(
                "the check {command} exited with {}: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            )),
            Ok(Err(err)) => Err(format!("the check {command} failed: {err}")),
            Err(_) => Err(format!("the check {command} took longer than {timeout:?}")),
        }
    }

    async fn port(&self, key: &StepKey) -> Option<u16> {
        let bytes = tokio::fs::read(self.resource_dir(key).join("label.json"))
            .await
            .ok()?;
        serde_json::from_slice::<Label>(&bytes).ok().map(|l| l.port)
    }
}

/// A process's step, as its environment names it: its resource directory, which is unique on
/// the machine (two Switchyards with one instance id but their own directories never take
/// each other's processes).
fn step_value(dir: &Path) -> String {
    dir.to_string_lossy().into_owned()
}

/// What one resource directory says, checked against the running processes.
async fn observe_one(dir: &Path, name: &str) -> Process {
    let label = tokio::fs::read(dir.join("label.json"))
        .await
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Label>(&bytes).ok());
    let address = label.as_ref().map(|l| format!("127.0.0.1:{}", l.port));
    let pid = tokio::fs::read_to_string(dir.join("pid"))
        .await
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok());
    let step = label.as_ref().map(|_| step_value(dir));
    let alive = match (pid, &step) {
        (Some(pid), Some(step)) => is_ours(pid, step).await,
        _ => false,
    };
    // Only after liveness: a supervisor writes the exit code before it ends, so once it is
    // seen gone, its exit code (if it left one) is there to read.
    let exit = if alive {
        None
    } else {
        tokio::fs::read_to_string(dir.join("exit"))
            .await
            .ok()
            .and_then(|text| text.trim().parse::<i32>().ok())
    };
    let state = match (alive, exit, pid, &label) {
        (true, _, _, _) => ProcessState::Running,
        (false, Some(code), _, _) => ProcessState::Exited(code),
        (false, None, _, None) => {
            ProcessState::Vanished("its start was interrupted before it was recorded".to_owned())
        }
        (false, None, None, Some(_)) => ProcessState::Vanished(
            "it never started: the start was interrupted (Switchyard stopped meanwhile)".to_owned(),
        ),
        (false, None, Some(_), Some(_)) => ProcessState::Vanished(
            "it is gone without an exit code: killed, or its machine restarted".to_owned(),
        ),
    };
    Process {
        name: name.to_owned(),
        address,
        group: pid.filter(|_| alive),
        state,
        ports: label.map(|l| l.ports).unwrap_or_default(),
    }
}

/// Whether `pid` runs and is the process this step started (its environment names the step).
async fn is_ours(pid: i32, step: &str) -> bool {
    let Ok(environ) = tokio::fs::read(format!("/proc/{pid}/environ")).await else {
        return false;
    };
    // A zombie has an empty environment: it has ended.
    let wanted = format!("{STEP_VARIABLE}={step}");
    environ
        .split(|b| *b == 0)
        .any(|entry| entry == wanted.as_bytes())
}

/// The entries of `dir` by their decoded names (none if it does not exist); names that are
/// not this backend's encoding are skipped.
async fn list(dir: &Path) -> Result<Vec<(String, tokio::fs::DirEntry)>> {
    let failed = || BackendError::failed(format!("cannot list {}", dir.display()));
    let mut entries = match tokio::fs::read_dir(dir).await {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(vec![]),
        Err(err) => return Err(failed()(err)),
    };
    let mut listed = Vec::new();
    while let Some(entry) = entries.next_entry().await.map_err(failed())? {
        if let Ok(name) = decode_token(&entry.file_name().to_string_lossy()) {
            listed.push((name, entry));
        }
    }
    Ok(listed)
}

/// The process groups of every live process whose step starts with `prefix`, read from
/// `/proc`: each process's environment names its step, inherited by whatever it starts.
async fn groups_of(prefix: &str) -> Vec<i32> {
    let wanted = format!("{STEP_VARIABLE}={prefix}");
    let Ok(mut entries) = tokio::fs::read_dir("/proc").await else {
        return vec![];
    };
    let mut groups = std::collections::BTreeSet::new();
    while let Ok(Some(entry)) = entries.next_entry().await {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(environ) = tokio::fs::read(format!("/proc/{pid}/environ")).await else {
            continue;
        };
        let ours = environ
            .split(|b| *b == 0)
            .any(|entry| entry.starts_with(wanted.as_bytes()));
        if !ours {
            continue;
        }
        // `pid (comm) state ppid pgrp ...`; comm may hold spaces and parentheses.
        let Ok(stat) = tokio::fs::read_to_string(format!("/proc/{pid}/stat")).await else {
            continue;
        };
        if let Some(group) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(2))
            .and_then(|g| g.parse::<i32>().ok())
        {
            groups.insert(group);
        }
    }
    groups.into_iter().collect()
}

/// Whether `command` names an executable file, itself (with a `/`) or on `PATH` (the one
/// given, else this process's).
fn findable(command: &str, path: Option<&String>) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let executable = |candidate: &Path| {
        std::fs::metadata(candidate)
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if command.contains('/') {
        return executable(Path::new(command));
    }
    let path = path
        .cloned()
        .or_else(|| std::env::var("PATH").ok())
        .unwrap_or_default();
    std::env::split_paths(&path).any(|dir| executable(&dir.join(command)))
}

/// `n` distinct free loopback ports: all held at once while they are picked.
fn free_ports(n: usize) -> std::io::Result<Vec<u16>> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind(("127.0.0.1", 0)))
        .collect::<std::io::Result<Vec<_>>>()?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()))
        .collect()
}

async fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    tokio::fs::write(&tmp, bytes).await?;
    tokio::fs::rename(&tmp, path).await
}
