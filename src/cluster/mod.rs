//! Ownership across replicas: entities are hashed into shards, and each shard has one owning
//! replica at a time, through a lease in the `<prefix>_SHARDS` KV bucket. NATS is the arbiter:
//! a lease is taken with compare-and-set (`create`), renewed with compare-and-set (`update` on
//! the revision its owner last wrote), and lapses on the server when its owner stops renewing
//! (the bucket's `max_age` is the lease TTL). The revision at which a replica took a lease is
//! its fencing token, written on every commit it makes for that shard.
//!
//! A replica serves a shard only while its own clock says a renewal is recent: it stops three
//! quarters of a TTL after the last renewal that succeeded, the server drops the lease a whole
//! TTL after it stored that renewal, so the old owner has stopped before anyone can take over.
//! Only durations on one machine are compared, never clocks across machines.
//!
//! [`plan`] holds the rules (which shard, which replica a shard prefers, what to do now); this
//! module does the I/O: the keeper task renews, takes and hands over leases; the watcher keeps
//! the view of other replicas' leases and presence up to date; [`forward`] sends requests for
//! shards owned elsewhere to their owner.

pub mod forward;
pub mod plan;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, OwnedRwLockReadGuard, RwLock, watch};

use crate::config::{ClusterConfig, StoreConfig};
use crate::metrics::{Metrics, OutcomeLabels, ShardLabels};
use plan::{Action, Holder, View};
pub use plan::{Shard, shard_of};

/// The reason on `unavailable` when no replica owns an entity's shard right now (a fail-over
/// is in progress): retry with the same command id.
pub const NO_SHARD_OWNER: &str = "no_shard_owner";
/// The reason on `unavailable` when the shard moved while the request was on its way.
pub const SHARD_MOVED: &str = "shard_moved";

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot open the shard bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cluster.shards must be at least 1")]
    NoShards,
    #[error(
        "cluster.replica {0:?} is not a valid name: use letters, digits, '-' and '_' (it is a subject token)"
    )]
    BadReplicaName(String),
    #[error(
        "replica {replica} runs with cluster.shards = {theirs} and this one with {ours}: every replica must agree"
    )]
    ShardCountMismatch {
        replica: String,
        theirs: u32,
        ours: u32,
    },
}

/// Where a shard's requests go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// This replica owns it, under this fencing token.
    Local { token: u64 },
    /// Another replica owns it and is alive.
    Remote { replica: String },
    /// Nobody (known to be alive) owns it now.
    Unowned,
}

/// The fencing token of the lease a commit was made under, written on the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fence<'a> {
    pub shard: Shard,
    pub token: u64,
    pub replica: &'a str,
}

/// What a lease's value says. The revision, not the value, is the token.
#[derive(Debug, Serialize, Deserialize)]
struct LeaseValue {
    replica: String,
}

/// What a replica's presence key says.
#[derive(Debug, Serialize, Deserialize)]
struct PresenceValue {
    shards: u32,
}

#[derive(Debug, Clone, Copy)]
struct Presence {
    first_seen: Instant,
    seen: Instant,
    revision: u64,
}

struct State {
    holders: Vec<Holder>,
    presence: HashMap<String, Presence>,
    /// Whether this replica takes shards (after `announce`, until `stop`).
    active: bool,
}

struct Inner {
    me: String,
    shards: u32,
    ttl: Duration,
    kv: kv::Store,
    state: Mutex<State>,
    /// One per shard: commits hold it shared while they append, a hand-over takes it
    /// exclusively, so no append is in flight when the lease is given up.
    fences: Vec<Arc<RwLock<()>>>,
    /// Bumped on every change of a holder, for waiters.
    changed: watch::Sender<u64>,
    wake: Notify,
    /// Held by each keeper round and by `stop`: a renewal in flight would otherwise move the
    /// revision a hand-over deletes at.
    ops: tokio::sync::Mutex<()>,
    /// Set by `stop`: the keeper ends.
    closed: std::sync::atomic::AtomicBool,
    metrics: Metrics,
}

