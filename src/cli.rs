//! `switchyard pod ...`, `switchyard mp ...` and `switchyard repair ...`: every switchboard
//! operation, and the operator's repair of an entity's history, from a shell, as a table for
//! people or JSON for scripts. Exit status 2 when the control plane answers with an error, 1 when
//! it cannot be reached.

use std::io::Write;
use std::time::Duration;

use clap::{Subcommand, ValueEnum};
use serde::Serialize;

use crate::api::routes::{CommandReply, GetReply, ListReply};
use crate::client::{ApiClient, ClientError};
use crate::domain::switchboard::{
    MachineId, MeetingPointView, PodName, PodView, PortRange, Username, millis,
};
use crate::switchboard::protocol::{
    AddPod, ClearReply, KeepAlivePod, ListMeetingPoints, ListPods, MachineRequest,
    MeetingPointRequest, PodMeetingPoints, PodRequest, PodValidity, RemovePod, ReserveMeetingPoint,
};

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum PodCommand {
    /// Register a pod (already_exists if it is active).
    Add {
        pod: PodName,
        /// How often the pod will keep itself alive; it expires after two missed periods.
        #[arg(long, value_parser = humantime::parse_duration)]
        keepalive: Option<Duration>,
        /// Ports it leases to meeting points, FIRST-LAST (default 10000-19999).
        #[arg(long)]
        ports: Option<PortRange>,
        /// Where machines reach its SSH server, HOST:PORT.
        #[arg(long)]
        ssh_address: Option<String>,
        /// Its SSH host key fingerprint, SHA256:...
        #[arg(long)]
        host_key_fingerprint: Option<String>,
    },
    /// Keep a pod registered (not_found if it is not).
    KeepAlive { pod: PodName },
    /// Remove a pod: it drains, and is gone once its last meeting point clears.
    Remove { pod: PodName },
    /// Show one pod.
    Get { pod: PodName },
    /// Whether a pod takes new meeting points (exit status 0 if so, 3 if not).
    IsValid { pod: PodName },
    /// How many meeting points a pod holds.
    CountMeetingPoints { pod: PodName },
    /// List pods that take meeting points.
    List {
        /// Also draining ones.
        #[arg(long)]
        all: bool,
    },
}

