//! `switchyard lesson ...` and `switchyard livesession ...`: read the catalog, check a
//! curriculum offline, request a lesson and follow it to READY (printing how to reach each
//! endpoint), as a table for people or JSON for scripts. Exit status 2 when the control plane
//! answers with an error (or the curriculum has problems), 3 when a followed lesson ends in
//! ERROR.

use std::io::Write;
use std::path::Path;
use std::time::Duration;

use clap::Subcommand;

use super::protocol::{
    CreateLiveSession, GetLesson, LessonList, LessonReply, LessonRequested, ListLessons,
    ListLiveLessons, LiveLessonRequest, LiveSessionCreated, LiveSessionKilled, LiveSessionRequest,
    ReloadCatalog, Reloaded, RequestLesson,
};
use crate::api::routes::{CommandReply, GetReply, ListReply, MAX_PAGE};
use crate::cli::{Output, Status, print_rows, print_value};
use crate::client::{ApiClient, ClientError};
use crate::domain::lessons::livelesson::{LiveLessonReply, LiveLessonView};
use crate::domain::lessons::livesession::LiveSessionView;
use crate::domain::lessons::{LessonSlug, LiveLessonId, LiveSessionId, Status as LessonStatus};

/// How often `--wait` and `--watch` look again.
const POLL: Duration = Duration::from_millis(250);

#[derive(Subcommand, Debug)]
pub enum LessonCommand {
    /// The lessons of the catalog in force.
    List,
    /// One lesson whole: endpoints, connections, stages, guides and scripts.
    Show { slug: LessonSlug },
    /// Check a curriculum directory offline: every problem of every lesson, with file and
    /// field. Needs no control plane.
    Validate { dir: std::path::PathBuf },
    /// Read the configured curriculum again and put it in force if it is valid.
    Reload,
    /// Request a lesson for a live session (creating its live lesson, keeping it alive, or
    /// changing its stage).
    Request {
        lesson: LessonSlug,
        #[arg(long)]
        session: LiveSessionId,
        /// From 1.
        #[arg(long, default_value_t = 1)]
        stage: u32,
        /// Then follow it through its statuses, and print how to reach each endpoint once
        /// READY.
        #[arg(long)]
        wait: bool,
    },
    /// Show a live lesson: status, reachability, endpoints, the error and its output.
    Status {
        id: LiveLessonId,
        /// Print it again whenever it changes, until READY or ERROR.
        #[arg(long)]
        watch: bool,
    },
    /// Live lessons (of one session, with --session).
    Live {
        #[arg(long)]
        session: Option<LiveSessionId>,
    },
    /// Kill a live lesson: everything the backend has of it is deleted.
    Kill { id: LiveLessonId },
}

#[derive(Subcommand, Debug)]
pub enum LiveSessionCommand {
    /// A new live session; prints its id.
    Create {
        #[arg(long)]
        id: Option<LiveSessionId>,
        /// Who it is for; the caller's principal by default.
        #[arg(long)]
        source: Option<String>,
        /// Its lessons outlive their TTL.
        #[arg(long)]
        persistent: bool,
        /// How long it lives with no lesson (e.g. 2h); the control plane's default otherwise.
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Option<Duration>,
    },
    Get {
        id: LiveSessionId,
    },
    List,
    /// End a live session and kill every lesson it holds.
    Kill {
        id: LiveSessionId,
    },
}

/// `lesson validate DIR`, which needs no control plane.
pub fn validate(dir: &Path, output: Output, out: &mut impl Write) -> Status {
    match super::curriculum::read(dir) {
        Err(err) => {
            let _ = writeln!(out, "{}", crate::runtime::error_chain(&err));
            2
        }
        Ok(sources) => match crate::domain::lessons::catalog::validate(&sources) {
            Ok(lessons) => {
                let summaries: Vec<_> = lessons
                    .iter()
                    .map(crate::domain::lessons::catalog::summary)
                    .collect();
                let _ = print_value(out, output, &summaries, || {
                    let names: Vec<&str> = lessons.iter().map(|l| l.slug.as_str()).collect();
                    format!(
                        "{}: {} lesson{}, all valid: {}",
                        dir.display(),
                        lessons.len(),
                        if lessons.len() == 1 { "" } else { "s" },
                        names.join(", ")
                    )
                });
                0
            }
            Err(problems) => {
                for problem in &problems {
                    let line = match output {
                        Output::Json => serde_json::to_string(problem).unwrap_or_default(),
                        Output::Table => problem.to_string(),
                    };
                    let _ = writeln!(out, "{line}");
                }
                if let Output::Table = output {
                    let _ = writeln!(
                        out,
                        "{} problem{} in {}; nothing would be loaded",
                        problems.len(),
                        if problems.len() == 1 { "" } else { "s" },
                        dir.display()
                    );
                }
                2
            }
        },
    }
}