/// This replica's view of who owns which shard, and its own leases. Cheap to clone.
#[derive(Clone)]
pub struct Ownership {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Ownership {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ownership")
            .field("replica", &self.inner.me)
            .field("shards", &self.inner.shards)
            .finish_non_exhaustive()
    }
}

/// Held by a commit while it appends: the shard cannot be handed over meanwhile.
pub struct FenceGuard {
    _guard: OwnedRwLockReadGuard<()>,
}

fn shard_key(shard: Shard) -> String {
    format!("shard.{shard}")
}

fn presence_key(replica: &str) -> String {
    format!("replica.{replica}")
}

/// A default replica name: the host name (as a subject token) and a random suffix.
fn default_replica_name() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "switchyard".to_owned());
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    format!("{host}-{}", &suffix[..8])
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

impl Ownership {
    /// Opens the shard bucket and starts watching it. The replica takes no shard until
    /// [`Ownership::announce`].
    pub async fn open(
        js: &jetstream::Context,
        store: &StoreConfig,
        config: &ClusterConfig,
        metrics: Metrics,
    ) -> Result<Self, ClusterError> {
        if config.shards == 0 {
            return Err(ClusterError::NoShards);
        }
        let me = if config.replica.is_empty() {
            default_replica_name()
        } else {
            config.replica.clone()
        };
        if !valid_name(&me) {
            return Err(ClusterError::BadReplicaName(me));
        }
        let bucket = store.shard_bucket();
        let kv = js
            .create_or_update_key_value(kv::Config {
                bucket: bucket.clone(),
                description: "Switchyard shard leases and replica presence (TTL = lease_ttl)"
                    .to_owned(),
                history: 1,
                max_age: config.lease_ttl,
                storage: jetstream::stream::StorageType::File,
                num_replicas: store.replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: bucket.clone(),
                source: e.into(),
            })?;
        let shards = config.shards;
        for shard in 0..shards {
            metrics
                .shard_owned
                .get_or_create(&ShardLabels {
                    shard: shard.to_string(),
                })
                .set(0);
        }
        let ownership = Self {
            inner: Arc::new(Inner {
                me,
                shards,
                ttl: config.lease_ttl,
                kv,
                state: Mutex::new(State {
                    holders: vec![Holder::Unknown; shards as usize],
                    presence: HashMap::new(),
                    active: false,
                }),
                fences: (0..shards).map(|_| Arc::new(RwLock::new(()))).collect(),
                changed: watch::channel(0).0,
                wake: Notify::new(),
                ops: tokio::sync::Mutex::new(()),
                closed: std::sync::atomic::AtomicBool::new(false),
                metrics,
            }),
        };
        // Watch first, then scan: whichever reports a key's later revision wins.
        let watch = ownership
            .inner
            .kv
            .watch_all()
            .await
            .map_err(|e| ClusterError::Bucket {
                bucket: bucket.clone(),
                source: e.into(),
            })?;
        tokio::spawn(watcher(ownership.clone(), watch));
        ownership
            .scan()
            .await
            .map_err(|source| ClusterError::Bucket {
                bucket: bucket.clone(),
                source,
            })?;
        tokio::spawn(keeper(ownership.clone()));
        Ok(ownership)
    }

    /// This replica's name.
    pub fn replica(&self) -> &str {
        &self.inner.me
    }

    pub fn shards(&self) -> u32 {
        self.inner.shards
    }

