//! The Kubernetes API, as the Kubernetes backends use it: a kube-rs client made from
//! configuration, every call in its own span (method, resource, namespace, name, status), and
//! API errors mapped to what a step does about them.
//!
//! - 409 on create means the object is there: an idempotent step succeeds ([`Kube::create`]).
//! - 404 on delete means it is gone: deleting succeeds ([`Kube::delete`]).
//! - 403 is [`KubeError::Forbidden`]: the service account lacks a verb; retrying will not help.
//! - 400 and 422 are [`KubeError::Invalid`]: what was sent can never succeed.
//! - 429, 5xx and broken connections are retried, waiting what the server asks
//!   (`retryAfterSeconds`) or backing off, and then are [`KubeError::Unavailable`].

pub mod emulator;

use std::fmt::Debug;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client, Resource};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::OnceCell;
use tracing::Instrument;

use crate::backend::BackendError;
use crate::config::KubernetesConfig;

/// The labels every object Switchyard makes carries.
pub const MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`MANAGED_BY`].
pub const SWITCHYARD: &str = "switchyard";
/// The Switchyard instance (its stream prefix, lower-cased) that made an object.
pub const INSTANCE: &str = "switchyard.dev/instance";

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot reach Kubernetes: {0}")]
    Config(String),
    #[error("{what}: forbidden: {message}")]
    Forbidden { what: String, message: String },
    #[error("{what}: not found")]
    NotFound { what: String },
    #[error("{what}: invalid: {message}")]
    Invalid { what: String, message: String },
    #[error("{what}: unavailable after {attempts} attempts: {message}")]
    Unavailable {
        what: String,
        attempts: u32,
        message: String,
    },
}

impl From<KubeError> for BackendError {
    fn from(err: KubeError) -> Self {
        match err {
            KubeError::Forbidden { what, message } => BackendError::Forbidden {
                what,
                reason: message,
            },
            KubeError::Invalid { what, message } => BackendError::Refused {
                what,
                reason: message,
            },
            other @ (KubeError::Config(_)
            | KubeError::NotFound { .. }
            | KubeError::Unavailable { .. }) => BackendError::Unavailable {
                what: "Kubernetes".into(),
                reason: other.to_string(),
            },
        }
    }
}

pub type Result<T, E = KubeError> = std::result::Result<T, E>;

/// What one call is about, for its span and its errors.
#[derive(Clone, Debug)]
pub struct Call<'a> {
    pub method: &'static str,
    /// The resource's plural (`pods`), or a subresource (`pods/log`).
    pub resource: String,
    pub namespace: Option<&'a str>,
    pub name: Option<&'a str>,
}

impl<'a> Call<'a> {
    /// A call on `K`, the resource type.
    pub fn on<K>(method: &'static str, namespace: Option<&'a str>, name: Option<&'a str>) -> Self
    where
        K: Resource,
        K::DynamicType: Default,
    {
        Self {
            method,
            resource: K::plural(&K::DynamicType::default()).into_owned(),
            namespace,
            name,
        }
    }

    fn what(&self) -> String {
        let mut what = format!("{} {}", self.method, self.resource);
        if let Some(ns) = self.namespace {
            what.push_str(&format!(" in {ns}"));
        }
        if let Some(name) = self.name {
            what.push_str(&format!(" {name}"));
        }
        what
    }
}

/// A client, made on first use (reading a kubeconfig is asynchronous), shared by clones.
#[derive(Clone)]
pub struct Kube {
    config: KubernetesConfig,
    client: Arc<OnceCell<Client>>,
}

impl Kube {
    /// Checks what can be checked without the network (the API URL's form).
    pub fn new(config: KubernetesConfig) -> Result<Self> {
        if let Some(api) = &config.api {
            api.parse::<http::Uri>()
                .map_err(|e| KubeError::Config(format!("kubernetes.api {api:?}: {e}")))?;
        }
        Ok(Self {
            config,
            client: Arc::new(OnceCell::new()),
        })
    }

    pub fn config(&self) -> &KubernetesConfig {
        &self.config
    }

