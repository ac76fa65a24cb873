//! The pure part of ownership: which shard an entity is in, which live replica a shard prefers,
//! and what a replica should do about each shard given what it sees. No I/O and no clock: the
//! caller passes `now` and what it observed, so the rules are table-tested.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// A shard number, `0..shards`.
pub type Shard = u32;

/// The shard of an entity: a stable hash (FNV-1a, 64-bit, then mixed) of its kind and id, the
/// same in every build and on every machine.
pub fn shard_of(kind: &str, id: &str, shards: u32) -> Shard {
    let hash = fnv1a(kind.bytes().chain([b'.']).chain(id.bytes()));
    // `shards` is at least 1 (checked in configuration); the remainder fits a u32.
    u32::try_from(mix(hash) % u64::from(shards.max(1))).unwrap_or(0)
}

/// Rendezvous (highest random weight) hashing: the replica a shard prefers among `replicas`.
/// Every replica computes the same answer from the same set, and a replica joining or leaving
/// moves only the shards it wins or held.
pub fn preferred<'a>(shard: Shard, replicas: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    replicas.into_iter().max_by_key(|replica| {
        (
            mix(fnv1a(replica.bytes()) ^ mix(u64::from(shard))),
            *replica,
        )
    })
}

fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// splitmix64's finalizer: FNV alone leaves similar inputs with similar low bits.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// What a replica knows of one shard's lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    /// Not read yet.
    Unknown,
    /// This replica holds it: `token` is the lease's revision when it was taken (the fencing
    /// token), `revision` its latest; it may serve the shard until `valid_until`.
    Me {
        token: u64,
        revision: u64,
        valid_until: Instant,
    },
    /// This replica's lease lapsed locally (renewals failed for too long); it serves nothing,
    /// but may still renew at `revision` if nobody took the shard meanwhile.
    Lapsed { token: u64, revision: u64 },
    /// Another replica holds it, as of its lease's revision `revision`, last seen `seen`.
    Other {
        replica: String,
        revision: u64,
        seen: Instant,
    },
    /// Nobody holds it, since `since` (as far as this replica knows).
    Free { since: Instant },
}

/// One thing the keeper should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Take the shard: create its lease.
    Acquire(Shard),
    /// Hand the shard over to the replica it prefers: stop serving it, delete the lease.
    Release(Shard),
}

/// What a replica sees: its own name, the live replicas (with when each was first seen), the
/// lease TTL, and the holder of every shard.
pub struct View<'a> {
    pub me: &'a str,
    pub ttl: Duration,
    /// Replicas whose presence is fresh, with when this replica first saw them.
    pub live: &'a BTreeMap<String, Instant>,
    pub holders: &'a [Holder],
}

