//! One compute target's nodes as one scheduling pass sees them: what is free now, what is
//! free once the attempts running now end, and an index to find fitting nodes without
//! scanning them all.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::compute::{Quota, QuotaUsage};
use crate::resources::Resources;
use crate::schedule::{Job, Placement, Waiting, Why};
use crate::state::{ActiveAttempt, ActiveSummary, Node, NodeState, State};

/// Resources in one comparable shape. A node that offers 0 CPU or 0 memory does not limit
/// that resource: its capacity is `u64::MAX`. `runs` counts attempts: each instance takes
/// one of a node's `max_runs` (unlimited when 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Amount {
    pub gpus: u64,
    pub cpu: u64,
    pub mem: u64,
    pub runs: u64,
}

impl Amount {
    /// What one instance of a run asks for.
    pub fn of(r: &Resources) -> Amount {
        Amount {
            gpus: r.gpus as u64,
            cpu: r.cpu_millis,
            mem: r.memory_bytes,
            runs: 1,
        }
    }

    /// Whether `want` fits in `self`.
    pub fn fits(&self, want: &Amount) -> bool {
        self.gpus >= want.gpus
            && self.cpu >= want.cpu
            && self.mem >= want.mem
            && self.runs >= want.runs
    }

    /// `self >= other` in every dimension.
    pub fn covers(&self, other: &Amount) -> bool {
        self.fits(other)
    }

    pub fn sub(&mut self, o: &Amount) {
        self.gpus = self.gpus.saturating_sub(o.gpus);
        self.cpu = self.cpu.saturating_sub(o.cpu);
        self.mem = self.mem.saturating_sub(o.mem);
        self.runs = self.runs.saturating_sub(o.runs);
    }

    pub fn add(&mut self, o: &Amount) {
        self.gpus = self.gpus.saturating_add(o.gpus);
        self.cpu = self.cpu.saturating_add(o.cpu);
        self.mem = self.mem.saturating_add(o.mem);
        self.runs = self.runs.saturating_add(o.runs);
    }

    /// What `self` lacks to hold `want`.
    pub fn deficit(&self, want: &Amount) -> Amount {
        Amount {
            gpus: want.gpus.saturating_sub(self.gpus),
            cpu: want.cpu.saturating_sub(self.cpu),
            mem: want.mem.saturating_sub(self.mem),
            runs: want.runs.saturating_sub(self.runs),
        }
    }
}

/// One ready node of the pool.
pub(super) struct Slot<'a> {
    pub node: &'a Node,
    /// What the node offers.
    pub cap: Amount,
    /// Free now: capacity minus active attempts, this pass's placements and the parts
    /// claimed by preemptors of this pass (which take it once their victims end).
    pub free: Amount,
    /// Free once every attempt active now has ended ("the H-view"): capacity minus this
    /// pass's placements and reservations (the head's and the preemptors'). Backfill keeps
    /// it covering what it reserves; see the module docs of `schedule`.
    pub hfree: Amount,
    /// What active attempts hold beyond the capacity (a node that re-registered smaller):
    /// that much of what they release is not free afterwards.
    pub debt: Amount,
    /// The free GPUs by UUID, computed on the first placement here.
    gpus: Option<Vec<&'a str>>,
}

/// Why an active attempt can or cannot be chosen as a victim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    /// May be preempted for a run of higher priority.
    Candidate,
    /// Already stopping (canceled or preempted in an earlier pass).
    Stopping,
    /// Chosen as a victim in this pass.
    Taken,
}

/// An active attempt of a run of this pool.
pub(super) struct Active<'a> {
    /// The attempt, as the state summarizes it.
    pub of: &'a ActiveAttempt,
    /// What it holds on each ready slot of the pool.
    pub on: Vec<(u32, Amount)>,
    pub standing: Standing,
}

impl Active<'_> {
    pub fn priority(&self) -> i32 {
        self.of.priority
    }

    /// What it holds on slot `s`.
    pub fn on_slot(&self, s: u32) -> Amount {
        self.on
            .iter()
            .find(|(i, _)| *i == s)
            .map(|(_, a)| *a)
            .unwrap_or_default()
    }
}

/// A plan to make room for a run: which attempts stop, and where it goes after.
pub(super) struct Plan {
    /// Indexes into `Pool::active`.
    pub victims: Vec<usize>,
    /// The slots the run will use, with what its victims release on each.
    pub slots: Vec<(u32, Amount)>,
}

/// The result of looking for nodes where a run fits now.
pub(super) struct Found {
    /// Slots where it fits now without touching any reservation (best fit first).
    pub chosen: Vec<u32>,
    /// Slots where it fits now but would break a reservation.
    pub reserved: usize,
}

