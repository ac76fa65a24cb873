//! The switchboard's twelve operations as API routes: `pod.*` and `meeting_point.*`.
//!
//! Most are one command to one entity or a read of a read model. `meeting_point.reserve` and
//! `meeting_point.clear` span two entities (a pod's port lease and the machine's meeting
//! point); each step is idempotent under ids derived from the caller's command id, so a retry
//! finishes or repeats the same reservation, and the reconciler repairs what a crash leaves.

use std::ops::Bound;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{Switchboard, placement};
use crate::api::routes::{
    self, CommandReply, GetReply, ListReply, MAX_PAGE, Mode, RouteSpec, json,
};
use crate::api::{ApiError, ApiRequest, Services, body_as};
use crate::domain::switchboard::meeting_point::{ClearReason, Expect, Place};
use crate::domain::switchboard::pod::{PodStatus, ReleaseReason};
use crate::domain::switchboard::{
    self as board, DEFAULT_PORTS, LeaseId, MEETING_POINT_KEEPALIVE, MachineId, MeetingPoint,
    MeetingPointCommand, MeetingPointView, POD_KEEPALIVE, Pod, PodCommand, PodName, PodView,
    PortRange, SshPublicKey, Username,
};
use crate::domain::{Aggregate, CommandRequest, ErrorKind};
use crate::runtime::{CommandMeta, derived_command_id, error_chain};
use crate::tunnel::keys;

/// The reason on `unavailable` when no pod takes meeting points.
pub const NO_PODS: &str = "no_pods";
const DEFAULT_PAGE: usize = 100;

/// `pod.add`: register a pod; adding an active pod again is `already_exists`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddPod {
    pub pod: PodName,
    /// How often the pod will call `pod.keep_alive`; it expires after two missed periods.
    /// 300000 (5 minutes) by default.
    pub keepalive_ms: Option<u64>,
    /// The ports it leases to meeting points; 10000-19999 by default.
    pub ports: Option<PortRange>,
    /// Where machines reach its SSH server, `host:port`.
    pub ssh_address: Option<String>,
    /// Its SSH host key's fingerprint, `SHA256:<base64>`, for machines to verify.
    pub host_key_fingerprint: Option<String>,
}

impl CommandRequest for AddPod {
    type Aggregate = Pod;
    const VERB: &'static str = "add";

    fn into_command(self) -> (PodName, PodCommand) {
        let keepalive = self
            .keepalive_ms
            .map_or(POD_KEEPALIVE, Duration::from_millis);
        let command = PodCommand::Add {
            keepalive,
            ports: self.ports.unwrap_or(DEFAULT_PORTS),
            ssh_address: self.ssh_address,
            host_key_fingerprint: self.host_key_fingerprint,
        };
        (self.pod, command)
    }
}

/// `pod.keep_alive`: the pod is still there; `not_found` if it is not registered.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeepAlivePod {
    pub pod: PodName,
}

impl CommandRequest for KeepAlivePod {
    type Aggregate = Pod;
    const VERB: &'static str = "keep_alive";

    fn into_command(self) -> (PodName, PodCommand) {
        (self.pod, PodCommand::KeepAlive)
    }
}

/// `pod.remove`: stop giving the pod new meeting points; it is gone once its last one clears.
/// Removing a missing pod succeeds.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovePod {
    pub pod: PodName,
}

impl CommandRequest for RemovePod {
    type Aggregate = Pod;
    const VERB: &'static str = "remove";

    fn into_command(self) -> (PodName, PodCommand) {
        (self.pod, PodCommand::Remove)
    }
}

