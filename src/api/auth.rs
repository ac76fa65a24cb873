//! Who a caller is, and what it may do.
//!
//! With `auth.mode = "nats"` the caller is the user NATS authenticated: Switchyard's account
//! exports its API as a service, callers' accounts import it with `share: true`, and the server
//! puts `Nats-Request-Info` (account and user) on every request, replacing any value a caller
//! set. The principal table (`auth.principals`) maps users and accounts to a principal and its
//! roles. `Switchyard-Principal` is honoured only from a principal marked `gateway`. A
//! fire-and-forget command carries no such header once stored, so it names its account in its
//! subject (`<prefix>.cmd.<account>.<kind>.<verb>`, written by the server through the account's
//! import mapping, see `deploy/`) and acts as the account's entry.
//!
//! With `auth.mode = "open"` (the embedded default) nobody is authenticated: every caller is
//! an operator and `Switchyard-Principal` names it.
//!
//! A refusal is `forbidden` (403) and writes nothing.

use async_nats::HeaderMap;
use serde::Deserialize;
use serde_json::Value;

use super::{ApiError, ApiRequest, Mode, PRINCIPAL_HEADER};
use crate::config::{AuthConfig, AuthMode, PrincipalRule, Role};
use crate::domain::{ErrorKind, Principal};

/// The header NATS adds to a request that crossed a service import with `share: true`.
pub const REQUEST_INFO_HEADER: &str = "Nats-Request-Info";

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.principals entry {index}: {reason}")]
    Rule { index: usize, reason: String },
}

/// The principal table, checked once at start-up.
#[derive(Debug, Clone)]
pub struct Auth {
    mode: AuthMode,
    rules: Vec<PrincipalRule>,
}

/// A caller, as authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// Recorded on its events.
    pub principal: Principal,
    pub roles: Vec<Role>,
}

/// Where a request came from, as NATS delivered it.
#[derive(Debug, Clone, Copy)]
pub enum Origin<'a> {
    /// A request on `<prefix>.api.<kind>.<verb>`.
    Request(Option<&'a HeaderMap>),
    /// A fire-and-forget command, from the account its subject names (if any).
    FireAndForget {
        account: Option<&'a str>,
        headers: Option<&'a HeaderMap>,
    },
}

/// What authorization still needs once the route has answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Allow,
    /// Allowed only if the reply's field at this JSON pointer is this value (a pod reads the
    /// meeting points on it, and only those).
    IfReply {
        pointer: &'static str,
        equals: String,
    },
}

/// What the server says about the requester; the fields Switchyard reads.
#[derive(Debug, Deserialize)]
struct RequestInfo {
    acc: Option<String>,
    user: Option<String>,
}

fn forbidden(message: impl Into<String>) -> ApiError {
    ApiError::new(ErrorKind::Forbidden, message)
}

