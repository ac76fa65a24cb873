//! This replica's own subjects, `<prefix>.replica.<name>.>`: where other replicas send the
//! requests of the shards it owns. `api.<kind>.<verb>` is a caller's request as it came (the
//! reply goes straight to the caller); `entity.<kind>` is one entity's command or read, from
//! another replica's `Entities` handle (`runtime::remote`).

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::api::server::{ApiContext, FORWARDED_FOR, Via, handle};
use crate::runtime::remote::Endpoint;

/// The running subscription.
pub struct Forwarded {
    task: JoinHandle<()>,
    subscription_closed: tokio::sync::oneshot::Sender<()>,
}

impl Forwarded {
    pub async fn start(
        context: Arc<ApiContext>,
        endpoints: Vec<Arc<dyn Endpoint>>,
    ) -> Result<Self, async_nats::SubscribeError> {
        let me = context.ownership.replica().to_owned();
        let mut requests = context
            .client
            .subscribe(format!("{}.>", context.subjects.replica(&me)))
            .await?;
        let endpoints: HashMap<&'static str, Arc<dyn Endpoint>> =
            endpoints.into_iter().map(|e| (e.kind(), e)).collect();
        let (subscription_closed, mut closing) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                let message = tokio::select! {
                    message = requests.next() => match message {
                        Some(message) => message,
                        None => break,
                    },
                    _ = &mut closing => {
                        let _ = requests.unsubscribe().await;
                        break;
                    }
                };
                let Some(reply) = message.reply.clone() else {
                    continue;
                };
                let parsed = context
                    .subjects
                    .parse_replica(message.subject.as_str(), &me)
                    .map(|(channel, rest)| (channel.to_owned(), rest.to_owned()));
                let context = context.clone();
                match parsed {
                    Some((channel, _)) if channel == "api" => {
                        // Acknowledged at once, so the forwarder knows it arrived; the answer
                        // goes to the caller.
                        let mut message = message;
                        let caller = message
                            .headers
                            .as_ref()
                            .and_then(|h| h.get(FORWARDED_FOR))
                            .map(|v| async_nats::Subject::from(v.as_str()));
                        if let Some(caller) = caller {
                            if let Err(err) =
                                context.client.publish(reply, bytes::Bytes::new()).await
                            {
                                tracing::debug!(error = %err, "cannot acknowledge a forwarded request");
                            }
                            message.reply = Some(caller);
                        }
                        tokio::spawn(async move { handle(&context, message, Via::Replica).await });
                    }
                    Some((channel, kind)) if channel == "entity" => {
                        let Some(endpoint) = endpoints.get(kind.as_str()).cloned() else {
                            let answer = crate::runtime::remote::unknown_kind(&kind);
                            if let Err(err) = context.client.publish(reply, answer).await {
                                tracing::debug!(error = %err, "cannot answer another replica");
                            }
                            continue;
                        };
                        tokio::spawn(async move {
                            let span = tracing::debug_span!("replica.entity", otel.kind = "server", kind = %kind);
                            crate::telemetry::continue_trace(&span, message.headers.as_ref());
                            let answer = endpoint
                                .handle(message.payload.clone())
                                .instrument(span)
                                .await;
                            if let Err(err) = context.client.publish(reply, answer).await {
                                tracing::debug!(error = %err, "cannot answer another replica");
                            }
                        });
                    }
                    _ => tracing::debug!(subject = %message.subject, "not a replica subject"),
                }
            }
        });
        Ok(Self {
            task,
            subscription_closed,
        })
    }

    pub async fn stop(self) {
        let _ = self.subscription_closed.send(());
        let _ = self.task.await;
    }
}
