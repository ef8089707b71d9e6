//! Where replicas fit when capacity is counted in CPU and memory (`[capacity] resources =
//! true`): a pure simulation of placement, host by host, that the engine runs instead of
//! counting slots. Nothing here reads a clock or does I/O.
//!
//! From where the replicas are now:
//! 1. every service above its want gives the surplus back (from hosts that are not ready
//!    first, then from the host where it has the most);
//! 2. mins first, in allocation order, as the slot engine reserves them: a service below its
//!    `min` places up to it, first fit, or else takes room from the others (any priority, the
//!    lowest first; above their own mins if those came first) on the host where that touches
//!    the lowest priorities;
//! 3. in allocation order (priority, then name; remainder services last), every service
//!    below its want places replicas one at a time: on the first host with room for one in
//!    every dimension, or else on the first host where replicas of lower priorities (the
//!    lowest first, none below its floor) can make that room; a per-host service places one
//!    on each ready host that lacks it; remainder services come last and fill what is left the
//!    same way, the first taking from the later ones. A service that gave room to a replica
//!    already waiting for it (pending on no host) does not grow again in the same tick (a
//!    move between hosts, which a count cannot say: nothing would change).
//!
//! So the plan never asks for a replica no host can take (free resources that add up to
//! enough but fit on no single host are not room), and a higher priority that needs room
//! frees it where it then fits, lowest priority first.

use crate::model::Resources;

/// How a service grows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Growth {
    /// Up to its want, taking room from lower priorities if it must.
    Priority,
    /// One replica on every ready host.
    PerHost,
    /// Into what is left, never taking from anyone.
    Remainder,
}

/// One service, in allocation order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ask {
    /// What one replica asks for.
    pub need: Resources,
    /// How many replicas it wants this tick.
    pub want: u32,
    /// How low a higher priority's growth may push it.
    pub floor: u32,
    /// What it is given before anyone's growth, even from higher priorities (its `min`, at
    /// most its want): every service's min is reserved first, as the slot engine does.
    pub min: u32,
    /// How it grows.
    pub growth: Growth,
    /// Replicas it has that wait for room, on no host (unschedulable): the first replicas it
    /// places are these.
    pub waiting: u32,
}

/// A host of the simulation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Room {
    /// What it can give to the services (its allocatable less the reserve); zero when unknown.
    pub allocatable: Resources,
    /// Whether new replicas may go there.
    pub ready: bool,
}

/// What a service ends with.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Placed {
    /// Replicas placed in all.
    pub target: u32,
    /// Where: `(host, count)`, by host, counts above zero (filled by [`place`]; the engine
    /// reads only the counts).
    pub per_host: Vec<(usize, u32)>,
    /// Short of its want because no host could take one more, even with room taken from lower
    /// priorities.
    pub blocked: bool,
    /// Replicas it took from lower priorities to make room: (their position, host, count).
    pub took: Vec<(usize, usize, u32)>,
    /// It gave room to a replica that was waiting for it, and so did not grow elsewhere this
    /// tick (it grows again at the next).
    pub held: bool,
}

impl Placed {
    /// Replicas on host `h`.
    pub fn on(&self, h: usize) -> u32 {
        self.per_host
            .binary_search_by_key(&h, |&(x, _)| x)
            .map_or(0, |i| self.per_host[i].1)
    }
}

/// The simulation's result: what each service ends with (without `per_host`), and where the
/// replicas are.
pub(crate) struct Placement {
    /// Per service, in the order of the asks.
    pub(crate) services: Vec<Placed>,
    /// Per host: `(service, count)`, counts above zero, in no particular order.
    by_host: Vec<Vec<(u32, u32)>>,
    /// Where replicas leave: `(service, host, count)`, by service then host, for the services
    /// that end with fewer replicas than they started with, on every host where they have
    /// fewer (surplus given back, room given to a higher priority, a per-host service off a
    /// host it may not run on).
    pub(crate) removed: Vec<(usize, usize, u32)>,
}

/// The count of service `a` in a host's list.
fn count(v: &[(u32, u32)], a: usize) -> u32 {
    v.iter()
        .find(|&&(x, _)| x as usize == a)
        .map_or(0, |&(_, c)| c)
}