/// Names one pod, for `pod.get`, `pod.is_valid` and `pod.count_meeting_points`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PodRequest {
    pub pod: PodName,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PodValidity {
    pub pod: PodName,
    /// Registered, not draining, and kept alive: it takes new meeting points.
    pub valid: bool,
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct PodMeetingPoints {
    pub pod: PodName,
    /// Meeting points holding a port on the pod; 0 for a pod that is gone.
    pub meeting_points: usize,
    /// `null` once the pod is gone.
    pub status: Option<PodStatus>,
}

/// `pod.list`: pods that take meeting points, in name order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListPods {
    /// Also list draining and expired-but-not-yet-reaped pods.
    #[serde(default)]
    pub all: bool,
    pub after: Option<PodName>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// `meeting_point.reserve`: a meeting point for `machine` on the least loaded valid pod,
/// replacing the machine's previous one.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReserveMeetingPoint {
    pub machine: MachineId,
    /// The account to log in as on the machine.
    pub username: Username,
    /// How often the machine will call `meeting_point.keep_alive`; 300000 (5 minutes) by
    /// default. The meeting point expires after two missed periods.
    pub keepalive_ms: Option<u64>,
    /// The SSH public key the machine will log in to its pod with, as in an authorized_keys
    /// line (`ssh-ed25519 AAAA... comment`). A pod forwards the meeting point's port only to a
    /// machine holding this key; without one, no machine can open the tunnel.
    #[serde(default)]
    pub public_key: Option<String>,
}

/// Names a machine's meeting point, optionally only if it is still the given one.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MeetingPointRequest {
    pub machine: MachineId,
    /// Only if the meeting point is on this pod.
    pub pod: Option<PodName>,
    /// Only if the meeting point is on this port.
    pub port: Option<u16>,
    /// Only if the meeting point stands on this lease (its reservation's command id).
    pub lease: Option<LeaseId>,
}

impl MeetingPointRequest {
    fn expect(&self) -> Expect {
        Expect {
            pod: self.pod.clone(),
            port: self.port,
            lease: self.lease.clone(),
        }
    }
}

/// `meeting_point.keep_alive`: the machine is still connected; `not_found` if it has no
/// meeting point, or not the one named.
impl CommandRequest for MeetingPointRequest {
    type Aggregate = MeetingPoint;
    const VERB: &'static str = "keep_alive";

    fn into_command(self) -> (MachineId, MeetingPointCommand) {
        let expect = self.expect();
        (self.machine, MeetingPointCommand::KeepAlive { expect })
    }
}

#[derive(Debug, Serialize, Deserialize, JsonSchema)]
pub struct ClearReply {
    /// The meeting point cleared; `null` if there was none (or not the one named).
    pub cleared: Option<MeetingPointView>,
}

/// Names a machine, for `meeting_point.get`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineRequest {
    pub machine: MachineId,
}

/// `meeting_point.list`: meeting points in machine order, a page at a time.
#[derive(Debug, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListMeetingPoints {
    /// Only those on this pod.
    pub pod: Option<PodName>,
    pub after: Option<MachineId>,
    /// 1 to 1000; 100 by default.
    pub limit: Option<usize>,
}