    /// The client: from `kubernetes.api` when set, else the kubeconfig (`kubernetes.kubeconfig`,
    /// `$KUBECONFIG`, `~/.kube/config`) or, in a pod, its service account.
    pub async fn client(&self) -> Result<Client> {
        self.client
            .get_or_try_init(|| async {
                let mut config = match &self.config.api {
                    Some(api) => {
                        let uri = api
                            .parse::<http::Uri>()
                            .map_err(|e| KubeError::Config(format!("kubernetes.api: {e}")))?;
                        kube::Config::new(uri)
                    }
                    None => {
                        let options = kube::config::KubeConfigOptions {
                            context: self.config.context.clone(),
                            ..Default::default()
                        };
                        let loaded = match &self.config.kubeconfig {
                            Some(path) => match kube::config::Kubeconfig::read_from(path) {
                                Ok(file) => {
                                    kube::Config::from_custom_kubeconfig(file, &options).await
                                }
                                Err(err) => {
                                    return Err(KubeError::Config(format!(
                                        "kubernetes.kubeconfig {}: {err}",
                                        path.display()
                                    )));
                                }
                            },
                            None => kube::Config::from_kubeconfig(&options).await,
                        };
                        match loaded {
                            Ok(config) => config,
                            Err(kubeconfig) => kube::Config::incluster().map_err(|e| {
                                KubeError::Config(format!(
                                    "no kubeconfig ({kubeconfig}) and not in a pod ({e})"
                                ))
                            })?,
                        }
                    }
                };
                // Retries are ours: each attempt is seen, and the server's hint is kept.
                config.default_retry = false;
                config.connect_timeout = Some(self.config.call_timeout);
                Client::try_from(config).map_err(|e| KubeError::Config(e.to_string()))
            })
            .await
            .cloned()
    }

    /// Runs one call in its span, retrying what may pass.
    pub async fn call<T, F, Fut>(&self, call: Call<'_>, mut attempt: F) -> Result<T>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = kube::Result<T>>,
    {
        let span = crate::step_span!(
            "k8s",
            otel.name = %format!("k8s {} {}", call.method, call.resource),
            k8s.method = call.method,
            k8s.resource = %call.resource,
            k8s.namespace = call.namespace.unwrap_or(""),
            k8s.name = call.name.unwrap_or(""),
            http.response.status_code = tracing::field::Empty,
            attempts = tracing::field::Empty
        );
        let client = self.client().instrument(span.clone()).await?;
        let mut tries = 0;
        let result = async {
            loop {
                tries += 1;
                let timeout = self.config.call_timeout;
                let outcome = match tokio::time::timeout(timeout, attempt(client.clone())).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(kube::Error::Service(
                        format!("no answer within {timeout:?}").into(),
                    )),
                };
                // kube-rs does not say which 2xx a success was: only failures carry a code.
                let err = match outcome {
                    Ok(value) => return Ok(value),
                    Err(err) => err,
                };
                let (code, message, hint) = match &err {
                    kube::Error::Api(status) => (
                        status.code,
                        status.message.clone(),
                        status
                            .details
                            .as_ref()
                            .map(|d| d.retry_after_seconds)
                            .filter(|s| *s > 0)
                            .map(|s| Duration::from_secs(u64::from(s))),
                    ),
                    other => (0, crate::runtime::error_chain(other), None),
                };
                if code != 0 {
                    span.record("http.response.status_code", code);
                }
                let what = call.what();
                // Throttled, overloaded or unanswered: may pass. A bad answer (not JSON, not
                // UTF-8) or a request that cannot be built will not.
                let transport = matches!(
                    err,
                    kube::Error::HyperError(_)
                        | kube::Error::Service(_)
                        | kube::Error::ReadEvents(_)
                );
                let retryable = transport || matches!(code, 408 | 429) || code >= 500;
                if !retryable || tries > self.config.retries {
                    return Err(match code {
                        401 | 403 => KubeError::Forbidden { what, message },
                        404 => KubeError::NotFound { what },
                        _ if retryable => KubeError::Unavailable {
                            what,
                            attempts: tries,
                            message,
                        },
                        _ => KubeError::Invalid { what, message },
                    });
                }
                let backoff = Duration::from_millis(100 << tries.min(6));
                let wait = hint.unwrap_or(backoff).min(Duration::from_secs(30));
                tracing::debug!(code, ?wait, error = %message, "retrying a Kubernetes call");
                tokio::time::sleep(wait).await;
            }
        }
        .instrument(span.clone())
        .await;
        span.record("attempts", tries);
        if let Err(err) = &result {
            crate::telemetry::failed(&span, &err.to_string());
        }
        result
    }

