//! The two operations that span a pod and a meeting point: `meeting_point.reserve` (a port
//! lease on the least loaded pod, then the meeting point on it) and `meeting_point.clear`.
//! Each step is idempotent under ids derived from the caller's command id, so a retry
//! finishes or repeats the same reservation, and the reconciler repairs what a crash leaves.

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::protocol::{ClearReply, MeetingPointRequest, ReserveMeetingPoint};
use super::routes::read_model_down;
use super::{Switchboard, placement};
use crate::api::routes::{self, CommandReply, json};
use crate::api::{ApiError, ApiRequest, body_as};
use crate::domain::switchboard::meeting_point::{ClearReason, Expect, Place};
use crate::domain::switchboard::pod::ReleaseReason;
use crate::domain::switchboard::{
    self as board, LeaseId, MEETING_POINT_KEEPALIVE, MachineId, MeetingPointCommand, Pod,
    PodCommand, PodName, SshPublicKey,
};
use crate::domain::{Aggregate, ErrorKind};
use crate::runtime::{CommandMeta, derived_command_id, error_chain};
use crate::tunnel::keys;

/// The reason on `unavailable` when no pod takes meeting points.
pub const NO_PODS: &str = "no_pods";

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

pub(super) fn reserve(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
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

pub(super) fn clear(
    board: Switchboard,
    request: ApiRequest,
) -> BoxFuture<'static, Result<Bytes, ApiError>> {
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
