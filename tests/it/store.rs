//! The event store's conformance suite, against a real nats-server: order, optimistic
//! concurrency (including "must be first"), idempotent retries, snapshots, long histories,
//! replay from a sequence, and old schema versions.

use std::collections::HashSet;
use std::time::Duration;

use futures::StreamExt;
use switchyard::codec::header;
use switchyard::config::StoreConfig;
use switchyard::domain::counter::{Added, Counter, CounterEvent, CounterId, Created};
use switchyard::domain::{Aggregate, CommandId, Principal, Timestamp, replay};
use switchyard::store::{Appended, Commit, Entity, EventStore, Start, StoreError};

use crate::harness::{store, store_with};

pub(crate) fn id(text: &str) -> CounterId {
    CounterId::new(text).unwrap()
}

pub(crate) fn created() -> CounterEvent {
    CounterEvent::Created(Created {
        limit: None,
        idle_ttl_ms: None,
        at: Timestamp::from_unix_nanos(1),
    })
}

fn added(amount: u64) -> CounterEvent {
    CounterEvent::Added(Added {
        amount,
        at: Timestamp::from_unix_nanos(2),
    })
}

/// Appends `events` as one commit with a fresh command id.
pub(crate) async fn append(
    store: &EventStore,
    entity: &CounterId,
    expected: u64,
    version: u64,
    events: &[CounterEvent],
) -> Result<Appended, StoreError> {
    append_as(
        store,
        entity,
        expected,
        version,
        &switchyard::runtime::new_command_id(),
        events,
    )
    .await
}

async fn append_as(
    store: &EventStore,
    entity: &CounterId,
    expected: u64,
    version: u64,
    command_id: &CommandId,
    events: &[CounterEvent],
) -> Result<Appended, StoreError> {
    store
        .append(Commit {
            fence: None,
            kind: Counter::KIND,
            entity: entity.as_str(),
            expected,
            entity_version: version,
            command_id,
            principal: &Principal::anonymous(),
            digest: None,
            generated_id: false,
            recorded_at: Timestamp::from_unix_nanos(3),
            events,
        })
        .await
}

#[tokio::test]
async fn commits_are_read_back_in_order_with_all_their_headers() {
    let fx = store().await;
    let c = id("skia-rpi-001.example.com");
    let first = append(&fx.store, &c, 0, 2, &[created(), added(1)])
        .await
        .unwrap();
    let second = append(&fx.store, &c, first.seq, 3, &[added(2)])
        .await
        .unwrap();
    assert!(second.seq > first.seq);

    let subject = fx.store.subjects().event("counter", c.as_str());
    let messages = fx.store.read_subject(&subject, 1, None).await.unwrap();
    assert_eq!(
        messages.iter().map(|m| m.seq).collect::<Vec<_>>(),
        vec![first.seq, second.seq]
    );
    assert_eq!(
        messages[0].decode::<CounterEvent>().unwrap(),
        vec![created(), added(1)]
    );
    assert_eq!(
        messages[1].decode::<CounterEvent>().unwrap(),
        vec![added(2)]
    );
    assert_eq!(
        messages[0].header(header::EVENT_TYPE),
        Some("counter.created,counter.added")
    );
    assert_eq!(messages[0].header(header::SCHEMA_VERSION), Some("2,1"));
    assert_eq!(messages[0].entity_version(), Some(2));
    assert_eq!(messages[1].entity_version(), Some(3));
    assert_eq!(messages[0].principal(), Some("anonymous"));
    assert!(messages[0].command_id().is_some());
    assert!(messages[0].recorded_at().is_some());

    let entity: Entity<Counter> = fx.store.load(&c).await.unwrap();
    assert_eq!(entity.version, 3);
    assert_eq!(entity.last_seq, second.seq);
    assert_eq!(entity.state.view(&c).unwrap().value, 3);
}

#[tokio::test]
async fn a_stale_expectation_is_a_conflict_and_writes_nothing() {
    let fx = store().await;
    let c = id("c");
    let first = append(&fx.store, &c, 0, 1, &[created()]).await.unwrap();
    append(&fx.store, &c, first.seq, 2, &[added(1)])
        .await
        .unwrap();
    let err = append(&fx.store, &c, first.seq, 2, &[added(5)])
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected, .. } if expected == first.seq),
        "{err:?}"
    );
    let subject = fx.store.subjects().event("counter", "c");
    assert_eq!(
        fx.store
            .read_subject(&subject, 1, None)
            .await
            .unwrap()
            .len(),
        2
    );
}

