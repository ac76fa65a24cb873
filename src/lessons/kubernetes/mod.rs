//! The Kubernetes lesson backend (`lessons.backend = "kubernetes"`): a namespace per live
//! lesson, holding what [`objects`] describes. Starting an endpoint creates what is missing
//! (a 409 is success, so a step retried after a crash creates nothing twice); observing lists
//! the lesson's pods and services; deleting is one namespace deletion; orphan pruning lists
//! namespaces by this instance's labels.
//!
//! The lesson's keys live in its Secret, so every replica (and a restart) configures the
//! lesson with the same key and checks each endpoint's host key. This replica also keeps a
//! copy of the private key in `<lessons.dir>/kubernetes/<instance>/<lesson>/id_ed25519` for
//! the `ssh -i` command it shows people.

pub mod objects;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::Api;
use russh::keys::PrivateKey;
use russh::keys::ssh_key::{LineEnding, PublicKey};

use super::backend::{Access, LessonBackend};
use crate::backend::{BackendError, Result};
use crate::domain::lessons::catalog::Lesson;
use crate::domain::lessons::plan::Seen;
use crate::domain::lessons::{EndpointName, LiveLessonId, LiveSessionId};
use crate::kubernetes::Kube;
use crate::subject::encode_token;
use objects::{Owner, PodState};

/// The lesson's keys, as read from its Secret.
struct Credentials {
    key: Arc<PrivateKey>,
    /// Each endpoint's host key, by endpoint name.
    host_keys: BTreeMap<String, PublicKey>,
}

pub struct KubernetesBackend {
    kube: Kube,
    instance: String,
    keys: PathBuf,
    /// Lessons whose namespace, Secret and policies this process has made sure of.
    prepared: Mutex<HashSet<LiveLessonId>>,
    credentials: Mutex<HashMap<LiveLessonId, Arc<Credentials>>>,
}

fn refused(what: impl Into<String>) -> impl FnOnce(String) -> BackendError {
    let what = what.into();
    move |reason| BackendError::Refused { what, reason }
}

impl KubernetesBackend {
    pub fn new(kube: Kube, dir: &Path, instance: &str) -> Self {
        Self {
            kube,
            instance: instance.to_owned(),
            keys: dir.join("kubernetes").join(encode_token(instance)),
            prepared: Mutex::new(HashSet::new()),
            credentials: Mutex::new(HashMap::new()),
        }
    }

    fn namespace(&self, id: &LiveLessonId) -> String {
        objects::namespace_name(&self.instance, id)
    }

    fn key_file(&self, id: &LiveLessonId) -> PathBuf {
        self.keys.join(id.as_str()).join("id_ed25519")
    }

