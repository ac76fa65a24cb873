//! What the scheduler does next for a live lesson, from its record and what the backend has:
//! never from why it woke up. A scheduler that restarts (or a replica that takes the lesson
//! over) asks again and carries on from where the log and the backend say it is; an endpoint
//! the backend has already is adopted, never started twice.

use std::collections::BTreeMap;
use std::time::Duration;

use super::EndpointName;
use super::livelesson::{Record, Status};
use crate::domain::Timestamp;

/// One endpoint, as the backend finds it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seen {
    /// Everything of it runs: where each port the lesson names is reached.
    Running { addresses: BTreeMap<u16, String> },
    /// Some of it was started, not all: starting it again starts the rest.
    Partial,
    /// All of it was started and the backend is bringing it up (a pod being scheduled, its
    /// image pulled, its Service given an address): wait for it.
    Starting,
    /// Some of it exited or vanished: why, and its output.
    Failed { why: String, output: String },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Killed: delete everything the backend has of it, then record `deleted`.
    Delete,
    /// Record that it is being provisioned (BOOTING), before anything is started.
    Provision,
    /// Start what the backend does not have of this endpoint.
    Start {
        endpoint: EndpointName,
    },
    /// The backend runs this endpoint: record where it is reached.
    Adopt {
        endpoint: EndpointName,
        addresses: BTreeMap<u16, String>,
    },
    /// Test every endpoint's reachability; past `deadline`, what does not answer fails it.
    Probe {
        deadline: Timestamp,
    },
    /// Run the stage's script on each of these endpoints, at once (a stage's scripts do not
    /// depend on each other).
    Configure {
        endpoints: Vec<EndpointName>,
        stage: u32,
    },
    Ready {
        stage: u32,
    },
    Fail {
        step: &'static str,
        reason: String,
        output: String,
    },
    /// Nothing to do before then.
    WaitUntil(Timestamp),
    /// Endpoints are coming up: look again in a moment.
    Poll,
    /// Nothing to do: READY, ERROR or deleted.
    Done,
}

/// The scheduler's timeouts.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// From BOOTING until every endpoint answers.
    pub reachability: Duration,
}