pub async fn lesson(
    api: &ApiClient,
    command: LessonCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        LessonCommand::Validate { dir } => Ok(validate(&dir, output, out)),
        LessonCommand::List => {
            let reply: LessonList = api.call("lesson.list", &ListLessons {}).await?;
            let rows = reply
                .result
                .iter()
                .map(|l| {
                    vec![
                        l.slug.to_string(),
                        l.name.clone(),
                        l.stages.to_string(),
                        l.endpoints
                            .iter()
                            .map(ToString::to_string)
                            .collect::<Vec<_>>()
                            .join(","),
                    ]
                })
                .collect();
            let status = print_rows(
                out,
                output,
                &reply.result,
                &["LESSON", "NAME", "STAGES", "ENDPOINTS"],
                rows,
            )?;
            if let Output::Table = output {
                match (&reply.catalog, &reply.source) {
                    (Some(digest), Some(source)) => {
                        let _ = writeln!(out, "\ncatalog {digest} from {source}");
                    }
                    _ => {
                        let _ = writeln!(out, "no curriculum is loaded (lessons.curriculum)");
                    }
                }
            }
            Ok(status)
        }
        LessonCommand::Show { slug } => {
            let reply: LessonReply = api.call("lesson.get", &GetLesson { slug }).await?;
            print_value(out, output, &reply, || {
                let lesson = &reply.result;
                let mut text = format!(
                    "{} ({}), catalog {}\n{}\n",
                    lesson.name, lesson.slug, reply.catalog, lesson.description
                );
                for e in &lesson.endpoints {
                    let presentations: Vec<String> = e
                        .presentations
                        .iter()
                        .map(|p| format!("{} {:?} :{}", p.name, p.kind, p.port))
                        .collect();
                    text.push_str(&format!(
                        "endpoint {}: {}\n",
                        e.name,
                        presentations.join(", ")
                    ));
                }
                for c in &lesson.connections {
                    text.push_str(&format!("connection {} <-> {}\n", c.a, c.b));
                }
                for s in &lesson.stages {
                    text.push_str(&format!(
                        "\nstage {}: {}\n{}",
                        s.number, s.description, s.guide
                    ));
                }
                text
            })
        }
        LessonCommand::Reload => {
            let reply: CommandReply<Reloaded> =
                api.call("lesson.reload", &ReloadCatalog {}).await?;
            print_value(out, output, &reply.result, || {
                format!(
                    "catalog {} with {} lessons{}",
                    reply.result.catalog,
                    reply.result.lessons,
                    if reply.result.changed {
                        ""
                    } else {
                        " (unchanged)"
                    }
                )
            })
        }
        LessonCommand::Request {
            lesson,
            session,
            stage,
            wait,
        } => {
            let body = RequestLesson {
                session,
                lesson,
                stage: Some(stage),
            };
            let reply: CommandReply<LessonRequested> = api.call("lesson.request", &body).await?;
            let id = reply.result.id.clone();
            if !wait {
                return print_value(out, output, &reply.result, || {
                    format!(
                        "{id}: {} (stage {})",
                        reply.result.status.as_str(),
                        reply.result.stage
                    )
                });
            }
            follow(api, &id, output, out).await
        }
        LessonCommand::Status { id, watch } => {
            if watch {
                return follow(api, &id, output, out).await;
            }
            let reply: GetReply<LiveLessonView> = api
                .call("livelesson.get", &LiveLessonRequest { id })
                .await?;
            print_value(out, output, &reply.result, || describe(&reply.result))
        }
        LessonCommand::Live { session } => {
            let mut all: Vec<LiveLessonView> = Vec::new();
            let mut after = None;
            loop {
                let body = ListLiveLessons {
                    session: session.clone(),
                    status: None,
                    deleted: false,
                    after,
                    limit: Some(MAX_PAGE),
                };
                let page: ListReply<LiveLessonId, LiveLessonView> =
                    api.call("livelesson.list", &body).await?;
                all.extend(page.result);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let rows = all
                .iter()
                .map(|l| {
                    vec![
                        l.id.to_string(),
                        l.lesson.to_string(),
                        l.stage.to_string(),
                        l.status.as_str().to_owned(),
                        format!("{}/{}", l.healthy, l.total),
                    ]
                })
                .collect();
            print_rows(
                out,
                output,
                &all,
                &["LIVE LESSON", "LESSON", "STAGE", "STATUS", "HEALTHY"],
                rows,
            )
        }
        LessonCommand::Kill { id } => {
            let reply: CommandReply<LiveLessonReply> = api
                .call("livelesson.kill", &LiveLessonRequest { id: id.clone() })
                .await?;
            print_value(out, output, &reply.result, || {
                format!("{id}: being deleted")
            })
        }
    }
}

