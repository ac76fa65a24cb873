//! An instance set as the log has it: how it is configured, and the throttles in force (rate
//! limited until, at quota, at capacity), recorded when they change so that operators and the
//! web page see them from any replica.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::InstanceSetId;
use crate::domain::{Aggregate, Context, ErrorKind, Rejection, Timestamp};
use crate::event_set;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct InstanceSet {
    pub config: Option<SetConfig>,
    /// The throttles in force, as operators read them; empty: none.
    pub holds: Vec<String>,
    pub holds_since: Option<Timestamp>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct SetConfig {
    pub driver: String,
    pub instance_type: String,
    pub max_instances: u32,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum InstanceSetCommand {
    /// As configuration says; nothing when it says what the log has.
    Configure(SetConfig),
    /// The throttles in force now; nothing when they are those recorded.
    Holds { holds: Vec<String> },
}

event_set! {
    pub enum InstanceSetEvent {
        Configured(Configured) = "instance_set.configured" @ 1,
        HoldsChanged(HoldsChanged) = "instance_set.holds_changed" @ 1,
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Configured {
    pub config: SetConfig,
    pub at: Timestamp,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HoldsChanged {
    pub holds: Vec<String>,
    pub at: Timestamp,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstanceSetError {
    #[error("instance set {set:?} is not configured")]
    NotConfigured { set: String },
}

impl Rejection for InstanceSetError {
    fn kind(&self) -> ErrorKind {
        ErrorKind::NotFound
    }
}

/// What readers see of an instance set.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct InstanceSetView {
    pub id: InstanceSetId,
    pub driver: String,
    pub instance_type: String,
    pub max_instances: u32,
    /// The throttles in force: why it creates (or calls its driver) no more for now.
    pub holds: Vec<String>,
    pub holds_since: Option<Timestamp>,
}

impl Aggregate for InstanceSet {
    const KIND: &'static str = "instance_set";
    const SNAPSHOT_VERSION: u16 = 1;

    type Id = InstanceSetId;
    type Command = InstanceSetCommand;
    type Event = InstanceSetEvent;
    type Reply = Option<InstanceSetView>;
    type View = InstanceSetView;
    type Error = InstanceSetError;

    fn decide(
        &self,
        id: &InstanceSetId,
        command: &InstanceSetCommand,
        cx: &Context,
    ) -> Result<Vec<InstanceSetEvent>, InstanceSetError> {
        let at = cx.now;
        Ok(match command {
            InstanceSetCommand::Configure(config) => {
                if self.config.as_ref() == Some(config) {
                    vec![]
                } else {
                    vec![InstanceSetEvent::Configured(Configured {
                        config: config.clone(),
                        at,
                    })]
                }
            }
            InstanceSetCommand::Holds { holds } => {
                if self.config.is_none() {
                    return Err(InstanceSetError::NotConfigured {
                        set: id.to_string(),
                    });
                }
                if &self.holds == holds {
                    vec![]
                } else {
                    vec![InstanceSetEvent::HoldsChanged(HoldsChanged {
                        holds: holds.clone(),
                        at,
                    })]
                }
            }
        })
    }

    fn apply(&mut self, event: &InstanceSetEvent) {
        match event {
            InstanceSetEvent::Configured(e) => self.config = Some(e.config.clone()),
            InstanceSetEvent::HoldsChanged(e) => {
                self.holds = e.holds.clone();
                self.holds_since = (!e.holds.is_empty()).then_some(e.at);
            }
        }
    }

    fn reply(&self, id: &InstanceSetId, _command: &InstanceSetCommand) -> Option<InstanceSetView> {
        self.view(id)
    }

    fn view(&self, id: &InstanceSetId) -> Option<InstanceSetView> {
        let config = self.config.as_ref()?;
        Some(InstanceSetView {
            id: id.clone(),
            driver: config.driver.clone(),
            instance_type: config.instance_type.clone(),
            max_instances: config.max_instances,
            holds: self.holds.clone(),
            holds_since: self.holds_since,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_recorded_when_they_change() {
        let id = InstanceSetId::new("workers").unwrap();
        let cx = Context {
            now: Timestamp::EPOCH,
        };
        let mut set = InstanceSet::default();
        let holds = InstanceSetCommand::Holds {
            holds: vec!["at quota".into()],
        };
        assert!(set.decide(&id, &holds, &cx).is_err());
        let config = InstanceSetCommand::Configure(SetConfig {
            driver: "stub".into(),
            instance_type: "small".into(),
            max_instances: 4,
        });
        for command in [&config, &holds] {
            for event in set.decide(&id, command, &cx).unwrap() {
                set.apply(&event);
            }
        }
        assert!(set.decide(&id, &config, &cx).unwrap().is_empty());
        assert!(set.decide(&id, &holds, &cx).unwrap().is_empty());
        assert_eq!(set.view(&id).unwrap().holds, ["at quota"]);
        assert_eq!(set.view(&id).unwrap().holds_since, Some(Timestamp::EPOCH));
    }
}
