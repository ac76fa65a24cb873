//! `schemas/`: a JSON Schema for every API request and reply and every event type and version,
//! plus an AsyncAPI document tying them to subjects. Generated from the Rust types by
//! `switchyard schemas`; a test fails when the checked-in files are out of date.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::generate::SchemaSettings;
use schemars::{Schema, SchemaGenerator};
use serde_json::{Value, json};

use crate::api::catalog::kinds;
use crate::api::routes::Mode;
use crate::api::{ErrorBody, routes};
use crate::subject::Subjects;

fn generator() -> SchemaGenerator {
    SchemaSettings::draft2020_12().into_generator()
}

fn pretty(value: &Value) -> String {
    let mut text = serde_json::to_string_pretty(value).unwrap_or_default();
    text.push('\n');
    text
}

fn with_title(mut schema: Schema, id: &str, description: &str) -> Value {
    schema.insert("$id".to_owned(), json!(id));
    schema.insert("description".to_owned(), json!(description));
    schema.to_value()
}

/// Every generated file: path relative to `schemas/`, and its contents.
/// The store's record of acknowledged foreign messages, in the event channels.
const ACKNOWLEDGE_FOREIGN_RECORD: &str = "record.acknowledge_foreign";
const ACKNOWLEDGE_FOREIGN_PATH: &str = "events/record.acknowledge_foreign.v1.json";

pub fn generate() -> BTreeMap<String, String> {
    let mut files = BTreeMap::new();
    let subjects = Subjects::default();
    let mut channels = serde_json::Map::new();
    let mut operations = serde_json::Map::new();

    for spec in routes() {
        let name = format!("{}.{}", spec.kind, spec.verb);
        let mut request = (spec.request_schema)(&mut generator());
        if spec.mode == Mode::Command {
            // Every command also takes an optional command id; the route types never see it.
            if let Some(properties) = request.get_mut("properties").and_then(Value::as_object_mut) {
                properties.insert(
                    "command_id".to_owned(),
                    json!({
                        "type": "string", "minLength": 1, "maxLength": 128,
                        "description": "Identifies the command across retries: the same id is applied once and answered with its first reply. Generated when absent."
                    }),
                );
            }
        }
        let request_path = format!("api/{name}.request.json");
        let reply_path = format!("api/{name}.reply.json");
        files.insert(
            request_path.clone(),
            pretty(&with_title(request, &request_path, spec.summary)),
        );
        let reply = (spec.reply_schema)(&mut generator());
        files.insert(
            reply_path.clone(),
            pretty(&with_title(
                reply,
                &reply_path,
                &format!("The reply to {name}"),
            )),
        );

        let messages = json!({
            "request": { "payload": { "$ref": format!("./{request_path}") } },
            "reply": { "payload": { "$ref": format!("./{reply_path}") } },
            "error": { "payload": { "$ref": "./api/error.json" } },
        });
        channels.insert(
            format!("api.{name}"),
            json!({
                "address": subjects.api(spec.kind, spec.verb),
                "description": spec.summary,
                "messages": messages,
            }),
        );
        operations.insert(
            name.clone(),
            json!({
                "action": "receive",
                "channel": { "$ref": format!("#/channels/api.{name}") },
                "summary": spec.summary,
                "messages": [{ "$ref": format!("#/channels/api.{name}/messages/request") }],
                "reply": {
                    "messages": [
                        { "$ref": format!("#/channels/api.{name}/messages/reply") },
                        { "$ref": format!("#/channels/api.{name}/messages/error") }
                    ]
                }
            }),
        );
        if spec.mode == Mode::Command {
            channels.insert(format!("cmd.{name}"), json!({
                "address": subjects.command(spec.kind, spec.verb),
                "description": format!("{} (fire-and-forget; the outcome is published on {})", spec.summary, subjects.result("{command_id}")),
                "messages": { "request": { "payload": { "$ref": format!("./{request_path}") } } },
            }));
            operations.insert(
                format!("{name}.fire_and_forget"),
                json!({
                    "action": "receive",
                    "channel": { "$ref": format!("#/channels/cmd.{name}") },
                    "messages": [{ "$ref": format!("#/channels/cmd.{name}/messages/request") }],
                }),
            );
        }
    }
    let error = generator().root_schema_for::<ErrorBody>();
    files.insert(
        "api/error.json".to_owned(),
        pretty(&with_title(
            error,
            "api/error.json",
            "The body of every error reply; the code is also in the Switchyard-Error header",
        )),
    );

    for kind in kinds() {
        let mut messages = serde_json::Map::new();
        for event_type in (kind.event_types)() {
            let path = format!("events/{}.v{}.json", event_type.name, event_type.version);
            if let Some(schema) =
                (kind.event_schema)(event_type.name, event_type.version, &mut generator())
            {
                let description = format!(
                    "The data of event {} at schema version {} (a {} entity's event)",
                    event_type.name, event_type.version, kind.kind
                );
                files.insert(
                    path.clone(),
                    pretty(&with_title(schema, &path, &description)),
                );
                messages.insert(
                    format!("{}.v{}", event_type.name, event_type.version),
                    json!({ "name": event_type.name, "payload": { "$ref": format!("./{path}") } }),
                );
            }
        }
        // The store's own record, which any entity's history may hold.
        messages.insert(
            format!("{ACKNOWLEDGE_FOREIGN_RECORD}.v1"),
            json!({ "name": ACKNOWLEDGE_FOREIGN_RECORD, "payload": { "$ref": format!("./{ACKNOWLEDGE_FOREIGN_PATH}") } }),
        );
        channels.insert(format!("events.{}", kind.kind), json!({
            "address": format!("{}.evt.{}.{{entity}}", subjects.prefix(), kind.kind),
            "description": format!("Events of {} entities, one subject per entity; each message is one command's events, see events/commit.json", kind.kind),
            "parameters": { "entity": { "description": "The entity id, encoded: A-Z a-z 0-9 - _ as is, every other UTF-8 byte as =XX" } },
            "messages": messages,
        }));
    }
    files.insert(
        ACKNOWLEDGE_FOREIGN_PATH.to_owned(),
        pretty(&with_title(
            generator().root_schema_for::<crate::store::provenance::AcknowledgedForeign>(),
            ACKNOWLEDGE_FOREIGN_PATH,
            "A record of the store, not an event: an operator acknowledged foreign messages in the entity's history (header Switchyard-Record: acknowledge_foreign, JSON payload, no Switchyard-Event-Type; the entity version is unchanged)",
        )),
    );
    files.insert("events/commit.json".to_owned(), pretty(&json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "events/commit.json",
        "title": "Commit",
        "description": "One event message in JSON form (Content-Type: application/json): all the events of one command, in order. bincode messages hold the same list with each event's data bincode-encoded.",
        "type": "array",
        "minItems": 1,
        "items": {
            "type": "object",
            "required": ["type", "version", "data"],
            "properties": {
                "type": { "type": "string", "description": "The event type, e.g. counter.created" },
                "version": { "type": "integer", "minimum": 1, "description": "The schema version the data was written with" },
                "data": { "description": "The event data; its schema is events/<type>.v<version>.json" }
            }
        }
    })));

    let asyncapi = json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": "Switchyard",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Commands, queries and events of the Switchyard control plane over NATS. Subjects are shown with the default prefix `sy`."
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
    });
    files.insert("asyncapi.json".to_owned(), pretty(&asyncapi));
    files
}

