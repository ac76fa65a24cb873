//! The switchboard's twelve operations as API routes: `pod.*` and `meeting_point.*`. Most are
//! one command to one entity or a read of a read model; `meeting_point.reserve` and
//! `meeting_point.clear` span two entities and live in [`super::reserve`].

use std::ops::Bound;

use bytes::Bytes;
use futures::future::BoxFuture;

use super::Switchboard;
use super::protocol::{
    AddPod, ClearReply, KeepAlivePod, ListMeetingPoints, ListPods, MachineRequest,
    MeetingPointRequest, PodMeetingPoints, PodRequest, PodValidity, RemovePod, ReserveMeetingPoint,
};
use super::reserve::{clear, reserve};
use crate::api::routes::{
    self, CommandReply, GetReply, ListReply, MAX_PAGE, Mode, RouteSpec, json,
};
use crate::api::{ApiError, ApiRequest, Services, body_as};
use crate::domain::Aggregate;
use crate::domain::switchboard::{
    MachineId, MeetingPoint, MeetingPointView, Pod, PodName, PodView,
};

const DEFAULT_PAGE: usize = 100;

/// Every switchboard route.
pub fn specs() -> Vec<RouteSpec> {
    fn board(services: &Services) -> Option<Switchboard> {
        services.get::<Switchboard>()
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

pub(super) fn read_model_down(kind: &str, err: impl std::fmt::Display) -> ApiError {
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
                let (views, next) = crate::api::routes::page(
                    table
                        .range(start)
                        .filter_map(|(pod, row)| row.state.view(pod))
                        .filter(|view| body.all || view.is_valid(now)),
                    limit,
                    |v: &PodView| v.name.clone(),
                );
                (views, next, position)
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
                let (views, next) = crate::api::routes::page(
                    table
                        .range(start)
                        .filter_map(|(machine, row)| row.state.view(machine))
                        .filter(|view| body.pod.as_ref().is_none_or(|pod| pod == &view.pod)),
                    limit,
                    |v: &MeetingPointView| v.machine.clone(),
                );
                (views, next, position)
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