#[tokio::test]
async fn must_be_first_conflicts_once_the_entity_has_events() {
    let fx = store().await;
    let c = id("c");
    append(&fx.store, &c, 0, 1, &[created()]).await.unwrap();
    let err = append(&fx.store, &c, 0, 1, &[created()]).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Conflict { expected: 0, .. }),
        "{err:?}"
    );
    // Another entity is its own consistency boundary.
    append(&fx.store, &id("d"), 0, 1, &[created()])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_retried_commit_is_never_written_twice() {
    let fx = store().await;
    let c = id("c");
    let command = switchyard::runtime::new_command_id();
    let first = append_as(&fx.store, &c, 0, 1, &command, &[created()])
        .await
        .unwrap();
    assert!(!first.duplicate);
    // A blind retry (the ack was lost) carries the old expectation. A single 2.15 server checks
    // the expected sequence before the message id and answers "conflict"; clustered streams
    // check the id first and answer "duplicate". Either way nothing is written, and the entity
    // actor resolves a conflict by reloading and finding the command among its recent ones.
    let blind = append_as(&fx.store, &c, 0, 1, &command, &[created()]).await;
    assert!(
        matches!(blind, Ok(Appended { seq, duplicate: true }) if seq == first.seq)
            || matches!(blind, Err(StoreError::Conflict { .. })),
        "{blind:?}"
    );
    // A retry with an up-to-date expectation is recognised by its message id: the first ack.
    let informed = append_as(&fx.store, &c, first.seq, 1, &command, &[created()])
        .await
        .unwrap();
    assert_eq!(
        informed,
        Appended {
            seq: first.seq,
            duplicate: true
        }
    );
    // The same command id on another entity is another command.
    let other = append_as(&fx.store, &id("d"), 0, 1, &command, &[created()])
        .await
        .unwrap();
    assert!(!other.duplicate);
    assert_eq!(fx.store.last_sequence().await.unwrap(), 2);
}

#[tokio::test]
async fn snapshot_plus_tail_equals_full_replay() {
    let fx = store_with(StoreConfig {
        snapshot_every: 10,
        ..Default::default()
    })
    .await;
    let c = id("snap");
    let mut entity: Entity<Counter> = fx.store.load(&c).await.unwrap();
    let mut all_events = Vec::new();
    for i in 0..57u64 {
        let events = if i == 0 {
            vec![created()]
        } else {
            vec![added(i), added(1)]
        };
        let appended = append(
            &fx.store,
            &c,
            entity.last_seq,
            entity.version + events.len() as u64,
            &events,
        )
        .await
        .unwrap();
        entity.record(
            appended.seq,
            &switchyard::runtime::new_command_id(),
            &events,
        );
        all_events.extend(events);
        if entity.snapshot_due(10) {
            fx.store.save_snapshot(&mut entity).await;
        }
    }
    let from_snapshot: Entity<Counter> = fx.store.load(&c).await.unwrap();
    let full: Entity<Counter> = fx.store.load_as_of(&c, u64::MAX).await.unwrap();
    assert_eq!(from_snapshot.state, full.state);
    assert_eq!(from_snapshot.version, full.version);
    assert_eq!(from_snapshot.last_seq, full.last_seq);
    assert_eq!(full.state, replay::<Counter>(&all_events));
    assert_eq!(full.version, all_events.len() as u64);
}

#[tokio::test]
async fn an_undecodable_snapshot_falls_back_to_the_full_history() {
    let fx = store().await;
    let c = id("corrupt");
    let first = append(&fx.store, &c, 0, 1, &[created()]).await.unwrap();
    append(&fx.store, &c, first.seq, 2, &[added(4)])
        .await
        .unwrap();
    fx.store
        .snapshots()
        .put_raw("counter.corrupt", b"\xff\xff not bincode".to_vec())
        .await
        .unwrap();
    let entity: Entity<Counter> = fx.store.load(&c).await.unwrap();
    assert_eq!(entity.version, 2);
    assert_eq!(entity.state.view(&c).unwrap().value, 4);
}

