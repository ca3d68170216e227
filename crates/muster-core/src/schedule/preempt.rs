//! Preemption plans: the fewest lower-priority attempts whose end lets a run start.

use std::collections::{BTreeMap, BTreeSet};

use crate::compute::QuotaUsage;
use crate::schedule::pool::{Amount, Plan, Pool, Standing};

/// One node where a blocked run could go, and the victims that takes (`len` indexes of
/// `active` from `start` in the plan's shared victim buffer: one allocation per plan, not
/// one per node looked at).
struct Site {
    start: usize,
    len: usize,
    top: i32,
    slot: u32,
}

/// Buffers reused for every node a plan looks at.
#[derive(Default)]
struct Scratch {
    candidates: Vec<usize>,
    left: Vec<usize>,
    chosen: Vec<usize>,
}

/// What a blocked run asks for.
pub(super) struct Ask<'s> {
    pub want: Amount,
    pub count: usize,
    pub selector: &'s BTreeMap<String, String>,
    pub priority: i32,
    pub need: QuotaUsage,
}

/// How good a victim is for covering `deficit`: the share of each lacking dimension it
/// covers, summed (in millionths, so it orders without floats).
fn coverage(have: &Amount, deficit: &Amount) -> u64 {
    let part = |h: u64, d: u64| {
        if d == 0 {
            0
        } else {
            (h.min(d) as u128 * 1_000_000 / d as u128) as u64
        }
    };
    part(have.gpus, deficit.gpus)
        + part(have.cpu, deficit.cpu)
        + part(have.mem, deficit.mem)
        + part(have.runs, deficit.runs)
}

