//! Cluster mode: one request's groups decided run after run, in request order, until one
//! denies. A run is one group, or consecutive groups whose keys one master serves (by the
//! slot map when the request started), decided in one step there. The walk is handed from
//! one master's calls to the next on the thread without waking the request in between
//! (see `cluster::run_master_batches`): each wake of a request polls its whole connection,
//! and its next job would reach the next master's queue a scheduler turn later, after
//! that master's call had gone with fewer jobs (benches/README.md, "Cluster: runs handed
//! on").

use tokio::sync::oneshot;

use super::batch::{Charges, RedisSpecs, REPLY_LEN};
use crate::limit::LimitGroup;

/// Where a request stands in deciding its groups, and their replies merged into the one the
/// script gives for a whole request.
#[derive(Debug, Clone, Copy)]
pub(super) struct Walk {
    /// All of the request's groups, in order.
    charges: Charges,
    /// Each group's master (its index in the slot map), where the map placed it
    /// ([`Walk::place`]).
    owners: [Option<u16>; 4],
    /// Each group's slot, reckoned once: the walk is placed again after every run.
    slots: [u16; 4],
    /// Whether a run may hold several groups: not once a master no longer served all of a
    /// run's keys (the slot map had gone stale).
    together: bool,
    /// The groups of the run last handed out, `start..end`.
    run: (usize, usize),
    /// The first group not decided yet.
    next: usize,
    /// {denied, group, quota, remaining or retry, reset, shadow mask, near mask}, as the
    /// script answers for a whole request.
    merged: [i64; REPLY_LEN],
    /// The fewest requests left by an admitting quota so far.
    tightest: Option<i64>,
}

impl Walk {
    /// A walk over `charges`, each group's keys in the slot `slot` gives.
    pub(super) fn new(charges: Charges, slot: impl Fn(LimitGroup, u64) -> u16) -> Self {
        let mut slots = [0; 4];
        for (slot_of_group, (group, hash)) in slots.iter_mut().zip(charges.as_slice()) {
            *slot_of_group = slot(*group, *hash);
        }
        Walk {
            charges,
            owners: [None; 4],
            slots,
            together: true,
            run: (0, 0),
            next: 0,
            merged: [0; REPLY_LEN],
            tightest: None,
        }
    }

    /// Places each group not decided yet on the master `owner` names for its slot (none:
    /// not known).
    pub(super) fn place(&mut self, owner: impl Fn(u16) -> Option<u16>) {
        for i in self.next..self.charges.as_slice().len() {
            self.owners[i] = owner(self.slots[i]);
        }
    }

    /// The next run to decide: its groups' charges and the master the slot map placed them
    /// on (none: the cluster client routes it), or none once every group is decided or one
    /// denied. Groups without quotas are passed over. Asking again before [`Walk::merge`]
    /// gives the same run.
    pub(super) fn next_run(&mut self, specs: &RedisSpecs) -> Option<(Charges, Option<u16>)> {
        let all = self.charges.as_slice();
        if self.merged[0] == 1 {
            return None;
        }
        let no_quotas = |i: usize| specs.group(all[i].0).quotas.is_empty();
        let mut first = self.next;
        while first < all.len() && no_quotas(first) {
            first += 1;
        }
        if first == all.len() {
            return None;
        }
        let owner = self.owners[first];
        let mut end = first + 1;
        if self.together && owner.is_some() {
            while end < all.len() && (no_quotas(end) || self.owners[end] == owner) {
                end += 1;
            }
        }
        self.run = (first, end);
        Some((Charges::new(&all[first..end]), owner))
    }

    /// The script's numbers for the run last handed out, merged in.
    pub(super) fn merge(&mut self, one: &[i64; REPLY_LEN]) {
        let (first, end) = self.run;
        // The run's groups are numbered from 1 in its reply; in the request, from
        // `first` + 1.
        let offset = i64::try_from(first).unwrap_or(0);
        self.merged[5] |= one[5] << first;
        self.merged[6] |= one[6] << (4 * first);
        self.next = end;
        if one[0] == 1 {
            self.merged[..5].copy_from_slice(&[1, offset + one[1], one[2], one[3], 0]);
            return;
        }
        // The tightest admitting quota; on a tie, the later group's, as the script and the
        // memory store.
        if one[1] != 0 && self.tightest.is_none_or(|remaining| one[3] <= remaining) {
            self.tightest = Some(one[3]);
            self.merged[..5].copy_from_slice(&[0, offset + one[1], one[2], one[3], one[4]]);
        }
    }

    /// The run last handed out is to be decided group by group, as is every later one: its
    /// master no longer served all of its keys.
    pub(super) fn one_by_one(&mut self) {
        self.together = false;
    }

    /// The replies so far, as the script answers for a whole request.
    pub(super) fn merged(&self) -> [i64; REPLY_LEN] {
        self.merged
    }
}

/// A request's walk, on its way through the masters' calls, and where it goes back to the
/// request: after a denial, after its last group, or where the thread's calls cannot take
/// it further (no master for the next run, a failure).
#[derive(Debug)]
pub(super) struct Walker {
    pub(super) walk: Walk,
    request: oneshot::Sender<Result<Walk, String>>,
    /// When the request stops waiting (and is answered as `on_error` says).
    deadline: tokio::time::Instant,
}

impl Walker {
    pub(super) fn new(
        walk: Walk,
        request: oneshot::Sender<Result<Walk, String>>,
        deadline: tokio::time::Instant,
    ) -> Self {
        Walker {
            walk,
            request,
            deadline,
        }
    }

