//! What a session is made of: its components, each naming a pool, what to run and how to know
//! it is ready. [`SessionSpec::problems`] lists every problem of a spec at once, with where it
//! is, so a bad session file is fixed in one pass.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{ComponentName, PoolName};

/// The most components one session may have.
pub const MAX_COMPONENTS: usize = 64;
/// The longest command, argument, image or environment value accepted, in bytes.
pub const MAX_TEXT: usize = 4096;
/// The most arguments (or environment variables) one component may have.
pub const MAX_ITEMS: usize = 256;
/// The longest a session may run.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(7 * 24 * 3600);

/// What a component is for; components start servers first, then clients, then the driver.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    Server,
    Client,
    /// Exactly one per session: it runs the test; its exit ends the session.
    Driver,
}

impl fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ComponentKind::Server => "server",
            ComponentKind::Client => "client",
            ComponentKind::Driver => "driver",
        })
    }
}

/// How to tell that a started component is ready.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReadinessCheck {
    /// Ready once a TCP connection to this port of the component's host succeeds; without a
    /// port, the port Switchyard gave the component (its `PORT`).
    Tcp {
        #[serde(default)]
        port: Option<u16>,
    },
    /// Ready once this command, run on the component's host, exits 0.
    Command {
        command: String,
        #[serde(default)]
        args: Vec<String>,
    },
}

/// One process of a session.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ComponentSpec {
    /// Unique within the session.
    pub name: ComponentName,
    pub kind: ComponentKind,
    /// The pool whose machine it runs on.
    pub pool: PoolName,
    /// The program to run, found on `PATH`.
    pub command: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to its environment. `PORT` (the port Switchyard gives it), the workers variable
    /// (`QPS_WORKERS` by default), `SWITCHYARD_SESSION` and `SWITCHYARD_COMPONENT` are set
    /// by Switchyard and may not be given here.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// A container image, for backends that run images (Kubernetes); the process backend
    /// ignores it.
    #[serde(default)]
    pub image: Option<String>,
    /// Without one, a component is ready once it runs.
    #[serde(default)]
    pub readiness: Option<ReadinessCheck>,
    /// Keep its output in the log store too (the driver's is always kept).
    #[serde(default)]
    pub keep_log: bool,
}

impl ComponentSpec {
    /// Whether its output is stored when the session ends.
    pub fn keeps_log(&self) -> bool {
        self.keep_log || self.kind == ComponentKind::Driver
    }
}

/// A session's components; the control plane adds its timeout.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionSpec {
    pub components: Vec<ComponentSpec>,
}

/// One problem of a spec, and where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Problem {
    /// Where: `components[2].env.PORT`, or `components` for the whole list.
    pub at: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.at, self.message)
    }
}

