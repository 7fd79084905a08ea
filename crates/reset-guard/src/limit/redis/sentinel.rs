//! Sentinel mode: asking the sentinels which server is the master, and moving every
//! connection to a new one after a failover.

use super::*;

/// Least time between two questions to the sentinels prompted by failed requests.
pub(super) const RESOLVE_INTERVAL_NS: u64 = 250_000_000;

/// The server decisions go to: the standalone one, or the master the sentinels named.
pub(super) struct Master {
    /// Counts masters: a per-thread queue made for an older one is remade.
    pub(super) generation: u64,
    /// The address the sentinels named (standalone: none).
    pub(super) address: Option<(String, u16)>,
    /// Where per-thread connections are made from.
    pub(super) client: redis::Client,
    /// The probe's connection.
    pub(super) connection: ConnectionManager,
}

impl Master {
    pub(super) fn new(
        generation: u64,
        address: Option<(String, u16)>,
        client: redis::Client,
        config: &ConnectionManagerConfig,
    ) -> redis::RedisResult<Self> {
        let connection = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())?;
        Ok(Master {
            generation,
            address,
            client,
            connection,
        })
    }
}

impl RedisStore {
    /// In Sentinel mode: asks the sentinels which server is the master now and, when it
    /// changed (a failover), moves every connection to it. One question at a time.
    pub(super) async fn resolve(&self) {
        let Some(sentinels) = &self.sentinels else {
            return;
        };
        let _one = self.resolving.lock().await;
        let Some((host, port)) = self.ask_sentinels(sentinels).await else {
            return;
        };
        let current = self.master.load_full();
        if current.as_ref().is_some_and(|m| {
            m.address
                .as_ref()
                .is_some_and(|(h, p)| *h == host && *p == port)
        }) {
            return;
        }
        let generation = current.map_or(1, |m| m.generation + 1);
        let named = format!("{host}:{port}");
        let master = self
            .settings
            .client_at(&sentinels.master_url(&host, port), true)
            .and_then(|client| Master::new(generation, Some((host, port)), client, &self.config));
        match master {
            Ok(master) => {
                tracing::info!(target: "reset_guard::limit", master = %named, "Redis master named by the sentinels");
                self.master.store(Some(Arc::new(master)));
            }
            Err(error) => {
                tracing::warn!(target: "reset_guard::limit", master = %named, %error, "cannot use the Redis master the sentinels named");
            }
        }
    }

    /// The master's address, from the first sentinel that names it.
    pub(super) async fn ask_sentinels(&self, sentinels: &Sentinels) -> Option<(String, u16)> {
        let wait = self.timeout.max(Duration::from_millis(250));
        for node in &sentinels.nodes {
            let ask = async {
                let client = self.settings.client_at(node, false)?;
                let mut connection = client.get_multiplexed_async_connection().await?;
                redis::cmd("SENTINEL")
                    .arg("get-master-addr-by-name")
                    .arg(&sentinels.master)
                    .query_async::<Option<(String, u16)>>(&mut connection)
                    .await
            };
            match tokio::time::timeout(wait, ask).await {
                Ok(Ok(Some(address))) => return Some(address),
                Ok(Ok(None)) => {
                    tracing::warn!(target: "reset_guard::limit", master = %sentinels.master, "a sentinel does not know this master");
                }
                Ok(Err(error)) => {
                    tracing::debug!(target: "reset_guard::limit", %error, "a sentinel did not answer");
                }
                Err(_) => {
                    tracing::debug!(target: "reset_guard::limit", "a sentinel did not answer in time");
                }
            }
        }
        tracing::warn!(target: "reset_guard::limit", "no sentinel named the Redis master");
        None
    }
}