#[derive(Subcommand, Debug)]
pub enum MeetingPointCommand {
    /// Reserve a meeting point for a machine on the least loaded pod.
    Reserve {
        machine: MachineId,
        /// The account to log in as on the machine.
        #[arg(long)]
        user: Username,
        #[arg(long, value_parser = humantime::parse_duration)]
        keepalive: Option<Duration>,
        /// The SSH public key the machine logs in to its pod with, e.g.
        /// "$(cat ~/.ssh/id_ed25519.pub)"; the pod forwards the port only to this key.
        #[arg(long)]
        public_key: Option<String>,
        /// Retries with the same id are the same reservation.
        #[arg(long)]
        command_id: Option<String>,
    },
    /// Clear a machine's meeting point (only the one named, with --pod/--port).
    Clear {
        machine: MachineId,
        #[arg(long)]
        pod: Option<PodName>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// Show how to reach a machine.
    Get { machine: MachineId },
    /// Keep a machine's meeting point (only the one named, with --pod/--port).
    KeepAlive {
        machine: MachineId,
        #[arg(long)]
        pod: Option<PodName>,
        #[arg(long)]
        port: Option<u16>,
    },
    /// List meeting points.
    List {
        /// Only those on this pod.
        #[arg(long)]
        pod: Option<PodName>,
    },
}

/// `switchyard repair KIND/ID --note WHY`: acknowledge the messages in an entity's history
/// that the store did not write (all of them, or those given with --seq).
#[derive(clap::Args, Debug)]
pub struct RepairArgs {
    /// The entity, KIND/ID (e.g. counter/rack4); the ID may contain slashes.
    pub entity: String,
    /// Why the messages may stay; recorded in the log with your principal.
    #[arg(long)]
    pub note: String,
    /// Only this foreign message (its stream sequence); repeat for several.
    #[arg(long = "seq")]
    pub seqs: Vec<u64>,
}

pub async fn repair(
    api: &ApiClient,
    args: RepairArgs,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    let Some((kind, id)) = args.entity.split_once('/') else {
        let _ = writeln!(out, "the entity is KIND/ID, not {:?}", args.entity);
        return Ok(2);
    };
    let body = crate::api::routes::AcknowledgeForeignRequest {
        id: id.to_owned(),
        seqs: (!args.seqs.is_empty()).then_some(args.seqs),
        note: args.note,
    };
    let reply: crate::api::routes::AcknowledgeForeignReply = api
        .call(&format!("{kind}.acknowledge_foreign"), &body)
        .await?;
    print_value(out, output, &reply, || {
        let mut text = if reply.acknowledged.is_empty() {
            format!("{kind}/{id} has no foreign message to acknowledge")
        } else {
            format!(
                "acknowledged foreign messages {:?} of {kind}/{id} (record at sequence {})",
                reply.acknowledged, reply.sequence
            )
        };
        for left in &reply.remaining {
            text.push_str(&format!(
                "\nstill unacknowledged: {} on {}: {}",
                left.seq, left.subject, left.reason
            ));
        }
        text
    })
}

/// What a command printed, and the exit status it asks for.
pub type Status = u8;

pub async fn pod(
    api: &ApiClient,
    command: PodCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        PodCommand::Add {
            pod,
            keepalive,
            ports,
            ssh_address,
            host_key_fingerprint,
        } => {
            let body = AddPod {
                pod,
                keepalive_ms: keepalive.map(millis),
                ports,
                ssh_address,
                host_key_fingerprint,
            };
            let reply: CommandReply<crate::domain::switchboard::pod::PodReply> =
                api.call("pod.add", &body).await?;
            print_pods(
                out,
                output,
                &reply.result.pod.into_iter().collect::<Vec<_>>(),
            )
        }
        PodCommand::KeepAlive { pod } => {
            let reply: CommandReply<crate::domain::switchboard::pod::PodReply> =
                api.call("pod.keep_alive", &KeepAlivePod { pod }).await?;
            print_pods(
                out,
                output,
                &reply.result.pod.into_iter().collect::<Vec<_>>(),
            )
        }
        PodCommand::Remove { pod } => {
            let reply: CommandReply<crate::domain::switchboard::pod::PodReply> = api
                .call("pod.remove", &RemovePod { pod: pod.clone() })
                .await?;
            match reply.result.pod {
                Some(view) => print_pods(out, output, &[view]),
                None => print_value(
                    out,
                    output,
                    &serde_json::json!({"pod": pod, "gone": true}),
                    || format!("{pod} is gone"),
                ),
            }
        }
        PodCommand::Get { pod } => {
            let reply: GetReply<PodView> = api.call("pod.get", &PodRequest { pod }).await?;
            print_pods(out, output, &[reply.result])
        }
        PodCommand::IsValid { pod } => {
            let reply: GetReply<PodValidity> =
                api.call("pod.is_valid", &PodRequest { pod }).await?;
            let valid = reply.result.valid;
            print_value(out, output, &reply.result, || valid.to_string())?;
            Ok(if valid { 0 } else { 3 })
        }
        PodCommand::CountMeetingPoints { pod } => {
            let reply: GetReply<PodMeetingPoints> = api
                .call("pod.count_meeting_points", &PodRequest { pod })
                .await?;
            let n = reply.result.meeting_points;
            print_value(out, output, &reply.result, || n.to_string())
        }
        PodCommand::List { all } => {
            let mut pods = Vec::new();
            let mut after = None;
            loop {
                let body = ListPods {
                    all,
                    after,
                    limit: Some(crate::api::routes::MAX_PAGE),
                };
                let page: ListReply<PodName, PodView> = api.call("pod.list", &body).await?;
                pods.extend(page.result);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            print_pods(out, output, &pods)
        }
    }
}

pub async fn meeting_point(
    api: &ApiClient,
    command: MeetingPointCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        MeetingPointCommand::Reserve {
            machine,
            user,
            keepalive,
            public_key,
            command_id,
        } => {
            let body = ReserveMeetingPoint {
                machine,
                username: user,
                keepalive_ms: keepalive.map(millis),
                public_key,
            };
            let reply: CommandReply<MeetingPointView> = api
                .call_with_id("meeting_point.reserve", &body, command_id.as_deref())
                .await?;
            print_meeting_points(out, output, &[reply.result])
        }
        MeetingPointCommand::Clear { machine, pod, port } => {
            let body = MeetingPointRequest {
                machine: machine.clone(),
                pod,
                port,
                lease: None,
            };
            let reply: CommandReply<ClearReply> = api.call("meeting_point.clear", &body).await?;
            let cleared = reply.result.cleared.is_some();
            print_value(out, output, &reply.result, || {
                if cleared {
                    format!("cleared the meeting point of {machine}")
                } else {
                    format!("{machine} had no such meeting point")
                }
            })
        }
        MeetingPointCommand::Get { machine } => {
            let reply: GetReply<MeetingPointView> = api
                .call("meeting_point.get", &MachineRequest { machine })
                .await?;
            let status = print_meeting_points(out, output, std::slice::from_ref(&reply.result))?;
            if let Output::Table = output {
                // The command a person wants next: the pod's host, the meeting point's port.
                let pod: Result<GetReply<PodView>, _> = api
                    .call(
                        "pod.get",
                        &PodRequest {
                            pod: reply.result.pod.clone(),
                        },
                    )
                    .await;
                let host = pod
                    .ok()
                    .and_then(|pod| pod.result.ssh_address)
                    .and_then(|address| address.rsplit_once(':').map(|(host, _)| host.to_owned()));
                if let Some(host) = host {
                    let view = &reply.result;
                    let _ = writeln!(out, "\nssh -p {} {}@{host}", view.port, view.username);
                }
            }
            Ok(status)
        }
        MeetingPointCommand::KeepAlive { machine, pod, port } => {
            let body = MeetingPointRequest {
                machine,
                pod,
                port,
                lease: None,
            };
            let reply: CommandReply<crate::domain::switchboard::meeting_point::MeetingPointReply> =
                api.call("meeting_point.keep_alive", &body).await?;
            print_meeting_points(
                out,
                output,
                &reply.result.meeting_point.into_iter().collect::<Vec<_>>(),
            )
        }
        MeetingPointCommand::List { pod } => {
            let mut all = Vec::new();
            let mut after = None;
            loop {
                let body = ListMeetingPoints {
                    pod: pod.clone(),
                    after,
                    limit: Some(crate::api::routes::MAX_PAGE),
                };
                let page: ListReply<MachineId, MeetingPointView> =
                    api.call("meeting_point.list", &body).await?;
                all.extend(page.result);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            print_meeting_points(out, output, &all)
        }
    }
}

pub(crate) fn print_value(
    out: &mut impl Write,
    output: Output,
    value: &impl Serialize,
    text: impl FnOnce() -> String,
) -> Result<Status, ClientError> {
    let line = match output {
        Output::Json => serde_json::to_string(value).unwrap_or_default(),
        Output::Table => text(),
    };
    let _ = writeln!(out, "{line}");
    Ok(0)
}

fn print_pods(
    out: &mut impl Write,
    output: Output,
    pods: &[PodView],
) -> Result<Status, ClientError> {
    let rows = pods
        .iter()
        .map(|p| {
            vec![
                p.name.to_string(),
                format!("{:?}", p.status).to_lowercase(),
                p.meeting_points.to_string(),
                p.ports.to_string(),
                p.ssh_address.clone().unwrap_or_else(|| "-".into()),
                p.last_seen.to_string(),
                p.expires_at.to_string(),
            ]
        })
        .collect();
    print_rows(
        out,
        output,
        pods,
        &[
            "POD",
            "STATUS",
            "MEETING POINTS",
            "PORTS",
            "SSH",
            "LAST SEEN",
            "EXPIRES",
        ],
        rows,
    )
}

fn print_meeting_points(
    out: &mut impl Write,
    output: Output,
    points: &[MeetingPointView],
) -> Result<Status, ClientError> {
    let rows = points
        .iter()
        .map(|m| {
            vec![
                m.machine.to_string(),
                m.pod.to_string(),
                m.port.to_string(),
                m.username.to_string(),
                m.last_seen.to_string(),
                m.expires_at.to_string(),
            ]
        })
        .collect();
    print_rows(
        out,
        output,
        points,
        &["MACHINE", "POD", "PORT", "USER", "LAST SEEN", "EXPIRES"],
        rows,
    )
}

/// JSON: one object per line. Table: aligned columns under a header.
pub(crate) fn print_rows<T: Serialize>(
    out: &mut impl Write,
    output: Output,
    values: &[T],
    header: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<Status, ClientError> {
    match output {
        Output::Json => {
            for value in values {
                let _ = writeln!(out, "{}", serde_json::to_string(value).unwrap_or_default());
            }
        }
        Output::Table => {
            let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
            for row in &rows {
                for (width, cell) in widths.iter_mut().zip(row) {
                    *width = (*width).max(cell.chars().count());
                }
            }
            let line = |cells: Vec<String>| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .map(|(cell, width)| format!("{cell:<width$}"))
                    .collect();
                padded.join("  ").trim_end().to_owned()
            };
            let _ = writeln!(
                out,
                "{}",
                line(header.iter().map(|h| (*h).to_owned()).collect())
            );
            for row in rows {
                let _ = writeln!(out, "{}", line(row));
            }
        }
    }
    Ok(0)
}