    pub(super) fn deadline(&self) -> tokio::time::Instant {
        self.deadline
    }

    pub(super) fn is_closed(&self) -> bool {
        self.request.is_closed()
    }

    /// The walk back to its request, as far as it went.
    pub(super) fn back(self) {
        // The request may have given up already; that is fine.
        let _ = self.request.send(Ok(self.walk));
    }

    /// The run's numbers merged in and the walk back to its request, or the failure.
    pub(super) fn send(mut self, outcome: Result<[i64; REPLY_LEN], String>) {
        match outcome {
            Ok(one) => {
                self.walk.merge(&one);
                self.back();
            }
            Err(error) => {
                let _ = self.request.send(Err(error));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::limit::{LimitSettings, Quota};

    fn specs(with_quotas: [bool; 4]) -> RedisSpecs {
        let quota = Quota::new(5, Duration::from_secs(60), None, false).unwrap();
        let groups = with_quotas.map(|on| if on { vec![quota] } else { Vec::new() });
        RedisSpecs::new(&LimitSettings::of_groups(groups), "rg", true, 1)
    }

    fn all_four() -> Charges {
        Charges::new(&LimitGroup::ALL.map(|group| (group, group.index() as u64)))
    }

    /// A walk over all four groups, each placed on the master `owners` names.
    fn placed(owners: [Option<u16>; 4]) -> Walk {
        // Each group in a slot of its own, numbered as the group.
        let mut walk = Walk::new(all_four(), |group, _| group.index() as u16);
        walk.place(|slot| owners[usize::from(slot)]);
        walk
    }

    fn groups(charges: &Charges) -> Vec<LimitGroup> {
        charges.as_slice().iter().map(|(group, _)| *group).collect()
    }

    /// An admitting reply for a run of `groups` groups, the first quota of the last one
    /// leaving `remaining`.
    fn admitted(groups: i64, remaining: i64) -> [i64; REPLY_LEN] {
        [0, groups, 1, remaining, 60_000_000, 0, 0]
    }

    #[test]
    fn consecutive_groups_on_one_master_are_one_run() {
        let specs = specs([true; 4]);
        let mut walk = placed([Some(0), Some(0), Some(1), Some(0)]);
        let (run, owner) = walk.next_run(&specs).unwrap();
        assert_eq!(
            (groups(&run), owner),
            (vec![LimitGroup::PerIp, LimitGroup::PerClient], Some(0))
        );
        assert_eq!(groups(&walk.next_run(&specs).unwrap().0).len(), 2, "again");
        walk.merge(&admitted(2, 4));
        let (run, owner) = walk.next_run(&specs).unwrap();
        assert_eq!((groups(&run), owner), (vec![LimitGroup::PerEmail], Some(1)));
        walk.merge(&admitted(1, 2));
        let (run, owner) = walk.next_run(&specs).unwrap();
        assert_eq!((groups(&run), owner), (vec![LimitGroup::Global], Some(0)));
        walk.merge(&admitted(1, 3));
        assert!(walk.next_run(&specs).is_none());
        // The tightest quota is the email's (2 left), numbered in the whole request.
        assert_eq!(walk.merged(), [0, 3, 1, 2, 60_000_000, 0, 0]);
    }

    #[test]
    fn a_denial_ends_the_walk_and_names_the_group_in_the_request() {
        let specs = specs([true; 4]);
        let mut walk = placed([Some(0), Some(1), Some(2), Some(0)]);
        walk.next_run(&specs);
        walk.merge(&admitted(1, 9));
        walk.next_run(&specs);
        walk.merge(&[1, 1, 2, 30_000_000, 0, 0, 0]);
        assert!(walk.next_run(&specs).is_none());
        assert_eq!(walk.merged(), [1, 2, 2, 30_000_000, 0, 0, 0]);
    }

    #[test]
    fn groups_without_quotas_are_passed_over_and_do_not_split_a_run() {
        let specs = specs([true, false, true, false]);
        let mut walk = placed([Some(0), Some(2), Some(0), Some(1)]);
        let (run, _) = walk.next_run(&specs).unwrap();
        assert_eq!(
            groups(&run).len(),
            4,
            "ip, client (no quotas), email, global"
        );
        walk.merge(&admitted(3, 1));
        assert!(walk.next_run(&specs).is_none());
        assert_eq!(walk.merged()[1], 3, "the email group");
    }

    #[test]
    fn after_a_stale_map_runs_are_single_groups() {
        let specs = specs([true; 4]);
        let mut walk = placed([Some(0); 4]);
        assert_eq!(groups(&walk.next_run(&specs).unwrap().0).len(), 4);
        walk.one_by_one();
        for group in LimitGroup::ALL {
            let (run, _) = walk.next_run(&specs).unwrap();
            assert_eq!(groups(&run), [group]);
            walk.merge(&admitted(1, 1));
        }
        assert!(walk.next_run(&specs).is_none());
    }

    #[test]
    fn shadow_and_near_limit_marks_keep_their_group() {
        let specs = specs([true; 4]);
        let mut walk = placed([Some(0), Some(1), Some(1), Some(2)]);
        walk.next_run(&specs);
        walk.merge(&admitted(1, 5));
        walk.next_run(&specs);
        // The run's second group (the request's third) was in shadow and near its limit.
        walk.merge(&[0, 2, 1, 0, 1, 0b10, 0b1_0000]);
        let merged = walk.merged();
        assert_eq!(merged[5], 0b100, "shadow: the third group");
        assert_eq!(merged[6], 1 << 8, "near: the third group's first quota");
    }
}