    pub fn lease_ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The shard of an entity.
    pub fn shard_of(&self, kind: &str, id: &str) -> Shard {
        shard_of(kind, id, self.inner.shards)
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Where a shard's requests go now.
    pub fn route(&self, shard: Shard) -> Route {
        let now = Instant::now();
        let state = self.state();
        let fresh = self.presence_fresh();
        match state.holders.get(shard as usize) {
            Some(Holder::Me {
                token, valid_until, ..
            }) if now < *valid_until => Route::Local { token: *token },
            Some(Holder::Other { replica, seen, .. })
                if now.saturating_duration_since(*seen) < self.inner.ttl
                    && state
                        .presence
                        .get(replica)
                        .is_some_and(|p| now.saturating_duration_since(p.seen) < fresh) =>
            {
                Route::Remote {
                    replica: replica.clone(),
                }
            }
            _ => Route::Unowned,
        }
    }

    /// Where a shard's requests go, waiting (up to one lease TTL) while nobody alive owns it:
    /// during a fail-over, until the new owner has taken it.
    pub async fn resolve(&self, shard: Shard) -> Route {
        let route = self.route(shard);
        if route != Route::Unowned {
            return route;
        }
        let deadline = tokio::time::Instant::now() + self.inner.ttl;
        let mut changed = self.inner.changed.subscribe();
        loop {
            let route = self.route(shard);
            if route != Route::Unowned {
                return route;
            }
            let wait = tokio::time::sleep_until(
                deadline.min(tokio::time::Instant::now() + Duration::from_millis(100)),
            );
            tokio::select! {
                _ = changed.changed() => {}
                () = wait => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return self.route(shard);
            }
        }
    }

    /// Bumped on every change of a shard's holder, as this replica sees it.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.inner.changed.subscribe()
    }

    /// Forgets a replica's presence (until it is refreshed): nobody answered on its subject,
    /// so requests wait for its leases to lapse rather than go to it.
    pub fn suspect(&self, replica: &str) {
        if replica != self.inner.me && self.state().presence.remove(replica).is_some() {
            tracing::info!(%replica, "a replica does not answer; waiting for its leases to lapse");
            self.notify_changed();
        }
    }

    /// Whether this replica serves `shard` under `token` right now.
    pub fn holds(&self, shard: Shard, token: u64) -> bool {
        self.route(shard) == Route::Local { token }
    }

    /// Whether this replica serves `shard` now, under any token.
    pub fn owns(&self, shard: Shard) -> bool {
        matches!(self.route(shard), Route::Local { .. })
    }

    /// Whether this replica serves the shard of this entity now: what reapers and reconcilers
    /// check before acting on it.
    pub fn owns_entity(&self, kind: &str, id: &str) -> bool {
        self.owns(self.shard_of(kind, id))
    }

    /// The shards this replica serves now.
    pub fn owned(&self) -> Vec<Shard> {
        (0..self.inner.shards).filter(|s| self.owns(*s)).collect()
    }

    /// The owner of every shard as this replica sees it (`None`: nobody alive).
    pub fn owners(&self) -> Vec<Option<String>> {
        (0..self.inner.shards)
            .map(|shard| match self.route(shard) {
                Route::Local { .. } => Some(self.inner.me.clone()),
                Route::Remote { replica } => Some(replica),
                Route::Unowned => None,
            })
            .collect()
    }

    /// Holds off a hand-over of `shard` while a commit under `token` appends; `None` if this
    /// replica no longer serves it under that token.
    pub async fn fence(&self, shard: Shard, token: u64) -> Option<FenceGuard> {
        let lock = self.inner.fences.get(shard as usize)?.clone();
        let guard = lock.read_owned().await;
        self.holds(shard, token)
            .then_some(FenceGuard { _guard: guard })
    }

    /// Starts taking shards: announces this replica and waits (at most one lease TTL) until
    /// it has tried, once, to take every shard it prefers.
    pub async fn announce(&self) -> Result<(), ClusterError> {
        let ours = self.inner.shards;
        self.put_presence().await;
        self.scan().await.map_err(|source| ClusterError::Bucket {
            bucket: self.inner.kv.name.clone(),
            source,
        })?;
        for (replica, theirs) in self.presence_shard_counts().await {
            if theirs != ours && replica != self.inner.me {
                let _ = self.inner.kv.delete(presence_key(&self.inner.me)).await;
                return Err(ClusterError::ShardCountMismatch {
                    replica,
                    theirs,
                    ours,
                });
            }
        }
        self.state().active = true;
        let _ = tokio::time::timeout(self.inner.ttl, self.round()).await;
        Ok(())
    }