/// Every switchboard route.
pub fn specs() -> Vec<RouteSpec> {
    fn board(services: &Services) -> Switchboard {
        services.switchboard.clone()
    }
    vec![
        routes::command::<AddPod>("Register a switch pod (already_exists if it is active)"),
        routes::command::<KeepAlivePod>("Keep a pod registered (not_found if it is not)"),
        routes::command::<RemovePod>(
            "Remove a pod: it drains, and is gone once its last meeting point clears",
        ),
        routes::custom::<PodRequest, GetReply<PodView>, _>(
            Pod::KIND,
            "get",
            Mode::Query,
            "Read one pod",
            board,
            get_pod,
        )
        .with_entity(|request| routes::body_field(request, "pod")),
        routes::custom::<PodRequest, GetReply<PodValidity>, _>(
            Pod::KIND,
            "is_valid",
            Mode::Query,
            "Whether a pod takes new meeting points",
            board,
            is_valid,
        ),
        routes::custom::<PodRequest, GetReply<PodMeetingPoints>, _>(
            Pod::KIND,
            "count_meeting_points",
            Mode::Query,
            "How many meeting points a pod holds",
            board,
            count_meeting_points,
        ),
        routes::custom::<ListPods, ListReply<PodName, PodView>, _>(
            Pod::KIND,
            "list",
            Mode::Query,
            "List the pods that take meeting points (all: also draining ones)",
            board,
            list_pods,
        ),
        routes::custom::<ReserveMeetingPoint, CommandReply<MeetingPointView>, _>(
            MeetingPoint::KIND,
            "reserve",
            Mode::Command,
            "Reserve a meeting point for a machine on the least loaded pod (unavailable/no_pods if none)",
            board,
            reserve,
        )
        .with_entity(|request| routes::body_field(request, "machine")),
        routes::custom::<MeetingPointRequest, CommandReply<ClearReply>, _>(
            MeetingPoint::KIND,
            "clear",
            Mode::Command,
            "Clear a machine's meeting point and free its port; clearing a missing one succeeds",
            board,
            clear,
        )
        .with_entity(|request| routes::body_field(request, "machine")),
        routes::custom::<MachineRequest, GetReply<MeetingPointView>, _>(
            MeetingPoint::KIND,
            "get",
            Mode::Query,
            "How to reach a machine: its meeting point (not_found if it has none)",
            board,
            get_meeting_point,
        )
        .with_entity(|request| routes::body_field(request, "machine")),
        routes::command::<MeetingPointRequest>(
            "Keep a machine's meeting point (not_found if it has none, or not the one named)",
        ),
        routes::custom::<ListMeetingPoints, ListReply<MachineId, MeetingPointView>, _>(
            MeetingPoint::KIND,
            "list",
            Mode::Query,
            "List meeting points, optionally those on one pod",
            board,
            list_meeting_points,
        ),
    ]
}

fn get_pod(board: Switchboard, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: PodRequest = body_as(&request)?;
        match board.pods.read(body.pod.clone()).await? {
            (Some(view), version) => json(GetReply {
                result: view,
                version,
            }),
            (None, _) => Err(ApiError::not_found(format!(
                "pod {:?} is not registered",
                body.pod.as_str()
            ))),
        }
    })
}

fn is_valid(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: PodRequest = body_as(&request)?;
        let (view, version) = board.pods.read(body.pod.clone()).await?;
        let now = (board.clock)();
        json(GetReply {
            result: PodValidity {
                pod: body.pod,
                valid: view.is_some_and(|view| view.is_valid(now)),
            },
            version,
        })
    })
}

fn count_meeting_points(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: PodRequest = body_as(&request)?;
        let (view, version) = board.pods.read(body.pod.clone()).await?;
        json(GetReply {
            result: PodMeetingPoints {
                pod: body.pod,
                meeting_points: view.as_ref().map_or(0, |v| v.meeting_points),
                status: view.map(|v| v.status),
            },
            version,
        })
    })
}

fn page_size(limit: Option<usize>) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE);
    if (1..=MAX_PAGE).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::invalid(format!(
            "limit must be 1 to {MAX_PAGE}, not {limit}"
        )))
    }
}

fn read_model_down(kind: &str, err: impl std::fmt::Display) -> ApiError {
    ApiError::unavailable(format!("the {kind} read model is not running: {err}"))
}

fn list_pods(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: ListPods = body_as(&request)?;
        let limit = page_size(body.limit)?;
        routes::caught_up(&board.pod_table)?;
        let now = (board.clock)();
        let (result, next, position) = board
            .pod_table
            .ask(move |table, position| {
                let start = body
                    .after
                    .as_ref()
                    .map_or(Bound::Unbounded, Bound::Excluded);
                let mut views: Vec<PodView> = table
                    .range(start)
                    .filter_map(|(pod, row)| row.state.view(pod))
                    .filter(|view| body.all || view.is_valid(now))
                    .take(limit + 1)
                    .collect();
                let next = (views.len() > limit).then(|| {
                    views.truncate(limit);
                    views.last().map(|v| v.name.clone())
                });
                (views, next.flatten(), position)
            })
            .await
            .map_err(|e| read_model_down(Pod::KIND, e))?;
        json(ListReply {
            result,
            next,
            position,
        })
    })
}