    async fn api<K>(&self, namespace: &str) -> Result<Api<K>>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Ok(Api::namespaced(self.kube.client().await?, namespace))
    }

    /// The namespace, the Secret and the policies: once per lesson and process.
    async fn prepare(&self, owner: &Owner<'_>) -> Result<()> {
        if lock(&self.prepared).contains(owner.id) {
            return Ok(());
        }
        let ns = owner.namespace_name();
        let namespaces: Api<Namespace> = Api::all(self.kube.client().await?);
        self.kube.create(&namespaces, &owner.namespace()).await?;
        let secrets: Api<Secret> = self.api(&ns).await?;
        if self
            .kube
            .get(&secrets, Some(&ns), objects::SECRET)
            .await?
            .is_none()
        {
            let keys = new_keys(owner.lesson)?;
            self.kube.create(&secrets, &owner.secret(keys)).await?;
        }
        let policies: Api<NetworkPolicy> = self.api(&ns).await?;
        for policy in owner.network_policies() {
            self.kube.create(&policies, &policy).await?;
        }
        lock(&self.prepared).insert(owner.id.clone());
        Ok(())
    }

    async fn start_endpoint(&self, owner: &Owner<'_>, endpoint: &EndpointName) -> Result<()> {
        let Some(endpoint) = owner.lesson.endpoint(endpoint) else {
            return Err(BackendError::Refused {
                what: format!("cannot start endpoint {endpoint}"),
                reason: "the lesson has no such endpoint".into(),
            });
        };
        let pod = owner
            .pod(endpoint)
            .map_err(refused(format!("cannot start endpoint {}", endpoint.name)))?;
        self.prepare(owner).await?;
        let ns = owner.namespace_name();
        let pods: Api<Pod> = self.api(&ns).await?;
        self.kube.create(&pods, &pod).await?;
        let services: Api<Service> = self.api(&ns).await?;
        for service in owner.services(endpoint) {
            self.kube.create(&services, &service).await?;
        }
        Ok(())
    }

    async fn observe_lesson(
        &self,
        id: &LiveLessonId,
        lesson: &Lesson,
    ) -> Result<BTreeMap<EndpointName, Seen>> {
        let ns = self.namespace(id);
        let selector = crate::kubernetes::instance_selector(&self.instance);
        let pods: Api<Pod> = self.api(&ns).await?;
        let found = self.kube.list(&pods, Some(&ns), &selector).await?;
        if found.is_empty() {
            return Ok(BTreeMap::new());
        }
        let services: Api<Service> = self.api(&ns).await?;
        let services = self.kube.list(&services, Some(&ns), &selector).await?;
        let mut seen = BTreeMap::new();
        for endpoint in &lesson.endpoints {
            let Some(pod) = found
                .iter()
                .find(|p| p.metadata.name.as_deref() == Some(endpoint.name.as_str()))
            else {
                continue;
            };
            let state = objects::pod_state(pod);
            let Some(mut endpoint_seen) = objects::seen(endpoint, &state, &services) else {
                continue;
            };
            if let (PodState::Failed(_), Seen::Failed { output, .. }) = (&state, &mut endpoint_seen)
            {
                *output = self.logs(&pods, &ns, endpoint.name.as_str()).await;
            }
            seen.insert(endpoint.name.clone(), endpoint_seen);
        }
        Ok(seen)
    }

    /// The end of a pod's log; nothing if it cannot be read.
    async fn logs(&self, pods: &Api<Pod>, ns: &str, name: &str) -> String {
        self.kube
            .pod_log(pods, ns, name, Some(200))
            .await
            .unwrap_or_default()
    }

    /// The lesson's keys, from its Secret (once per lesson and process).
    async fn credentials(&self, id: &LiveLessonId) -> Result<Arc<Credentials>> {
        if let Some(found) = lock(&self.credentials).get(id) {
            return Ok(found.clone());
        }
        let ns = self.namespace(id);
        let secrets: Api<Secret> = self.api(&ns).await?;
        let what = format!("the keys of lesson {id}");
        let Some(secret) = self.kube.get(&secrets, Some(&ns), objects::SECRET).await? else {
            return Err(BackendError::Unavailable {
                what,
                reason: format!("secret {}/{} does not exist yet", ns, objects::SECRET),
            });
        };
        let data = secret.data.unwrap_or_default();
        let text = |key: &str| {
            data.get(key)
                .map(|v| String::from_utf8_lossy(&v.0).into_owned())
                .ok_or_else(|| format!("the secret has no {key}"))
        };
        let private = text(objects::PRIVATE_KEY).map_err(refused(what.clone()))?;
        let key = PrivateKey::from_openssh(private.as_bytes())
            .map_err(|e| e.to_string())
            .map_err(refused(what.clone()))?;
        let mut host_keys = BTreeMap::new();
        for (name, value) in &data {
            if let Some(endpoint) = name
                .strip_prefix("host-")
                .and_then(|n| n.strip_suffix(".pub"))
            {
                let text = String::from_utf8_lossy(&value.0);
                if let Ok(public) = crate::tunnel::keys::parse_public(&text) {
                    host_keys.insert(endpoint.to_owned(), public);
                }
            }
        }
        self.write_key_file(id, &private).await?;
        let credentials = Arc::new(Credentials {
            key: Arc::new(key),
            host_keys,
        });
        lock(&self.credentials).insert(id.clone(), credentials.clone());
        Ok(credentials)
    }

    /// Keeps the private key where `ssh -i` can read it: mode 0600, written whole.
    async fn write_key_file(&self, id: &LiveLessonId, private: &str) -> Result<()> {
        let path = self.key_file(id);
        let dir = path.parent().unwrap_or(&self.keys).to_owned();
        tokio::fs::create_dir_all(&dir)
            .await
            .map_err(BackendError::failed(format!(
                "cannot create {}",
                dir.display()
            )))?;
        crate::backend::write_private(&path, private.as_bytes()).await
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fresh keys for a lesson: its key pair and a host key per endpoint.
fn new_keys(lesson: &Lesson) -> Result<BTreeMap<String, Vec<u8>>> {
    let bad = |e: crate::tunnel::keys::KeyError| BackendError::Refused {
        what: "cannot make the lesson's keys".into(),
        reason: e.to_string(),
    };
    let encode = |key: &PrivateKey| -> Result<(String, String)> {
        let private = key
            .to_openssh(LineEnding::LF)
            .map_err(|e| BackendError::Refused {
                what: "cannot encode the lesson's keys".into(),
                reason: e.to_string(),
            })?
            .to_string();
        let public = crate::tunnel::keys::canonical(key.public_key()).map_err(bad)?;
        Ok((private, public))
    };
    let mut keys = BTreeMap::new();
    let (private, public) = encode(&crate::tunnel::keys::generate().map_err(bad)?)?;
    keys.insert(objects::PRIVATE_KEY.to_owned(), private.into_bytes());
    keys.insert(
        objects::AUTHORIZED_KEYS.to_owned(),
        format!("{public}\n").into_bytes(),
    );
    for endpoint in &lesson.endpoints {
        let (private, public) = encode(&crate::tunnel::keys::generate().map_err(bad)?)?;
        let name = objects::host_key_name(&endpoint.name);
        keys.insert(name.clone(), private.into_bytes());
        keys.insert(format!("{name}.pub"), format!("{public}\n").into_bytes());
    }
    Ok(keys)
}

impl LessonBackend for KubernetesBackend {
    fn name(&self) -> &'static str {
        "kubernetes"
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
        session: &'a LiveSessionId,
        lesson: &'a Lesson,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            let owner = Owner {
                instance: &self.instance,
                id,
                session,
                lesson,
            };
            self.start_endpoint(&owner, endpoint).await
        })
    }

    fn access<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<Access>> {
        Box::pin(async move {
            let credentials = self.credentials(id).await?;
            Ok(Access {
                user: self.kube.config().ssh_user.clone(),
                key: credentials.key.clone(),
                key_file: Some(self.key_file(id)),
            })
        })
    }

    fn host_key<'a>(
        &'a self,
        id: &'a LiveLessonId,
        endpoint: &'a EndpointName,
    ) -> BoxFuture<'a, Option<PublicKey>> {
        Box::pin(async move {
            let credentials = self.credentials(id).await.ok()?;
            credentials.host_keys.get(endpoint.as_str()).cloned()
        })
    }

    fn ssh_command(&self, id: &LiveLessonId, address: &str) -> String {
        super::backend::ssh_command(&self.key_file(id), &self.kube.config().ssh_user, address)
    }

    fn delete<'a>(&'a self, id: &'a LiveLessonId) -> BoxFuture<'a, Result<()>> {
        Box::pin(async move {
            // One deletion: the namespace takes everything in it along.
            let ns = self.namespace(id);
            let namespaces: Api<Namespace> = Api::all(self.kube.client().await?);
            self.kube.delete(&namespaces, None, &ns).await?;
            lock(&self.prepared).remove(id);
            lock(&self.credentials).remove(id);
            let dir = self.keys.join(id.as_str());
            crate::backend::remove_dir(&dir).await
        })
    }

    fn lessons(&self) -> BoxFuture<'_, Result<Vec<(String, SystemTime)>>> {
        Box::pin(async move {
            let namespaces: Api<Namespace> = Api::all(self.kube.client().await?);
            let selector = crate::kubernetes::instance_selector(&self.instance);
            let found = self.kube.list(&namespaces, None, &selector).await?;
            Ok(found
                .into_iter()
                .filter(|ns| ns.metadata.deletion_timestamp.is_none())
                .filter_map(|ns| {
                    let id = ns
                        .metadata
                        .annotations
                        .as_ref()
                        .and_then(|a| a.get(objects::LIVE_LESSON).cloned())?;
                    let at = ns
                        .metadata
                        .creation_timestamp
                        .map(|t| SystemTime::from(t.0))
                        .unwrap_or(SystemTime::UNIX_EPOCH);
                    Some((id, at))
                })
                .collect())
        })
    }
}