/// The simulation's state: who is where (sparse: a cluster of 1,000 hosts and 10,000
/// services has a few replicas of a few services on each host).
struct State {
    /// Per host: `(service, count)`.
    by_host: Vec<Vec<(u32, u32)>>,
    total: Vec<u32>,
    used: Vec<Resources>,
    /// A max tree over the hosts of the highest service position each holds, plus one (1: a
    /// ready host that holds none; 0: a host that is not ready): the first host that may hold
    /// replicas of a lower priority than a given service, in O(log hosts). A value may be too high (a removal does not
    /// lower it until the host is looked at again), never too low.
    tree: Vec<u32>,
    /// The first leaf of `tree`.
    leaves: usize,
}

impl State {
    fn add(&mut self, asks: &[Ask], a: usize, h: usize, n: i64) {
        let v = &mut self.by_host[h];
        match v.iter().position(|&(x, _)| x as usize == a) {
            Some(i) => {
                let c = (i64::from(v[i].1) + n).max(0) as u32;
                if c == 0 {
                    v.swap_remove(i);
                } else {
                    v[i].1 = c;
                }
            }
            None if n > 0 => v.push((a as u32, n as u32)),
            None => {}
        }
        let need = asks[a].need.times(n.unsigned_abs() as u32);
        if n > 0 {
            self.total[a] += n as u32;
            self.used[h] = self.used[h].plus(need);
            let leaf = self.leaves + h;
            if self.tree[leaf] != 0 && self.tree[leaf] < a as u32 + 1 {
                self.set(h, a as u32 + 1);
            }
        } else {
            self.total[a] -= n.unsigned_abs() as u32;
            self.used[h] = self.used[h].saturating_sub(need);
        }
    }

    /// Sets host `h`'s value in the tree.
    fn set(&mut self, h: usize, value: u32) {
        let mut i = self.leaves + h;
        self.tree[i] = value;
        while i > 1 {
            i /= 2;
            self.tree[i] = self.tree[2 * i].max(self.tree[2 * i + 1]);
        }
    }

    /// The first host at or after `from` whose value is above `a + 1` (it may hold replicas
    /// of a service after `a`).
    fn next_lower(&self, from: usize, a: usize) -> Option<usize> {
        let above = a as u32 + 1;
        let n = self.leaves;
        if from >= n {
            return None;
        }
        // Walk up from the leaf, looking right for a subtree with a value above.
        let mut i = n + from;
        if self.tree[i] > above {
            return Some(from);
        }
        loop {
            // Move to the next subtree to the right at the lowest level possible.
            while i % 2 == 1 {
                i /= 2;
                if i <= 1 {
                    return None;
                }
            }
            i += 1;
            if self.tree[i] > above {
                break;
            }
        }
        // Down to the first leaf above.
        while i < n {
            i = if self.tree[2 * i] > above {
                2 * i
            } else {
                2 * i + 1
            };
        }
        Some(i - n)
    }
}

/// Whether room for `need` is made on a host with `room` free from the replicas `on` it
/// (`(service, count)`, sorted here lowest priority first), each service giving at most what
/// `spare` says: what is taken goes to `taken` as `(service, count)`.
fn make_room(
    need: Resources,
    mut room: Resources,
    on: &mut [(u32, u32)],
    asks: &[Ask],
    taken: &mut Vec<(usize, u32)>,
    spare: impl Fn(usize) -> u32,
) -> bool {
    on.sort_unstable_by_key(|&(b, _)| std::cmp::Reverse(b));
    for &(b, c) in on.iter() {
        if need.fits(&room) {
            break;
        }
        let b = b as usize;
        let spare = spare(b).min(c);
        let mut n = 0;
        while n < spare && !need.fits(&room) {
            room = room.plus(asks[b].need);
            n += 1;
        }
        if n > 0 {
            taken.push((b, n));
        }
    }
    need.fits(&room)
}