fn list_meeting_points(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: ListMeetingPoints = body_as(&request)?;
        let limit = page_size(body.limit)?;
        routes::caught_up(&board.meeting_point_table)?;
        let (result, next, position) = board
            .meeting_point_table
            .ask(move |table, position| {
                let start = body
                    .after
                    .as_ref()
                    .map_or(Bound::Unbounded, Bound::Excluded);
                let mut views: Vec<MeetingPointView> = table
                    .range(start)
                    .filter_map(|(machine, row)| row.state.view(machine))
                    .filter(|view| body.pod.as_ref().is_none_or(|pod| pod == &view.pod))
                    .take(limit + 1)
                    .collect();
                let next = (views.len() > limit).then(|| {
                    views.truncate(limit);
                    views.last().map(|v| v.machine.clone())
                });
                (views, next.flatten(), position)
            })
            .await
            .map_err(|e| read_model_down(MeetingPoint::KIND, e))?;
        json(ListReply {
            result,
            next,
            position,
        })
    })
}

fn get_meeting_point(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: MachineRequest = body_as(&request)?;
        match board.meeting_points.read(body.machine.clone()).await? {
            (Some(view), version) => json(GetReply {
                result: view,
                version,
            }),
            (None, _) => Err(ApiError::not_found(format!(
                "machine {:?} has no meeting point",
                body.machine.as_str()
            ))),
        }
    })
}

/// The least loaded valid pods as the pod read model sees them, the first one held.
async fn choose(board: &Switchboard) -> Result<Option<placement::Choice>, ApiError> {
    routes::caught_up(&board.pod_table)?;
    let now = (board.clock)();
    let (loads, position) = board
        .pod_table
        .ask(move |table, position| {
            let loads: Vec<(PodName, usize)> = table
                .rows()
                .filter_map(|(pod, row)| row.state.view(pod))
                .filter(|view| view.is_valid(now))
                .map(|view| (view.name, view.meeting_points))
                .collect();
            (loads, position)
        })
        .await
        .map_err(|e| read_model_down(Pod::KIND, e))?;
    Ok(board.placement.choose(loads, position))
}

/// How long a reservation waits for the pod read model to reach the end of the log.
const CATCH_UP: Duration = Duration::from_secs(2);