impl Auth {
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        for (index, rule) in config.principals.iter().enumerate() {
            let fail = |reason: String| AuthError::Rule { index, reason };
            if rule.roles.is_empty() {
                return Err(fail("has no roles".to_owned()));
            }
            if rule.account.is_none() && rule.user.is_none() {
                return Err(fail("names neither an account nor a user".to_owned()));
            }
            if let Some(principal) = &rule.principal {
                Principal::new(principal.clone())
                    .map_err(|e| fail(format!("principal {principal:?}: {e}")))?;
            }
        }
        Ok(Self {
            mode: config.mode,
            rules: config.principals.clone(),
        })
    }

    pub fn mode(&self) -> AuthMode {
        self.mode
    }

    /// Who sent a request: the authenticated caller, with the principal its events record.
    /// `claimed` is what `Switchyard-Principal` said (already parsed into the request).
    pub fn identify(&self, origin: Origin<'_>, claimed: &Principal) -> Result<Caller, ApiError> {
        if self.mode == AuthMode::Open {
            return Ok(Caller {
                principal: claimed.clone(),
                roles: vec![Role::Operator],
            });
        }
        let (account, user, headers) = match origin {
            Origin::Request(headers) => {
                let info = headers
                    .and_then(|h| h.get(REQUEST_INFO_HEADER))
                    .ok_or_else(|| {
                        forbidden(format!(
                            "the request carries no authenticated identity ({REQUEST_INFO_HEADER}): call through an account that imports the API with share: true"
                        ))
                    })?;
                let info: RequestInfo = serde_json::from_str(info.as_str())
                    .map_err(|e| forbidden(format!("{REQUEST_INFO_HEADER} does not parse: {e}")))?;
                (info.acc, info.user, headers)
            }
            Origin::FireAndForget { account, headers } => {
                let account = account.ok_or_else(|| {
                    forbidden(
                        "a fire-and-forget command must come through an account's import, which names the account in its subject (see deploy/)",
                    )
                })?;
                (Some(account.to_owned()), None, headers)
            }
        };
        let rule = self
            .rules
            .iter()
            .find(|rule| {
                rule.account
                    .as_ref()
                    .is_none_or(|a| Some(a) == account.as_ref())
                    && match (&rule.user, &user) {
                        (None, _) => true,
                        (Some(wanted), Some(user)) => wanted == user,
                        (Some(_), None) => false,
                    }
            })
            .ok_or_else(|| {
                forbidden(format!(
                    "user {:?} of account {:?} has no role here",
                    user.as_deref().unwrap_or("(any)"),
                    account.as_deref().unwrap_or("?")
                ))
            })?;
        let name = rule
            .principal
            .clone()
            .or(user)
            .or(account)
            .unwrap_or_default();
        let own = Principal::new(name.clone())
            .map_err(|e| forbidden(format!("principal {name:?} is not valid: {e}")))?;
        let claimed_header = headers.and_then(|h| h.get(PRINCIPAL_HEADER)).is_some();
        let principal = if rule.gateway && claimed_header {
            claimed.clone()
        } else {
            if claimed_header {
                tracing::debug!(principal = %own, claimed = %claimed, "ignoring {PRINCIPAL_HEADER} from a caller that is not a gateway");
            }
            own
        };
        Ok(Caller {
            principal,
            roles: rule.roles.clone(),
        })
    }

    /// Whether `caller` may call `kind.verb` with this request.
    pub fn authorize(
        &self,
        caller: &Caller,
        kind: &str,
        verb: &str,
        mode: Mode,
        request: &ApiRequest,
    ) -> Result<Check, ApiError> {
        let mut conditional = None;
        for role in &caller.roles {
            match decide(*role, caller.principal.as_str(), kind, verb, mode, request) {
                Some(Check::Allow) => return Ok(Check::Allow),
                Some(check) => conditional = Some(check),
                None => {}
            }
        }
        conditional.ok_or_else(|| {
            let roles: Vec<String> = caller
                .roles
                .iter()
                .map(|r| format!("{r:?}").to_lowercase())
                .collect();
            forbidden(format!(
                "{} ({}) may not call {kind}.{verb} on this target",
                caller.principal,
                roles.join(", ")
            ))
        })
    }

    /// The check a route's reply must pass, if `check` asked for one.
    pub fn after(check: &Check, reply: &[u8]) -> Result<(), ApiError> {
        match check {
            Check::Allow => Ok(()),
            Check::IfReply { pointer, equals } => {
                let value: Value = serde_json::from_slice(reply).unwrap_or_default();
                if value.pointer(pointer).and_then(Value::as_str) == Some(equals.as_str()) {
                    Ok(())
                } else {
                    Err(forbidden(format!("{equals} may read only what is on it")))
                }
            }
        }
    }
}