/// Simulates the placement: `start[service]` is where its replicas are now, `(host, count)`.
pub fn place(asks: &[Ask], hosts: &[Room], start: &[Vec<(usize, u32)>]) -> Vec<Placed> {
    let flat: Vec<(usize, usize, u32)> = start
        .iter()
        .enumerate()
        .flat_map(|(a, per)| per.iter().map(move |&(h, n)| (a, h, n)))
        .collect();
    let Placement {
        mut services,
        by_host,
        ..
    } = simulate(asks, hosts, &flat, &[]);
    for (h, on) in by_host.iter().enumerate() {
        for &(a, n) in on {
            services[a as usize].per_host.push((h, n));
        }
    }
    services
}

/// [`place`] from `start` as `(service, host, count)` (each pair of service and host at most
/// once), without the services' `per_host`. `only[a]`, where given, says on which hosts the
/// per-host service `a` runs (by host index); an empty `only` (or `None`): on every ready host.
pub(crate) fn simulate(
    asks: &[Ask],
    hosts: &[Room],
    start: &[(usize, usize, u32)],
    only: &[Option<Vec<bool>>],
) -> Placement {
    let allowed = |a: usize, h: usize| {
        only.get(a)
            .and_then(Option::as_ref)
            .is_none_or(|on| on.get(h).copied().unwrap_or(false))
    };
    let nh = hosts.len();
    let ns = asks.len();
    let start: Vec<(usize, usize, u32)> = start
        .iter()
        .copied()
        .filter(|&(a, h, n)| a < ns && h < nh && n > 0)
        .collect();
    let mut on_host = vec![0u32; nh];
    let mut of_service = vec![0u32; ns + 1];
    for &(a, h, _) in &start {
        on_host[h] += 1;
        of_service[a + 1] += 1;
    }
    let leaves = nh.next_power_of_two().max(1);
    let mut st = State {
        by_host: on_host
            .iter()
            .map(|&c| Vec::with_capacity(c as usize + 4))
            .collect(),
        total: vec![0; ns],
        used: vec![Resources::ZERO; nh],
        tree: vec![0; 2 * leaves],
        leaves,
    };
    // Where each service is, by service (a counting sort of `start`), for the surplus.
    for a in 0..ns {
        of_service[a + 1] += of_service[a];
    }
    let mut fill = of_service.clone();
    let mut mine: Vec<(usize, u32)> = vec![(0, 0); start.len()];
    for &(a, h, n) in &start {
        st.by_host[h].push((a as u32, n));
        st.total[a] += n;
        st.used[h] = st.used[h].plus(asks[a].need.times(n));
        mine[fill[a] as usize] = (h, n);
        fill[a] += 1;
    }
    let start_total = st.total.clone();
    for (h, room) in hosts.iter().enumerate() {
        if room.ready {
            let top = st.by_host[h].iter().map(|&(b, _)| b + 1).max().unwrap_or(0);
            st.tree[leaves + h] = top.max(1);
        }
    }
    for i in (1..leaves).rev() {
        st.tree[i] = st.tree[2 * i].max(st.tree[2 * i + 1]);
    }
    let mut out: Vec<Placed> = vec![Placed::default(); ns];
    let free = |st: &State, h: usize| hosts[h].allocatable.saturating_sub(st.used[h]);

    // 1. Surplus back: per-host services keep one per ready host; the others give back from
    //    hosts that are not ready first, then from the host where they have the most.
    for (a, ask) in asks.iter().enumerate() {
        let mine = &mut mine[of_service[a] as usize..of_service[a + 1] as usize];
        if ask.growth == Growth::PerHost {
            for &(h, c) in mine.iter() {
                let n = c.saturating_sub(u32::from(hosts[h].ready && allowed(a, h)));
                if n > 0 {
                    st.add(asks, a, h, -i64::from(n));
                }
            }
            continue;
        }
        while st.total[a] > ask.want {
            let Some(e) = mine
                .iter_mut()
                .filter(|e| e.1 > 0)
                .max_by_key(|&&mut (h, c)| (!hosts[h].ready, c, h))
            else {
                break;
            };
            let n = e.1.min(st.total[a] - ask.want);
            e.1 -= n;
            let h = e.0;
            st.add(asks, a, h, -i64::from(n));
        }
    }

    // Who gave room to a replica that was waiting for it this tick.
    let mut held = vec![false; ns];
    // Replicas each service placed this tick (the first ones are those that were waiting).
    let mut placed = vec![0u32; ns];

    // 1b. Mins first, in allocation order, as the slot engine reserves them: a service below
    //     its min places up to it, first fit, or else on the host where the others (any
    //     priority, the lowest first; above their own mins if those come first) make the
    //     room while touching the lowest priorities. A rare path (a min not met), so it looks
    //     at every host.
    for a in 0..ns {
        let ask = asks[a];
        if ask.growth == Growth::PerHost {
            continue;
        }
        // What another service can give to `a`'s min: above its own min if its min was
        // reserved before (earlier in allocation order), all of it if after.
        let kept = |st: &State, b: usize| {
            if b > a {
                st.total[b]
            } else {
                st.total[b].saturating_sub(asks[b].min)
            }
        };
        while st.total[a] < ask.min.min(ask.want) {
            if let Some(h) = (0..nh).find(|&h| hosts[h].ready && ask.need.fits(&free(&st, h))) {
                st.add(asks, a, h, 1);
                placed[a] += 1;
                continue;
            }
            // Per host: the room made from the lowest first, and the highest priority it
            // had to touch; the host whose highest is lowest wins (the first of equals).
            // (host, the highest priority touched, what is taken: (service, count)).
            type Made = (usize, usize, Vec<(usize, u32)>);
            let mut best: Option<Made> = None;
            for h in (0..nh).filter(|&h| hosts[h].ready) {
                let mut others: Vec<(u32, u32)> = st.by_host[h]
                    .iter()
                    .copied()
                    .filter(|&(b, _)| b as usize != a && kept(&st, b as usize) > 0)
                    .collect();
                let mut taken = Vec::new();
                let fits = make_room(ask.need, free(&st, h), &mut others, asks, &mut taken, |b| {
                    kept(&st, b)
                });
                let highest = taken.last().map_or(usize::MAX, |&(b, _)| b);
                if fits && best.as_ref().is_none_or(|&(_, x, _)| highest > x) {
                    best = Some((h, highest, taken));
                }
            }
            let Some((h, _, taken)) = best else {
                out[a].blocked = ask.growth != Growth::Remainder;
                break;
            };
            for (b, n) in taken {
                st.add(asks, b, h, -i64::from(n));
                out[a].took.push((b, h, n));
            }
            st.add(asks, a, h, 1);
            placed[a] += 1;
        }
    }

    // 2. Growth in allocation order (remainder services last: they fill what is left, the
    //    first taking from the later ones as a higher priority does). First fit starts at a
    //    cursor per size: the hosts before it had no room for that size when last looked at.
    let mut cursors: std::collections::HashMap<Resources, usize> = Default::default();
    // The cursor of the size being placed (written back when the size changes).
    let mut cursor: Option<(Resources, usize)> = None;
    let mut lower: Vec<(u32, u32)> = Vec::new();
    let mut plan: Vec<(usize, u32)> = Vec::new();
    for a in 0..ns {
        let ask = asks[a];
        // A service that gave room to a replica already waiting for it does not grow
        // elsewhere this tick: with the counts unchanged (a move between hosts, which a count
        // cannot say) nothing would be dispatched and the replica would go on waiting. Its
        // count goes down, the orchestrator frees room, and it grows again at the next tick.
        if held[a] {
            continue;
        }
        let per_host: Vec<usize> = if ask.growth == Growth::PerHost {
            (0..nh)
                .filter(|&h| hosts[h].ready && allowed(a, h) && count(&st.by_host[h], a) == 0)
                .collect()
        } else {
            Vec::new()
        };
        let mut next_host = per_host.into_iter();
        loop {
            let only = if ask.growth == Growth::PerHost {
                match next_host.next() {
                    Some(h) => Some(h),
                    None => break,
                }
            } else {
                if st.total[a] >= ask.want {
                    break;
                }
                None
            };
            // First fit.
            let fit = match only {
                Some(h) => ask.need.fits(&free(&st, h)).then_some(h),
                None => {
                    let from = match cursor {
                        Some((need, at)) if need == ask.need => at,
                        _ => {
                            if let Some((need, at)) = cursor {
                                cursors.insert(need, at);
                            }
                            cursors.get(&ask.need).copied().unwrap_or(0)
                        }
                    };
                    let h = (from..nh).find(|&h| hosts[h].ready && ask.need.fits(&free(&st, h)));
                    cursor = Some((ask.need, h.unwrap_or(nh)));
                    h
                }
            };
            if let Some(h) = fit {
                st.add(asks, a, h, 1);
                placed[a] += 1;
                continue;
            }
            // Room taken from lower priorities, the lowest first, none below its floor: on
            // the first ready host (or the one host) that holds some and where they make it.
            let mut done = false;
            let mut at = match only {
                Some(h) => Some(h),
                None => st.next_lower(0, a),
            };
            while let Some(h) = at {
                at = match only {
                    Some(_) => None,
                    None => st.next_lower(h + 1, a),
                };
                lower.clear();
                lower.extend(
                    st.by_host[h]
                        .iter()
                        .copied()
                        .filter(|&(b, _)| b as usize > a),
                );
                if only.is_none() {
                    // The host's value, exact again.
                    let top = st.by_host[h].iter().map(|&(b, _)| b + 1).max().unwrap_or(0);
                    st.set(h, top.max(1));
                }
                if lower.is_empty() {
                    continue;
                }
                plan.clear();
                let fits = make_room(ask.need, free(&st, h), &mut lower, asks, &mut plan, |b| {
                    st.total[b].saturating_sub(asks[b].floor)
                });
                if !fits {
                    continue;
                }
                // This replica is one that waits for room (not a new one).
                let waiting = placed[a] < ask.waiting;
                for &(b, n) in &plan {
                    st.add(asks, b, h, -i64::from(n));
                    out[a].took.push((b, h, n));
                    held[b] |= waiting;
                }
                st.add(asks, a, h, 1);
                placed[a] += 1;
                done = true;
                break;
            }
            if !done {
                out[a].blocked = ask.growth != Growth::Remainder;
                if ask.growth != Growth::PerHost {
                    break;
                }
            }
        }
    }

    for (a, o) in out.iter_mut().enumerate() {
        o.target = st.total[a];
        o.held = held[a];
        if o.took.len() > 1 {
            o.took.sort_unstable();
            let mut merged: Vec<(usize, usize, u32)> = Vec::with_capacity(o.took.len());
            for &(b, h, n) in &o.took {
                match merged.last_mut() {
                    Some(last) if last.0 == b && last.1 == h => last.2 += n,
                    _ => merged.push((b, h, n)),
                }
            }
            o.took = merged;
        }
    }
    // Only a service that ends with fewer replicas gives some up (one that moves a replica
    // keeps its count, and a backend reads `remove_from` only when the count goes down).
    let mut removed: Vec<(usize, usize, u32)> = start
        .iter()
        .filter(|&&(a, _, _)| st.total[a] < start_total[a])
        .filter_map(|&(a, h, n)| {
            let left = count(&st.by_host[h], a);
            (left < n).then(|| (a, h, n - left))
        })
        .collect();
    removed.sort_unstable();
    Placement {
        services: out,
        by_host: st.by_host,
        removed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(cpu_milli: u64, mib: u64) -> Resources {
        Resources {
            cpu_milli,
            memory: mib * 1024 * 1024,
        }
    }

    fn host(cpu_milli: u64, mib: u64) -> Room {
        Room {
            allocatable: r(cpu_milli, mib),
            ready: true,
        }
    }

    /// A dense start (`[service][host]`) as `place` takes it.
    fn sparse(dense: &[Vec<u32>]) -> Vec<Vec<(usize, u32)>> {
        dense
            .iter()
            .map(|c| {
                c.iter()
                    .copied()
                    .enumerate()
                    .filter(|&(_, n)| n > 0)
                    .collect()
            })
            .collect()
    }

    fn dense(p: &Placed, nh: usize) -> Vec<u32> {
        (0..nh).map(|h| p.on(h)).collect()
    }

    fn ask(need: Resources, want: u32, growth: Growth) -> Ask {
        Ask {
            need,
            want,
            floor: 0,
            min: 0,
            growth,
            waiting: 0,
        }
    }

    /// Free room that adds up to a replica but is split over two hosts is not room.
    #[test]
    fn fragmented_room_is_not_room() {
        let hosts = [host(1000, 1024), host(1000, 1024)];
        // batch holds 0.6 CPU on each host: 0.4 free on each, 0.8 in all.
        let asks = [
            ask(r(500, 256), 1, Growth::Priority),
            Ask {
                floor: 2,
                ..ask(r(600, 256), 2, Growth::Priority)
            },
        ];
        let out = place(&asks, &hosts, &sparse(&[vec![0, 0], vec![1, 1]]));
        assert_eq!(out[0].target, 0, "{out:?}");
        assert!(out[0].blocked);
        assert_eq!(out[1].target, 2);
    }

    /// A higher priority takes room from the lowest priority on a host where it then fits.
    #[test]
    fn room_is_taken_from_the_lowest_priority_where_it_fits() {
        let hosts = [host(1000, 4096), host(2000, 4096)];
        let asks = [
            ask(r(1500, 512), 1, Growth::Priority),
            ask(r(500, 512), 2, Growth::Priority),
            ask(r(250, 128), 8, Growth::Remainder),
        ];
        // mid has one replica per host; low fills the rest.
        let start = vec![vec![0, 0], vec![1, 1], vec![2, 6]];
        let out = place(&asks, &hosts, &sparse(&start));
        // Host 1 cannot make room even from everyone below; host 2 can, from the remainder
        // alone (1.5 CPU: all 6 of its replicas there), mid keeps both.
        assert_eq!(out[0].target, 1, "{out:?}");
        assert_eq!(dense(&out[0], hosts.len()), vec![0, 1]);
        assert_eq!(out[0].took, vec![(2, 1, 6)]);
        assert_eq!(out[1].target, 2);
        assert_eq!(dense(&out[2], hosts.len()), vec![2, 0]);
        // The remainder leaves host 2, where the room was made: 6 there, none elsewhere.
        let p = simulate(
            &asks,
            &hosts,
            &[(1, 0, 1), (1, 1, 1), (2, 0, 2), (2, 1, 6)],
            &[],
        );
        assert_eq!(p.removed, vec![(2, 1, 6)]);
    }

    #[test]
    fn per_host_services_take_one_on_every_ready_host() {
        let mut hosts = vec![host(1000, 1024); 3];
        hosts[2].ready = false;
        let asks = [
            ask(r(100, 64), 2, Growth::PerHost),
            ask(r(300, 256), 10, Growth::Remainder),
        ];
        let out = place(&asks, &hosts, &sparse(&[vec![0, 2, 1], vec![3, 3, 0]]));
        assert_eq!(dense(&out[0], hosts.len()), vec![1, 1, 0], "{out:?}");
        assert_eq!(dense(&out[1], hosts.len()), vec![3, 3, 0]);
    }

    #[test]
    fn per_host_services_limited_to_some_hosts_run_there_only() {
        let hosts = vec![host(1000, 1024); 3];
        let asks = [
            ask(r(100, 64), 2, Growth::PerHost),
            ask(r(300, 256), 10, Growth::Remainder),
        ];
        // On hosts 0 and 2 only; one runs on host 1 now (the query stopped matching it).
        let only = [Some(vec![true, false, true]), None];
        let p = simulate(&asks, &hosts, &[(0, 1, 1)], &only);
        let on = |a: u32| -> Vec<u32> {
            (0..hosts.len())
                .map(|h| {
                    p.by_host[h]
                        .iter()
                        .filter(|&&(x, _)| x == a)
                        .map(|&(_, n)| n)
                        .sum()
                })
                .collect()
        };
        assert_eq!(on(0), vec![1, 0, 1]);
        assert_eq!(p.services[0].target, 2);
        assert_eq!(on(1), vec![3, 3, 3], "the remainder fills what is left");
    }

    #[test]
    fn surplus_leaves_hosts_that_are_not_ready_first() {
        let mut hosts = vec![host(4000, 4096); 2];
        hosts[0].ready = false;
        let asks = [ask(r(500, 256), 2, Growth::Priority)];
        let out = place(&asks, &hosts, &sparse(&[vec![2, 2]]));
        assert_eq!(dense(&out[0], hosts.len()), vec![0, 2]);
        let p = simulate(&asks, &hosts, &[(0, 0, 2), (0, 1, 2)], &[]);
        assert_eq!(p.removed, vec![(0, 0, 2)]);
    }
}