#[tokio::test]
async fn a_snapshot_that_disagrees_with_the_log_falls_back_to_the_full_history() {
    let fx = store().await;
    let c = id("liar");
    let first = append(&fx.store, &c, 0, 1, &[created()]).await.unwrap();
    // A snapshot claiming 5 events at the first message: the next message (version 2) exposes it.
    let mut wrong: Entity<Counter> = fx.store.load(&c).await.unwrap();
    wrong.record(
        first.seq,
        &switchyard::runtime::new_command_id(),
        &[added(1), added(1), added(1), added(1)],
    );
    wrong.last_seq = first.seq;
    fx.store.save_snapshot(&mut wrong).await;
    append(&fx.store, &c, first.seq, 2, &[added(7)])
        .await
        .unwrap();
    let entity: Entity<Counter> = fx.store.load(&c).await.unwrap();
    assert_eq!(entity.version, 2);
    assert_eq!(entity.state.view(&c).unwrap().value, 7);
}

#[tokio::test]
async fn ten_thousand_events_on_one_entity_load_whole() {
    let fx = store_with(StoreConfig {
        snapshot_every: 0,
        ..Default::default()
    })
    .await;
    let c = id("long");
    let mut last = append(&fx.store, &c, 0, 1, &[created()]).await.unwrap().seq;
    let batch: Vec<CounterEvent> = (0..9).map(|_| added(1)).collect();
    let mut version = 1;
    // 1,111 commits of 9 events after the first: 10,000 events.
    for _ in 0..1111 {
        version += batch.len() as u64;
        last = append(&fx.store, &c, last, version, &batch)
            .await
            .unwrap()
            .seq;
    }
    assert_eq!(version, 10_000);
    let entity: Entity<Counter> = fx.store.load(&c).await.unwrap();
    assert_eq!(entity.version, 10_000);
    assert_eq!(entity.last_seq, last);
    assert_eq!(entity.state.view(&c).unwrap().value, 9_999);
}

#[tokio::test]
async fn the_stream_replays_from_any_sequence_then_follows_live() {
    let fx = store().await;
    for name in ["a", "b", "c", "d"] {
        append(&fx.store, &id(name), 0, 1, &[created()])
            .await
            .unwrap();
    }
    let filter = fx.store.subjects().events_of_kind("counter");
    let (mut stream, pending) = fx.store.follow(&filter, Start::Sequence(3)).await.unwrap();
    assert_eq!(pending, 2);
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(stream.next().await.unwrap().unwrap().seq);
    }
    assert_eq!(seen, vec![3, 4]);
    append(&fx.store, &id("e"), 0, 1, &[created()])
        .await
        .unwrap();
    let live = tokio::time::timeout(Duration::from_secs(5), stream.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(live.seq, 5);
    assert_eq!(
        fx.store.subjects().parse_event(&live.subject),
        Some(("counter".into(), "e".into()))
    );
}

#[tokio::test]
async fn concurrent_writers_get_one_success_per_expected_sequence() {
    let fx = store().await;
    let c = id("contended");
    append(&fx.store, &c, 0, 1, &[created()]).await.unwrap();
    let writers = 8;
    let per_writer = 25;
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let store = fx.store.clone();
        let c = c.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            let mut entity: Entity<Counter> = store.load(&c).await.unwrap();
            while won.len() < per_writer {
                match append(&store, &c, entity.last_seq, entity.version + 1, &[added(1)]).await {
                    Ok(ack) => {
                        won.push(entity.last_seq);
                        entity.record(ack.seq, &switchyard::runtime::new_command_id(), &[added(1)]);
                    }
                    Err(StoreError::Conflict { .. }) => {
                        store.catch_up(&mut entity).await.unwrap();
                    }
                    Err(err) => panic!("unexpected {err}"),
                }
            }
            won
        }));
    }
    let mut expectations = Vec::new();
    for task in tasks {
        expectations.extend(task.await.unwrap());
    }
    let unique: HashSet<_> = expectations.iter().collect();
    assert_eq!(
        unique.len(),
        expectations.len(),
        "two writers succeeded on the same expectation"
    );

    let subject = fx.store.subjects().event("counter", c.as_str());
    let history = fx.store.read_subject(&subject, 1, None).await.unwrap();
    assert_eq!(history.len(), 1 + writers * per_writer);
    let versions: Vec<u64> = history
        .iter()
        .map(|m| m.entity_version().unwrap())
        .collect();
    assert_eq!(
        versions,
        (1..=history.len() as u64).collect::<Vec<_>>(),
        "versions are gapless"
    );
    // Every success expected exactly the message before it.
    let chain: HashSet<u64> = history[..history.len() - 1].iter().map(|m| m.seq).collect();
    assert_eq!(unique.into_iter().copied().collect::<HashSet<_>>(), chain);
}

