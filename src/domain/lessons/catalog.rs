//! The lesson catalog: what a lesson is, how its files are checked, and the catalog entity.
//!
//! A curriculum is a directory with one directory per lesson. A lesson's directory holds
//! `lesson.yaml` (its endpoints, connections and stages), and per stage `N` (from 1)
//! `stageN/guide.md` (the guide, markdown) and, for each endpoint that is configured,
//! `stageN/configs/<endpoint>.sh` (shell) or `.py` (python): the script run on that endpoint
//! over SSH when the lesson enters the stage. [`validate`] reads nothing itself: it is given
//! the files' text and answers the lessons, or every problem of every file at once, each with
//! its file and field. A catalog is all or nothing: one problem and nothing of it loads.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{CatalogId, EndpointName, LessonSlug};
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

/// The file that defines a lesson, in its directory.
pub const LESSON_FILE: &str = "lesson.yaml";
/// The most endpoints (or stages) one lesson may have.
pub const MAX_ENDPOINTS: usize = 32;
pub const MAX_STAGES: usize = 32;
/// The longest script or guide, in bytes.
pub const MAX_FILE: usize = 64 * 1024;
/// The most text a whole curriculum may hold: it is recorded in one event, which must fit a
/// NATS message (1 MiB by default) with room to spare.
pub const MAX_CATALOG: usize = 512 * 1024;
/// The longest ready delay.
pub const MAX_READY_DELAY: Duration = Duration::from_secs(600);

/// How an endpoint is configured: the interpreter its stage scripts run in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ConfigurationType {
    /// `stageN/configs/<endpoint>.sh`, run by `sh -s`.
    Shell,
    /// `stageN/configs/<endpoint>.py`, run by `python3 -`.
    Python,
}

impl ConfigurationType {
    pub fn extension(self) -> &'static str {
        match self {
            ConfigurationType::Shell => "sh",
            ConfigurationType::Python => "py",
        }
    }

    /// The command that runs a script given on its standard input.
    pub fn interpreter(self) -> &'static str {
        match self {
            ConfigurationType::Shell => "sh -s",
            ConfigurationType::Python => "python3 -",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum PresentationKind {
    /// A shell over SSH (the lesson's credentials).
    Ssh,
    /// A web page.
    Http,
}

/// One way learners reach an endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Presentation {
    /// Unique within the endpoint.
    pub name: EndpointName,
    #[serde(rename = "type")]
    pub kind: PresentationKind,
    /// The endpoint's port it presents (a backend maps it to where it is reachable).
    pub port: u16,
}

/// One machine of a lesson.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    pub name: EndpointName,
    /// The image it runs (the Kubernetes backend); the local backend runs local processes.
    #[serde(default)]
    pub image: Option<String>,
    /// A program (and arguments) to run instead of, or besides, an image: on the local
    /// backend, it serves the endpoint's http presentation (`PORT`) and additional ports
    /// (`PORT_<n>`).
    #[serde(default)]
    pub command: Vec<String>,
    /// How its stage scripts run; none: it is not configured.
    #[serde(default)]
    pub configuration: Option<ConfigurationType>,
    #[serde(default)]
    pub presentations: Vec<Presentation>,
    #[serde(default)]
    pub additional_ports: Vec<u16>,
}

impl Endpoint {
    pub fn ssh(&self) -> Option<&Presentation> {
        self.presentations
            .iter()
            .find(|p| p.kind == PresentationKind::Ssh)
    }
}

/// A link between two endpoints of a lesson.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Connection {
    pub a: EndpointName,
    pub b: EndpointName,
}

/// A stage script: what runs on one endpoint when its lesson enters a stage.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Script {
    pub kind: ConfigurationType,
    /// Its file, relative to the lesson's directory.
    pub file: String,
    pub text: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Stage {
    /// From 1.
    pub number: u32,
    pub description: String,
    /// `stageN/guide.md`.
    pub guide: String,
    /// The script per configured endpoint.
    pub configs: BTreeMap<EndpointName, Script>,
}