/// The pools of one pass.
pub(super) struct Pools<'a> {
    pub list: Vec<Pool<'a>>,
    /// Compute target name -> index in `list`.
    pub by_name: BTreeMap<&'a str, usize>,
}

/// One compute target in one pass.
pub(super) struct Pool<'a> {
    /// Every node of the target, whatever its state (for reasons and quota).
    pub nodes: Vec<&'a Node>,
    /// The ready nodes, in id order.
    pub slots: Vec<Slot<'a>>,
    /// `(free GPUs, free CPU, slot)` of every slot: the fitting slots of a request are a few
    /// ranges of this set, smallest fit first.
    index: BTreeSet<(u64, u64, u32)>,
    /// Ready slots whose capacity fits an instance shape (memo of `capable`).
    capable: BTreeMap<Amount, usize>,
    pub quota: Quota,
    /// The state's summary of the target's active runs.
    pub summary: Option<&'a ActiveSummary>,
    /// Quota usage now (active attempts, this pass's placements, preemptors' claims).
    pub used_now: QuotaUsage,
    /// Quota usage in the H-view (this pass's placements and reservations only).
    pub used_h: QuotaUsage,
    /// Active attempts of the pool's runs, built on the first blocked run.
    pub active: Option<Vec<Active<'a>>>,
    /// The active attempts on each slot (indexes into `active`).
    pub on_slot: Vec<Vec<usize>>,
    /// Preemptor run id -> its victims still stopping (indexes into `active`).
    pub pending: BTreeMap<&'a str, Vec<usize>>,
    /// Priorities of the `Candidate` attempts, with their counts.
    pub candidate_priorities: BTreeMap<i32, u32>,
    /// The run whose place the backfill rule protects in this pool.
    pub head: Option<Job<'a>>,
    /// Wait reasons already worded in this pass (indexes into `Waiting`'s texts).
    pub reasons: BTreeMap<Why, u32>,
    /// Shapes `(instance, count, priority)` for which no preemption plan was found: a run
    /// at least as large and at most as urgent cannot find one either in this pass.
    pub no_plan: Vec<(Amount, usize, i32)>,
    /// Shapes `(instance, count)` that could not reserve in the H-view.
    pub no_reserve: Vec<(Amount, usize)>,
}

fn limit(v: u64) -> u64 {
    if v == 0 { u64::MAX } else { v }
}