/// Waits (bounded) until the pod read model has applied everything in the log now.
async fn catch_up(board: &Switchboard) -> Result<(), ApiError> {
    let pods = board.store.subjects().events_of_kind(Pod::KIND);
    let last = board.store.last_sequence_of(&pods).await.map_err(|e| {
        ApiError::unavailable(format!(
            "cannot read the log's position: {}",
            error_chain(&e)
        ))
    })?;
    let deadline = tokio::time::Instant::now() + CATCH_UP;
    while tokio::time::Instant::now() < deadline {
        let position = board
            .pod_table
            .ask(|_, position| position)
            .await
            .map_err(|e| read_model_down(Pod::KIND, e))?;
        if position >= last {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The id of one step of a multi-entity command: the same command, the same step, the same id.
fn step(meta: &CommandMeta, step: &str, entity: &str) -> CommandMeta {
    CommandMeta {
        command_id: derived_command_id(&format!("{}\n{step}\n{entity}", meta.command_id)),
        principal: meta.principal.clone(),
        digest: meta.digest.clone(),
        fresh: false,
    }
}

/// Whether a pod's refusal of a lease means "try the next pod".
/// Parses a caller's OpenSSH public key into the canonical form meeting points record.
fn public_key(text: &str) -> Result<SshPublicKey, ApiError> {
    let invalid = |err: &dyn std::error::Error| {
        ApiError::invalid(format!("public_key: {}", error_chain(err)))
    };
    let parsed = keys::parse_public(text).map_err(|e| invalid(&e))?;
    let canonical = keys::canonical(&parsed).map_err(|e| invalid(&e))?;
    SshPublicKey::new(canonical).map_err(|e| invalid(&e))
}

fn try_next_pod(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::NotFound | ErrorKind::Unavailable | ErrorKind::Capacity | ErrorKind::Conflict
    )
}

fn reserve(board: Switchboard, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: ReserveMeetingPoint = body_as(&request)?;
        let keepalive = board::keepalive(body.keepalive_ms, MEETING_POINT_KEEPALIVE)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
        let public_key = body.public_key.as_deref().map(public_key).transpose()?;
        let lease = request.meta.command_id.clone();
        let machine = body.machine;

        // 1. A port on the least loaded pod that takes one.
        let choice = match choose(&board).await? {
            Some(choice) => choice,
            // The read model trails the log: a pod registered a moment ago may not be in it
            // yet. Before answering `no_pods`, let it catch up with the log as it is now.
            None => {
                catch_up(&board).await?;
                choose(&board).await?.ok_or_else(|| {
                    ApiError::unavailable(
                        "no pod takes meeting points: none is registered, kept alive and not draining",
                    )
                    .with_reason(NO_PODS)
                })?
            }
        };
        let mut hold = choice.hold;
        let mut refusals = Vec::new();
        let mut leased = None;
        for pod in choice
            .candidates
            .into_iter()
            .take(board.config.reserve_attempts.max(1))
        {
            hold.move_to(&pod);
            let command = PodCommand::Lease {
                machine: machine.clone(),
                lease: lease.clone(),
            };
            // A fresh id: the pod recognises a retried lease by its lease id against its
            // current state, so a retry after the reconciler released the port leases anew
            // instead of being answered from history with a port no longer held.
            let meta = CommandMeta::fresh(request.meta.principal.clone());
            match board.pods.execute(pod.clone(), command, meta).await {
                Ok(outcome) => match outcome.reply.port {
                    Some(port) => {
                        leased = Some((pod, port, outcome.seq));
                        break;
                    }
                    // A retry of a reservation whose lease was since released.
                    None => refusals.push(format!("{pod}: the lease was released")),
                },
                // The caller's command id is another machine's reservation: trying another
                // pod would only hide the reuse.
                Err(err) if err.reason() == Some(crate::domain::COMMAND_ID_REUSED) => {
                    return Err(err.into());
                }
                Err(err) if try_next_pod(err.kind()) => {
                    refusals.push(format!("{pod}: {}", error_chain(&err)));
                }
                Err(err) => return Err(err.into()),
            }
        }
        let Some((pod, port, seq)) = leased else {
            return Err(ApiError::unavailable(format!(
                "no pod could lease a port: {}",
                refusals.join("; ")
            ))
            .with_reason(NO_PODS));
        };
        hold.settle(seq);
        crate::failpoint::hit("reserve.after_lease");

        // 2. The meeting point, on that lease.
        let place = Place {
            pod: pod.clone(),
            port,
            lease: lease.clone(),
        };
        let command = MeetingPointCommand::Reserve {
            place,
            username: body.username,
            public_key,
            keepalive,
        };
        let outcome = match board
            .meeting_points
            .execute(machine.clone(), command, request.meta.clone())
            .await
        {
            Ok(outcome) => outcome,
            Err(err) => {
                let place = Place {
                    pod: pod.clone(),
                    port,
                    lease: lease.clone(),
                };
                give_back_unless_recorded(&board, &request.meta, &machine, place, &err).await;
                return Err(err.into());
            }
        };
        let Some(view) = outcome.reply.meeting_point else {
            return Err(ApiError::new(
                ErrorKind::Conflict,
                format!("the meeting point of {machine} was cleared while it was reserved; retry"),
            )
            .with_reason(crate::runtime::CONTENDED));
        };
        // 3. Give back what is no longer used: the machine's previous port, and ours if this
        // is a retry whose first attempt got its meeting point on another pod.
        if (&view.pod, view.port) != (&pod, port) {
            release(
                &board,
                &request.meta,
                &pod,
                port,
                &lease,
                ReleaseReason::Orphaned,
            )
            .await;
        }
        if let Some(old) = outcome.reply.replaced {
            release(
                &board,
                &request.meta,
                &old.pod,
                old.port,
                &old.lease,
                ReleaseReason::Replaced,
            )
            .await;
        }
        json(CommandReply {
            result: view,
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

fn clear(board: Switchboard, request: ApiRequest) -> BoxFuture<'static, Result<Bytes, ApiError>> {
    Box::pin(async move {
        let body: MeetingPointRequest = body_as(&request)?;
        let expect = body.expect();
        let (current, version) = board.meeting_points.read(body.machine.clone()).await?;
        // Clear exactly the meeting point read, so one reserved meanwhile survives.
        let target = current.filter(|view| {
            expect.pod.as_ref().is_none_or(|pod| pod == &view.pod)
                && expect.port.is_none_or(|port| port == view.port)
                && expect
                    .lease
                    .as_ref()
                    .is_none_or(|lease| lease == &view.lease)
        });
        let Some(target) = target else {
            // Nothing to clear: already what the caller wants.
            return json(CommandReply {
                result: ClearReply { cleared: None },
                version,
                sequence: 0,
            });
        };
        let command = MeetingPointCommand::Clear {
            expect: Expect::lease(target.lease.clone()),
            reason: ClearReason::Requested,
        };
        let outcome = board
            .meeting_points
            .execute(body.machine.clone(), command, request.meta.clone())
            .await?;
        let cleared = outcome.reply.meeting_point.is_none().then_some(target);
        if let Some(view) = &cleared {
            release(
                &board,
                &request.meta,
                &view.pod,
                view.port,
                &view.lease,
                ReleaseReason::Cleared,
            )
            .await;
        }
        json(CommandReply {
            result: ClearReply { cleared },
            version: outcome.version,
            sequence: outcome.seq,
        })
    })
}

/// After the meeting point of a reservation failed: gives its port back, but only when that is
/// certainly right. The failure must be a definite refusal (a lost acknowledgement may hide a
/// stored meeting point, which would then name a port nobody holds), and the meeting point,
/// read again, must not stand on the lease (an earlier attempt with the same command id may
/// have recorded it). In every other case the reconciler settles it from the log, once
/// `reconcile_grace` has passed.
async fn give_back_unless_recorded(
    board: &Switchboard,
    meta: &CommandMeta,
    machine: &MachineId,
    place: Place,
    err: &crate::runtime::CommandError,
) {
    if !err.is_definite() {
        tracing::warn!(%machine, pod = %place.pod, port = place.port, error = %error_chain(err), "the meeting point may or may not be recorded; leaving its lease to the reconciler");
        return;
    }
    match board.meeting_points.read(machine.clone()).await {
        Ok((Some(view), _))
            if view.pod == place.pod && view.port == place.port && view.lease == place.lease => {}
        Ok(_) => {
            release(
                board,
                meta,
                &place.pod,
                place.port,
                &place.lease,
                ReleaseReason::Orphaned,
            )
            .await;
        }
        Err(read) => {
            tracing::warn!(%machine, error = %error_chain(&read), "cannot read the meeting point again; leaving its lease to the reconciler");
        }
    }
}

/// Gives a port back. Best effort: if it fails, the reconciler releases it later.
async fn release(
    board: &Switchboard,
    meta: &CommandMeta,
    pod: &PodName,
    port: u16,
    lease: &LeaseId,
    reason: ReleaseReason,
) {
    let command = PodCommand::Release {
        port,
        lease: Some(lease.clone()),
        reason,
    };
    let meta = step(meta, "release", &format!("{pod}\n{port}"));
    if let Err(err) = board.pods.execute(pod.clone(), command, meta).await {
        tracing::warn!(%pod, port, error = %error_chain(&err), "cannot release a port now; the reconciler will");
    }
}
