//! Cluster mode: a request's groups decided one after another, each on the node that holds
//! its keys' slot.

use super::*;

/// Cluster mode: the client every per-thread connection is made from, and the probe's.
pub(super) struct Cluster {
    pub(super) client: redis::cluster::ClusterClient,
    pub(super) config: redis::cluster::ClusterConfig,
    /// The probe's connection; made on first use, then reconnected by the client itself.
    pub(super) probe: tokio::sync::OnceCell<redis::cluster_async::ClusterConnection>,
}

impl Cluster {
    pub(super) fn connection(&self) -> redis::cluster_async::ClusterConnection {
        self.client
            .get_pending_async_connection_with_config(self.config.clone())
    }
}

impl RedisStore {
    /// Cluster mode: one script call per group with quotas, in request order, each over
    /// that group's keys only (one hash tag, one slot), until one denies. As in one call
    /// over all groups, a group is charged only if all its quotas admit, and the groups
    /// after a denial are not charged; what differs is that the groups are no longer
    /// decided in one atomic step (another request may be decided between two of them).
    /// The replies are merged into the one the script gives for a whole request, so the
    /// decision is read the same way. The whole request waits at most `timeout`.
    pub(super) fn decide_in_cluster(
        self: &Arc<Self>,
        specs: &Arc<RedisSpecs>,
        charges: Charges,
        cached: Option<(usize, Denial)>,
    ) -> Pin<Box<dyn Future<Output = Decision> + Send>> {
        let store = self.clone();
        let specs = specs.clone();
        Box::pin(async move {
            let deadline = tokio::time::Instant::now() + store.timeout;
            // {denied, group, quota, remaining or retry, reset, shadow mask}, as the script.
            let mut merged = [0i64; REPLY_LEN];
            let mut tightest: Option<i64> = None;
            for (i, charge) in charges.as_slice().iter().enumerate() {
                if specs.group(charge.0).quotas.is_empty() {
                    continue;
                }
                let (reply, answer) = oneshot::channel();
                let job = Job {
                    specs: specs.clone(),
                    charges: Charges::new(std::slice::from_ref(charge)),
                    reply,
                };
                if let Err(why) = store.enqueue(job) {
                    return store.fail(&why);
                }
                let one = match tokio::time::timeout_at(deadline, answer).await {
                    Ok(Ok(Ok(reply))) => reply,
                    Ok(Ok(Err(error))) => return store.fail(&error),
                    Ok(Err(_)) => return store.fail("the Redis worker stopped"),
                    Err(_) => return store.fail("timed out"),
                };
                let group = i64::try_from(i + 1).unwrap_or(0);
                if one[5] & 1 != 0 {
                    merged[5] |= 1 << i;
                }
                if one[0] == 1 {
                    merged[..5].copy_from_slice(&[1, group, one[2], one[3], 0]);
                    break;
                }
                // The tightest admitting quota; on a tie, the earlier group's, as the script.
                if one[1] != 0 && tightest.is_none_or(|remaining| one[3] < remaining) {
                    tightest = Some(one[3]);
                    merged[..5].copy_from_slice(&[0, group, one[2], one[3], one[4]]);
                }
            }
            store.healthy.store(true, Ordering::Relaxed);
            store.read_reply(&merged, charges.as_slice(), &specs, cached)
        })
    }

    /// Cluster mode: this thread's queue and its own cluster connection, which keeps
    /// itself connected to every master (reconnecting, and refreshing the slot map on
    /// MOVED or when a node is lost).
    pub(super) fn cluster_queue(&self, cluster: &Cluster) -> mpsc::Sender<Job> {
        QUEUES.with(|queues| {
            let mut queues = queues.borrow_mut();
            if let Some((.., sender)) = queues
                .iter()
                .find(|(id, _, s)| *id == self.id && !s.is_closed())
            {
                return sender.clone();
            }
            let (sender, receiver) = mpsc::channel(QUEUE_LIMIT);
            tokio::spawn(run_cluster_batches(
                receiver,
                cluster.connection(),
                self.script.clone(),
                self.timeout,
            ));
            queues.retain(|(id, ..)| *id != self.id);
            queues.push((self.id, 0, sender.clone()));
            sender
        })
    }
}
