//! Cloud pools, first pieces: an instance set behind its throttles, on the stub driver that
//! records every call. A rate-limited driver is never called before its earliest retry, calls
//! are spaced by `max_cloud_ops_per_second`, quota and capacity hold creates, and two instance
//! sets on one driver see only their own instances.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use switchyard::cloud::driver::{
    Driver, DriverError, InstanceSpec, Operation, Registry, StubDriver,
};
use switchyard::cloud::throttled::{Refusal, Throttled};
use switchyard::domain::cloud::throttle::{CapacityScope, Counts, Hold, Limits};
use switchyard::runtime::system_clock;

fn spec(set: &str) -> InstanceSpec {
    InstanceSpec {
        instance_type: "m5.large".into(),
        image: "debian".into(),
        tags: BTreeMap::from([("set".to_owned(), set.to_owned())]),
        init_command: "true".into(),
        public_key: "ssh-ed25519 AAAA".into(),
    }
}

fn one(creating: u32) -> Counts {
    Counts {
        instances: 0,
        creating,
    }
}

fn set(stub: &StubDriver, id: &str, ops_per_second: u32) -> Throttled {
    let inner = stub.instance_set(&serde_json::json!({}), id).unwrap();
    Throttled::new(inner, Limits::default(), ops_per_second, system_clock())
}

#[tokio::test]
async fn a_rate_limited_driver_is_not_called_before_its_earliest_retry() {
    let clock = system_clock();
    let stub = StubDriver::new(clock.clone());
    let instances = set(&stub, "a", 0);
    let earliest = clock().saturating_add(Duration::from_millis(700));
    stub.inject(
        Operation::Instances,
        DriverError::RateLimited {
            earliest_retry: earliest,
            message: "slow down".into(),
        },
    );
    let tags = BTreeMap::new();
    assert!(matches!(
        instances.instances(&tags).await,
        Err(Refusal::Driver(DriverError::RateLimited { .. }))
    ));
    // Every call is suspended, creates included: none reaches the driver.
    let mut held = 0;
    while clock() < earliest {
        match instances.create(&spec("a"), "m", one(1)).await {
            Err(Refusal::Held(Hold::RateLimited { until })) => {
                assert_eq!(until, earliest);
                held += 1;
            }
            other => panic!("called before the earliest retry: {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(held > 0);
    instances.create(&spec("a"), "m", one(1)).await.unwrap();
    let calls = stub.calls();
    assert_eq!(calls.len(), 2, "{calls:?}");
    assert!(calls[1].at >= earliest, "{calls:?}");
}

#[tokio::test]
async fn calls_are_spaced_by_max_cloud_ops_per_second() {
    let stub = StubDriver::new(system_clock());
    let instances = set(&stub, "a", 20);
    let tags = BTreeMap::new();
    for _ in 0..10 {
        instances.instances(&tags).await.unwrap();
    }
    let calls = stub.calls();
    assert_eq!(calls.len(), 10);
    for pair in calls.windows(2) {
        let gap = pair[1].at.since(pair[0].at);
        assert!(gap >= Duration::from_millis(50), "{gap:?} between calls");
    }
}

#[tokio::test]
async fn quota_and_capacity_errors_hold_creates_until_they_may_pass() {
    let stub = StubDriver::new(system_clock());
    let instances = set(&stub, "a", 0);
    for _ in 0..2 {
        instances.create(&spec("a"), "m", one(1)).await.unwrap();
    }
    stub.inject(
        Operation::Create,
        DriverError::Quota {
            message: "InstanceLimitExceeded".into(),
        },
    );
    let counts = Counts {
        instances: 2,
        creating: 1,
    };
    assert!(matches!(
        instances.create(&spec("a"), "m", counts).await,
        Err(Refusal::Driver(DriverError::Quota { .. }))
    ));
    let two = Counts {
        instances: 2,
        creating: 1,
    };
    assert_eq!(
        instances.create(&spec("a"), "m", two).await,
        Err(Refusal::Held(Hold::AtQuotaUntilFewer { instances: 2 }))
    );
    // One goes away: the next list ends the hold.
    let id = stub.all_instances()[0].id.clone();
    instances.destroy(&id).await.unwrap();
    instances.instances(&BTreeMap::new()).await.unwrap();
    instances.create(&spec("a"), "m", one(1)).await.unwrap();

    stub.inject(
        Operation::Create,
        DriverError::Capacity {
            scope: CapacityScope::Type("m5.large".into()),
            message: "InsufficientInstanceCapacity".into(),
        },
    );
    assert!(instances.create(&spec("a"), "m", one(1)).await.is_err());
    assert!(matches!(
        instances.create(&spec("a"), "m", one(1)).await,
        Err(Refusal::Held(Hold::AtCapacity { .. }))
    ));
    let mut other = spec("a");
    other.instance_type = "c5.large".into();
    instances.create(&other, "c", one(1)).await.unwrap();
    assert_eq!(instances.holds(Counts::default()).len(), 1);
}

#[tokio::test]
async fn two_instance_sets_on_one_driver_see_only_their_own() {
    let stub = StubDriver::new(system_clock());
    let mut registry = Registry::default();
    registry.register(Arc::new(stub.clone()));
    let driver = registry.get("stub").unwrap();
    assert!(matches!(
        registry.get("ec2"),
        Err(DriverError::UnknownDriver { .. })
    ));
    let a = Throttled::new(
        driver.instance_set(&serde_json::json!({}), "a").unwrap(),
        Limits::default(),
        0,
        system_clock(),
    );
    let b = Throttled::new(
        driver.instance_set(&serde_json::json!({}), "b").unwrap(),
        Limits::default(),
        0,
        system_clock(),
    );
    a.create(&spec("a"), "m", one(1)).await.unwrap();
    b.create(&spec("b"), "m", one(1)).await.unwrap();
    let mine = |set: &str| BTreeMap::from([("set".to_owned(), set.to_owned())]);
    let of_a = a.instances(&mine("a")).await.unwrap();
    assert_eq!(of_a.len(), 1);
    assert_eq!(of_a[0].tags["set"], "a");
    let of_b = b.instances(&mine("b")).await.unwrap();
    assert_eq!(of_b.len(), 1);
    assert_ne!(of_a[0].id, of_b[0].id);
}