impl Pool<'_> {
    /// The cheapest set of victims on slot `s` whose end lets `want` fit there, among
    /// `candidates` (indexes into `active`), greedily by coverage of what is lacking, then
    /// lowest priority; unneeded ones are dropped again. `None` if even all of them do not
    /// make room.
    ///
    /// The victims are left in `scratch.chosen` (its `candidates` are the input).
    fn victims_on_slot(&self, s: u32, want: &Amount, scratch: &mut Scratch) -> bool {
        let active = self.active.as_ref().expect("built before planning");
        let Scratch {
            candidates,
            left,
            chosen,
        } = scratch;
        let mut all = Amount::default();
        for &v in candidates.iter() {
            all.add(&active[v].on_slot(s));
        }
        if !self.after_release(s, &all).fits(want) {
            return false;
        }
        let mut released = Amount::default();
        chosen.clear();
        left.clear();
        left.extend_from_slice(candidates);
        while !self.after_release(s, &released).fits(want) {
            let deficit = self.after_release(s, &released).deficit(want);
            let (pos, _) = left
                .iter()
                .enumerate()
                .max_by_key(|(_, v)| {
                    let a = &active[**v];
                    (
                        coverage(&a.on_slot(s), &deficit),
                        std::cmp::Reverse(a.priority()),
                        std::cmp::Reverse(**v),
                    )
                })
                .expect("all candidates together fit");
            let v = left.swap_remove(pos);
            released.add(&active[v].on_slot(s));
            chosen.push(v);
        }
        // Drop victims that turned out unneeded, most important first.
        chosen.sort_by_key(|v| std::cmp::Reverse(active[*v].priority()));
        let mut i = 0;
        while i < chosen.len() {
            let mut without = Amount::default();
            for (j, v) in chosen.iter().enumerate() {
                if j != i {
                    without.add(&active[*v].on_slot(s));
                }
            }
            if self.after_release(s, &without).fits(want) {
                chosen.remove(i);
            } else {
                i += 1;
            }
        }
        true
    }

    /// Plans room for `ask` by preempting attempts of lower priority than it (never equal
    /// or higher, never ones already stopping or taken by another plan of this pass):
    /// the fewest victims that make `count` distinct nodes fit (a gang victim counts once,
    /// with all it holds) and keep the quota. `None` if even all of them would not do.
    pub fn plan_preemption(&self, ask: &Ask<'_>) -> Option<Plan> {
        let active = self.active.as_ref().expect("built before planning");
        let mut scratch = Scratch::default();
        // The lowest priority any victim can have: a single run that finds a node needing
        // just one such victim cannot do better, and stops looking.
        let floor = self.candidate_priorities.keys().next().copied();
        let mut options: Vec<Site> = Vec::new();
        let mut flat: Vec<usize> = Vec::new();
        for s in 0..self.slots.len() as u32 {
            let slot = &self.slots[s as usize];
            if !slot.hfree.fits(&ask.want) || !self.matches(s, ask.selector) {
                continue;
            }
            let option = if slot.free.fits(&ask.want) {
                Site {
                    start: flat.len(),
                    len: 0,
                    top: i32::MIN,
                    slot: s,
                }
            } else {
                scratch.candidates.clear();
                scratch
                    .candidates
                    .extend(self.on_slot[s as usize].iter().copied().filter(|v| {
                        active[*v].standing == Standing::Candidate
                            && active[*v].priority() < ask.priority
                    }));
                if !self.victims_on_slot(s, &ask.want, &mut scratch) {
                    continue;
                }
                let top = scratch
                    .chosen
                    .iter()
                    .map(|i| active[*i].priority())
                    .max()
                    .unwrap_or(i32::MIN);
                let start = flat.len();
                flat.extend_from_slice(&scratch.chosen);
                Site {
                    start,
                    len: scratch.chosen.len(),
                    top,
                    slot: s,
                }
            };
            let best_possible = option.len == 0 || (option.len == 1 && Some(option.top) == floor);
            options.push(option);
            if ask.count == 1 && best_possible {
                break;
            }
        }
        if options.len() < ask.count {
            return None;
        }
        let victims_of = |o: &Site| &flat[o.start..o.start + o.len];
        // Choose `count` nodes, fewest new victims first; among equals, the node whose
        // victims also stand on other candidate nodes (a gang victim frees several at
        // once), then the lowest-priority victims, then node order.
        // Only a victim on several nodes (a gang) can stand on several options; counting
        // just those keeps this linear in the options.
        let mut shared: BTreeMap<usize, usize> = BTreeMap::new();
        for o in &options {
            for v in victims_of(o) {
                if active[*v].on.len() > 1 {
                    *shared.entry(*v).or_default() += 1;
                }
            }
        }
        let spread_of = |v: &usize| shared.get(v).map_or(0, |n| n - 1);
        let mut victims: Vec<usize> = Vec::new();
        let mut seen = BTreeSet::new();
        let mut slots: Vec<u32> = Vec::with_capacity(ask.count);
        let mut left: Vec<usize> = (0..options.len()).collect();
        for _ in 0..ask.count {
            let (pos, _) = left
                .iter()
                .enumerate()
                .min_by_key(|(_, o)| {
                    let o = &options[**o];
                    let new = victims_of(o).iter().filter(|v| !seen.contains(*v)).count();
                    let spread: usize = victims_of(o).iter().map(spread_of).sum();
                    (new, std::cmp::Reverse(spread), o.top, o.slot)
                })
                .expect("at least count options");
            let o = &options[left.swap_remove(pos)];
            slots.push(o.slot);
            for v in victims_of(o) {
                if seen.insert(*v) {
                    victims.push(*v);
                }
            }
        }
        // The quota: more victims (anywhere in the pool) until it admits the run.
        let freed = |victims: &[usize]| {
            let mut u = QuotaUsage::default();
            for v in victims {
                u.add(&active[*v].of.usage);
            }
            u
        };
        if self
            .quota
            .admits(&self.used_now.minus(&freed(&victims)), &ask.need)
            .is_err()
        {
            let mut extra: Vec<usize> = (0..active.len())
                .filter(|i| {
                    let a = &active[*i];
                    a.standing == Standing::Candidate
                        && a.priority() < ask.priority
                        && !seen.contains(i)
                })
                .collect();
            // Largest first (fewest victims), then lowest priority.
            extra.sort_by_key(|i| {
                let u = &active[*i].of.usage;
                (
                    std::cmp::Reverse((u.gpus, u.cpu_millis)),
                    active[*i].priority(),
                    *i,
                )
            });
            let mut extra = extra.into_iter();
            while self
                .quota
                .admits(&self.used_now.minus(&freed(&victims)), &ask.need)
                .is_err()
            {
                victims.push(extra.next()?);
            }
        }
        // Drop victims that turned out unneeded (a gang freeing several chosen nodes,
        // quota victims that also freed a node), most important first.
        let fits_without = |victims: &[usize]| {
            slots.iter().all(|&s| {
                let mut released = Amount::default();
                for v in victims {
                    released.add(&active[*v].on_slot(s));
                }
                self.after_release(s, &released).fits(&ask.want)
            }) && self
                .quota
                .admits(&self.used_now.minus(&freed(victims)), &ask.need)
                .is_ok()
        };
        let mut order: Vec<usize> = victims.clone();
        order.sort_by_key(|v| (std::cmp::Reverse(active[*v].priority()), *v));
        for v in order {
            let without: Vec<usize> = victims.iter().copied().filter(|x| *x != v).collect();
            if fits_without(&without) {
                victims = without;
            }
        }
        Some(self.plan_on(slots, victims))
    }

    /// Plans room for `ask` with the victims it already has (preempted in an earlier pass
    /// and still stopping), choosing no new ones. `None` if they no longer make room.
    pub fn plan_with_pending(&self, ask: &Ask<'_>, pending: &[usize]) -> Option<Plan> {
        let active = self.active.as_ref().expect("built before planning");
        let mut options: Vec<(bool, u32)> = Vec::new();
        for s in 0..self.slots.len() as u32 {
            let slot = &self.slots[s as usize];
            if !slot.hfree.fits(&ask.want) || !self.matches(s, ask.selector) {
                continue;
            }
            let fits_now = slot.free.fits(&ask.want);
            let mut released = Amount::default();
            for v in pending {
                released.add(&active[*v].on_slot(s));
            }
            if self.after_release(s, &released).fits(&ask.want) {
                // Prefer the victims' nodes, which free up for this run alone.
                options.push((fits_now, s));
            }
        }
        if options.len() < ask.count {
            return None;
        }
        options.sort();
        let slots: Vec<u32> = options[..ask.count].iter().map(|(_, s)| *s).collect();
        let mut freed = QuotaUsage::default();
        for v in pending {
            freed.add(&active[*v].of.usage);
        }
        self.quota
            .admits(&self.used_now.minus(&freed), &ask.need)
            .ok()?;
        Some(self.plan_on(slots, pending.to_vec()))
    }

    fn plan_on(&self, slots: Vec<u32>, victims: Vec<usize>) -> Plan {
        let active = self.active.as_ref().expect("built before planning");
        let slots = slots
            .into_iter()
            .map(|s| {
                let mut released = Amount::default();
                for v in &victims {
                    released.add(&active[*v].on_slot(s));
                }
                released.sub(&self.slots[s as usize].debt);
                (s, released)
            })
            .collect();
        Plan { victims, slots }
    }

    /// Claims what a plan's run will take, now and in the H-view, and marks its victims.
    pub fn claim_plan(&mut self, ask: &Ask<'_>, plan: &Plan) {
        for (s, released) in &plan.slots {
            self.claim(*s, &ask.want, released);
        }
        let active = self.active.as_ref().expect("built before planning");
        let mut freed = QuotaUsage::default();
        for v in &plan.victims {
            freed.add(&active[*v].of.usage);
        }
        self.used_now.add(&ask.need.minus(&freed));
        self.used_h.add(&ask.need);
        let victims = plan.victims.clone();
        self.take_victims(&victims);
    }
}
