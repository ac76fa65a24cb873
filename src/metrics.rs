//! Prometheus metrics, served on `/metrics`. One registry per process; cheap to clone.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub kind: String,
    pub verb: String,
    /// `ok`, or the error code.
    pub code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    pub kind: String,
    pub verb: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    pub kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AppendLabels {
    pub kind: String,
    /// `ok`, `duplicate`, `conflict` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ProjectionLabels {
    pub projection: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShardLabels {
    pub shard: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReactionLabels {
    pub reaction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReactionJobLabels {
    pub reaction: String,
    /// `ok` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WorkerStateLabels {
    pub set: String,
    pub instance_type: String,
    pub state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverCallLabels {
    pub set: String,
    pub operation: String,
    /// `ok`, `rate_limited`, `quota`, `capacity`, `not_implemented` or `error`.
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetLabels {
    pub set: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SetOutcomeLabels {
    pub set: String,
    pub outcome: String,
}

/// Every metric Switchyard exports.
#[derive(Clone, Debug)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// API requests by route and outcome code (`ok` or an error code).
    pub requests: Family<RouteLabels, Counter>,
    pub request_seconds: Family<OperationLabels, Histogram>,
    pub appends: Family<AppendLabels, Counter>,
    pub active_entities: Family<KindLabels, Gauge>,
    pub activations: Family<KindLabels, Counter>,
    pub passivations: Family<KindLabels, Counter>,
    pub projection_position: Family<ProjectionLabels, Gauge>,
    pub projection_errors: Family<ProjectionLabels, Counter>,
    pub work_queue: Family<OutcomeLabels, Counter>,
    pub reaped: Family<KindLabels, Counter>,
    pub repairs: Family<KindLabels, Counter>,
    /// Messages in the event stream that the store did not write.
    pub foreign: ForeignLog,
    /// Commits written to the command index.
    pub indexed: Counter,
    /// Lookups in the command index, by whether they found the command.
    pub index_lookups: Family<OutcomeLabels, Counter>,
    /// 1 for each shard this replica owns (and serves) now, 0 for the others.
    pub shard_owned: Family<ShardLabels, Gauge>,
    /// Shard leases taken, handed over, and lost (lapsed or taken by another), by outcome.
    pub shard_changes: Family<OutcomeLabels, Counter>,
    /// Requests sent on to the replica that owns their entity, by how (`api`, `entity`).
    pub forwarded: Family<OutcomeLabels, Counter>,
    /// The stream sequence each reaction has folded up to.
    pub reaction_position: Family<ReactionLabels, Gauge>,
    /// How many messages each reaction is behind the stream.
    pub reaction_lag: Family<ReactionLabels, Gauge>,
    /// Jobs each reaction is running now.
    pub reaction_running: Family<ReactionLabels, Gauge>,
    /// Jobs each reaction ran, by outcome.
    pub reaction_jobs: Family<ReactionJobLabels, Counter>,
    /// Cloud workers not yet gone, by instance set, instance type and state.
    pub cloud_workers: Family<WorkerStateLabels, Gauge>,
    /// Driver calls by instance set, operation and outcome.
    pub cloud_driver_calls: Family<DriverCallLabels, Counter>,
    /// How created instances' boots ended: `booted`, `never_booted`, `refused`.
    pub cloud_boots: Family<SetOutcomeLabels, Counter>,
    /// From an instance's creation to its first passing boot probe (its host verified and
    /// the pool's `boot_probe_command` exiting 0): time to ready.
    pub cloud_boot_seconds: Family<SetLabels, Histogram>,
    /// From an instance's creation to its first SSH session (host verified, a command run,
    /// whatever its exit): time to SSH.
    pub cloud_ssh_seconds: Family<SetLabels, Histogram>,
    /// The oldest last passing probe among a set's booted workers, in seconds.
    pub cloud_probe_age_seconds: Family<SetLabels, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchyard");
        let requests = Family::<RouteLabels, Counter>::default();
        registry.register(
            "requests",
            "API requests by route and outcome",
            requests.clone(),
        );
        let request_seconds = Family::<OperationLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_1, 2.0, 18))
        });
        registry.register(
            "request_seconds",
            "API request handling time",
            request_seconds.clone(),
        );
        let appends = Family::<AppendLabels, Counter>::default();
        registry.register("appends", "Event store appends by outcome", appends.clone());
        let active_entities = Family::<KindLabels, Gauge>::default();
        registry.register(
            "active_entities",
            "Entity actors in memory",
            active_entities.clone(),
        );
        let activations = Family::<KindLabels, Counter>::default();
        registry.register("activations", "Entity actors started", activations.clone());
        let passivations = Family::<KindLabels, Counter>::default();
        registry.register(
            "passivations",
            "Entity actors stopped when idle",
            passivations.clone(),
        );
        let projection_position = Family::<ProjectionLabels, Gauge>::default();
        registry.register(
            "projection_position",
            "Stream sequence each projection has applied",
            projection_position.clone(),
        );
        let projection_errors = Family::<ProjectionLabels, Counter>::default();
        registry.register(
            "projection_errors",
            "Messages a projection could not apply (skipped)",
            projection_errors.clone(),
        );
        let work_queue = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "work_queue",
            "Fire-and-forget commands by outcome",
            work_queue.clone(),
        );
        let reaped = Family::<KindLabels, Counter>::default();
        registry.register("reaped", "Commands sent by reapers", reaped.clone());
        let repairs = Family::<KindLabels, Counter>::default();
        registry.register(
            "repairs",
            "Repairs made by reconcilers, by kind of repair",
            repairs.clone(),
        );
        let foreign = ForeignLog::default();
        registry.register(
            "foreign_messages",
            "Messages in the event stream the store did not write, not yet acknowledged",
            foreign.unacknowledged.clone(),
        );
        registry.register(
            "foreign_messages_seen",
            "Times a reader met a message the store did not write (skipped)",
            foreign.seen.clone(),
        );
        let indexed = Counter::default();
        registry.register(
            "command_index_writes",
            "Commits written to the command index",
            indexed.clone(),
        );
        let index_lookups = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "command_index_lookups",
            "Retry checks beyond an entity's recent commands, by outcome (found, missing)",
            index_lookups.clone(),
        );
        let shard_owned = Family::<ShardLabels, Gauge>::default();
        registry.register(
            "shard_owned",
            "1 for each shard this replica owns and serves",
            shard_owned.clone(),
        );
        let shard_changes = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "shard_changes",
            "Shard leases acquired, released (handed over) and lost",
            shard_changes.clone(),
        );
        let forwarded = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "forwarded",
            "Requests forwarded to the replica owning their entity",
            forwarded.clone(),
        );
        let reaction_position = Family::<ReactionLabels, Gauge>::default();
        registry.register(
            "reaction_position",
            "Stream sequence each reaction has folded up to",
            reaction_position.clone(),
        );
        let reaction_lag = Family::<ReactionLabels, Gauge>::default();
        registry.register(
            "reaction_lag",
            "Messages each reaction is behind the event stream",
            reaction_lag.clone(),
        );
        let reaction_running = Family::<ReactionLabels, Gauge>::default();
        registry.register(
            "reaction_running",
            "Jobs each reaction is running now",
            reaction_running.clone(),
        );
        let reaction_jobs = Family::<ReactionJobLabels, Counter>::default();
        registry.register(
            "reaction_jobs",
            "Jobs each reaction ran, by outcome",
            reaction_jobs.clone(),
        );
        let cloud_workers = Family::<WorkerStateLabels, Gauge>::default();
        registry.register(
            "cloud_workers",
            "Cloud workers not yet gone, by instance set, type and state",
            cloud_workers.clone(),
        );
        let cloud_driver_calls = Family::<DriverCallLabels, Counter>::default();
        registry.register(
            "cloud_driver_calls",
            "Cloud driver calls by instance set, operation and outcome",
            cloud_driver_calls.clone(),
        );
        let cloud_boots = Family::<SetOutcomeLabels, Counter>::default();
        registry.register(
            "cloud_boots",
            "How created instances' boots ended (booted, never_booted, refused)",
            cloud_boots.clone(),
        );
        let cloud_boot_seconds = Family::<SetLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 12))
        });
        registry.register(
            "cloud_boot_seconds",
            "From an instance's creation to its first passing boot probe",
            cloud_boot_seconds.clone(),
        );
        let cloud_ssh_seconds = Family::<SetLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.5, 2.0, 12))
        });
        registry.register(
            "cloud_ssh_seconds",
            "From an instance's creation to its first SSH session",
            cloud_ssh_seconds.clone(),
        );
        let cloud_probe_age_seconds = Family::<SetLabels, Gauge>::default();
        registry.register(
            "cloud_probe_age_seconds",
            "The oldest last passing probe among a set's booted workers",
            cloud_probe_age_seconds.clone(),
        );
        Self {
            registry: Arc::new(registry),
            cloud_workers,
            cloud_driver_calls,
            cloud_boots,
            cloud_boot_seconds,
            cloud_ssh_seconds,
            cloud_probe_age_seconds,
            reaction_position,
            reaction_lag,
            reaction_running,
            reaction_jobs,
            shard_owned,
            shard_changes,
            forwarded,
            foreign,
            indexed,
            index_lookups,
            requests,
            request_seconds,
            appends,
            active_entities,
            activations,
            passivations,
            projection_position,
            projection_errors,
            work_queue,
            reaped,
            repairs,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub fn kind(kind: &str) -> KindLabels {
        KindLabels {
            kind: kind.to_owned(),
        }
    }

    /// The metrics of one entity kind, resolved once: commands touch them without hashing labels.
    pub fn entity(&self, kind: &str) -> EntityMetrics {
        let append = |outcome: &str| {
            let labels = AppendLabels {
                kind: kind.to_owned(),
                outcome: outcome.to_owned(),
            };
            self.appends.get_or_create_owned(&labels)
        };
        EntityMetrics {
            appended: append("ok"),
            duplicates: append("duplicate"),
            conflicts: append("conflict"),
            append_errors: append("error"),
            active: self
                .active_entities
                .get_or_create_owned(&Metrics::kind(kind)),
            activations: self.activations.get_or_create_owned(&Metrics::kind(kind)),
            passivations: self.passivations.get_or_create_owned(&Metrics::kind(kind)),
            index_found: self.index_lookups.get_or_create_owned(&OutcomeLabels {
                outcome: "found".to_owned(),
            }),
            index_missing: self.index_lookups.get_or_create_owned(&OutcomeLabels {
                outcome: "missing".to_owned(),
            }),
        }
    }

    /// The metrics of one API route, resolved once.
    pub fn route(&self, kind: &str, verb: &str) -> RouteMetrics {
        let codes = std::iter::once("ok")
            .chain(crate::domain::ErrorKind::ALL.iter().map(|k| k.as_str()))
            .map(|code| {
                let labels = RouteLabels {
                    kind: kind.to_owned(),
                    verb: verb.to_owned(),
                    code: code.to_owned(),
                };
                (code, self.requests.get_or_create_owned(&labels))
            })
            .collect();
        let labels = OperationLabels {
            kind: kind.to_owned(),
            verb: verb.to_owned(),
        };
        let seconds = self.request_seconds.get_or_create_owned(&labels);
        RouteMetrics { codes, seconds }
    }
}

