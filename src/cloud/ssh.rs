//! The SSH executor (russh): one multiplexed connection per instance, made again when it
//! drops, public-key authentication only. Before the first command runs, the instance's host
//! key is verified, by the driver when it can tell, or else by the instance secret: the init
//! command wrote it (mode 0600) where only a login on that instance can read it, so reading it
//! over the open connection and finding the tag's value proves the server is the instance
//! that was created. Anything else refuses the instance. Once verified, the key is pinned: a
//! reconnection to another key is refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, AuthResult, Handle};
use russh::keys::ssh_key::PublicKey;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

use super::driver::{DriverError, InstanceSet};

/// Where the init command leaves the instance secret, as a shell expression (an instance
/// serves from `$SWITCHYARD_HOME`, `/var/lib/switchyard` unless it sets another).
const SECRET_FILE: &str = "\"${SWITCHYARD_HOME:-/var/lib/switchyard}/instance-secret\"";

/// The init command for an instance with `secret` (hex): it writes the secret, readable by
/// its owner only.
pub fn init_command(secret: &str) -> String {
    format!(
        "mkdir -p \"${{SWITCHYARD_HOME:=/var/lib/switchyard}}\" && \
         (umask 0177 && printf %s '{secret}' > \"$SWITCHYARD_HOME/instance-secret\")"
    )
}

/// A fresh instance secret: 128 random bits, hex.
pub fn new_secret() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Why a command did not run on an instance.
#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    /// Nothing answers yet (an instance still booting), or the connection failed.
    #[error("{address}: cannot connect over SSH: {reason}")]
    Unreachable { address: String, reason: String },
    #[error("{address}: no answer within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("{address}: the key was refused for user {user:?}")]
    LoginRefused { address: String, user: String },
    /// The server is not the instance: its host key failed the driver's check, or changed.
    #[error("instance {instance}: refused, its host key is not its own: {reason}")]
    HostKey { instance: String, reason: String },
    /// The driver cannot verify host keys and the instance secret was missing or wrong.
    #[error("instance {instance}: refused, it does not hold the instance secret: {reason}")]
    Impostor { instance: String, reason: String },
    #[error("{address}: the SSH session failed: {reason}")]
    Session { address: String, reason: String },
}

impl ExecError {
    /// Whether the instance is refused for good (not a server that has yet to boot).
    pub fn refuses_instance(&self) -> bool {
        matches!(self, ExecError::HostKey { .. } | ExecError::Impostor { .. })
    }
}

/// What a command did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Output {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// `None` when the channel closed without a status (killed by a signal).
    pub status: Option<u32>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
}

/// Accepts the pinned key, or records what is offered for verification after login.
struct Checker {
    pinned: Option<PublicKey>,
    offered: Arc<Mutex<Option<PublicKey>>>,
}

impl client::Handler for Checker {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let PublicKeyOrCertificate::PublicKey { key, .. } = offered else {
            return Ok(false);
        };
        if let Some(pinned) = &self.pinned {
            return Ok(pinned.key_data() == key.key_data());
        }
        *self
            .offered
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key.clone());
        Ok(true)
    }
}

/// Where and how to reach one instance.
#[derive(Clone)]
pub struct Target {
    pub instance: String,
    pub address: String,
    pub user: String,
    /// The `InstanceSecret` tag; `None`: only the driver can verify the host.
    pub secret: Option<String>,
}

/// Channels open at once on one connection, at most: OpenSSH refuses more than its
/// `MaxSessions` (10 by default).
pub const MAX_CHANNELS: usize = 8;

/// Runs commands on one instance over one connection.
pub struct Executor {
    target: Target,
    channels: tokio::sync::Semaphore,
    key: Arc<PrivateKey>,
    set: Arc<dyn InstanceSet>,
    timeout: Duration,
    connection: tokio::sync::Mutex<Option<Arc<Handle<Checker>>>>,
    pinned: Mutex<Option<PublicKey>>,
}

impl Executor {
    pub fn new(
        target: Target,
        key: Arc<PrivateKey>,
        set: Arc<dyn InstanceSet>,
        timeout: Duration,
    ) -> Self {
        Self {
            target,
            channels: tokio::sync::Semaphore::new(MAX_CHANNELS),
            key,
            set,
            timeout,
            connection: tokio::sync::Mutex::new(None),
            pinned: Mutex::new(None),
        }
    }

    pub fn target(&self) -> &Target {
        &self.target
    }

