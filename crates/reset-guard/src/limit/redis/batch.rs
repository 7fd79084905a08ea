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
    /// `{prefix}:{group}:{interval_us}.{capacity_us}:` per quota. The quota's numbers are
    /// part of the key: a changed quota starts fresh, an unchanged one keeps its state
    /// across reloads and replicas.
    prefixes: Vec<String>,
}

impl RedisSpecs {
    pub(crate) fn new(limits: &LimitSettings, prefix: &str) -> Self {
        let groups = LimitGroup::ALL.map(|group| {
            let quotas = limits.quotas(group);
            let mut spec = GroupSpec {
                quotas: quotas.to_vec(),
                args: vec![quotas.len() as u64],
                prefixes: Vec::new(),
            };
            for quota in quotas {
                let interval_us = (quota.interval_ns / 1000).max(1);
                let capacity_us = interval_us * u64::from(quota.burst);
                spec.args
                    .extend([interval_us, capacity_us, u64::from(quota.shadow)]);
                spec.prefixes.push(format!(
                    "{prefix}:{}:{interval_us}.{capacity_us}:",
                    group.name()
                ));
            }
            spec
        });
        RedisSpecs { groups }
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
            for prefix in &job.specs.group(*group).prefixes {
                use std::fmt::Write;
                key.clear();
                let _ = write!(key, "{prefix}{hash:016x}");
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
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        // One call at a time: Redis runs scripts one after another anyway, and whatever
        // arrives meanwhile rides in the next batch.
        let invocation = invocation(&script, &batch);
        let call = invocation.invoke_async::<Vec<i64>>(&mut connection);
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
}