/// Per-kind entity metrics.
#[derive(Clone, Debug)]
pub struct EntityMetrics {
    pub appended: Counter,
    pub duplicates: Counter,
    pub conflicts: Counter,
    pub append_errors: Counter,
    pub active: Gauge,
    pub activations: Counter,
    pub passivations: Counter,
    pub index_found: Counter,
    pub index_missing: Counter,
}

/// Per-route API metrics.
#[derive(Clone, Debug)]
pub struct RouteMetrics {
    codes: Vec<(&'static str, Counter)>,
    seconds: Histogram,
}

impl RouteMetrics {
    pub fn record(&self, code: &str, elapsed: std::time::Duration) {
        if let Some((_, counter)) = self.codes.iter().find(|(c, _)| *c == code) {
            counter.inc();
        }
        self.seconds.observe(elapsed.as_secs_f64());
    }
}

/// The foreign messages readers have met and no operator has acknowledged, by sequence: what
/// `/readyz` reports. Bounded: beyond [`ForeignLog::LISTED`] only the count grows.
#[derive(Clone, Debug, Default)]
pub struct ForeignLog {
    inner: Arc<Mutex<ForeignEntries>>,
    unacknowledged: Gauge,
    seen: Counter,
}

#[derive(Debug, Default)]
struct ForeignEntries {
    listed: BTreeMap<u64, crate::store::provenance::ForeignMessage>,
    /// Sequences met beyond the listed ones.
    unlisted: std::collections::BTreeSet<u64>,
}

impl ForeignLog {
    pub const LISTED: usize = 1024;