pub fn next(
    record: &Record,
    seen: &BTreeMap<EndpointName, Seen>,
    now: Timestamp,
    limits: Limits,
) -> Step {
    if record.is_deleted() {
        return Step::Done;
    }
    if record.kill.is_some() {
        return Step::Delete;
    }
    if record.status == Status::Error {
        return Step::Done;
    }
    if record.status != Status::Initialized {
        for endpoint in &record.lesson.endpoints {
            if let Some(Seen::Failed { why, output }) = seen.get(&endpoint.name) {
                return Step::Fail {
                    step: "endpoint",
                    reason: format!("endpoint {}: {why}", endpoint.name),
                    output: output.clone(),
                };
            }
        }
    }
    match record.status {
        Status::Initialized => Step::Provision,
        Status::Booting => {
            let since = record.booting_at.unwrap_or(record.requested_at);
            let deadline = since.saturating_add(limits.reachability);
            // Every endpoint is started before any is waited for: they come up together.
            let mut starting = Vec::new();
            for endpoint in &record.lesson.endpoints {
                match seen.get(&endpoint.name) {
                    Some(Seen::Running { addresses }) => {
                        if record.endpoints.get(&endpoint.name) != Some(addresses) {
                            return Step::Adopt {
                                endpoint: endpoint.name.clone(),
                                addresses: addresses.clone(),
                            };
                        }
                    }
                    Some(Seen::Starting) => starting.push(endpoint.name.to_string()),
                    _ => {
                        return Step::Start {
                            endpoint: endpoint.name.clone(),
                        };
                    }
                }
            }
            if starting.is_empty() {
                Step::Probe { deadline }
            } else if now >= deadline {
                Step::Fail {
                    step: "reachability",
                    reason: format!(
                        "not running {} s after booting: {}",
                        limits.reachability.as_secs(),
                        starting.join(", ")
                    ),
                    output: String::new(),
                }
            } else {
                Step::Poll
            }
        }
        Status::Configuration => {
            let Some(configuring) = &record.configuring else {
                return Step::Fail {
                    step: "configure",
                    reason: "configuration without a stage (a bug)".into(),
                    output: String::new(),
                };
            };
            let stage = configuring.stage;
            let Some(definition) = record.lesson.stage(stage) else {
                return Step::Fail {
                    step: "configure",
                    reason: format!("the lesson has no stage {stage}"),
                    output: String::new(),
                };
            };
            let mut pending = Vec::new();
            for endpoint in &record.lesson.endpoints {
                if !definition.configs.contains_key(&endpoint.name)
                    || configuring.done.contains_key(&endpoint.name)
                {
                    continue;
                }
                if !matches!(seen.get(&endpoint.name), Some(Seen::Running { .. })) {
                    return Step::Fail {
                        step: "configure",
                        reason: format!("endpoint {} is not running", endpoint.name),
                        output: String::new(),
                    };
                }
                pending.push(endpoint.name.clone());
            }
            if !pending.is_empty() {
                return Step::Configure {
                    endpoints: pending,
                    stage,
                };
            }
            let last = configuring
                .done
                .values()
                .map(|c| c.at)
                .max()
                .unwrap_or(configuring.at)
                .max(configuring.at);
            let ready_at = last.saturating_add(Duration::from_millis(record.lesson.ready_delay_ms));
            if now < ready_at {
                Step::WaitUntil(ready_at)
            } else {
                Step::Ready { stage }
            }
        }
        Status::Ready | Status::Error => Step::Done,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::catalog::{tests::sample, validate};
    use super::super::livelesson::{LiveLesson, LiveLessonCommand};
    use super::super::{LiveLessonId, LiveSessionId};
    use super::*;
    use crate::domain::{Aggregate, Context};

    const LIMITS: Limits = Limits {
        reachability: Duration::from_secs(60),
    };

    fn at(s: i64) -> Timestamp {
        Timestamp::from_unix_nanos(s * 1_000_000_000)
    }

    fn run(state: &mut LiveLesson, command: LiveLessonCommand, now: i64) {
        let id = LiveLessonId::new("abc-ssh-basics-1").unwrap();
        for event in state
            .decide(&id, &command, &Context { now: at(now) })
            .unwrap()
        {
            state.apply(&event);
        }
    }

    fn record(state: &LiveLesson) -> &Record {
        match state {
            LiveLesson::Present(r) => r,
            LiveLesson::Absent => panic!("absent"),
        }
    }

    fn name(n: &str) -> EndpointName {
        EndpointName::new(n).unwrap()
    }

    fn running(port: u16) -> Seen {
        Seen::Running {
            addresses: BTreeMap::from([(22, format!("127.0.0.1:{port}"))]),
        }
    }

    /// The sample lesson, requested at 0.
    fn requested() -> LiveLesson {
        let mut state = LiveLesson::default();
        let lesson = validate(&[sample()]).unwrap().remove(0);
        run(
            &mut state,
            LiveLessonCommand::Request {
                session: LiveSessionId::new("abc").unwrap(),
                lesson: Box::new(lesson),
                catalog: "d".into(),
                stage: 1,
            },
            0,
        );
        state
    }

    #[test]
    fn the_plan_walks_a_lesson_to_ready_and_adopts_what_runs() {
        let mut state = requested();
        let mut seen = BTreeMap::new();
        assert_eq!(next(record(&state), &seen, at(0), LIMITS), Step::Provision);
        run(&mut state, LiveLessonCommand::Provision, 1);
        assert_eq!(
            next(record(&state), &seen, at(1), LIMITS),
            Step::Start {
                endpoint: name("alpha")
            }
        );
        // alpha was started before a crash: adopted, not started again.
        seen.insert(name("alpha"), running(1000));
        let step = next(record(&state), &seen, at(2), LIMITS);
        assert!(
            matches!(step, Step::Adopt { ref endpoint, .. } if endpoint == &name("alpha")),
            "{step:?}"
        );
        let Step::Adopt {
            endpoint,
            addresses,
        } = step
        else {
            unreachable!()
        };
        run(
            &mut state,
            LiveLessonCommand::EndpointStarted {
                endpoint,
                addresses,
            },
            2,
        );
        assert_eq!(
            next(record(&state), &seen, at(2), LIMITS),
            Step::Start {
                endpoint: name("beta")
            }
        );
        seen.insert(name("beta"), running(1001));
        let Step::Adopt {
            endpoint,
            addresses,
        } = next(record(&state), &seen, at(3), LIMITS)
        else {
            panic!()
        };
        run(
            &mut state,
            LiveLessonCommand::EndpointStarted {
                endpoint,
                addresses,
            },
            3,
        );
        assert_eq!(
            next(record(&state), &seen, at(3), LIMITS),
            Step::Probe { deadline: at(61) }
        );
        run(&mut state, LiveLessonCommand::Configure, 4);
        assert_eq!(
            next(record(&state), &seen, at(4), LIMITS),
            Step::Configure {
                endpoints: vec![name("alpha"), name("beta")],
                stage: 1
            }
        );
        run(
            &mut state,
            LiveLessonCommand::EndpointConfigured {
                stage: 1,
                endpoint: name("alpha"),
                output: String::new(),
            },
            5,
        );
        assert_eq!(
            next(record(&state), &seen, at(5), LIMITS),
            Step::Configure {
                endpoints: vec![name("beta")],
                stage: 1
            }
        );
        run(
            &mut state,
            LiveLessonCommand::EndpointConfigured {
                stage: 1,
                endpoint: name("beta"),
                output: String::new(),
            },
            5,
        );
        // The ready delay (1 s) counts from the last script.
        assert_eq!(
            next(record(&state), &seen, at(5), LIMITS),
            Step::WaitUntil(at(6))
        );
        assert_eq!(
            next(record(&state), &seen, at(6), LIMITS),
            Step::Ready { stage: 1 }
        );
        // An endpoint that dies fails the lesson, with its output.
        seen.insert(
            name("beta"),
            Seen::Failed {
                why: "exited 1".into(),
                output: "boom".into(),
            },
        );
        let step = next(record(&state), &seen, at(6), LIMITS);
        assert!(
            matches!(step, Step::Fail { ref output, .. } if output == "boom"),
            "{step:?}"
        );
        run(
            &mut state,
            LiveLessonCommand::Kill {
                reason: super::super::livelesson::KillReason::Killed,
            },
            7,
        );
        assert_eq!(next(record(&state), &seen, at(7), LIMITS), Step::Delete);
    }

    #[test]
    fn starting_endpoints_are_all_started_then_waited_for_until_the_deadline() {
        let mut state = requested();
        run(&mut state, LiveLessonCommand::Provision, 1);
        let mut seen = BTreeMap::new();
        seen.insert(name("alpha"), Seen::Starting);
        // alpha comes up; beta is started meanwhile, not after it.
        assert_eq!(
            next(record(&state), &seen, at(1), LIMITS),
            Step::Start {
                endpoint: name("beta")
            }
        );
        seen.insert(name("beta"), Seen::Starting);
        assert_eq!(next(record(&state), &seen, at(2), LIMITS), Step::Poll);
        assert!(matches!(
            next(record(&state), &seen, at(61), LIMITS),
            Step::Fail { step: "reachability", ref reason, .. } if reason.contains("alpha, beta")
        ));
    }
}