    fn pinned(&self) -> Option<PublicKey> {
        self.pinned
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Runs `command` (through the login shell) with `stdin`, within the executor's timeout.
    pub async fn execute(&self, command: &str, stdin: &[u8]) -> Result<Output, ExecError> {
        let address = self.target.address.clone();
        let timeout = self.timeout;
        tokio::time::timeout(timeout, async {
            let _channel = self
                .channels
                .acquire()
                .await
                .map_err(|e| self.session_error(e.to_string()))?;
            let connection = self.connection().await?;
            match run(&connection, command, stdin).await {
                Ok(output) => Ok(output),
                // A connection that dropped since it was last used: once more, on a new one.
                Err(_) if connection.is_closed() => {
                    self.forget(&connection).await;
                    let connection = self.connection().await?;
                    run(&connection, command, stdin)
                        .await
                        .map_err(|reason| self.session_error(reason))
                }
                Err(reason) => Err(self.session_error(reason)),
            }
        })
        .await
        .unwrap_or(Err(ExecError::Timeout { address, timeout }))
    }

    /// Closes the connection (the next command opens another).
    pub async fn close(&self) {
        if let Some(connection) = self.connection.lock().await.take() {
            let _ = connection
                .disconnect(russh::Disconnect::ByApplication, "", "en")
                .await;
        }
    }

    fn session_error(&self, reason: String) -> ExecError {
        ExecError::Session {
            address: self.target.address.clone(),
            reason,
        }
    }

    async fn forget(&self, stale: &Arc<Handle<Checker>>) {
        let mut connection = self.connection.lock().await;
        if connection.as_ref().is_some_and(|c| Arc::ptr_eq(c, stale)) {
            *connection = None;
        }
    }

    /// The open connection, or a new, verified one.
    async fn connection(&self) -> Result<Arc<Handle<Checker>>, ExecError> {
        let mut connection = self.connection.lock().await;
        if let Some(open) = connection.as_ref()
            && !open.is_closed()
        {
            return Ok(open.clone());
        }
        let opened = Arc::new(self.connect().await?);
        *connection = Some(opened.clone());
        Ok(opened)
    }

    async fn connect(&self) -> Result<Handle<Checker>, ExecError> {
        let address = &self.target.address;
        let offered = Arc::new(Mutex::new(None));
        let pinned = self.pinned();
        let checker = Checker {
            pinned: pinned.clone(),
            offered: offered.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            nodelay: true,
            ..Default::default()
        });
        let mut handle = match client::connect(config, address.as_str(), checker).await {
            Ok(handle) => handle,
            Err(russh::Error::UnknownKey) if pinned.is_some() => {
                return Err(ExecError::HostKey {
                    instance: self.target.instance.clone(),
                    reason: "it presented another key than the one verified before".into(),
                });
            }
            Err(err) => {
                return Err(ExecError::Unreachable {
                    address: address.clone(),
                    reason: err.to_string(),
                });
            }
        };
        let login = handle
            .authenticate_publickey(
                &self.target.user,
                PrivateKeyWithHashAlg::new(self.key.clone(), None),
            )
            .await
            .map_err(|err| self.session_error(err.to_string()))?;
        if !matches!(login, AuthResult::Success) {
            return Err(ExecError::LoginRefused {
                address: address.clone(),
                user: self.target.user.clone(),
            });
        }
        if pinned.is_none() {
            let key = offered
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take();
            let Some(key) = key else {
                return Err(self.session_error("no host key was offered".into()));
            };
            if let Err(refused) = self.verify(&handle, &key).await {
                let _ = handle
                    .disconnect(russh::Disconnect::ByApplication, "", "en")
                    .await;
                return Err(refused);
            }
            *self
                .pinned
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(key);
        }
        Ok(handle)
    }

    /// The driver's word on `key`, or, when it has none, the instance secret read over
    /// `handle`.
    async fn verify(&self, handle: &Handle<Checker>, key: &PublicKey) -> Result<(), ExecError> {
        let instance = self.target.instance.clone();
        let line = key.to_openssh().map_err(|err| ExecError::HostKey {
            instance: instance.clone(),
            reason: err.to_string(),
        })?;
        match self.set.verify_host_key(&instance, &line).await {
            Ok(()) => Ok(()),
            Err(DriverError::NotImplemented) => {
                let Some(expected) = &self.target.secret else {
                    return Err(ExecError::Impostor {
                        instance,
                        reason: "the driver cannot verify host keys and the instance has no \
                                 secret tag"
                            .into(),
                    });
                };
                let read = run(handle, &format!("cat {SECRET_FILE}"), &[])
                    .await
                    .map_err(|reason| self.session_error(reason))?;
                if !read.success() {
                    return Err(ExecError::Impostor {
                        instance,
                        reason: format!(
                            "reading it failed: {}",
                            String::from_utf8_lossy(&read.stderr).trim()
                        ),
                    });
                }
                if read.stdout.trim_ascii() != expected.as_bytes() {
                    return Err(ExecError::Impostor {
                        instance,
                        reason: "it holds another secret".into(),
                    });
                }
                Ok(())
            }
            Err(err) => Err(ExecError::HostKey {
                instance,
                reason: err.to_string(),
            }),
        }
    }
}

/// Runs one command in a new channel of `handle`.
async fn run(handle: &Handle<Checker>, command: &str, stdin: &[u8]) -> Result<Output, String> {
    let mut channel = handle
        .channel_open_session()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .exec(true, command)
        .await
        .map_err(|e| e.to_string())?;
    if !stdin.is_empty() {
        channel
            .data_bytes(stdin.to_vec())
            .await
            .map_err(|e| e.to_string())?;
    }
    channel.eof().await.map_err(|e| e.to_string())?;
    let mut output = Output {
        stdout: Vec::new(),
        stderr: Vec::new(),
        status: None,
    };
    while let Some(message) = channel.wait().await {
        match message {
            ChannelMsg::Data { data } => output.stdout.extend_from_slice(&data),
            ChannelMsg::ExtendedData { data, .. } => output.stderr.extend_from_slice(&data),
            ChannelMsg::ExitStatus { exit_status } => output.status = Some(exit_status),
            ChannelMsg::Close => break,
            _ => {}
        }
    }
    Ok(output)
}