    async fn presence_shard_counts(&self) -> Vec<(String, u32)> {
        let names: Vec<String> = self.state().presence.keys().cloned().collect();
        let mut out = Vec::new();
        for name in names {
            if let Ok(Some(value)) = self.inner.kv.get(presence_key(&name)).await
                && let Ok(presence) = serde_json::from_slice::<PresenceValue>(&value)
            {
                out.push((name, presence.shards));
            }
        }
        out
    }

    /// Stops serving every shard and hands them over at once: presence first (so nobody hands
    /// this replica a shard again), then each lease, each after its appends in flight.
    pub async fn stop(&self) {
        let _ops = self.inner.ops.lock().await;
        self.state().active = false;
        self.inner
            .closed
            .store(true, std::sync::atomic::Ordering::Release);
        let _ = self.inner.kv.delete(presence_key(&self.inner.me)).await;
        for shard in 0..self.inner.shards {
            self.release(shard).await;
        }
        self.inner.wake.notify_one();
    }

    async fn put_presence(&self) {
        let value = serde_json::to_vec(&PresenceValue {
            shards: self.inner.shards,
        })
        .unwrap_or_default();
        if let Err(err) = self
            .inner
            .kv
            .put(presence_key(&self.inner.me), value.into())
            .await
        {
            tracing::warn!(error = %err, "cannot refresh this replica's presence");
        }
    }

    /// Reads every key once: the leases and presences as they are now.
    async fn scan(&self) -> Result<(), async_nats::Error> {
        let mut keys = self.inner.kv.keys().await?;
        let mut names = Vec::new();
        while let Some(key) = keys.next().await {
            names.push(key?);
        }
        for key in names {
            if let Some(entry) = self.inner.kv.entry(&key).await? {
                let name = key.strip_prefix("replica.").filter(|n| *n != self.inner.me);
                let known = name.and_then(|n| self.state().presence.get(n).map(|p| p.revision));
                self.observe(&entry);
                // A presence read once says nothing of whether it is still renewed (a killed
                // replica's lingers for a TTL): it counts as alive once a renewal is seen.
                if let Some(name) = name
                    && known != Some(entry.revision)
                    && let Some(presence) = self.state().presence.get_mut(name)
                    && presence.revision == entry.revision
                {
                    presence.seen = Instant::now()
                        .checked_sub(self.inner.ttl)
                        .unwrap_or(presence.seen);
                    presence.first_seen = presence.seen;
                }
            }
        }
        let now = Instant::now();
        let mut state = self.state();
        for holder in &mut state.holders {
            if *holder == Holder::Unknown {
                *holder = Holder::Free { since: now };
            }
        }
        drop(state);
        self.notify_changed();
        Ok(())
    }