/// Every problem, one per line.
pub fn describe(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

fn text_problem(value: &str) -> Option<String> {
    if value.len() > MAX_TEXT {
        Some(format!("is {} bytes, the limit is {MAX_TEXT}", value.len()))
    } else if value.contains('\0') {
        Some("contains a NUL byte".to_owned())
    } else {
        None
    }
}

fn env_name_ok(name: &str) -> bool {
    let mut chars = name.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

impl SessionSpec {
    /// Every problem of the spec, where `reserved` are the environment variables the control
    /// plane sets itself. Empty when the spec is good.
    pub fn problems(&self, reserved: &[&str]) -> Vec<Problem> {
        let mut problems = Vec::new();
        let mut problem = |at: String, message: String| problems.push(Problem { at, message });
        if self.components.is_empty() {
            problem("components".into(), "a session needs a driver".into());
        }
        if self.components.len() > MAX_COMPONENTS {
            problem(
                "components".into(),
                format!(
                    "{} components, the limit is {MAX_COMPONENTS}",
                    self.components.len()
                ),
            );
        }
        let drivers = self
            .components
            .iter()
            .filter(|c| c.kind == ComponentKind::Driver)
            .count();
        if !self.components.is_empty() && drivers != 1 {
            problem(
                "components".into(),
                format!("a session has exactly one driver, this one has {drivers}"),
            );
        }
        let mut seen: BTreeMap<&ComponentName, usize> = BTreeMap::new();
        for (i, component) in self.components.iter().enumerate() {
            let at = |field: &str| format!("components[{i}].{field}");
            if let Some(first) = seen.insert(&component.name, i) {
                problem(
                    at("name"),
                    format!(
                        "{:?} is also the name of components[{first}]",
                        component.name.as_str()
                    ),
                );
            }
            if component.command.trim().is_empty() {
                problem(at("command"), "must name a program".into());
            }
            if let Some(message) = text_problem(&component.command) {
                problem(at("command"), message);
            }
            if component.args.len() > MAX_ITEMS {
                problem(
                    at("args"),
                    format!(
                        "{} arguments, the limit is {MAX_ITEMS}",
                        component.args.len()
                    ),
                );
            }
            for (j, arg) in component.args.iter().enumerate() {
                if let Some(message) = text_problem(arg) {
                    problem(at(&format!("args[{j}]")), message);
                }
            }
            if component.env.len() > MAX_ITEMS {
                problem(
                    at("env"),
                    format!(
                        "{} variables, the limit is {MAX_ITEMS}",
                        component.env.len()
                    ),
                );
            }
            for (name, value) in &component.env {
                let at = at(&format!("env.{name}"));
                if !env_name_ok(name) {
                    problem(
                        at.clone(),
                        "a variable name is letters, digits and '_', not starting with a digit"
                            .into(),
                    );
                }
                if reserved.contains(&name.as_str()) {
                    problem(at.clone(), "is set by Switchyard".into());
                }
                if let Some(message) = text_problem(value) {
                    problem(at, message);
                }
            }
            if let Some(image) = &component.image
                && let Some(message) = text_problem(image)
            {
                problem(at("image"), message);
            }
            match &component.readiness {
                Some(ReadinessCheck::Tcp { port: Some(0) }) => {
                    problem(at("readiness.tcp.port"), "must be 1 to 65535".into());
                }
                Some(ReadinessCheck::Command { command, args }) => {
                    if command.trim().is_empty() {
                        problem(
                            at("readiness.command.command"),
                            "must name a program".into(),
                        );
                    }
                    for (j, arg) in std::iter::once(command).chain(args).enumerate() {
                        if let Some(message) = text_problem(arg) {
                            problem(at(&format!("readiness.command[{j}]")), message);
                        }
                    }
                }
                _ => {}
            }
        }
        problems
    }

    /// Machines needed per pool: one per component.
    pub fn demand(&self) -> BTreeMap<PoolName, u32> {
        let mut demand = BTreeMap::new();
        for component in &self.components {
            *demand.entry(component.pool.clone()).or_insert(0) += 1;
        }
        demand
    }

    /// The components in the order they start: servers, then clients, then the driver.
    pub fn start_order(&self) -> Vec<&ComponentSpec> {
        let mut order: Vec<&ComponentSpec> = self.components.iter().collect();
        order.sort_by_key(|c| c.kind);
        order
    }

    pub fn component(&self, name: &ComponentName) -> Option<&ComponentSpec> {
        self.components.iter().find(|c| &c.name == name)
    }

    pub fn driver(&self) -> Option<&ComponentSpec> {
        self.components
            .iter()
            .find(|c| c.kind == ComponentKind::Driver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub fn component(name: &str, kind: ComponentKind) -> ComponentSpec {
        ComponentSpec {
            name: ComponentName::new(name).unwrap(),
            kind,
            pool: PoolName::new("local").unwrap(),
            command: "true".into(),
            args: vec![],
            env: BTreeMap::new(),
            image: None,
            readiness: None,
            keep_log: false,
        }
    }

    #[test]
    fn a_good_spec_has_no_problem_and_starts_servers_then_clients_then_the_driver() {
        let spec = SessionSpec {
            components: vec![
                component("d", ComponentKind::Driver),
                component("c", ComponentKind::Client),
                component("s", ComponentKind::Server),
            ],
        };
        assert_eq!(spec.problems(&["PORT"]), vec![]);
        let order: Vec<&str> = spec.start_order().iter().map(|c| c.name.as_str()).collect();
        assert_eq!(order, ["s", "c", "d"]);
        assert_eq!(spec.demand()[&PoolName::new("local").unwrap()], 3);
    }

    #[test]
    fn every_problem_is_listed_with_where_it_is() {
        let mut server = component("s", ComponentKind::Server);
        server.command = " ".into();
        server.env.insert("PORT".into(), "1".into());
        server.env.insert("1BAD".into(), "x".into());
        server.readiness = Some(ReadinessCheck::Tcp { port: Some(0) });
        let twin = component("s", ComponentKind::Server);
        let spec = SessionSpec {
            components: vec![server, twin],
        };
        let problems: Vec<String> = spec
            .problems(&["PORT"])
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            problems,
            [
                "components: a session has exactly one driver, this one has 0",
                "components[0].command: must name a program",
                "components[0].env.1BAD: a variable name is letters, digits and '_', not starting with a digit",
                "components[0].env.PORT: is set by Switchyard",
                "components[0].readiness.tcp.port: must be 1 to 65535",
                "components[1].name: \"s\" is also the name of components[0]",
            ]
        );
    }

    #[test]
    fn an_empty_session_needs_a_driver() {
        let problems = SessionSpec { components: vec![] }.problems(&[]);
        assert_eq!(problems.len(), 1);
        assert_eq!(problems[0].message, "a session needs a driver");
    }
}
