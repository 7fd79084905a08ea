//! Batching: the requests waiting for Redis on one thread go to the server as one script
//! call, each still decided atomically and in order; and the script's view of a settings
//! generation, prepared once per reload.

use std::sync::Arc;
use std::time::Duration;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use crate::limit::{LimitGroup, LimitSettings, Quota};

/// Most requests decided by one script call.
const MAX_BATCH: usize = 128;
/// Numbers the script returns per request.
pub(super) const REPLY_LEN: usize = 6;

/// One request's charges under one settings generation, and where its six numbers go.
pub(super) struct Job {
    pub(super) specs: Arc<RedisSpecs>,
    pub(super) charges: Charges,
    pub(super) reply: oneshot::Sender<Result<[i64; REPLY_LEN], String>>,
}

/// The script's view of one settings generation, prepared once per reload: per group, the
/// quota arguments and the key prefix of each quota.
#[derive(Debug)]
pub(crate) struct RedisSpecs {
    groups: [GroupSpec; 4],
    /// Cluster mode: each key's group and keyed hash form its hash tag, so every quota of
    /// one group and key shares a slot.
    cluster: bool,
}

/// A request's charges in order, without an allocation (a request has at most four).
#[derive(Debug, Clone, Copy)]
pub(super) struct Charges {
    items: [(LimitGroup, u64); 4],
    len: usize,
}

impl Charges {
    pub(super) fn new(charges: &[(LimitGroup, u64)]) -> Self {
        let mut items = [(LimitGroup::Global, 0); 4];
        items[..charges.len()].copy_from_slice(charges);
        Charges {
            items,
            len: charges.len(),
        }
    }

    pub(super) fn as_slice(&self) -> &[(LimitGroup, u64)] {
        &self.items[..self.len]
    }
}

#[derive(Debug, Default)]
pub(super) struct GroupSpec {
    /// The group's quotas, to read the script's answer by index.
    pub(super) quotas: Vec<Quota>,
    /// Quota count, then interval_us, capacity_us, shadow per quota.
    args: Vec<u64>,
    /// `{prefix}:{group}`.
    head: String,
    /// `{interval_us}.{capacity_us}` per quota. The quota's numbers are part of the key: a
    /// changed quota starts fresh, an unchanged one keeps its state across reloads and
    /// replicas.
    quota_parts: Vec<String>,
}

impl GroupSpec {
    /// The key of quota `q` for the keyed hash `hash`: `{prefix}:{group}:{quota}:{hash}`,
    /// or in Cluster mode `{{prefix}:{group}:{hash}}:{quota}`, whose hash tag puts every
    /// quota of one group and key in one slot.
    fn key(&self, out: &mut String, q: usize, hash: u64, cluster: bool) {
        use std::fmt::Write;
        out.clear();
        let (head, quota) = (&self.head, &self.quota_parts[q]);
        let _ = if cluster {
            write!(out, "{{{head}:{hash:016x}}}:{quota}")
        } else {
            write!(out, "{head}:{quota}:{hash:016x}")
        };
    }
}

impl RedisSpecs {
    pub(crate) fn new(limits: &LimitSettings, prefix: &str, cluster: bool) -> Self {
        let groups = LimitGroup::ALL.map(|group| {
            let quotas = limits.quotas(group);
            let mut spec = GroupSpec {
                quotas: quotas.to_vec(),
                args: vec![quotas.len() as u64],
                head: format!("{prefix}:{}", group.name()),
                quota_parts: Vec::new(),
            };
            for quota in quotas {
                let interval_us = (quota.interval_ns / 1000).max(1);
                let capacity_us = interval_us * u64::from(quota.burst);
                spec.args
                    .extend([interval_us, capacity_us, u64::from(quota.shadow)]);
                spec.quota_parts
                    .push(format!("{interval_us}.{capacity_us}"));
            }
            spec
        });
        RedisSpecs { groups, cluster }
    }

    pub(super) fn group(&self, group: LimitGroup) -> &GroupSpec {
        &self.groups[group.index()]
    }
}