impl<'a> Pool<'a> {
    /// The pools of every compute target that has nodes, from the state.
    pub fn build_all(state: &'a State) -> Pools<'a> {
        let mut pools = Pools {
            list: Vec::new(),
            by_name: BTreeMap::new(),
        };
        for node in state.nodes.values() {
            let i = *pools
                .by_name
                .entry(node.compute.as_str())
                .or_insert_with(|| {
                    let quota = state
                        .computes
                        .get(&node.compute)
                        .map(|c| c.spec.quota)
                        .unwrap_or_default();
                    pools.list.push(Pool {
                        nodes: Vec::new(),
                        slots: Vec::new(),
                        index: BTreeSet::new(),
                        capable: BTreeMap::new(),
                        quota,
                        summary: state.active_summary(&node.compute),
                        used_now: state.quota_usage(&node.compute),
                        used_h: QuotaUsage::default(),
                        active: None,
                        on_slot: Vec::new(),
                        pending: BTreeMap::new(),
                        candidate_priorities: BTreeMap::new(),
                        head: None,
                        reasons: BTreeMap::new(),
                        no_plan: Vec::new(),
                        no_reserve: Vec::new(),
                    });
                    pools.list.len() - 1
                });
            let pool = &mut pools.list[i];
            pool.nodes.push(node);
            if node.state != NodeState::Ready {
                continue;
            }
            let cap = Amount {
                gpus: node.capacity.gpus.len() as u64,
                cpu: limit(node.capacity.cpu_millis),
                mem: limit(node.capacity.memory_bytes),
                runs: limit(node.capacity.max_runs.into()),
            };
            let allocated = Amount {
                gpus: node.allocated_gpus.len() as u64,
                cpu: node.allocated.cpu_millis,
                mem: node.allocated.memory_bytes,
                runs: node.attempts.len() as u64,
            };
            let mut free = cap;
            free.sub(&allocated);
            let debt = cap.deficit(&allocated);
            let i = pool.slots.len() as u32;
            pool.index.insert((free.gpus, free.cpu, i));
            pool.slots.push(Slot {
                node,
                cap,
                free,
                hfree: cap,
                debt,
                gpus: None,
            });
        }
        pools
    }

    /// Records why a run waits: worded once per pass for every run of the same shape
    /// (runs with a node selector are worded each).
    pub fn say(
        &mut self,
        waiting: &mut Waiting,
        why: Why,
        selector: &BTreeMap<String, String>,
        text: impl FnOnce() -> String,
    ) -> u32 {
        if !selector.is_empty() {
            return waiting.say(text());
        }
        if let Some(t) = self.reasons.get(&why) {
            return *t;
        }
        let t = waiting.say(text());
        self.reasons.insert(why, t);
        t
    }

    /// Whether the reason `why` was worded in this pass already (`say` reuses it).
    pub fn said(&self, why: &Why, selector: &BTreeMap<String, String>) -> bool {
        selector.is_empty() && self.reasons.contains_key(why)
    }

    /// How many ready nodes have the room `want` asks for but already hold as many
    /// attempts as they may at once (their `max_runs`).
    pub fn at_run_cap(&self, want: &Amount, selector: &BTreeMap<String, String>) -> usize {
        (0..self.slots.len() as u32)
            .filter(|&s| {
                let mut free = self.slots[s as usize].free;
                let capped = free.runs < want.runs;
                free.runs = want.runs;
                capped && free.fits(want) && self.matches(s, selector)
            })
            .count()
    }

    /// What is free on slot `s` once attempts holding `released` there have ended.
    pub fn after_release(&self, s: u32, released: &Amount) -> Amount {
        let slot = &self.slots[s as usize];
        let mut released = *released;
        released.sub(&slot.debt);
        let mut free = slot.free;
        free.add(&released);
        free
    }

    /// Whether slot `s` carries every label of `selector`.
    pub fn matches(&self, s: u32, selector: &BTreeMap<String, String>) -> bool {
        let labels = &self.slots[s as usize].node.labels;
        selector.iter().all(|(k, v)| labels.get(k) == Some(v))
    }

    /// How many ready nodes could hold one instance of `want` if they were empty.
    pub fn capable(&mut self, want: &Amount, selector: &BTreeMap<String, String>) -> usize {
        if selector.is_empty()
            && let Some(n) = self.capable.get(want)
        {
            return *n;
        }
        let n = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].cap.fits(want) && self.matches(s, selector))
            .count();
        if selector.is_empty() {
            self.capable.insert(*want, n);
        }
        n
    }

    /// Up to `count` distinct slots where `want` fits now and in the H-view, smallest fit
    /// first (fewest free GPUs, then least free CPU), which keeps whole nodes free for
    /// large runs. Visits only the index ranges that can fit, so a full pool answers in a
    /// few lookups.
    pub fn find(&self, want: &Amount, count: usize, selector: &BTreeMap<String, String>) -> Found {
        let mut found = Found {
            chosen: Vec::with_capacity(count),
            reserved: 0,
        };
        let mut start = (want.gpus, want.cpu, 0u32);
        'seek: loop {
            for &(g, c, s) in self.index.range(start..) {
                if c < want.cpu {
                    // A new GPU level begins below the CPU asked for: skip to where it fits.
                    start = (g, want.cpu, 0);
                    continue 'seek;
                }
                let slot = &self.slots[s as usize];
                if slot.free.mem < want.mem
                    || slot.free.runs < want.runs
                    || !self.matches(s, selector)
                {
                    continue;
                }
                if !slot.hfree.fits(want) {
                    found.reserved += 1;
                    continue;
                }
                found.chosen.push(s);
                if found.chosen.len() == count {
                    break 'seek;
                }
            }
            break;
        }
        found
    }

    fn reindex(&mut self, s: u32, change: impl FnOnce(&mut Slot<'a>)) {
        let slot = &mut self.slots[s as usize];
        self.index.remove(&(slot.free.gpus, slot.free.cpu, s));
        change(slot);
        self.index.insert((slot.free.gpus, slot.free.cpu, s));
    }

    /// Places one instance of `spec_resources` on slot `s` (now and in the H-view) and
    /// assigns it GPUs by UUID.
    pub fn take(&mut self, s: u32, resources: &Resources) -> Placement {
        let want = Amount::of(resources);
        self.reindex(s, |slot| {
            slot.free.sub(&want);
            slot.hfree.sub(&want);
        });
        let slot = &mut self.slots[s as usize];
        let node = slot.node;
        let gpus = slot.gpus.get_or_insert_with(|| {
            node.capacity
                .gpus
                .iter()
                .map(|g| g.uuid.as_str())
                .filter(|g| !node.allocated_gpus.contains(*g))
                .collect()
        });
        let taken: Vec<String> = gpus
            .drain(..want.gpus as usize)
            .map(str::to_string)
            .collect();
        Placement {
            node_id: node.id.clone(),
            gpus: taken,
            resources: *resources,
        }
    }

    /// Claims for a preemptor what it takes on slot `s` once what its victims hold there
    /// (`released`) is free: the rest of `want` now, all of `want` in the H-view.
    pub fn claim(&mut self, s: u32, want: &Amount, released: &Amount) {
        let from_free = Amount {
            gpus: want.gpus.saturating_sub(released.gpus),
            cpu: want.cpu.saturating_sub(released.cpu),
            mem: want.mem.saturating_sub(released.mem),
            runs: want.runs.saturating_sub(released.runs),
        };
        self.reindex(s, |slot| {
            slot.free.sub(&from_free);
            slot.hfree.sub(want);
        });
    }

    /// Reserves `count` slots for the head in the H-view: those closest to fitting now
    /// first, so it starts as soon as possible. False (and nothing changed) if the H-view
    /// cannot hold it.
    pub fn reserve(
        &mut self,
        want: &Amount,
        count: usize,
        selector: &BTreeMap<String, String>,
    ) -> bool {
        if self
            .no_reserve
            .iter()
            .any(|(w, n)| selector.is_empty() && want.covers(w) && count >= *n)
        {
            return false;
        }
        let mut fitting: Vec<u32> = (0..self.slots.len() as u32)
            .filter(|&s| self.slots[s as usize].hfree.fits(want) && self.matches(s, selector))
            .collect();
        if fitting.len() < count {
            if selector.is_empty() {
                self.no_reserve.push((*want, count));
            }
            return false;
        }
        fitting.sort_by_key(|&s| {
            let f = &self.slots[s as usize].free;
            (
                !f.fits(want),
                std::cmp::Reverse(f.gpus),
                std::cmp::Reverse(f.cpu),
                s,
            )
        });
        for &s in &fitting[..count] {
            self.slots[s as usize].hfree.sub(want);
        }
        true
    }

    /// Builds, once per pass and only for a pool where some run may preempt, the list of
    /// its active attempts: victim candidates, and victims still stopping for their
    /// preemptors. A run belongs to the pool of its compute target, wherever its nodes are
    /// now. Read from the state's summary of the target's active attempts: no run is
    /// looked up.
    pub fn build_active(&mut self) {
        if self.active.is_some() {
            return;
        }
        self.active = Some(Vec::new());
        self.on_slot = vec![Vec::new(); self.slots.len()];
        let Some(summary) = self.summary else {
            return;
        };
        let slot_of: HashMap<&str, u32> = self
            .slots
            .iter()
            .enumerate()
            .map(|(s, slot)| (slot.node.id.as_str(), s as u32))
            .collect();
        for a in summary.attempts.values() {
            self.add_active(a, &slot_of);
        }
    }

    /// Adds an active attempt; `slot_of` gives the slot of a ready node of this pool.
    fn add_active(&mut self, a: &'a ActiveAttempt, slot_of: &HashMap<&str, u32>) {
        let on: Vec<(u32, Amount)> = a
            .placements
            .iter()
            .filter_map(|(node_id, gpus, resources)| {
                slot_of.get(node_id.as_str()).map(|s| {
                    (
                        *s,
                        Amount {
                            gpus: *gpus,
                            cpu: resources.cpu_millis,
                            mem: resources.memory_bytes,
                            runs: 1,
                        },
                    )
                })
            })
            .collect();
        let standing = if a.stopping {
            Standing::Stopping
        } else {
            *self.candidate_priorities.entry(a.priority).or_default() += 1;
            Standing::Candidate
        };
        let active = self.active.as_mut().expect("set by build_active");
        for (s, _) in &on {
            self.on_slot[*s as usize].push(active.len());
        }
        if let Some(for_run) = &a.preempted_for {
            self.pending
                .entry(for_run.as_str())
                .or_default()
                .push(active.len());
        }
        active.push(Active {
            of: a,
            on,
            standing,
        });
    }

    /// Whether some attempt of lower priority than `priority` may still be preempted.
    pub fn has_candidates_below(&self, priority: i32) -> bool {
        self.candidate_priorities
            .keys()
            .next()
            .is_some_and(|p| *p < priority)
    }

    /// Marks victims as taken by a plan of this pass.
    pub fn take_victims(&mut self, victims: &[usize]) {
        let active = self.active.as_mut().expect("built before planning");
        for &v in victims {
            let a = &mut active[v];
            if a.standing == Standing::Candidate {
                let p = a.of.priority;
                if let Some(c) = self.candidate_priorities.get_mut(&p) {
                    *c -= 1;
                    if *c == 0 {
                        self.candidate_priorities.remove(&p);
                    }
                }
            }
            a.standing = Standing::Taken;
        }
    }
}