impl View<'_> {
    /// A free shard whose preferred replica does not take it within this long is taken by
    /// anyone: the preferred one may be dead and its presence not yet lapsed.
    pub fn takeover_after(&self) -> Duration {
        self.ttl / 2
    }

    /// How long a new replica must have been seen before others hand it shards: long enough
    /// for it to be really up, short enough to balance quickly.
    pub fn settle(&self) -> Duration {
        self.ttl / 4
    }

    /// A lease not refreshed for a whole TTL has lapsed on the server (its owner renews every
    /// eighth of it), even if this replica never saw it go.
    fn lapsed(&self, seen: Instant, now: Instant) -> bool {
        now.saturating_duration_since(seen) >= self.ttl
    }

    /// What to do about every shard now.
    pub fn plan(&self, now: Instant) -> Vec<Action> {
        let mut actions = Vec::new();
        for (shard, holder) in (0..).zip(self.holders) {
            let preferred = preferred(shard, self.live.keys().map(String::as_str));
            let i_am_preferred = preferred == Some(self.me);
            match holder {
                Holder::Unknown | Holder::Lapsed { .. } => {}
                Holder::Me { .. } => {
                    let settled = preferred
                        .and_then(|p| self.live.get(p))
                        .is_some_and(|first| {
                            now.saturating_duration_since(*first) >= self.settle()
                        });
                    if !i_am_preferred && settled {
                        actions.push(Action::Release(shard));
                    }
                }
                Holder::Other { seen, .. } => {
                    if self.lapsed(*seen, now) {
                        actions.push(Action::Acquire(shard));
                    }
                }
                Holder::Free { since } => {
                    if i_am_preferred
                        || now.saturating_duration_since(*since) >= self.takeover_after()
                    {
                        actions.push(Action::Acquire(shard));
                    }
                }
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_are_stable_and_spread() {
        // Stored nowhere, but every replica must agree: pin a few values.
        assert_eq!(
            shard_of("pod", "switch-pod-0", 32),
            shard_of("pod", "switch-pod-0", 32)
        );
        assert_ne!(
            shard_of("pod", "a", 1 << 20),
            shard_of("meeting_point", "a", 1 << 20)
        );
        let mut counts = [0u32; 8];
        for i in 0..8000 {
            counts[shard_of("counter", &format!("c{i}"), 8) as usize] += 1;
        }
        assert!(counts.iter().all(|c| (800..1200).contains(c)), "{counts:?}");
        assert_eq!(shard_of("counter", "x", 0), 0);
    }

    #[test]
    fn rendezvous_moves_only_the_shards_of_the_replica_that_left() {
        let three = ["a", "b", "c"];
        let two = ["a", "b"];
        let mut share = BTreeMap::new();
        for shard in 0..300 {
            let with_c = preferred(shard, three).unwrap();
            let without = preferred(shard, two).unwrap();
            if with_c != "c" {
                assert_eq!(
                    with_c, without,
                    "shard {shard} moved though its owner stayed"
                );
            }
            *share.entry(with_c).or_insert(0) += 1;
        }
        assert!(share.values().all(|n| (70..130).contains(n)), "{share:?}");
        assert_eq!(preferred(0, []), None);
    }

    fn live(names: &[(&str, Instant)]) -> BTreeMap<String, Instant> {
        names.iter().map(|(n, t)| ((*n).to_owned(), *t)).collect()
    }

    #[test]
    fn the_plan_takes_what_it_prefers_hands_over_what_others_prefer_and_waits_otherwise() {
        let t0 = Instant::now();
        let ttl = Duration::from_secs(4);
        let now = t0 + Duration::from_secs(10);
        let replicas = live(&[("a", t0), ("b", t0)]);
        // Find one shard each replica prefers.
        let mine = (0..)
            .find(|s| preferred(*s, ["a", "b"]) == Some("a"))
            .unwrap();
        let theirs = (0..)
            .find(|s| preferred(*s, ["a", "b"]) == Some("b"))
            .unwrap();
        let n = mine.max(theirs) as usize + 1;
        let plan = |set: &[(Shard, Holder)], replicas: &BTreeMap<String, Instant>| {
            let mut holders = vec![Holder::Unknown; n];
            for (s, h) in set {
                holders[*s as usize] = h.clone();
            }
            View {
                me: "a",
                ttl,
                live: replicas,
                holders: &holders,
            }
            .plan(now)
        };
        let me = Holder::Me {
            token: 1,
            revision: 1,
            valid_until: now + ttl,
        };
        let just_freed = Holder::Free { since: now };
        let long_free = Holder::Free {
            since: now - Duration::from_secs(3),
        };
        let other = |seen| Holder::Other {
            replica: "b".to_owned(),
            revision: 9,
            seen,
        };
        // A free shard it prefers: take it at once; one b prefers: only once b has had time.
        assert_eq!(
            plan(&[(mine, just_freed.clone())], &replicas),
            [Action::Acquire(mine)]
        );
        assert_eq!(plan(&[(theirs, just_freed)], &replicas), []);
        assert_eq!(
            plan(&[(theirs, long_free)], &replicas),
            [Action::Acquire(theirs)]
        );
        // Held by b and fresh: leave it; not refreshed for a TTL: it lapsed, take it.
        assert_eq!(plan(&[(mine, other(now))], &replicas), []);
        assert_eq!(
            plan(&[(mine, other(now - ttl))], &replicas),
            [Action::Acquire(mine)]
        );
        // Held by a but preferred by b: hand it over once b has settled, not before.
        assert_eq!(
            plan(&[(theirs, me.clone())], &replicas),
            [Action::Release(theirs)]
        );
        let b_just_came = live(&[("a", t0), ("b", now)]);
        assert_eq!(plan(&[(theirs, me.clone())], &b_just_came), []);
        assert_eq!(plan(&[(mine, me)], &replicas), []);
        // Alone, it prefers everything.
        let alone = live(&[("a", t0)]);
        assert_eq!(
            plan(&[(theirs, Holder::Free { since: now })], &alone),
            [Action::Acquire(theirs)]
        );
    }
}