/// Writes every generated file under `dir`, removing stale ones; returns how many were written.
pub fn write(dir: &Path) -> std::io::Result<usize> {
    let files = generate();
    for stale in existing(dir)?
        .into_iter()
        .filter(|p| !files.contains_key(p))
    {
        std::fs::remove_file(dir.join(stale))?;
    }
    for (path, contents) in &files {
        let path = dir.join(path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, contents)?;
    }
    Ok(files.len())
}

/// The files under `dir` that differ from what `generate` makes, are missing, or are extra.
pub fn check(dir: &Path) -> std::io::Result<Vec<String>> {
    let files = generate();
    let mut stale: Vec<String> = existing(dir)?
        .into_iter()
        .filter(|p| !files.contains_key(p))
        .collect();
    for (path, contents) in &files {
        if std::fs::read_to_string(dir.join(path)).ok().as_deref() != Some(contents.as_str()) {
            stale.push(path.clone());
        }
    }
    stale.sort();
    Ok(stale)
}

fn existing(dir: &Path) -> std::io::Result<Vec<String>> {
    let mut found = Vec::new();
    for sub in ["api", "events"] {
        let Ok(entries) = std::fs::read_dir(dir.join(sub)) else {
            continue;
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") {
                found.push(format!("{sub}/{name}"));
            }
        }
    }
    if dir.join("asyncapi.json").exists() {
        found.push("asyncapi.json".to_owned());
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_schemas_are_up_to_date() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("schemas");
        let stale = check(&dir).unwrap();
        assert!(
            stale.is_empty(),
            "schemas/ is out of date ({stale:?}); run `cargo run -- schemas`"
        );
    }

    #[test]
    fn every_event_version_and_route_has_a_schema() {
        let files = generate();
        for name in [
            "events/record.acknowledge_foreign.v1.json",
            "events/counter.created.v1.json",
            "events/counter.created.v2.json",
            "api/counter.add.request.json",
            "api/counter.list.reply.json",
            "asyncapi.json",
        ] {
            assert!(files.contains_key(name), "{name}");
        }
        let add: Value = serde_json::from_str(&files["api/counter.add.request.json"]).unwrap();
        assert!(add["properties"]["command_id"].is_object());
        assert_eq!(add["required"], json!(["id", "amount"]));
    }
}
