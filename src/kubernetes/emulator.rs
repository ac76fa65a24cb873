//! The Kubernetes API emulator of the tests and the `kubernetes` bench scenario
//! (`tests/kubernetes/emulator.py`: kmock, installed into `.tools/venv` by `scripts/setup`),
//! started as a process and killed on drop.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

pub struct Emulator {
    child: Child,
    url: String,
}

impl Emulator {
    /// Starts it; none when it is not installed here (no venv, or not a source checkout).
    pub fn start() -> anyhow::Result<Option<Self>> {
        let python = crate::nats_server::tools_dir().join("venv/bin/python");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/kubernetes/emulator.py");
        if !python.exists() || !script.exists() {
            return Ok(None);
        }
        let mut child = Command::new(python)
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let Some(stdout) = child.stdout.take() else {
            anyhow::bail!("the emulator has no output");
        };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line)?;
        match line.strip_prefix("READY ") {
            Some(url) => Ok(Some(Self {
                url: url.trim().to_owned(),
                child,
            })),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                anyhow::bail!("the emulator did not start (is kmock installed?): {line:?}")
            }
        }
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of it, with kube-rs's own retries off.
    pub fn client(&self) -> anyhow::Result<kube::Client> {
        let mut config = kube::Config::new(self.url.parse()?);
        config.default_retry = false;
        Ok(kube::Client::try_from(config)?)
    }

    /// Posts to one of its own endpoints: `faults`, `watch-gone`, `logs`.
    pub async fn control(&self, what: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        let request = http::Request::post(format!("/emulator/{what}"))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(body)?)?;
        self.client()?.request_text(request).await?;
        Ok(())
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