/// One role's rule for one route: allowed, allowed if the reply agrees, or not (`None`).
fn decide(
    role: Role,
    me: &str,
    kind: &str,
    verb: &str,
    mode: Mode,
    request: &ApiRequest,
) -> Option<Check> {
    let names_me = |field: &str| {
        (super::routes::body_field(request, field).as_deref() == Some(me)).then_some(Check::Allow)
    };
    match role {
        Role::Operator => Some(Check::Allow),
        Role::Auditor => (mode == Mode::Query).then_some(Check::Allow),
        Role::Pod => match (kind, verb) {
            (
                "pod",
                "add" | "keep_alive" | "remove" | "get" | "is_valid" | "count_meeting_points",
            ) => names_me("pod"),
            ("meeting_point", "list") => names_me("pod"),
            ("meeting_point", "get") => Some(Check::IfReply {
                pointer: "/result/pod",
                equals: me.to_owned(),
            }),
            _ => None,
        },
        Role::Machine => match (kind, verb) {
            ("meeting_point", "reserve" | "keep_alive" | "clear" | "get") => names_me("machine"),
            ("pod", "get" | "is_valid") => Some(Check::Allow),
            _ => None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::CommandMeta;

    fn request(body: Value) -> ApiRequest {
        ApiRequest {
            kind: String::new(),
            verb: String::new(),
            body: body.as_object().cloned().unwrap_or_default(),
            meta: CommandMeta::new(crate::runtime::new_command_id(), Principal::anonymous()),
        }
    }

    fn nats(rules: Vec<PrincipalRule>) -> Auth {
        Auth::new(&AuthConfig {
            mode: AuthMode::Nats,
            principals: rules,
        })
        .unwrap()
    }

    fn rule(account: &str, user: Option<&str>, roles: &[Role]) -> PrincipalRule {
        PrincipalRule {
            account: Some(account.to_owned()),
            user: user.map(str::to_owned),
            principal: None,
            roles: roles.to_vec(),
            gateway: false,
        }
    }

    fn info(account: &str, user: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(
            REQUEST_INFO_HEADER,
            format!(r#"{{"acc":"{account}","user":"{user}","rtt":1}}"#).as_str(),
        );
        headers
    }

    #[test]
    fn open_mode_makes_everyone_an_operator_named_as_they_say() {
        let auth = Auth::new(&AuthConfig::default()).unwrap();
        let claimed = Principal::new("alice").unwrap();
        let caller = auth.identify(Origin::Request(None), &claimed).unwrap();
        assert_eq!(caller.principal, claimed);
        let check = auth
            .authorize(
                &caller,
                "pod",
                "remove",
                Mode::Command,
                &request(serde_json::json!({})),
            )
            .unwrap();
        assert_eq!(check, Check::Allow);
    }

    #[test]
    fn nats_mode_takes_the_authenticated_user_and_ignores_a_claimed_principal() {
        let auth = nats(vec![rule("APP", Some("alice"), &[Role::Operator])]);
        let mut headers = info("APP", "alice");
        headers.insert(PRINCIPAL_HEADER, "root");
        let caller = auth
            .identify(
                Origin::Request(Some(&headers)),
                &Principal::new("root").unwrap(),
            )
            .unwrap();
        assert_eq!(caller.principal.as_str(), "alice");
        let err = auth
            .identify(Origin::Request(None), &Principal::anonymous())
            .unwrap_err();
        assert_eq!(err.code, ErrorKind::Forbidden);
        let stranger = info("APP", "mallory");
        assert_eq!(
            auth.identify(Origin::Request(Some(&stranger)), &Principal::anonymous())
                .unwrap_err()
                .code,
            ErrorKind::Forbidden
        );
    }

    #[test]
    fn a_gateway_may_name_the_principal_it_acts_for() {
        let mut portal = rule("APP", Some("portal"), &[Role::Operator]);
        portal.gateway = true;
        let auth = nats(vec![portal]);
        let mut headers = info("APP", "portal");
        headers.insert(PRINCIPAL_HEADER, "student-7");
        let caller = auth
            .identify(
                Origin::Request(Some(&headers)),
                &Principal::new("student-7").unwrap(),
            )
            .unwrap();
        assert_eq!(caller.principal.as_str(), "student-7");
    }

    #[test]
    fn fire_and_forget_commands_act_as_their_account() {
        let auth = nats(vec![
            rule("APP", Some("alice"), &[Role::Operator]),
            rule("APP", None, &[Role::Auditor]),
        ]);
        let caller = auth
            .identify(
                Origin::FireAndForget {
                    account: Some("APP"),
                    headers: None,
                },
                &Principal::anonymous(),
            )
            .unwrap();
        assert_eq!(caller.principal.as_str(), "APP");
        assert_eq!(caller.roles, vec![Role::Auditor]);
        let unnamed = Origin::FireAndForget {
            account: None,
            headers: None,
        };
        assert!(auth.identify(unnamed, &Principal::anonymous()).is_err());
    }

    #[test]
    fn roles_reach_only_their_own_targets() {
        let auth = nats(vec![]);
        let caller = |name: &str, role: Role| Caller {
            principal: Principal::new(name).unwrap(),
            roles: vec![role],
        };
        let pod = caller("switch-pod-0", Role::Pod);
        let machine = caller("m1", Role::Machine);
        let auditor = caller("audit", Role::Auditor);
        let allowed = |who: &Caller, kind, verb, mode, body: Value| {
            auth.authorize(who, kind, verb, mode, &request(body))
        };
        use serde_json::json;
        assert!(
            allowed(
                &pod,
                "pod",
                "keep_alive",
                Mode::Command,
                json!({"pod": "switch-pod-0"})
            )
            .is_ok()
        );
        assert!(
            allowed(
                &pod,
                "pod",
                "remove",
                Mode::Command,
                json!({"pod": "other"})
            )
            .is_err()
        );
        assert!(
            allowed(
                &pod,
                "meeting_point",
                "clear",
                Mode::Command,
                json!({"machine": "m1"})
            )
            .is_err()
        );
        assert_eq!(
            allowed(
                &pod,
                "meeting_point",
                "get",
                Mode::Query,
                json!({"machine": "m1"})
            )
            .unwrap(),
            Check::IfReply {
                pointer: "/result/pod",
                equals: "switch-pod-0".to_owned()
            }
        );
        assert!(
            allowed(
                &machine,
                "meeting_point",
                "reserve",
                Mode::Command,
                json!({"machine": "m1"})
            )
            .is_ok()
        );
        assert!(
            allowed(
                &machine,
                "meeting_point",
                "reserve",
                Mode::Command,
                json!({"machine": "m2"})
            )
            .is_err()
        );
        assert!(allowed(&machine, "pod", "get", Mode::Query, json!({"pod": "any"})).is_ok());
        assert!(allowed(&machine, "pod", "add", Mode::Command, json!({"pod": "m1"})).is_err());
        assert!(allowed(&auditor, "counter", "list", Mode::Query, json!({})).is_ok());
        assert!(allowed(&auditor, "counter", "add", Mode::Command, json!({})).is_err());
        assert!(
            allowed(
                &auditor,
                "counter",
                "acknowledge_foreign",
                Mode::Command,
                json!({})
            )
            .is_err()
        );
        // The reply check.
        let check = Check::IfReply {
            pointer: "/result/pod",
            equals: "switch-pod-0".to_owned(),
        };
        assert!(Auth::after(&check, br#"{"result":{"pod":"switch-pod-0"}}"#).is_ok());
        assert!(Auth::after(&check, br#"{"result":{"pod":"other"}}"#).is_err());
    }

    #[test]
    fn rules_are_checked_at_start_up() {
        let config = |rule| AuthConfig {
            mode: AuthMode::Nats,
            principals: vec![rule],
        };
        assert!(Auth::new(&config(rule("APP", None, &[]))).is_err());
        let mut nameless = rule("APP", None, &[Role::Operator]);
        nameless.account = None;
        assert!(Auth::new(&config(nameless)).is_err());
        let mut bad = rule("APP", None, &[Role::Operator]);
        bad.principal = Some(" padded".to_owned());
        assert!(Auth::new(&config(bad)).is_err());
    }
}
