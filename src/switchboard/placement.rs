//! Which pod a reservation goes to: the least loaded valid pod.
//!
//! Loads come from the pod read model, which trails the log; 200 reservations at once would all
//! see the same loads and pile onto one pod. So each choice also places a *hold* on its pod,
//! counted as load until the read model has applied the lease (its position passes the lease's
//! sequence) or the reservation gives up. Choosing and holding happen under one lock, so
//! concurrent reservations in this process see each other.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use crate::domain::switchboard::PodName;

#[derive(Default)]
pub struct Placement {
    holds: Mutex<Holds>,
}

#[derive(Default)]
struct Holds {
    next_id: u64,
    /// By hold id: the pod, and the stream sequence of its lease once taken (`u64::MAX` while
    /// the lease is in flight).
    held: HashMap<u64, (PodName, u64)>,
}

/// A pod chosen for one reservation, and the others to try after it.
pub struct Choice {
    pub candidates: Vec<PodName>,
    pub hold: Hold,
}

/// Counts one reservation against a pod. Dropped unsettled, it stops counting.
pub struct Hold {
    placement: Arc<Placement>,
    id: u64,
    settled: bool,
}

impl Placement {
    /// Orders `loads` (valid pods and their meeting points, as of read-model `position`) least
    /// loaded first, counting holds not yet in the read model, and holds the first.
    pub fn choose(self: &Arc<Self>, loads: Vec<(PodName, usize)>, position: u64) -> Option<Choice> {
        let mut holds = self.lock();
        holds.held.retain(|_, (_, seq)| *seq > position);
        let mut pending: HashMap<&PodName, usize> = HashMap::new();
        for (pod, _) in holds.held.values() {
            *pending.entry(pod).or_default() += 1;
        }
        let mut ranked: Vec<(usize, PodName)> = loads
            .into_iter()
            .map(|(pod, load)| (load + pending.get(&pod).copied().unwrap_or(0), pod))
            .collect();
        ranked.sort_unstable();
        let candidates: Vec<PodName> = ranked.into_iter().map(|(_, pod)| pod).collect();
        let first = candidates.first()?.clone();
        let id = holds.next_id;
        holds.next_id += 1;
        holds.held.insert(id, (first, u64::MAX));
        drop(holds);
        Some(Choice {
            candidates,
            hold: Hold {
                placement: self.clone(),
                id,
                settled: false,
            },
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Holds> {
        // A panic while holding this lock leaves plain counters behind; they are still usable.
        self.holds.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[cfg(test)]
    fn held(&self) -> usize {
        self.lock().held.len()
    }
}

impl Hold {
    /// The reservation moved on to `pod` (the previous choice refused it).
    pub fn move_to(&mut self, pod: &PodName) {
        if let Some(held) = self.placement.lock().held.get_mut(&self.id) {
            held.0 = pod.clone();
        }
    }

    /// The lease was taken at stream sequence `seq`: keep counting until the read model has it.
    pub fn settle(mut self, seq: u64) {
        if let Some(held) = self.placement.lock().held.get_mut(&self.id) {
            held.1 = seq;
        }
        self.settled = true;
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.settled {
            self.placement.lock().held.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(name: &str) -> PodName {
        PodName::new(name).unwrap()
    }

    fn loads() -> Vec<(PodName, usize)> {
        vec![(pod("a"), 2), (pod("b"), 0), (pod("c"), 1)]
    }

    #[test]
    fn least_loaded_first_and_holds_count_until_the_read_model_catches_up() {
        let placement = Arc::new(Placement::default());
        let first = placement.choose(loads(), 10).unwrap();
        assert_eq!(first.candidates, [pod("b"), pod("c"), pod("a")]);
        first.hold.settle(11);
        // b now counts 1: ties with c, broken by name.
        let second = placement.choose(loads(), 10).unwrap();
        assert_eq!(second.candidates[0], pod("b"));
        second.hold.settle(12);
        let third = placement.choose(loads(), 10).unwrap();
        assert_eq!(third.candidates[0], pod("c"));
        drop(third);
        // The read model reached 12: the loads given now include both leases on b.
        let caught_up = vec![(pod("a"), 2), (pod("b"), 2), (pod("c"), 1)];
        let fourth = placement.choose(caught_up, 12).unwrap();
        assert_eq!(fourth.candidates[0], pod("c"));
        assert_eq!(placement.held(), 1);
    }

    #[test]
    fn an_abandoned_hold_stops_counting_and_a_moved_one_follows() {
        let placement = Arc::new(Placement::default());
        let mut choice = placement.choose(loads(), 0).unwrap();
        choice.hold.move_to(&pod("a"));
        let next = placement.choose(loads(), 0).unwrap();
        assert_eq!(next.candidates, [pod("b"), pod("c"), pod("a")]);
        drop(next);
        drop(choice);
        assert_eq!(placement.held(), 0);
        assert!(placement.choose(vec![], 0).is_none());
    }
}
