//! Where sessions' output is kept once they end: the JetStream object store bucket
//! `<prefix>_SESSION_LOGS`, one object per component, `<session>/<component>`. Writing an object
//! again replaces it, so storing a log twice (a step repeated after a crash) keeps one.

use async_nats::jetstream::object_store::{self, ObjectStore};
use tokio::io::AsyncReadExt;
use tokio::sync::OnceCell;

use crate::store::EventStore;
use crate::subject::encode_token;

#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("cannot open the log bucket {bucket}")]
    Bucket {
        bucket: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot store the log {object}")]
    Put {
        object: String,
        #[source]
        source: async_nats::Error,
    },
    #[error("cannot read the log {object}")]
    Get {
        object: String,
        #[source]
        source: async_nats::Error,
    },
}

/// The log bucket, opened (created) on first use.
#[derive(Clone)]
pub struct LogStore {
    store: EventStore,
    bucket: std::sync::Arc<OnceCell<ObjectStore>>,
}

impl LogStore {
    pub fn new(store: EventStore) -> Self {
        Self {
            store,
            bucket: std::sync::Arc::default(),
        }
    }

    pub fn bucket_name(&self) -> String {
        format!("{}_SESSION_LOGS", self.store.config().stream_prefix)
    }

    /// The object a component's log is kept in.
    pub fn object(session: &str, component: &str) -> String {
        format!("{}/{component}", encode_token(session))
    }

    async fn bucket(&self) -> Result<&ObjectStore, LogError> {
        self.bucket
            .get_or_try_init(|| async {
                let config = self.store.config();
                self.store
                    .jetstream()
                    .create_object_store(object_store::Config {
                        bucket: self.bucket_name(),
                        description: Some("Switchyard: the output of sessions' components".into()),
                        num_replicas: config.replicas,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| LogError::Bucket {
                        bucket: self.bucket_name(),
                        source: e.into(),
                    })
            })
            .await
    }

    pub async fn put(&self, object: &str, data: &[u8]) -> Result<(), LogError> {
        let bucket = self.bucket().await?;
        let mut reader = data;
        bucket
            .put(object, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| LogError::Put {
                object: object.to_owned(),
                source: e.into(),
            })
    }

    /// The whole object, or `None` if there is none.
    pub async fn get(&self, object: &str) -> Result<Option<Vec<u8>>, LogError> {
        let bucket = self.bucket().await?;
        let mut found = match bucket.get(object).await {
            Ok(found) => found,
            Err(err) if err.kind() == object_store::GetErrorKind::NotFound => return Ok(None),
            Err(err) => {
                return Err(LogError::Get {
                    object: object.to_owned(),
                    source: err.into(),
                });
            }
        };
        let mut data = Vec::new();
        found
            .read_to_end(&mut data)
            .await
            .map_err(|e| LogError::Get {
                object: object.to_owned(),
                source: e.into(),
            })?;
        Ok(Some(data))
    }
}