    fn lock(&self) -> std::sync::MutexGuard<'_, ForeignEntries> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A reader met `message`; once per sequence, it is logged.
    pub fn report(&self, message: crate::store::provenance::ForeignMessage) {
        self.seen.inc();
        let mut entries = self.lock();
        if entries.listed.contains_key(&message.seq) || entries.unlisted.contains(&message.seq) {
            return;
        }
        tracing::warn!(seq = message.seq, subject = %message.subject, reason = %message.reason, "the event stream holds a message the store did not write; skipping it (acknowledge it with `switchyard repair`)");
        if entries.listed.len() < Self::LISTED {
            entries.listed.insert(message.seq, message);
        } else {
            entries.unlisted.insert(message.seq);
        }
        self.unacknowledged
            .set(i64::try_from(entries.listed.len() + entries.unlisted.len()).unwrap_or(i64::MAX));
    }

    /// An operator acknowledged these.
    pub fn acknowledge(&self, seqs: &[u64]) {
        let mut entries = self.lock();
        for seq in seqs {
            entries.listed.remove(seq);
            entries.unlisted.remove(seq);
        }
        self.unacknowledged
            .set(i64::try_from(entries.listed.len() + entries.unlisted.len()).unwrap_or(i64::MAX));
    }

    /// How many are unacknowledged, and the latest few.
    pub fn summary(&self, latest: usize) -> (usize, Vec<crate::store::provenance::ForeignMessage>) {
        let entries = self.lock();
        let count = entries.listed.len() + entries.unlisted.len();
        let shown = entries
            .listed
            .values()
            .rev()
            .take(latest)
            .cloned()
            .collect();
        (count, shown)
    }
}