    /// Applies one entry (from the scan or the watch) to the view, if it is news.
    fn observe(&self, entry: &kv::Entry) {
        let now = Instant::now();
        let put = entry.operation == kv::Operation::Put;
        if let Some(name) = entry.key.strip_prefix("replica.") {
            let mut state = self.state();
            let known = state.presence.get(name).map_or(0, |p| p.revision);
            if entry.revision <= known {
                return;
            }
            // Only a replica that appears or leaves changes the plan: a renewal (every round
            // writes this replica's own) waking the keeper made it renew again at once, in a
            // loop of thousands of writes a second.
            let news = name != self.inner.me.as_str() && (put != state.presence.contains_key(name));
            if put {
                let first_seen = state.presence.get(name).map_or(now, |p| p.first_seen);
                state.presence.insert(
                    name.to_owned(),
                    Presence {
                        first_seen,
                        seen: now,
                        revision: entry.revision,
                    },
                );
            } else {
                state.presence.remove(name);
            }
            drop(state);
            if news {
                self.inner.wake.notify_one();
            }
            return;
        }
        let Some(shard) = entry
            .key
            .strip_prefix("shard.")
            .and_then(|s| s.parse::<Shard>().ok())
            .filter(|s| *s < self.inner.shards)
        else {
            return;
        };
        let holder = if put {
            match serde_json::from_slice::<LeaseValue>(&entry.value) {
                Ok(lease) => Some(lease.replica),
                Err(_) => None,
            }
        } else {
            None
        };
        let mut state = self.state();
        let slot = &mut state.holders[shard as usize];
        let known = match slot {
            Holder::Me { revision, .. }
            | Holder::Lapsed { revision, .. }
            | Holder::Other { revision, .. } => *revision,
            Holder::Unknown | Holder::Free { .. } => 0,
        };
        if entry.revision <= known {
            return;
        }
        let mine = matches!(slot, Holder::Me { .. } | Holder::Lapsed { .. });
        match holder {
            Some(replica) if replica == self.inner.me => {
                // Our own write, seen before its acknowledgement; the keeper records it.
                return;
            }
            Some(replica) => {
                if mine {
                    tracing::warn!(shard, to = %replica, "another replica took this replica's shard");
                    self.count("lost");
                }
                *slot = Holder::Other {
                    replica,
                    revision: entry.revision,
                    seen: now,
                };
            }
            None => {
                if mine {
                    self.count("lost");
                }
                *slot = Holder::Free { since: now };
            }
        }
        drop(state);
        self.owned_gauge(shard, false);
        self.notify_changed();
        self.inner.wake.notify_one();
    }

    /// When the first lease held by another replica lapses, unless renewed before.
    fn next_lapse(&self) -> Option<Instant> {
        let ttl = self.inner.ttl;
        self.state()
            .holders
            .iter()
            .filter_map(|holder| match holder {
                Holder::Other { seen, .. } => Some(*seen + ttl),
                _ => None,
            })
            .min()
    }

    fn notify_changed(&self) {
        self.inner.changed.send_modify(|n| *n += 1);
    }