    /// Creates `object`; one that is already there (409) is success: the step is idempotent.
    /// Whether it was made by this call.
    pub async fn create<K>(&self, api: &Api<K>, object: &K) -> Result<bool>
    where
        K: Resource + Clone + Debug + Serialize + DeserializeOwned,
        K::DynamicType: Default,
    {
        let name = object.meta().name.clone().unwrap_or_default();
        let namespace = object.meta().namespace.clone();
        let call = Call::on::<K>("create", namespace.as_deref(), Some(&name));
        self.call(call, |_| {
            let api = api.clone();
            let object = object.clone();
            async move {
                match api.create(&PostParams::default(), &object).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                    Err(err) => Err(err),
                }
            }
        })
        .await
    }

    /// The object named `name`, if there is one.
    pub async fn get<K>(
        &self,
        api: &Api<K>,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<Option<K>>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
        K::DynamicType: Default,
    {
        let call = Call::on::<K>("get", namespace, Some(name));
        self.call(call, |_| {
            let api = api.clone();
            let name = name.to_owned();
            async move {
                match api.get(&name).await {
                    Ok(found) => Ok(Some(found)),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(None),
                    Err(err) => Err(err),
                }
            }
        })
        .await
    }

    /// Every object `selector` picks.
    pub async fn list<K>(
        &self,
        api: &Api<K>,
        namespace: Option<&str>,
        selector: &str,
    ) -> Result<Vec<K>>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
        K::DynamicType: Default,
    {
        let call = Call::on::<K>("list", namespace, None);
        self.call(call, |_| {
            let api = api.clone();
            let params = ListParams::default().labels(selector);
            async move { Ok(api.list(&params).await?.items) }
        })
        .await
    }

    /// Deletes `name`; what is gone (404) is deleted.
    pub async fn delete<K>(&self, api: &Api<K>, namespace: Option<&str>, name: &str) -> Result<()>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
        K::DynamicType: Default,
    {
        let call = Call::on::<K>("delete", namespace, Some(name));
        self.call(call, |_| {
            let api = api.clone();
            let name = name.to_owned();
            async move {
                match api.delete(&name, &DeleteParams::background()).await {
                    Ok(_) => Ok(()),
                    Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                    Err(err) => Err(err),
                }
            }
        })
        .await
    }

    /// Deletes every object `selector` picks in `namespace`.
    pub async fn delete_all<K>(
        &self,
        api: &Api<K>,
        namespace: Option<&str>,
        selector: &str,
    ) -> Result<()>
    where
        K: Resource + Clone + Debug + DeserializeOwned,
        K::DynamicType: Default,
    {
        let call = Call::on::<K>("deletecollection", namespace, None);
        self.call(call, |_| {
            let api = api.clone();
            let params = ListParams::default().labels(selector);
            async move {
                api.delete_collection(&DeleteParams::background(), &params)
                    .await
                    .map(|_| ())
            }
        })
        .await
    }
}

/// A DNS label of at most `max` characters for `raw`: `raw` itself when it is one; otherwise
/// lower-cased, anything else replaced by '-', cut to fit and ended with a digest of `raw`, so
/// distinct inputs stay distinct.
pub fn label(raw: &str, max: usize) -> String {
    if raw.len() <= max && crate::domain::ids::dns_label(raw) {
        return raw.to_owned();
    }
    let hex = digest(raw, 5);
    let mut kept: String = raw
        .chars()
        .map(|c| match c.to_ascii_lowercase() {
            c @ ('a'..='z' | '0'..='9') => c,
            _ => '-',
        })
        .collect();
    kept.truncate(max.saturating_sub(hex.len() + 1));
    let kept = kept.trim_matches('-');
    if kept.is_empty() {
        hex
    } else {
        format!("{kept}-{hex}")
    }
}

/// The first `bytes` bytes of `raw`'s SHA-256, in hex: what keeps shortened names distinct.
pub fn digest(raw: &str, bytes: usize) -> String {
    ring::digest::digest(&ring::digest::SHA256, raw.as_bytes()).as_ref()[..bytes.min(32)]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The labels that pick what `instance` made.
pub fn instance_selector(instance: &str) -> String {
    format!(
        "{MANAGED_BY}={SWITCHYARD},{INSTANCE}={}",
        label_value(instance)
    )
}

/// Waiting reasons after which a container will not start by waiting longer.
const FATAL_WAITING: [&str; 5] = [
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
];

/// `reason: message`, of whichever of the two there is.
pub fn reason_and_message(reason: Option<&str>, message: Option<&str>) -> String {
    [reason, message]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(": ")
}

/// Why `container` will not start by waiting longer (a crash loop, an image that cannot be
/// pulled), if that is so.
pub fn fatal_wait(container: &k8s_openapi::api::core::v1::ContainerStatus) -> Option<String> {
    let waiting = container.state.as_ref()?.waiting.as_ref()?;
    let reason = waiting.reason.as_deref()?;
    FATAL_WAITING
        .contains(&reason)
        .then(|| reason_and_message(Some(reason), waiting.message.as_deref()))
}

/// A log as text, whatever bytes it holds.
fn lossy(log: kube::Result<String>) -> kube::Result<String> {
    match log {
        Err(kube::Error::FromUtf8(bytes)) => {
            Ok(String::from_utf8_lossy(bytes.as_bytes()).into_owned())
        }
        other => other,
    }
}

impl Kube {
    /// A pod's log (its last `tail_lines`, or all of it), read as text whatever its bytes.
    pub async fn pod_log(
        &self,
        pods: &Api<k8s_openapi::api::core::v1::Pod>,
        namespace: &str,
        name: &str,
        tail_lines: Option<i64>,
    ) -> Result<String> {
        let call = Call {
            method: "get",
            resource: "pods/log".to_owned(),
            namespace: Some(namespace),
            name: Some(name),
        };
        self.call(call, |_| {
            let pods = pods.clone();
            let name = name.to_owned();
            async move {
                let params = kube::api::LogParams {
                    tail_lines,
                    ..Default::default()
                };
                lossy(pods.logs(&name, &params).await)
            }
        })
        .await
    }
}

/// A label value (at most 63 characters of `[A-Za-z0-9._-]`) for `raw`, shortened with a digest
/// when needed; the whole value belongs in an annotation then.
pub fn label_value(raw: &str) -> String {
    let ok = raw.len() <= 63
        && raw
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && raw.chars().next().is_none_or(|c| c.is_ascii_alphanumeric())
        && raw.chars().last().is_none_or(|c| c.is_ascii_alphanumeric());
    if ok { raw.to_owned() } else { label(raw, 63) }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn labels_are_dns_labels_and_distinct_when_shortened() {
        assert_eq!(label("switchyard-demo-1", 63), "switchyard-demo-1");
        assert!(label("T_abc-Demo", 63).starts_with("t-abc-demo-"));
        assert_ne!(label("T_abc-Demo", 63), label("t-abc-demo", 63));
        let long_a = format!("{}a", "x".repeat(80));
        let long_b = format!("{}b", "x".repeat(80));
        let (a, b) = (label(&long_a, 63), label(&long_b, 63));
        assert!(a.len() <= 63 && b.len() <= 63);
        assert_ne!(a, b);
        assert!(crate::domain::ids::dns_label(&a));
        assert!(crate::domain::ids::dns_label(&label("___", 63)));
    }

    #[test]
    fn label_values_keep_what_is_allowed() {
        assert_eq!(label_value("SWITCHYARD_x.1"), "SWITCHYARD_x.1");
        let long = "a".repeat(70);
        assert!(label_value(&long).len() <= 63);
        assert_eq!(label_value(""), "");
    }
}