/// A lesson, as the catalog holds it and a live lesson records it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Lesson {
    pub slug: LessonSlug,
    pub name: String,
    pub description: String,
    /// How long to wait after configuration before READY (for endpoints that settle slowly).
    pub ready_delay_ms: u64,
    pub endpoints: Vec<Endpoint>,
    pub connections: Vec<Connection>,
    pub stages: Vec<Stage>,
}

impl Lesson {
    pub fn stage(&self, number: u32) -> Option<&Stage> {
        self.stages.iter().find(|s| s.number == number)
    }

    pub fn endpoint(&self, name: &EndpointName) -> Option<&Endpoint> {
        self.endpoints.iter().find(|e| &e.name == name)
    }
}

/// `lesson.yaml`, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LessonFile {
    #[serde(default)]
    slug: Option<String>,
    name: String,
    #[serde(default)]
    description: String,
    #[serde(default, with = "humantime_serde")]
    ready_delay: Option<Duration>,
    endpoints: Vec<EndpointFile>,
    #[serde(default)]
    connections: Vec<ConnectionFile>,
    stages: Vec<StageFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct EndpointFile {
    name: String,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    command: Vec<String>,
    #[serde(default)]
    configuration: Option<ConfigurationType>,
    #[serde(default)]
    presentations: Vec<PresentationFile>,
    #[serde(default)]
    additional_ports: Vec<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PresentationFile {
    name: String,
    #[serde(rename = "type")]
    kind: PresentationKind,
    port: u32,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConnectionFile {
    a: String,
    b: String,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct StageFile {
    #[serde(default)]
    description: String,
}

/// One lesson's files: `dir` is its directory's name, `files` its files' text by path
/// relative to that directory.
#[derive(Clone, Debug, Default)]
pub struct LessonSource {
    pub dir: String,
    pub files: BTreeMap<String, String>,
    /// Files that could not be read as text, and why.
    pub unreadable: BTreeMap<String, String>,
}

/// One thing wrong with a curriculum, and where.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// The file, relative to the curriculum directory.
    pub file: String,
    /// The field within it, if the problem is one field's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            Some(field) => write!(f, "{}: {field}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Checks every lesson of a curriculum: its lessons in slug order, or every problem found.
pub fn validate(sources: &[LessonSource]) -> Result<Vec<Lesson>, Vec<Problem>> {
    let mut problems = Vec::new();
    let total: usize = sources
        .iter()
        .flat_map(|s| s.files.values())
        .map(String::len)
        .sum();
    if total > MAX_CATALOG {
        problems.push(Problem {
            file: ".".into(),
            field: None,
            message: format!(
                "the curriculum holds {total} bytes of files; the limit is {MAX_CATALOG} (it is recorded in one event)"
            ),
        });
    }
    let mut lessons: BTreeMap<LessonSlug, (String, Lesson)> = BTreeMap::new();
    for source in sources {
        let Some(lesson) = validate_one(source, &mut problems) else {
            continue;
        };
        let file = format!("{}/{LESSON_FILE}", source.dir);
        if let Some((other, _)) = lessons.get(&lesson.slug) {
            problems.push(Problem {
                file,
                field: Some("slug".into()),
                message: format!(
                    "lesson {:?} is defined in {other} too",
                    lesson.slug.as_str()
                ),
            });
            continue;
        }
        lessons.insert(lesson.slug.clone(), (file, lesson));
    }
    if problems.is_empty() {
        Ok(lessons.into_values().map(|(_, l)| l).collect())
    } else {
        Err(problems)
    }
}

struct Check<'a> {
    file: String,
    problems: &'a mut Vec<Problem>,
}

impl Check<'_> {
    fn problem(&mut self, field: impl Into<Option<String>>, message: impl Into<String>) {
        self.problems.push(Problem {
            file: self.file.clone(),
            field: field.into(),
            message: message.into(),
        });
    }
}

fn validate_one(source: &LessonSource, problems: &mut Vec<Problem>) -> Option<Lesson> {
    let before = problems.len();
    let mut check = Check {
        file: format!("{}/{LESSON_FILE}", source.dir),
        problems,
    };
    for (file, why) in &source.unreadable {
        check.problems.push(Problem {
            file: format!("{}/{file}", source.dir),
            field: None,
            message: why.clone(),
        });
    }
    let Some(text) = source.files.get(LESSON_FILE) else {
        check.problem(None, "a lesson directory needs a lesson.yaml");
        return None;
    };
    let raw: LessonFile = match serde_yaml_ng::from_str(text) {
        Ok(raw) => raw,
        Err(err) => {
            let field = err.location().map(|l| format!("line {}", l.line()));
            check.problem(field, err.to_string());
            return None;
        }
    };
    let slug_text = raw.slug.clone().unwrap_or_else(|| source.dir.clone());
    let slug = match LessonSlug::new(slug_text.clone()) {
        Ok(slug) => Some(slug),
        Err(err) => {
            check.problem(Some("slug".into()), format!("{slug_text:?}: {err}"));
            None
        }
    };
    if raw.name.trim().is_empty() {
        check.problem(Some("name".into()), "is empty");
    }
    let ready_delay = raw.ready_delay.unwrap_or_default();
    if ready_delay > MAX_READY_DELAY {
        check.problem(
            Some("ready_delay".into()),
            format!(
                "is over the limit of {}",
                humantime::format_duration(MAX_READY_DELAY)
            ),
        );
    }
    let endpoints = endpoints(&raw, &mut check);
    let names: BTreeSet<&str> = raw.endpoints.iter().map(|e| e.name.as_str()).collect();
    let mut connections = Vec::new();
    let mut seen_links = BTreeSet::new();
    for (i, c) in raw.connections.iter().enumerate() {
        for (side, name) in [("a", &c.a), ("b", &c.b)] {
            if !names.contains(name.as_str()) {
                check.problem(
                    Some(format!("connections[{i}].{side}")),
                    format!("{name:?} is not an endpoint of this lesson"),
                );
            }
        }
        if c.a == c.b {
            check.problem(
                Some(format!("connections[{i}]")),
                "connects an endpoint to itself",
            );
        }
        let link = if c.a < c.b {
            (&c.a, &c.b)
        } else {
            (&c.b, &c.a)
        };
        if !seen_links.insert(link) {
            check.problem(
                Some(format!("connections[{i}]")),
                format!("{:?} and {:?} are connected already", c.a, c.b),
            );
        }
        if let (Ok(a), Ok(b)) = (
            EndpointName::new(c.a.clone()),
            EndpointName::new(c.b.clone()),
        ) {
            connections.push(Connection { a, b });
        }
    }
    let stages = stages(source, &raw, &endpoints, &mut check);
    if check.problems.len() > before {
        return None;
    }
    Some(Lesson {
        slug: slug?,
        name: raw.name.trim().to_owned(),
        description: raw.description.trim().to_owned(),
        ready_delay_ms: u64::try_from(ready_delay.as_millis()).unwrap_or(u64::MAX),
        endpoints,
        connections,
        stages,
    })
}

fn port(value: u32, field: String, check: &mut Check<'_>) -> Option<u16> {
    match u16::try_from(value) {
        Ok(port) if port > 0 => Some(port),
        _ => {
            check.problem(Some(field), format!("{value} is not a port (1 to 65535)"));
            None
        }
    }
}

fn endpoints(raw: &LessonFile, check: &mut Check<'_>) -> Vec<Endpoint> {
    if raw.endpoints.is_empty() {
        check.problem(
            Some("endpoints".into()),
            "a lesson needs at least one endpoint",
        );
    }
    if raw.endpoints.len() > MAX_ENDPOINTS {
        check.problem(
            Some("endpoints".into()),
            format!(
                "{} endpoints; the limit is {MAX_ENDPOINTS}",
                raw.endpoints.len()
            ),
        );
    }
    let mut seen = BTreeSet::new();
    let mut endpoints = Vec::new();
    for (i, e) in raw.endpoints.iter().enumerate() {
        let at = format!("endpoints[{i}]");
        let name = match EndpointName::new(e.name.clone()) {
            Ok(name) => Some(name),
            Err(err) => {
                check.problem(Some(format!("{at}.name")), format!("{:?}: {err}", e.name));
                None
            }
        };
        if !seen.insert(e.name.as_str()) {
            check.problem(
                Some(format!("{at}.name")),
                format!("endpoint {:?} is defined twice", e.name),
            );
        }
        if e.image.as_deref().is_none_or(|i| i.trim().is_empty()) && e.command.is_empty() {
            check.problem(Some(at.clone()), "an endpoint needs an image or a command");
        }
        if e.command.first().is_some_and(|c| c.trim().is_empty()) {
            check.problem(Some(format!("{at}.command")), "the program is empty");
        }
        if e.presentations.is_empty() && e.additional_ports.is_empty() {
            check.problem(
                Some(at.clone()),
                "an endpoint needs presentations or additional ports",
            );
        }
        let mut ports = BTreeSet::new();
        let mut names = BTreeSet::new();
        let mut presentations = Vec::new();
        for (j, p) in e.presentations.iter().enumerate() {
            let field = format!("{at}.presentations[{j}]");
            let pname = match EndpointName::new(p.name.clone()) {
                Ok(n) => Some(n),
                Err(err) => {
                    check.problem(
                        Some(format!("{field}.name")),
                        format!("{:?}: {err}", p.name),
                    );
                    None
                }
            };
            if !names.insert(p.name.as_str()) {
                check.problem(
                    Some(format!("{field}.name")),
                    format!("presentation {:?} is defined twice", p.name),
                );
            }
            let number = port(p.port, format!("{field}.port"), check);
            if let Some(number) = number
                && !ports.insert(number)
            {
                check.problem(
                    Some(format!("{field}.port")),
                    format!("port {number} is presented twice"),
                );
            }
            if let (Some(name), Some(port)) = (pname, number) {
                presentations.push(Presentation {
                    name,
                    kind: p.kind,
                    port,
                });
            }
        }
        let mut additional = Vec::new();
        for (j, p) in e.additional_ports.iter().enumerate() {
            let field = format!("{at}.additional_ports[{j}]");
            if let Some(number) = port(*p, field.clone(), check) {
                if ports.insert(number) {
                    additional.push(number);
                } else {
                    check.problem(Some(field), format!("port {number} is listed twice"));
                }
            }
        }
        if e.configuration.is_some()
            && !e
                .presentations
                .iter()
                .any(|p| p.kind == PresentationKind::Ssh)
        {
            check.problem(
                Some(format!("{at}.configuration")),
                "a configured endpoint needs an ssh presentation: its scripts run over SSH",
            );
        }
        if let Some(name) = name {
            endpoints.push(Endpoint {
                name,
                image: e.image.clone().filter(|i| !i.trim().is_empty()),
                command: e.command.clone(),
                configuration: e.configuration,
                presentations,
                additional_ports: additional,
            });
        }
    }
    endpoints
}

fn stages(
    source: &LessonSource,
    raw: &LessonFile,
    endpoints: &[Endpoint],
    check: &mut Check<'_>,
) -> Vec<Stage> {
    if raw.stages.is_empty() {
        check.problem(Some("stages".into()), "a lesson needs at least one stage");
    }
    if raw.stages.len() > MAX_STAGES {
        check.problem(
            Some("stages".into()),
            format!("{} stages; the limit is {MAX_STAGES}", raw.stages.len()),
        );
    }
    let mut stages = Vec::new();
    let mut expected = BTreeSet::new();
    for (i, s) in raw.stages.iter().enumerate() {
        let number = u32::try_from(i + 1).unwrap_or(u32::MAX);
        let guide_file = format!("stage{number}/guide.md");
        expected.insert(guide_file.clone());
        let guide = match source.files.get(&guide_file) {
            Some(text) => text.clone(),
            None => {
                check.problem(
                    Some(format!("stages[{i}]")),
                    format!(
                        "stage {number} has no guide: {}/{guide_file} is missing",
                        source.dir
                    ),
                );
                String::new()
            }
        };
        let mut configs = BTreeMap::new();
        for e in endpoints {
            let Some(kind) = e.configuration else {
                continue;
            };
            let file = format!("stage{number}/configs/{}.{}", e.name, kind.extension());
            expected.insert(file.clone());
            match source.files.get(&file) {
                Some(text) => {
                    configs.insert(
                        e.name.clone(),
                        Script {
                            kind,
                            file,
                            text: text.clone(),
                        },
                    );
                }
                None => check.problem(
                    Some(format!("stages[{i}]")),
                    format!(
                        "endpoint {:?} is configured with {} but stage {number} has no script: {}/{file} is missing",
                        e.name.as_str(),
                        match kind {
                            ConfigurationType::Shell => "shell",
                            ConfigurationType::Python => "python",
                        },
                        source.dir
                    ),
                ),
            }
        }
        stages.push(Stage {
            number,
            description: s.description.trim().to_owned(),
            guide,
            configs,
        });
    }
    for (file, text) in &source.files {
        let path = format!("{}/{file}", source.dir);
        if text.len() > MAX_FILE {
            check.problems.push(Problem {
                file: path.clone(),
                field: None,
                message: format!("is {} bytes; the limit is {MAX_FILE}", text.len()),
            });
        }
        // A script nothing runs is a mistake (a misspelt endpoint, a stage too many).
        if file.starts_with("stage") && file.contains("/configs/") && !expected.contains(file) {
            check.problems.push(Problem {
                file: path,
                field: None,
                message: "is not the script of a configured endpoint of an existing stage"
                    .to_owned(),
            });
        }
    }
    stages
}

/// A digest of lessons: the same lessons, the same digest.
pub fn digest(lessons: &[Lesson]) -> String {
    let bytes = serde_json::to_vec(lessons).unwrap_or_default();
    let hash = ring::digest::digest(&ring::digest::SHA256, &bytes);
    hash.as_ref()[..12]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The catalog entity: the curriculum in force.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Catalog {
    pub loaded: Option<Loaded>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Loaded {
    pub digest: String,
    /// Where it was read from.
    pub source: String,
    pub lessons: Vec<Lesson>,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum CatalogCommand {
    /// Puts these (checked) lessons in force, unless they are those in force already.
    Load {
        source: String,
        lessons: Vec<Lesson>,
    },
}

event_set! {
    pub enum CatalogEvent {
        Loaded(Loaded) = "catalog.loaded" @ 1,
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    #[error("the curriculum is invalid: {}", describe(.problems))]
    Invalid { problems: Vec<Problem> },
}

impl Rejection for CatalogError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::Invalid
    }
}

/// One lesson as the catalog lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct LessonSummary {
    pub slug: LessonSlug,
    pub name: String,
    pub description: String,
    pub stages: u32,
    pub endpoints: Vec<EndpointName>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CatalogView {
    pub digest: String,
    pub source: String,
    pub loaded_at: Timestamp,
    pub lessons: Vec<Lesson>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CatalogReply {
    pub digest: Option<String>,
    pub lessons: usize,
}

impl Catalog {
    pub fn lesson(&self, slug: &LessonSlug) -> Option<&Lesson> {
        self.loaded
            .as_ref()
            .and_then(|l| l.lessons.iter().find(|x| &x.slug == slug))
    }

    pub fn digest(&self) -> Option<&str> {
        self.loaded.as_ref().map(|l| l.digest.as_str())
    }
}

impl Aggregate for Catalog {
    const KIND: &'static str = "catalog";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = CatalogId;
    type Command = CatalogCommand;
    type Event = CatalogEvent;
    type Reply = CatalogReply;
    type View = CatalogView;
    type Error = CatalogError;

    fn decide(
        &self,
        _: &CatalogId,
        command: &CatalogCommand,
        cx: &Context,
    ) -> Result<Vec<CatalogEvent>, CatalogError> {
        let CatalogCommand::Load { source, lessons } = command;
        let digest = digest(lessons);
        if self.digest() == Some(digest.as_str()) {
            return Ok(vec![]);
        }
        // Each lesson must be whole: a caller cannot put half a lesson in force.
        let mut problems = Vec::new();
        let mut slugs = BTreeSet::new();
        for lesson in lessons {
            if !slugs.insert(&lesson.slug) {
                problems.push(Problem {
                    file: lesson.slug.to_string(),
                    field: Some("slug".into()),
                    message: "is given twice".into(),
                });
            }
            if lesson.stages.is_empty() || lesson.endpoints.is_empty() {
                problems.push(Problem {
                    file: lesson.slug.to_string(),
                    field: None,
                    message: "needs endpoints and stages".into(),
                });
            }
        }
        if !problems.is_empty() {
            return Err(CatalogError::Invalid { problems });
        }
        Ok(vec![CatalogEvent::Loaded(Loaded {
            digest,
            source: source.clone(),
            lessons: lessons.clone(),
            at: cx.now,
        })])
    }

    fn apply(&mut self, event: &CatalogEvent) {
        let CatalogEvent::Loaded(loaded) = event;
        self.loaded = Some(loaded.clone());
    }

    fn reply(&self, _: &CatalogId, _: &CatalogCommand) -> CatalogReply {
        CatalogReply {
            digest: self.digest().map(str::to_owned),
            lessons: self.loaded.as_ref().map_or(0, |l| l.lessons.len()),
        }
    }

    fn view(&self, _: &CatalogId) -> Option<CatalogView> {
        let loaded = self.loaded.as_ref()?;
        Some(CatalogView {
            digest: loaded.digest.clone(),
            source: loaded.source.clone(),
            loaded_at: loaded.at,
            lessons: loaded.lessons.clone(),
        })
    }
}

pub fn summary(lesson: &Lesson) -> LessonSummary {
    LessonSummary {
        slug: lesson.slug.clone(),
        name: lesson.name.clone(),
        description: lesson.description.clone(),
        stages: u32::try_from(lesson.stages.len()).unwrap_or(u32::MAX),
        endpoints: lesson.endpoints.iter().map(|e| e.name.clone()).collect(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub mod tests {
    use super::*;

    pub const SAMPLE: &str = r#"
name: SSH basics
description: Two machines, one link.
ready_delay: 1s
endpoints:
  - name: alpha
    image: utility
    configuration: shell
    presentations:
      - { name: cli, type: ssh, port: 22 }
  - name: beta
    image: utility
    configuration: python
    presentations:
      - { name: cli, type: ssh, port: 22 }
      - { name: web, type: http, port: 80 }
    additional_ports: [8080]
connections:
  - { a: alpha, b: beta }
stages:
  - description: Look around
  - description: Change something
"#;

    pub fn sample() -> LessonSource {
        let mut files = BTreeMap::new();
        files.insert(LESSON_FILE.to_owned(), SAMPLE.to_owned());
        for n in [1, 2] {
            files.insert(format!("stage{n}/guide.md"), format!("# Stage {n}\n"));
            files.insert(format!("stage{n}/configs/alpha.sh"), format!("echo {n}\n"));
            files.insert(format!("stage{n}/configs/beta.py"), format!("print({n})\n"));
        }
        LessonSource {
            dir: "ssh-basics".into(),
            files,
            unreadable: BTreeMap::new(),
        }
    }

    #[test]
    fn a_whole_lesson_loads_with_its_scripts_and_guides() {
        let lessons = validate(&[sample()]).unwrap();
        assert_eq!(lessons.len(), 1);
        let lesson = &lessons[0];
        assert_eq!(lesson.slug.as_str(), "ssh-basics");
        assert_eq!(lesson.ready_delay_ms, 1000);
        assert_eq!(lesson.stages.len(), 2);
        let stage = lesson.stage(2).unwrap();
        assert_eq!(stage.guide, "# Stage 2\n");
        let beta = EndpointName::new("beta").unwrap();
        assert_eq!(stage.configs[&beta].text, "print(2)\n");
        assert_eq!(stage.configs[&beta].kind, ConfigurationType::Python);
        assert_eq!(lesson.endpoint(&beta).unwrap().additional_ports, vec![8080]);
        assert_eq!(digest(&lessons), digest(&validate(&[sample()]).unwrap()));
    }

    #[test]
    fn every_problem_is_reported_at_once_with_file_and_field() {
        let mut bad = sample();
        let yaml = SAMPLE
            .replace("- name: beta", "- name: alpha")
            .replace("{ a: alpha, b: beta }", "{ a: alpha, b: gamma }")
            .replace("port: 80", "port: 70000");
        bad.files.insert(LESSON_FILE.into(), yaml);
        bad.files.remove("stage2/configs/alpha.sh");
        bad.files.remove("stage1/guide.md");
        bad.files
            .insert("stage3/configs/alpha.sh".into(), "true".into());
        let problems = validate(&[bad]).unwrap_err();
        let text = describe(&problems);
        for expected in [
            "ssh-basics/lesson.yaml: endpoints[1].name: endpoint \"alpha\" is defined twice",
            "connections[0].b: \"gamma\" is not an endpoint",
            "endpoints[1].presentations[1].port: 70000 is not a port",
            "stage 1 has no guide",
            "stage 2 has no script: ssh-basics/stage2/configs/alpha.sh is missing",
            "ssh-basics/stage3/configs/alpha.sh: is not the script",
        ] {
            assert!(text.contains(expected), "{expected:?} missing from {text}");
        }
    }

    #[test]
    fn unknown_fields_and_duplicate_slugs_are_problems() {
        let mut bad = sample();
        bad.files.insert(
            LESSON_FILE.into(),
            SAMPLE.replace("ready_delay: 1s", "readyDelay: 1"),
        );
        let problems = validate(&[bad]).unwrap_err();
        assert!(problems[0].message.contains("readyDelay"), "{problems:?}");
        let mut twin = sample();
        twin.dir = "copy".into();
        twin.files
            .insert(LESSON_FILE.into(), format!("slug: ssh-basics\n{SAMPLE}"));
        let problems = validate(&[sample(), twin]).unwrap_err();
        let text = describe(&problems);
        assert!(
            text.contains("is defined in ssh-basics/lesson.yaml too"),
            "{text}"
        );
    }

    #[test]
    fn a_configured_endpoint_needs_ssh() {
        let mut bad = sample();
        bad.files.insert(
            LESSON_FILE.into(),
            SAMPLE.replacen(
                "{ name: cli, type: ssh, port: 22 }",
                "{ name: web, type: http, port: 80 }",
                1,
            ),
        );
        let text = describe(&validate(&[bad]).unwrap_err());
        assert!(
            text.contains(
                "endpoints[0].configuration: a configured endpoint needs an ssh presentation"
            ),
            "{text}"
        );
    }

    #[test]
    fn loading_the_same_lessons_again_records_nothing() {
        let lessons = validate(&[sample()]).unwrap();
        let cx = Context {
            now: Timestamp::from_unix_nanos(1_000_000),
        };
        let id = CatalogId::lessons();
        let load = CatalogCommand::Load {
            source: "dir".into(),
            lessons,
        };
        let mut catalog = Catalog::default();
        let events = catalog.decide(&id, &load, &cx).unwrap();
        assert_eq!(events.len(), 1);
        catalog.apply(&events[0]);
        assert!(catalog.decide(&id, &load, &cx).unwrap().is_empty());
        assert_eq!(summary(&catalog.view(&id).unwrap().lessons[0]).stages, 2);
    }
}