/// Builds one script call for a batch: the quota sets of every settings generation in
/// it, once, then each request's groups and keys.
fn invocation<'a>(script: &'a redis::Script, batch: &[Job]) -> redis::ScriptInvocation<'a> {
    let mut generations: Vec<&Arc<RedisSpecs>> = Vec::new();
    for job in batch {
        if !generations.iter().any(|g| Arc::ptr_eq(g, &job.specs)) {
            generations.push(&job.specs);
        }
    }
    let mut invocation = script.prepare_invoke();
    invocation.arg(batch.len()).arg(generations.len() * 4);
    for specs in &generations {
        for spec in &specs.groups {
            for arg in &spec.args {
                invocation.arg(*arg);
            }
        }
    }
    let mut key = String::new();
    for job in batch {
        let generation = generations
            .iter()
            .position(|g| Arc::ptr_eq(g, &job.specs))
            .unwrap_or(0);
        invocation.arg(job.charges.len);
        for (group, _) in job.charges.as_slice() {
            invocation.arg(generation * 4 + group.index() + 1);
        }
        for (group, hash) in job.charges.as_slice() {
            let spec = job.specs.group(*group);
            for q in 0..spec.quota_parts.len() {
                spec.key(&mut key, q, *hash, job.specs.cluster);
                invocation.key(key.as_str());
            }
        }
    }
    invocation
}

/// Gathers whatever requests are waiting into one script call, so a busy gateway makes
/// one round trip for many requests; each request is still decided atomically, in order.
pub(super) async fn run_batches(
    mut queue: mpsc::Receiver<Job>,
    connection: ConnectionManager,
    script: Arc<redis::Script>,
    timeout: Duration,
) {
    let mut connection = connection;
    while let Some(first) = queue.recv().await {
        let batch = gather(first, &mut queue);
        // One call at a time: Redis runs scripts one after another anyway, and whatever
        // arrives meanwhile rides in the next batch.
        call(batch, &mut connection, &script, timeout).await;
    }
}

/// Cluster mode: each job is one group of one request (its keys share a hash tag). The
/// jobs waiting on this thread are gathered, and those with the same hash tag (the same
/// group and key: above all the hot `global` key) go as one script call; calls for
/// different tags run side by side, pipelined over the cluster connection, which sends
/// each to the node holding its slot and follows MOVED/ASK itself.
pub(super) async fn run_cluster_batches(
    mut queue: mpsc::Receiver<Job>,
    connection: redis::cluster_async::ClusterConnection,
    script: Arc<redis::Script>,
    timeout: Duration,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = gather(first, &mut queue);
        while !batch.is_empty() {
            let tag = batch[0].charges.as_slice().first().copied();
            let (same, rest): (Vec<Job>, Vec<Job>) = batch
                .into_iter()
                .partition(|job| job.charges.as_slice().first().copied() == tag);
            batch = rest;
            let mut connection = connection.clone();
            let script = script.clone();
            tokio::spawn(async move { call(same, &mut connection, &script, timeout).await });
        }
    }
}

/// The first job and whatever else is waiting, up to [`MAX_BATCH`].
fn gather(first: Job, queue: &mut mpsc::Receiver<Job>) -> Vec<Job> {
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH {
        match queue.try_recv() {
            Ok(job) => batch.push(job),
            Err(_) => break,
        }
    }
    batch
}

/// One script call deciding `batch`, and each job's six numbers (or the error) sent back.
async fn call(
    batch: Vec<Job>,
    connection: &mut impl redis::aio::ConnectionLike,
    script: &redis::Script,
    timeout: Duration,
) {
    let invocation = invocation(script, &batch);
    let call = invocation.invoke_async::<Vec<i64>>(connection);
    let outcome = match tokio::time::timeout(timeout, call).await {
        Ok(Ok(values)) if values.len() == REPLY_LEN * batch.len() => Ok(values),
        Ok(Ok(_)) => Err("unexpected reply from the rate-limit script".to_owned()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err("timed out".to_owned()),
    };
    for (i, job) in batch.into_iter().enumerate() {
        let reply = match &outcome {
            Ok(values) => {
                let mut six = [0; REPLY_LEN];
                six.copy_from_slice(&values[i * REPLY_LEN..(i + 1) * REPLY_LEN]);
                Ok(six)
            }
            Err(error) => Err(error.clone()),
        };
        // The request may have given up already; that is fine.
        let _ = job.reply.send(reply);
    }
}
