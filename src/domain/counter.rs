//! `counter`: a small entity that proves the runtime. Tests and benchmarks drive it; it has
//! every moving part a real entity has: creation, bounded updates, deletion, expiry by a reaper,
//! and an event whose schema changed (`counter.created` v1 to v2).

use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Aggregate, CommandRequest, Context, ErrorKind, Rejection, Timestamp};
use crate::{entity_id, event_set};

entity_id!(
    /// Names a counter: any printable text.
    CounterId,
    "counter id"
);

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub enum Counter {
    #[default]
    Absent,
    Live(Live),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Live {
    pub value: u64,
    pub limit: Option<u64>,
    pub idle_ttl: Option<Duration>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CounterCommand {
    Create {
        limit: Option<u64>,
        idle_ttl: Option<Duration>,
    },
    Add {
        amount: u64,
    },
    Delete,
    /// Sent by the reaper; deletes the counter only if it is still idle past its TTL.
    Expire,
}

event_set! {
    pub enum CounterEvent {
        Created(Created) = "counter.created" @ 2 older { 1 => CreatedV1 },
        Added(Added) = "counter.added" @ 1,
        Deleted(Deleted) = "counter.deleted" @ 1,
    }
}

/// A counter came into existence.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Created {
    /// The value may never exceed this; `None` means unbounded.
    pub limit: Option<u64>,
    /// Delete the counter once it has not changed for this many milliseconds.
    pub idle_ttl_ms: Option<u64>,
    pub at: Timestamp,
}

/// `counter.created` as written before idle TTLs existed: a limit of 0 meant "unbounded".
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CreatedV1 {
    pub limit: u64,
    pub at: Timestamp,
}

impl From<CreatedV1> for Created {
    fn from(old: CreatedV1) -> Self {
        Created {
            limit: (old.limit != 0).then_some(old.limit),
            idle_ttl_ms: None,
            at: old.at,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Added {
    pub amount: u64,
    pub at: Timestamp,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeleteReason {
    Requested,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub reason: DeleteReason,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CounterError {
    #[error("counter {id:?} already exists")]
    AlreadyExists { id: String },
    #[error("counter {id:?} does not exist")]
    NotFound { id: String },
    #[error("adding {amount} to counter {id:?} at {value} would pass its limit of {limit}")]
    LimitExceeded {
        id: String,
        value: u64,
        amount: u64,
        limit: u64,
    },
    #[error("adding {amount} to counter {id:?} at {value} would overflow")]
    Overflow { id: String, value: u64, amount: u64 },
    #[error("amount must be at least 1")]
    ZeroAmount,
}

impl Rejection for CounterError {
    fn kind(&self) -> ErrorKind {
        match self {
            CounterError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
            CounterError::NotFound { .. } => ErrorKind::NotFound,
            CounterError::LimitExceeded { .. } | CounterError::Overflow { .. } => {
                ErrorKind::Capacity
            }
            CounterError::ZeroAmount => ErrorKind::Invalid,
        }
    }
}

/// What readers see of a counter.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CounterView {
    pub id: CounterId,
    pub value: u64,
    pub limit: Option<u64>,
    pub idle_ttl_ms: Option<u64>,
    pub created_at: Timestamp,
    pub updated_at: Timestamp,
}

/// The reply to every counter command: the counter afterwards, `null` once deleted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CounterReply {
    pub counter: Option<CounterView>,
}

impl Aggregate for Counter {
    const KIND: &'static str = "counter";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = CounterId;
    type Command = CounterCommand;
    type Event = CounterEvent;
    type Reply = CounterReply;
    type View = CounterView;
    type Error = CounterError;

    fn decide(
        &self,
        id: &CounterId,
        command: &CounterCommand,
        cx: &Context,
    ) -> Result<Vec<CounterEvent>, CounterError> {
        let at = cx.now;
        match (self, command) {
            (Counter::Absent, CounterCommand::Create { limit, idle_ttl }) => {
                Ok(vec![CounterEvent::Created(Created {
                    limit: *limit,
                    idle_ttl_ms: idle_ttl
                        .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                    at,
                })])
            }
            (Counter::Live(_), CounterCommand::Create { .. }) => {
                Err(CounterError::AlreadyExists { id: id.to_string() })
            }
            (_, CounterCommand::Add { amount: 0 }) => Err(CounterError::ZeroAmount),
            (Counter::Absent, CounterCommand::Add { .. }) => {
                Err(CounterError::NotFound { id: id.to_string() })
            }
            (Counter::Live(live), CounterCommand::Add { amount }) => {
                let value = live.value;
                let amount = *amount;
                let next = value.checked_add(amount).ok_or(CounterError::Overflow {
                    id: id.to_string(),
                    value,
                    amount,
                })?;
                match live.limit {
                    Some(limit) if next > limit => Err(CounterError::LimitExceeded {
                        id: id.to_string(),
                        value,
                        amount,
                        limit,
                    }),
                    _ => Ok(vec![CounterEvent::Added(Added { amount, at })]),
                }
            }
            // Deleting is idempotent: a missing counter is already what the caller wants.
            (Counter::Absent, CounterCommand::Delete | CounterCommand::Expire) => Ok(vec![]),
            (Counter::Live(_), CounterCommand::Delete) => {
                Ok(vec![CounterEvent::Deleted(Deleted {
                    reason: DeleteReason::Requested,
                    at,
                })])
            }
            (Counter::Live(live), CounterCommand::Expire) => {
                if live.expired_at(at) {
                    Ok(vec![CounterEvent::Deleted(Deleted {
                        reason: DeleteReason::Expired,
                        at,
                    })])
                } else {
                    Ok(vec![])
                }
            }
        }
    }

    fn apply(&mut self, event: &CounterEvent) {
        match event {
            CounterEvent::Created(created) => {
                *self = Counter::Live(Live {
                    value: 0,
                    limit: created.limit,
                    idle_ttl: created.idle_ttl_ms.map(Duration::from_millis),
                    created_at: created.at,
                    updated_at: created.at,
                });
            }
            CounterEvent::Added(added) => {
                if let Counter::Live(live) = self {
                    live.value = live.value.saturating_add(added.amount);
                    live.updated_at = added.at;
                }
            }
            CounterEvent::Deleted(_) => *self = Counter::Absent,
        }
    }

    fn reply(&self, id: &CounterId, _command: &CounterCommand) -> CounterReply {
        CounterReply {
            counter: self.view(id),
        }
    }

    fn view(&self, id: &CounterId) -> Option<CounterView> {
        match self {
            Counter::Absent => None,
            Counter::Live(live) => Some(CounterView {
                id: id.clone(),
                value: live.value,
                limit: live.limit,
                idle_ttl_ms: live
                    .idle_ttl
                    .map(|ttl| u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
                created_at: live.created_at,
                updated_at: live.updated_at,
            }),
        }
    }

    fn due(&self, _id: &CounterId, now: Timestamp) -> Option<CounterCommand> {
        match self {
            Counter::Live(live) if live.expired_at(now) => Some(CounterCommand::Expire),
            _ => None,
        }
    }
}

impl Live {
    fn expired_at(&self, now: Timestamp) -> bool {
        self.idle_ttl
            .is_some_and(|ttl| now >= self.updated_at.saturating_add(ttl))
    }
}

/// `counter.create`: create a counter at zero.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCounter {
    pub id: CounterId,
    /// The value may never exceed this.
    #[serde(default)]
    pub limit: Option<u64>,
    /// Delete the counter once it has not changed for this many milliseconds.
    #[serde(default)]
    pub idle_ttl_ms: Option<u64>,
}

impl CommandRequest for CreateCounter {
    type Aggregate = Counter;
    const VERB: &'static str = "create";

    fn into_command(self) -> (CounterId, CounterCommand) {
        let idle_ttl = self.idle_ttl_ms.map(Duration::from_millis);
        (
            self.id,
            CounterCommand::Create {
                limit: self.limit,
                idle_ttl,
            },
        )
    }
}

/// `counter.add`: add a positive amount, within the counter's limit.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddToCounter {
    pub id: CounterId,
    pub amount: u64,
}

impl CommandRequest for AddToCounter {
    type Aggregate = Counter;
    const VERB: &'static str = "add";

    fn into_command(self) -> (CounterId, CounterCommand) {
        (
            self.id,
            CounterCommand::Add {
                amount: self.amount,
            },
        )
    }
}

/// `counter.delete`: delete a counter; deleting a missing counter succeeds.
#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DeleteCounter {
    pub id: CounterId,
}

impl CommandRequest for DeleteCounter {
    type Aggregate = Counter;
    const VERB: &'static str = "delete";

    fn into_command(self) -> (CounterId, CounterCommand) {
        (self.id, CounterCommand::Delete)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::replay;

    fn id() -> CounterId {
        CounterId::new("c.1/ü").unwrap()
    }

    fn at(secs: i64) -> Context {
        Context {
            now: Timestamp::from_unix_nanos(secs * 1_000_000_000),
        }
    }

    fn run(state: &mut Counter, command: CounterCommand, cx: Context) -> Result<(), CounterError> {
        for event in state.decide(&id(), &command, &cx)? {
            state.apply(&event);
        }
        Ok(())
    }

    fn live(limit: Option<u64>, idle_ttl: Option<Duration>) -> Counter {
        let mut c = Counter::default();
        run(&mut c, CounterCommand::Create { limit, idle_ttl }, at(0)).unwrap();
        c
    }

    #[test]
    fn create_twice_is_already_exists() {
        let mut c = live(None, None);
        let err = run(
            &mut c,
            CounterCommand::Create {
                limit: None,
                idle_ttl: None,
            },
            at(1),
        );
        assert_eq!(err.unwrap_err().kind(), ErrorKind::AlreadyExists);
    }

    #[test]
    fn add_to_missing_counter_is_not_found() {
        let err = Counter::default().decide(&id(), &CounterCommand::Add { amount: 1 }, &at(0));
        assert_eq!(err.unwrap_err().kind(), ErrorKind::NotFound);
    }

    #[test]
    fn add_respects_the_limit_and_rejects_zero() {
        let mut c = live(Some(5), None);
        run(&mut c, CounterCommand::Add { amount: 5 }, at(1)).unwrap();
        let err = run(&mut c, CounterCommand::Add { amount: 1 }, at(2)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Capacity);
        let err = run(&mut c, CounterCommand::Add { amount: 0 }, at(2)).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Invalid);
        assert_eq!(c.view(&id()).unwrap().value, 5);
    }

    #[test]
    fn add_that_would_overflow_is_capacity() {
        let mut c = live(None, None);
        run(&mut c, CounterCommand::Add { amount: u64::MAX }, at(1)).unwrap();
        let err = run(&mut c, CounterCommand::Add { amount: 1 }, at(2)).unwrap_err();
        assert!(matches!(err, CounterError::Overflow { .. }));
    }

    #[test]
    fn delete_is_idempotent() {
        let mut c = live(None, None);
        run(&mut c, CounterCommand::Delete, at(1)).unwrap();
        assert_eq!(c, Counter::Absent);
        assert!(
            c.decide(&id(), &CounterCommand::Delete, &at(2))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn expiry_reads_only_state_and_time() {
        let c = live(None, Some(Duration::from_secs(10)));
        assert_eq!(c.due(&id(), at(9).now), None);
        assert_eq!(c.due(&id(), at(10).now), Some(CounterCommand::Expire));
        // An Expire that arrives before the deadline (a stale reaper) changes nothing.
        assert!(
            c.decide(&id(), &CounterCommand::Expire, &at(9))
                .unwrap()
                .is_empty()
        );
        let events = c.decide(&id(), &CounterCommand::Expire, &at(10)).unwrap();
        assert!(matches!(
            &events[..],
            [CounterEvent::Deleted(Deleted {
                reason: DeleteReason::Expired,
                ..
            })]
        ));
        assert_eq!(live(None, None).due(&id(), at(1_000_000).now), None);
    }

    #[test]
    fn created_v1_upcasts_zero_limit_to_unbounded() {
        let v2: Created = CreatedV1 {
            limit: 0,
            at: Timestamp::EPOCH,
        }
        .into();
        assert_eq!(v2.limit, None);
        let v2: Created = CreatedV1 {
            limit: 7,
            at: Timestamp::EPOCH,
        }
        .into();
        assert_eq!(v2.limit, Some(7));
    }

    #[test]
    fn replay_equals_incremental_application() {
        let events = vec![
            CounterEvent::Created(Created {
                limit: None,
                idle_ttl_ms: None,
                at: Timestamp::EPOCH,
            }),
            CounterEvent::Added(Added {
                amount: 2,
                at: Timestamp::EPOCH,
            }),
            CounterEvent::Added(Added {
                amount: 3,
                at: Timestamp::EPOCH,
            }),
        ];
        let state: Counter = replay(&events);
        assert_eq!(state.view(&id()).unwrap().value, 5);
    }
}
