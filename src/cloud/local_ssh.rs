//! An SSH server in this process whose commands run as local processes: what the stub
//! driver's instances answer with when they serve (`"ssh": true`), so a drill of hundreds of
//! sessions costs a fork per command rather than an OpenSSH server per instance (arvados's
//! stub driver serves its fake instances the same way). It speaks real SSH (russh): its own
//! host key, public-key login with the one key the instance was created with and no other,
//! and `exec` channels whose command runs under `/bin/sh -c` in the instance's home
//! (`SWITCHYARD_HOME`), with stdin, stdout, stderr and the exit status carried as OpenSSH
//! carries them. Dropping the server closes its listener and every connection.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use russh::keys::{PrivateKey, PublicKey};
use russh::server::{Auth, Msg, PublicKeyOffer, Session, VerifiedPublicKey};
use russh::{Channel, ChannelId, ChannelMsg, Disconnect, MethodKind, MethodSet};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::process::{Child, Command};
use tokio::task::{JoinHandle, JoinSet};

/// One instance's SSH server.
pub struct LocalServer {
    address: String,
    task: JoinHandle<()>,
    /// Dropped with the server: every connection then closes.
    _closing: tokio::sync::watch::Sender<()>,
}

impl LocalServer {
    /// Listens on a free loopback port; lets in `authorized` only; runs commands in `home`.
    pub async fn start(
        host_key: PrivateKey,
        authorized: PublicKey,
        home: PathBuf,
    ) -> std::io::Result<Self> {
        Self::start_at("127.0.0.1:0", host_key, authorized, home).await
    }

    /// The same, listening on `bind` (`host:port`).
    pub async fn start_at(
        bind: &str,
        host_key: PrivateKey,
        authorized: PublicKey,
        home: PathBuf,
    ) -> std::io::Result<Self> {
        let listener = TcpListener::bind(bind).await?;
        let address = listener.local_addr()?.to_string();
        let config = Arc::new(russh::server::Config {
            methods: MethodSet::from(&[MethodKind::PublicKey][..]),
            keys: vec![host_key],
            inactivity_timeout: None,
            auth_rejection_time: Duration::ZERO,
            nodelay: true,
            ..Default::default()
        });
        let home = Arc::new(home);
        let (closing, closed) = tokio::sync::watch::channel(());
        let task = tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let _ = socket.set_nodelay(true);
                let handler = Connection {
                    authorized: authorized.clone(),
                    home: home.clone(),
                    channels: HashMap::new(),
                    commands: JoinSet::new(),
                };
                let config = config.clone();
                let mut closed = closed.clone();
                tokio::spawn(async move {
                    let Ok(session) = russh::server::run_stream(config, socket, handler).await
                    else {
                        return;
                    };
                    let handle = session.handle();
                    tokio::select! {
                        _ = session => {}
                        // The server is gone: so is every connection, and what it runs.
                        _ = closed.changed() => {
                            let _ = handle
                                .disconnect(Disconnect::ByApplication, "gone".into(), "en".into())
                                .await;
                        }
                    }
                });
            }
        });
        Ok(Self {
            address,
            task,
            _closing: closing,
        })
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> &str {
        &self.address
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct Connection {
    authorized: PublicKey,
    home: Arc<PathBuf>,
    /// Opened session channels not yet given a command.
    channels: HashMap<ChannelId, Channel<Msg>>,
    /// The commands running for this connection; they end with it.
    commands: JoinSet<()>,
}

impl Connection {
    fn admits(&self, key: &PublicKey) -> Auth {
        if key.key_data() == self.authorized.key_data() {
            Auth::Accept
        } else {
            Auth::reject()
        }
    }
}

impl russh::server::Handler for Connection {
    type Error = russh::Error;

    async fn auth_publickey_offered(
        &mut self,
        _user: &str,
        offer: PublicKeyOffer<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.admits(offer.public_key))
    }

    async fn auth_publickey(
        &mut self,
        _user: &str,
        key: VerifiedPublicKey<'_>,
    ) -> Result<Auth, Self::Error> {
        Ok(self.admits(key.public_key))
    }

    async fn channel_open_session(
        &mut self,
        channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.insert(channel.id(), channel);
        reply.accept().await;
        Ok(())
    }

    async fn exec_request(
        &mut self,
        id: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let Some(channel) = self.channels.remove(&id) else {
            return session.channel_failure(id);
        };
        while self.commands.try_join_next().is_some() {}
        let command = String::from_utf8_lossy(data).into_owned();
        match spawn(&command, &self.home) {
            Ok(child) => {
                session.channel_success(id)?;
                self.commands.spawn(relay(channel, child));
                Ok(())
            }
            Err(err) => {
                tracing::debug!(
                    error = &err as &dyn std::error::Error,
                    "cannot run a command"
                );
                session.channel_failure(id)
            }
        }
    }

    async fn channel_close(
        &mut self,
        id: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.channels.remove(&id);
        Ok(())
    }
}

fn spawn(command: &str, home: &Path) -> std::io::Result<Child> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(command)
        .current_dir(home)
        .env("SWITCHYARD_HOME", home)
        .env("HOME", home)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
}

/// Carries the channel's data to the command's stdin and its output back, then its exit
/// status. A channel the client closes first kills the command.
async fn relay(channel: Channel<Msg>, mut child: Child) {
    let (mut from_client, to_client) = channel.split();
    let mut stdin = child.stdin.take();
    let (Some(mut stdout), Some(mut stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return;
    };
    let mut out = to_client.make_writer();
    let mut err = to_client.make_writer_ext(Some(1));
    let output = async {
        let _ = tokio::join!(
            tokio::io::copy(&mut stdout, &mut out),
            tokio::io::copy(&mut stderr, &mut err)
        );
        let _ = out.flush().await;
        let _ = err.flush().await;
        child.wait().await
    };
    let input = async {
        loop {
            match from_client.wait().await {
                Some(ChannelMsg::Data { data }) => {
                    if let Some(pipe) = stdin.as_mut()
                        && pipe.write_all(&data).await.is_err()
                    {
                        stdin = None;
                    }
                }
                Some(ChannelMsg::Eof) => stdin = None,
                Some(_) => {}
                None => return,
            }
        }
    };
    tokio::pin!(output);
    let status = tokio::select! {
        status = &mut output => status,
        () = input => return,
    };
    if let Ok(status) = status
        && let Some(code) = status.code()
    {
        let _ = to_client.exit_status(code as u32).await;
    }
    let _ = to_client.eof().await;
    let _ = to_client.close().await;
}
