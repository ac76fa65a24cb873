//! A typed client for the command API, for Switchyard's own tools (the CLI, the agents). Any
//! NATS client can do the same with JSON; this one adds types and one error enum.

use std::time::Duration;

use async_nats::HeaderMap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{COMMAND_ID_HEADER, ErrorBody, PRINCIPAL_HEADER};
use crate::domain::ErrorKind;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The control plane answered with a typed error.
    #[error("{route}: {code}{}: {message}", reason.as_deref().map(|r| format!("/{r}")).unwrap_or_default())]
    Api {
        route: String,
        code: ErrorKind,
        reason: Option<String>,
        message: String,
    },
    #[error("{route}: no reply within {timeout:?} (is the control plane running?)")]
    Timeout { route: String, timeout: Duration },
    #[error("{route}: the request failed")]
    Request {
        route: String,
        #[source]
        source: async_nats::RequestError,
    },
    #[error("{route}: cannot encode the request or decode the reply")]
    Json {
        route: String,
        #[source]
        source: serde_json::Error,
    },
}

impl ClientError {
    /// The API error code, if the control plane answered with one.
    pub fn code(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether retrying the same command may succeed: the control plane was unreachable or
    /// said so.
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::Api { code, .. } => {
                matches!(code, ErrorKind::Unavailable | ErrorKind::Conflict)
            }
            ClientError::Timeout { .. } | ClientError::Request { .. } => true,
            ClientError::Json { .. } => false,
        }
    }
}

/// Calls `<prefix>.api.<route>`.
#[derive(Clone)]
pub struct ApiClient {
    client: async_nats::Client,
    prefix: String,
    timeout: Duration,
    principal: Option<String>,
}

impl ApiClient {
    pub fn new(client: async_nats::Client, prefix: impl Into<String>, timeout: Duration) -> Self {
        Self {
            client,
            prefix: prefix.into(),
            timeout,
            principal: None,
        }
    }

    /// Names the caller on the events its commands write.
    pub fn with_principal(mut self, principal: impl Into<String>) -> Self {
        self.principal = Some(principal.into());
        self
    }

    pub fn nats(&self) -> &async_nats::Client {
        &self.client
    }

    /// Sends `body` to `route` and decodes the reply's JSON.
    pub async fn call<B: Serialize, R: DeserializeOwned>(
        &self,
        route: &str,
        body: &B,
    ) -> Result<R, ClientError> {
        self.call_with_id(route, body, None).await
    }

    /// As [`call`](Self::call), with a command id: the same id is the same command.
    pub async fn call_with_id<B: Serialize, R: DeserializeOwned>(
        &self,
        route: &str,
        body: &B,
        command_id: Option<&str>,
    ) -> Result<R, ClientError> {
        let json_error = |source| ClientError::Json {
            route: route.to_owned(),
            source,
        };
        let payload = serde_json::to_vec(body).map_err(json_error)?;
        let mut headers = HeaderMap::new();
        if let Some(id) = command_id {
            headers.insert(COMMAND_ID_HEADER, id);
        }
        if let Some(principal) = &self.principal {
            headers.insert(PRINCIPAL_HEADER, principal.as_str());
        }
        let subject = format!("{}.api.{route}", self.prefix);
        let request = self
            .client
            .request_with_headers(subject, headers, payload.into());
        let reply = tokio::time::timeout(self.timeout, request)
            .await
            .map_err(|_| ClientError::Timeout {
                route: route.to_owned(),
                timeout: self.timeout,
            })?
            .map_err(|source| ClientError::Request {
                route: route.to_owned(),
                source,
            })?;
        let failed = reply.headers.as_ref().is_some_and(|h| {
            h.get(async_nats::service::NATS_SERVICE_ERROR_CODE)
                .is_some()
        });
        if failed {
            let body: ErrorBody = serde_json::from_slice(&reply.payload).map_err(json_error)?;
            return Err(ClientError::Api {
                route: route.to_owned(),
                code: body.error.code,
                reason: body.error.reason,
                message: body.error.message,
            });
        }
        serde_json::from_slice(&reply.payload).map_err(json_error)
    }
}