#[tokio::test]
#[allow(clippy::disallowed_methods)] // plants messages as an older release wrote them
async fn old_schema_versions_and_json_commits_are_upcast_on_read() {
    let fx = store().await;
    let js = async_nats::jetstream::new(fx.client.clone());
    // The headers every release of the store has written.
    let old_headers = || {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(header::EVENT_TYPE, "counter.created");
        headers.insert(header::SCHEMA_VERSION, "1");
        headers.insert(header::ENTITY_VERSION, "1");
        headers.insert(header::COMMAND_ID, "created-by-an-older-release");
        headers
    };
    // A counter.created v1 (limit 0 meant unbounded), written as JSON by an older release.
    let mut headers = old_headers();
    headers.insert(header::CONTENT_TYPE, "application/json");
    let payload = r#"[{"type":"counter.created","version":1,"data":{"limit":0,"at":"2024-01-01T00:00:00Z"}}]"#;
    js.publish_with_headers("sy.evt.counter.legacy", headers, payload.into())
        .await
        .unwrap()
        .await
        .unwrap();
    // And the same event as bincode v1, from the golden fixture.
    js.publish_with_headers(
        "sy.evt.counter.legacy-bin",
        old_headers(),
        GOLDEN_CREATED_V1.to_vec().into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    for name in ["legacy", "legacy-bin"] {
        let entity: Entity<Counter> = fx.store.load(&id(name)).await.unwrap();
        let view = entity.state.view(&id(name)).unwrap();
        assert_eq!(
            view.limit, None,
            "{name}: v1 limit 0 is upcast to unbounded"
        );
        assert_eq!(view.idle_ttl_ms, None);
        assert_eq!(entity.version, 1);
    }
}

/// `counter.created` v1 `{limit: 0, at: 1_700_000_000_000_000_000ns}` as stored by bincode 2.0.1
/// (standard config): a golden fixture, decoded by every future release.
const GOLDEN_CREATED_V1: &[u8] = &[
    0x01, // one event
    0x0f, b'c', b'o', b'u', b'n', b't', b'e', b'r', b'.', b'c', b'r', b'e', b'a', b't', b'e', b'd',
    0x01, // version 1
    0x0a, // 10 data bytes
    0x00, // limit 0
    0xfd, 0x00, 0x00, 0x54, 0x6c, 0xfc, 0x39, 0x2f,
    0x2f, // at: zigzag, then u64 little-endian
];

#[test]
fn the_golden_fixture_is_what_bincode_writes() {
    #[derive(serde::Serialize)]
    struct V1 {
        limit: u64,
        at: Timestamp,
    }
    let data = bincode::serde::encode_to_vec(
        V1 {
            limit: 0,
            at: Timestamp::from_unix_nanos(1_700_000_000_000_000_000),
        },
        bincode::config::standard(),
    )
    .unwrap();
    assert_eq!(&GOLDEN_CREATED_V1[19..], &data[..], "data bytes");
    assert_eq!(usize::from(GOLDEN_CREATED_V1[18]), data.len());
}

#[test]
fn a_meeting_point_reserved_before_keys_existed_is_upcast_without_one() {
    use switchyard::codec::{Bincode, Json};
    use switchyard::domain::event::{DomainEvent, Format};
    use switchyard::domain::switchboard::MeetingPointEvent;
    use switchyard::domain::switchboard::meeting_point::ReservedEventV1;

    let v1: ReservedEventV1 = serde_json::from_value(serde_json::json!({
        "place": {"pod": "switch-pod-0", "port": 10000, "lease": "l1"},
        "username": "chrome-bot",
        "keepalive_ms": 300000,
        "replaced": null,
        "at": "2026-11-22T10:00:00Z"
    }))
    .unwrap();
    for bytes in [Bincode::encode(&v1).unwrap(), Json::encode(&v1).unwrap()] {
        let format_is_json = bytes.first() == Some(&b'{');
        let event = if format_is_json {
            MeetingPointEvent::decode::<Json>("meeting_point.reserved", 1, &bytes)
        } else {
            MeetingPointEvent::decode::<Bincode>("meeting_point.reserved", 1, &bytes)
        }
        .unwrap();
        let MeetingPointEvent::Reserved(reserved) = event else {
            panic!("decoded as {event:?}");
        };
        assert_eq!(reserved.public_key, None);
        assert_eq!(reserved.place.port, 10000);
        assert_eq!(reserved.keepalive_ms, 300_000);
        let upcast = MeetingPointEvent::Reserved(reserved);
        assert_eq!(
            upcast.event_type().version,
            2,
            "re-encoded at the current version"
        );
    }
}