    fn count(&self, outcome: &str) {
        self.inner
            .metrics
            .shard_changes
            .get_or_create(&OutcomeLabels {
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    fn owned_gauge(&self, shard: Shard, owned: bool) {
        self.inner
            .metrics
            .shard_owned
            .get_or_create(&ShardLabels {
                shard: shard.to_string(),
            })
            .set(i64::from(owned));
    }

    fn lease_value(&self) -> Bytes {
        serde_json::to_vec(&LeaseValue {
            replica: self.inner.me.clone(),
        })
        .unwrap_or_default()
        .into()
    }

    /// A replica is alive while its presence was refreshed this recently (it refreshes every
    /// eighth of a TTL): two missed refreshes and requests wait for its leases instead of
    /// going to it.
    fn presence_fresh(&self) -> Duration {
        self.inner.ttl / 4
    }

    /// How long a renewal sent at `sent` lets this replica serve.
    fn validity(&self) -> Duration {
        self.inner.ttl * 3 / 4
    }

    /// One pass of the keeper: presence, renewals, then the plan.
    async fn round(&self) {
        let _ops = self.inner.ops.lock().await;
        if !self.state().active {
            return;
        }
        self.put_presence().await;
        self.renew_all().await;
        let actions = {
            let now = Instant::now();
            let state = self.state();
            let fresh = self.presence_fresh();
            let mut live: BTreeMap<String, Instant> = state
                .presence
                .iter()
                .filter(|(_, p)| now.saturating_duration_since(p.seen) < fresh)
                .map(|(name, p)| (name.clone(), p.first_seen))
                .collect();
            live.entry(self.inner.me.clone()).or_insert(now);
            View {
                me: &self.inner.me,
                ttl: self.inner.ttl,
                live: &live,
                holders: &state.holders,
            }
            .plan(now)
        };
        for action in actions {
            match action {
                Action::Acquire(shard) => self.acquire(shard).await,
                Action::Release(shard) => self.release(shard).await,
            }
        }
    }

    async fn renew_all(&self) {
        let now = Instant::now();
        let owned: Vec<(Shard, u64, u64)> = {
            let mut state = self.state();
            let mut owned = Vec::new();
            for (shard, holder) in (0..).zip(state.holders.iter_mut()) {
                match *holder {
                    Holder::Me {
                        token,
                        revision,
                        valid_until,
                    } => {
                        if now >= valid_until {
                            *holder = Holder::Lapsed { token, revision };
                            tracing::warn!(
                                shard,
                                "lease not renewed in time; no longer serving this shard"
                            );
                        }
                        owned.push((shard, token, revision));
                    }
                    Holder::Lapsed { token, revision } => owned.push((shard, token, revision)),
                    _ => {}
                }
            }
            owned
        };
        for (shard, token, revision) in owned {
            let sent = Instant::now();
            let result = self
                .inner
                .kv
                .update(shard_key(shard), self.lease_value(), revision)
                .await;
            match self.renewed(shard, token, sent, now, result) {
                Renewal::Kept | Renewal::Gone => {}
                Renewal::Back => {
                    tracing::info!(shard, "lease renewed again; serving the shard");
                    self.owned_gauge(shard, true);
                    self.notify_changed();
                }
                Renewal::Lost => {
                    tracing::warn!(shard, "lease lost: it lapsed or was taken");
                    self.count("lost");
                    self.owned_gauge(shard, false);
                    self.notify_changed();
                    if let Ok(Some(entry)) = self.inner.kv.entry(shard_key(shard)).await {
                        self.observe(&entry);
                    }
                }
                Renewal::Failed(err) => {
                    tracing::warn!(shard, error = %err, "cannot renew a lease; retrying");
                    if !self.owns(shard) {
                        self.owned_gauge(shard, false);
                        self.notify_changed();
                    }
                }
            }
        }
    }

    /// Records what a renewal of `shard` (under `token`, sent at `sent`) came to.
    fn renewed(
        &self,
        shard: Shard,
        token: u64,
        sent: Instant,
        now: Instant,
        result: Result<u64, kv::UpdateError>,
    ) -> Renewal {
        let mut state = self.state();
        let slot = &mut state.holders[shard as usize];
        // Handed over or taken meanwhile: nothing to renew.
        if !matches!(slot, Holder::Me { token: t, .. } | Holder::Lapsed { token: t, .. } if *t == token)
        {
            return Renewal::Gone;
        }
        match result {
            Ok(revision) => {
                let was_lapsed = matches!(slot, Holder::Lapsed { .. });
                *slot = Holder::Me {
                    token,
                    revision,
                    valid_until: sent + self.validity(),
                };
                if was_lapsed {
                    Renewal::Back
                } else {
                    Renewal::Kept
                }
            }
            Err(err) if err.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                *slot = Holder::Free { since: now };
                Renewal::Lost
            }
            Err(err) => Renewal::Failed(err),
        }
    }

    async fn acquire(&self, shard: Shard) {
        let sent = Instant::now();
        match self
            .inner
            .kv
            .create(shard_key(shard), self.lease_value())
            .await
        {
            Ok(revision) => {
                let mut state = self.state();
                if !state.active {
                    return;
                }
                state.holders[shard as usize] = Holder::Me {
                    token: revision,
                    revision,
                    valid_until: sent + self.validity(),
                };
                drop(state);
                tracing::debug!(shard, token = revision, "took a shard");
                self.count("acquired");
                self.owned_gauge(shard, true);
                self.notify_changed();
            }
            Err(err) if err.kind() == kv::CreateErrorKind::AlreadyExists => {
                // A newer revision (another owner) updates the view; the same one means its
                // owner stopped renewing and the server has not dropped it yet: try again at
                // the next round.
                if let Ok(Some(entry)) = self.inner.kv.entry(shard_key(shard)).await {
                    self.observe(&entry);
                }
            }
            Err(err) => tracing::debug!(shard, error = %err, "cannot take a shard now"),
        }
    }

    /// Stops serving `shard` (after the appends in flight) and deletes its lease.
    async fn release(&self, shard: Shard) {
        let Some(lock) = self.inner.fences.get(shard as usize).cloned() else {
            return;
        };
        let exclusive = lock.write_owned().await;
        let revision = {
            let mut state = self.state();
            let slot = &mut state.holders[shard as usize];
            let revision = match slot {
                Holder::Me { revision, .. } | Holder::Lapsed { revision, .. } => *revision,
                _ => return,
            };
            *slot = Holder::Free {
                since: Instant::now(),
            };
            revision
        };
        self.owned_gauge(shard, false);
        self.notify_changed();
        drop(exclusive);
        match self
            .inner
            .kv
            .delete_expect_revision(shard_key(shard), Some(revision))
            .await
        {
            Ok(()) => {
                tracing::debug!(shard, "handed a shard over");
                self.count("released");
            }
            Err(err) => {
                // Still ours at a revision this replica did not record: delete at that one.
                let ours = match self.inner.kv.entry(shard_key(shard)).await {
                    Ok(Some(entry)) if entry.operation == kv::Operation::Put => {
                        serde_json::from_slice::<LeaseValue>(&entry.value)
                            .is_ok_and(|lease| lease.replica == self.inner.me)
                            .then_some(entry.revision)
                    }
                    _ => None,
                };
                let retried = match ours {
                    Some(revision) => self
                        .inner
                        .kv
                        .delete_expect_revision(shard_key(shard), Some(revision))
                        .await
                        .is_ok(),
                    None => false,
                };
                if retried {
                    self.count("released");
                } else {
                    tracing::debug!(shard, error = %err, "cannot delete a lease; it lapses on its own");
                }
            }
        }
    }
}

enum Renewal {
    Kept,
    /// Renewed after it had lapsed locally: serving again.
    Back,
    /// Someone else's now, or nobody's.
    Lost,
    /// Handed over meanwhile.
    Gone,
    Failed(kv::UpdateError),
}

/// Refreshes presence, renews and takes leases every eighth of a TTL, and at once when the
/// view changes.
async fn keeper(ownership: Ownership) {
    let tick = ownership.inner.ttl / 8;
    loop {
        // A round at the tick, or as soon as another replica's lease lapses (its owner
        // stopped renewing): a dead replica's shards are taken within moments of its TTL.
        // (Not sooner than a quarter tick: a lease seen lapsed whose take failed, renewed
        // unseen, is retried at that pace rather than in a loop.)
        let wait = ownership.next_lapse().map_or(tick, |at| {
            at.saturating_duration_since(Instant::now())
                .clamp(tick / 4, tick)
        });
        let _ = tokio::time::timeout(wait, ownership.inner.wake.notified()).await;
        // Let a burst of watch events settle into one round.
        tokio::time::sleep(Duration::from_millis(5)).await;
        if ownership
            .inner
            .closed
            .load(std::sync::atomic::Ordering::Acquire)
        {
            return;
        }
        ownership.round().await;
    }
}

/// Follows the bucket: other replicas' leases and presences, as they change.
async fn watcher(ownership: Ownership, mut watch: kv::Watch) {
    loop {
        match watch.next().await {
            Some(Ok(entry)) => ownership.observe(&entry),
            Some(Err(err)) => {
                tracing::debug!(error = %err, "shard watch interrupted; watching again");
                watch = loop {
                    if ownership
                        .inner
                        .closed
                        .load(std::sync::atomic::Ordering::Acquire)
                    {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                    if let Ok(watch) = ownership.inner.kv.watch_all().await {
                        let _ = ownership.scan().await;
                        break watch;
                    }
                };
            }
            None => return,
        }
    }
}
