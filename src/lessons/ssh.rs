//! SSH to a lesson's endpoints (russh): the reachability test, and running a stage script.
//!
//! Reachability is antidote's test: an SSH handshake with a made-up user; the server refusing
//! to authenticate it counts as reachable (it answered as an SSH server). A stage script runs
//! in one `exec` channel with the lesson's key: the interpreter (`sh -s`, `python3 -`) reads the
//! script on its standard input, and its output (stdout and stderr, interleaved as they come)
//! and exit status are what the lesson records.

use std::sync::Arc;
use std::time::Duration;

use russh::ChannelMsg;
use russh::client::{self, AuthResult};
use russh::keys::ssh_key::PublicKey;
use russh::keys::{PrivateKey, PrivateKeyWithHashAlg, PublicKeyOrCertificate};

/// Why an SSH step failed.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    #[error("{address}: no SSH server answered within {timeout:?}")]
    Timeout { address: String, timeout: Duration },
    #[error("{address}: cannot connect over SSH")]
    Connect {
        address: String,
        #[source]
        source: russh::Error,
    },
    #[error("{address}: the lesson's key was refused for user {user:?}")]
    Refused { address: String, user: String },
    #[error("{address}: the SSH session failed")]
    Session {
        address: String,
        #[source]
        source: russh::Error,
    },
}

/// Accepts the endpoint's host key if it is the one expected (or any, when none is known:
/// the reachability test talks to a server it has never seen).
struct Endpoint {
    expected: Option<PublicKey>,
}

impl client::Handler for Endpoint {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        offered: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let Some(expected) = &self.expected else {
            return Ok(true);
        };
        Ok(match offered {
            PublicKeyOrCertificate::PublicKey { key, .. } => expected.key_data() == key.key_data(),
            PublicKeyOrCertificate::Certificate(_) => false,
        })
    }
}

fn config(timeout: Duration) -> Arc<client::Config> {
    Arc::new(client::Config {
        inactivity_timeout: Some(timeout.max(Duration::from_secs(1))),
        nodelay: true,
        ..Default::default()
    })
}

/// Whether an SSH server answers at `address` within `timeout`.
pub async fn answers(address: &str, timeout: Duration) -> Result<(), String> {
    let attempt = async {
        let mut session = client::connect(config(timeout), address, Endpoint { expected: None })
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        // Refused or accepted: either way, an SSH server answered.
        let _ = session
            .authenticate_password("switchyard-probe", "switchyard-probe")
            .await
            .map_err(|e| format!("{address}: {e}"))?;
        let _ = session
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(())
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(result) => result,
        Err(_) => Err(format!("{address}: no SSH answer within {timeout:?}")),
    }
}

/// What a script did.
#[derive(Debug, Clone)]
pub struct Ran {
    /// Its exit status; `None` if the channel closed without one (killed by a signal).
    pub status: Option<u32>,
    pub output: String,
}

/// Runs `script` with `interpreter` on the endpoint at `address` as `user`, within `timeout`.
pub async fn run(
    address: &str,
    user: &str,
    key: &PrivateKey,
    host_key: Option<PublicKey>,
    interpreter: &str,
    script: &str,
    timeout: Duration,
) -> Result<Ran, SshError> {
    let attempt = async {
        let mut session =
            client::connect(config(timeout), address, Endpoint { expected: host_key })
                .await
                .map_err(|source| SshError::Connect {
                    address: address.to_owned(),
                    source,
                })?;
        let session_error = |source| SshError::Session {
            address: address.to_owned(),
            source,
        };
        let login = session
            .authenticate_publickey(
                user,
                PrivateKeyWithHashAlg::new(Arc::new(key.clone()), None),
            )
            .await
            .map_err(session_error)?;
        if !matches!(login, AuthResult::Success) {
            return Err(SshError::Refused {
                address: address.to_owned(),
                user: user.to_owned(),
            });
        }
        let mut channel = session
            .channel_open_session()
            .await
            .map_err(session_error)?;
        channel
            .exec(true, interpreter)
            .await
            .map_err(session_error)?;
        channel
            .data_bytes(script.as_bytes().to_vec())
            .await
            .map_err(session_error)?;
        channel.eof().await.map_err(session_error)?;
        let mut output = Vec::new();
        let mut status = None;
        while let Some(message) = channel.wait().await {
            match message {
                ChannelMsg::Data { data } | ChannelMsg::ExtendedData { data, .. } => {
                    output.extend_from_slice(&data);
                }
                ChannelMsg::ExitStatus { exit_status } => status = Some(exit_status),
                ChannelMsg::Close => break,
                _ => {}
            }
        }
        let _ = session
            .disconnect(russh::Disconnect::ByApplication, "", "en")
            .await;
        Ok(Ran {
            status,
            output: String::from_utf8_lossy(&output).into_owned(),
        })
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(SshError::Timeout {
                address: address.to_owned(),
                timeout,
            })
        })
}