/// Prints the lesson whenever its status or reachability changes, until READY or ERROR.
async fn follow(
    api: &ApiClient,
    id: &LiveLessonId,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    let mut last = String::new();
    loop {
        let reply: GetReply<LiveLessonView> = api
            .call("livelesson.get", &LiveLessonRequest { id: id.clone() })
            .await?;
        let view = reply.result;
        let line = match output {
            Output::Json => serde_json::to_string(&view).unwrap_or_default(),
            Output::Table => format!(
                "{} {} (stage {}, {}/{} endpoints answer)",
                view.id,
                view.status.as_str(),
                view.stage,
                view.healthy,
                view.total
            ),
        };
        if line != last {
            let _ = writeln!(out, "{line}");
            let _ = out.flush();
            last = line;
        }
        if view.deleted_at.is_some() {
            return Ok(3);
        }
        match view.status {
            LessonStatus::Ready => {
                if let Output::Table = output {
                    let _ = write!(out, "{}", reach(&view));
                }
                return Ok(0);
            }
            LessonStatus::Error => {
                if let Output::Table = output {
                    let _ = write!(out, "{}", describe(&view));
                }
                return Ok(3);
            }
            _ => tokio::time::sleep(POLL).await,
        }
    }
}

/// How to reach each endpoint.
fn reach(view: &LiveLessonView) -> String {
    let mut text = String::new();
    for endpoint in &view.endpoints {
        for p in &endpoint.presentations {
            let address = p.address.as_deref().unwrap_or("(no address yet)");
            let how = match (p.kind, &endpoint.ssh) {
                (crate::domain::lessons::catalog::PresentationKind::Ssh, Some(command)) => {
                    command.clone()
                }
                (crate::domain::lessons::catalog::PresentationKind::Http, _) => {
                    format!("http://{address}/")
                }
                _ => address.to_owned(),
            };
            text.push_str(&format!("  {} {}: {how}\n", endpoint.name, p.name));
        }
    }
    text
}

fn describe(view: &LiveLessonView) -> String {
    let l = view;
    let mut text = format!(
        "{} ({} stage {}/{}, session {}, catalog {}): {}, {}/{} endpoints answer\n",
        l.id,
        l.lesson,
        l.stage,
        l.stages,
        l.session,
        l.catalog,
        l.status.as_str(),
        l.healthy,
        l.total
    );
    text.push_str(&reach(view));
    if let Some(error) = &l.error {
        text.push_str(&format!("error in {}: {}\n", error.step, error.reason));
        if !error.output.is_empty() {
            text.push_str("output:\n");
            text.push_str(&error.output);
            if !error.output.ends_with('\n') {
                text.push('\n');
            }
        }
    }
    if let Some(kill) = &l.kill {
        text.push_str(&format!("being deleted ({:?})\n", kill.reason));
    }
    text
}

pub async fn live_session(
    api: &ApiClient,
    command: LiveSessionCommand,
    output: Output,
    out: &mut impl Write,
) -> Result<Status, ClientError> {
    match command {
        LiveSessionCommand::Create {
            id,
            source,
            persistent,
            ttl,
        } => {
            let body = CreateLiveSession {
                id,
                source,
                persistent,
                ttl_ms: ttl.map(|t| u64::try_from(t.as_millis()).unwrap_or(u64::MAX)),
            };
            let reply: CommandReply<LiveSessionCreated> =
                api.call("livesession.create", &body).await?;
            print_value(out, output, &reply.result, || reply.result.id.to_string())
        }
        LiveSessionCommand::Get { id } => {
            let reply: GetReply<LiveSessionView> = api
                .call("livesession.get", &LiveSessionRequest { id })
                .await?;
            print_value(out, output, &reply.result, || {
                let s = &reply.result;
                let lessons: Vec<String> = s
                    .lessons
                    .iter()
                    .map(|(lesson, live)| format!("{lesson}={live}"))
                    .collect();
                format!(
                    "{} from {}{}: lessons [{}], expires {}{}",
                    s.id,
                    s.source,
                    if s.persistent { " (persistent)" } else { "" },
                    lessons.join(", "),
                    s.expires_at,
                    s.ended
                        .as_ref()
                        .map(|e| format!(", ended ({:?})", e.reason))
                        .unwrap_or_default()
                )
            })
        }
        LiveSessionCommand::List => {
            let mut all: Vec<LiveSessionView> = Vec::new();
            let mut after: Option<LiveSessionId> = None;
            loop {
                let body = serde_json::json!({"after": after, "limit": MAX_PAGE});
                let page: ListReply<LiveSessionId, LiveSessionView> =
                    api.call("livesession.list", &body).await?;
                all.extend(page.result);
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            let rows = all
                .iter()
                .map(|s| {
                    vec![
                        s.id.to_string(),
                        s.source.clone(),
                        s.persistent.to_string(),
                        s.lessons.len().to_string(),
                        s.ended
                            .as_ref()
                            .map_or("open".to_owned(), |e| format!("{:?}", e.reason)),
                    ]
                })
                .collect();
            print_rows(
                out,
                output,
                &all,
                &["SESSION", "SOURCE", "PERSISTENT", "LESSONS", "STATE"],
                rows,
            )
        }
        LiveSessionCommand::Kill { id } => {
            let reply: CommandReply<LiveSessionKilled> = api
                .call("livesession.kill", &LiveSessionRequest { id })
                .await?;
            print_value(out, output, &reply.result, || {
                format!(
                    "{} ended; {} lesson{} being deleted",
                    reply.result.id,
                    reply.result.lessons.len(),
                    if reply.result.lessons.len() == 1 {
                        ""
                    } else {
                        "s"
                    }
                )
            })
        }
    }
}
