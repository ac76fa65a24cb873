//! `switchyard instances list | hold | drain | run | kill` and `switchyard instance-set list`:
//! the workers of the cloud pools and their instance sets, as a table for people or JSON for
//! scripts. Exit status 2 when the control plane answers with an error.

use std::io::Write;

use clap::Subcommand;
use serde_json::json;

use crate::api::routes::{CommandReply, ListReply, MAX_PAGE};
use crate::cli::{Output, Status, print_rows};
use crate::client::{ApiClient, ClientError};
use crate::domain::EntityId;
use crate::domain::cloud::instance_set::InstanceSetView;
use crate::domain::cloud::worker::WorkerView;
use crate::domain::cloud::{InstanceSetId, WorkerId};

#[derive(Subcommand, Debug)]
pub enum InstancesCommand {
    /// The workers: state, idle behaviour, address, and why each was shut down.
    List {
        /// Only the workers of this instance set (cloud pool).
        #[arg(long)]
        set: Option<String>,
        /// Gone workers too (destroyed, or disappeared).
        #[arg(long)]
        all: bool,
    },
    /// Hold a worker: nothing new starts on it, and it is never shut down.
    Hold { id: WorkerId },
    /// Drain a worker: nothing new starts on it; shut down once idle.
    Drain { id: WorkerId },
    /// Let work run on a held or drained worker again.
    Run { id: WorkerId },
    /// Shut a worker down now, whatever runs on it.
    Kill { id: WorkerId },
}

#[derive(Subcommand, Debug)]
pub enum InstanceSetCommand {
    /// The instance sets: driver, instance type, max_instances, and the throttles in force.
    List,
}

/// Every page of `<kind>.list`.
async fn list_all<I, V>(api: &ApiClient, route: &str) -> Result<Vec<V>, ClientError>
where
    I: serde::de::DeserializeOwned + serde::Serialize + EntityId,
    V: serde::de::DeserializeOwned,
{
    let mut all = Vec::new();
    let mut after: Option<I> = None;
    loop {
        let body = json!({"after": after.as_ref().map(EntityId::as_str), "limit": MAX_PAGE});
        let page: ListReply<I, V> = api.call(route, &body).await?;
        all.extend(page.result);
        match page.next {
            Some(next) => after = Some(next),
            None => return Ok(all),
        }
    }
}

pub async fn instances(
    api: &ApiClient,
    command: InstancesCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    let (verb, id) = match command {
        InstancesCommand::List { set, all } => {
            let workers: Vec<WorkerView> = list_all::<WorkerId, _>(api, "worker.list")
                .await?
                .into_iter()
                .filter(|w: &WorkerView| all || w.gone_at.is_none())
                .filter(|w| set.as_deref().is_none_or(|s| w.set.as_str() == s))
                .collect();
            return print_workers(out, output, &workers);
        }
        InstancesCommand::Hold { id } => ("hold", id),
        InstancesCommand::Drain { id } => ("drain", id),
        InstancesCommand::Run { id } => ("run", id),
        InstancesCommand::Kill { id } => ("kill", id),
    };
    let reply: CommandReply<Option<WorkerView>> = api
        .call(&format!("worker.{verb}"), &json!({"id": id}))
        .await?;
    let workers: Vec<WorkerView> = reply.result.into_iter().collect();
    print_workers(out, output, &workers)
}

pub async fn instance_set(
    api: &ApiClient,
    command: InstanceSetCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        InstanceSetCommand::List => {
            let sets: Vec<InstanceSetView> =
                list_all::<InstanceSetId, _>(api, "instance_set.list").await?;
            let rows = sets
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.driver.clone(),
                        s.instance_type.clone(),
                        s.max_instances.to_string(),
                        if s.holds.is_empty() {
                            "-".to_owned()
                        } else {
                            s.holds.join("; ")
                        },
                    ]
                })
                .collect();
            print_rows(
                out,
                output,
                &sets,
                &["SET", "DRIVER", "TYPE", "MAX", "THROTTLES IN FORCE"],
                rows,
            )
        }
    }
}

fn print_workers(
    out: &mut impl Write,
    output: Output,
    workers: &[WorkerView],
) -> Result<Status, ClientError> {
    let rows = workers
        .iter()
        .map(|w| {
            vec![
                w.id.to_string(),
                w.set.to_string(),
                w.instance_type.clone(),
                if w.gone_at.is_some() {
                    "gone".to_owned()
                } else {
                    word(&w.state)
                },
                word(&w.idle_behavior),
                w.address.clone().unwrap_or_else(|| "-".into()),
                w.appeared_at.to_string(),
                w.shutdown_reason
                    .as_ref()
                    .map_or_else(|| "-".to_owned(), ToString::to_string),
            ]
        })
        .collect();
    print_rows(
        out,
        output,
        workers,
        &[
            "WORKER", "SET", "TYPE", "STATE", "IDLE", "ADDRESS", "APPEARED", "SHUTDOWN",
        ],
        rows,
    )
}

/// The `snake_case` word serde gives a unit variant.
fn word<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_value(value)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}
