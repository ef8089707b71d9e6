//! Where replicas fit when capacity is counted in CPU and memory (`[capacity] resources =
//! true`): a pure simulation of placement, host by host, that the engine runs instead of
//! counting slots. Nothing here reads a clock or does I/O.
//!
//! From where the replicas are now:
//! 1. every service above its want gives the surplus back (from hosts that are not ready
//!    first, then from the host where it has the most);
//! 2. in allocation order (priority, then name; remainder services last), every service
//!    below its want places replicas one at a time: on the first host with room for one in
//!    every dimension, or else on the first host where replicas of lower priorities (the
//!    lowest first, none below its floor) can make that room; a per-host service places one
//!    on each ready host that lacks it; remainder services come last and fill what is left the
//!    same way, the first taking from the later ones.
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
    /// How it grows.
    pub growth: Growth,
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
    /// Where: `(host, count)`, by host, counts above zero.
    pub per_host: Vec<(usize, u32)>,
    /// Short of its want because no host could take one more, even with room taken from lower
    /// priorities.
    pub blocked: bool,
    /// Replicas it took from lower priorities to make room: (their position, host, count).
    pub took: Vec<(usize, usize, u32)>,
}

impl Placed {
    /// Replicas on host `h`.
    pub fn on(&self, h: usize) -> u32 {
        self.per_host
            .binary_search_by_key(&h, |&(x, _)| x)
            .map_or(0, |i| self.per_host[i].1)
    }
}

/// The simulation's state: who is where, both ways (sparse: a cluster of 1,000 hosts and
/// 10,000 services has a few replicas of a few services on each host).
struct State {
    /// Per service: `(host, count)`.
    by_service: Vec<Vec<(usize, u32)>>,
    /// Per host: `(service, count)`.
    by_host: Vec<Vec<(usize, u32)>>,
    total: Vec<u32>,
    used: Vec<Resources>,
}

impl State {
    fn add(&mut self, asks: &[Ask], a: usize, h: usize, n: i64) {
        fn bump(v: &mut Vec<(usize, u32)>, k: usize, n: i64) {
            match v.iter().position(|&(x, _)| x == k) {
                Some(i) => {
                    let c = (i64::from(v[i].1) + n).max(0) as u32;
                    if c == 0 {
                        v.swap_remove(i);
                    } else {
                        v[i].1 = c;
                    }
                }
                None if n > 0 => v.push((k, n as u32)),
                None => {}
            }
        }
        bump(&mut self.by_service[a], h, n);
        bump(&mut self.by_host[h], a, n);
        let need = asks[a].need.times(n.unsigned_abs() as u32);
        if n > 0 {
            self.total[a] += n as u32;
            self.used[h] = self.used[h].plus(need);
        } else {
            self.total[a] -= n.unsigned_abs() as u32;
            self.used[h] = self.used[h].saturating_sub(need);
        }
    }

    fn count(&self, a: usize, h: usize) -> u32 {
        self.by_host[h]
            .iter()
            .find(|&&(x, _)| x == a)
            .map_or(0, |&(_, c)| c)
    }
}

/// Simulates the placement: `start[service]` is where its replicas are now, `(host, count)`.
pub fn place(asks: &[Ask], hosts: &[Room], start: &[Vec<(usize, u32)>]) -> Vec<Placed> {
    let nh = hosts.len();
    let mut st = State {
        by_service: vec![Vec::new(); asks.len()],
        by_host: vec![Vec::new(); nh],
        total: vec![0; asks.len()],
        used: vec![Resources::ZERO; nh],
    };
    for (a, per) in start.iter().enumerate().take(asks.len()) {
        for &(h, n) in per {
            if h < nh && n > 0 {
                st.add(asks, a, h, i64::from(n));
            }
        }
    }
    let mut out: Vec<Placed> = vec![Placed::default(); asks.len()];
    let free = |st: &State, h: usize| hosts[h].allocatable.saturating_sub(st.used[h]);

    // 1. Surplus back: per-host services keep one per ready host; the others give back from
    //    hosts that are not ready first, then from the host where they have the most.
    for (a, ask) in asks.iter().enumerate() {
        if ask.growth == Growth::PerHost {
            let extra: Vec<(usize, u32)> = st.by_service[a]
                .iter()
                .map(|&(h, c)| (h, c.saturating_sub(u32::from(hosts[h].ready))))
                .filter(|&(_, n)| n > 0)
                .collect();
            for (h, n) in extra {
                st.add(asks, a, h, -i64::from(n));
            }
            continue;
        }
        while st.total[a] > ask.want {
            let Some(&(h, c)) = st.by_service[a]
                .iter()
                .max_by_key(|&&(h, c)| (!hosts[h].ready, c, h))
            else {
                break;
            };
            let n = c.min(st.total[a] - ask.want);
            st.add(asks, a, h, -i64::from(n));
        }
    }

    // 2. Growth in allocation order (remainder services last: they fill what is left, the
    //    first taking from the later ones as a higher priority does). First fit starts at a
    //    cursor per size: the hosts before it had no room for that size when last looked at.
    let mut cursor: std::collections::HashMap<Resources, usize> = Default::default();
    for a in 0..asks.len() {
        let ask = asks[a];
        let per_host: Vec<usize> = if ask.growth == Growth::PerHost {
            (0..nh)
                .filter(|&h| hosts[h].ready && st.count(a, h) == 0)
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
                    let from = cursor.get(&ask.need).copied().unwrap_or(0);
                    let h = (from..nh).find(|&h| hosts[h].ready && ask.need.fits(&free(&st, h)));
                    cursor.insert(ask.need, h.unwrap_or(nh));
                    h
                }
            };
            if let Some(h) = fit {
                st.add(asks, a, h, 1);
                continue;
            }
            // Room taken from lower priorities, the lowest first, none below its floor.
            let candidates: Box<dyn Iterator<Item = usize>> = match only {
                Some(h) => Box::new(std::iter::once(h)),
                None => Box::new((0..nh).filter(|&h| hosts[h].ready)),
            };
            let mut done = false;
            for h in candidates {
                let mut room = free(&st, h);
                let mut lower: Vec<(usize, u32)> = st.by_host[h]
                    .iter()
                    .copied()
                    .filter(|&(b, _)| b > a)
                    .collect();
                if lower.is_empty() {
                    continue;
                }
                lower.sort_unstable_by_key(|&(b, _)| std::cmp::Reverse(b));
                let mut plan: Vec<(usize, u32)> = Vec::new();
                for (b, c) in lower {
                    if ask.need.fits(&room) {
                        break;
                    }
                    let spare = st.total[b].saturating_sub(asks[b].floor).min(c);
                    let mut n = 0;
                    while n < spare && !ask.need.fits(&room) {
                        room = room.plus(asks[b].need);
                        n += 1;
                    }
                    if n > 0 {
                        plan.push((b, n));
                    }
                }
                if !ask.need.fits(&room) {
                    continue;
                }
                for (b, n) in plan {
                    st.add(asks, b, h, -i64::from(n));
                    out[a].took.push((b, h, n));
                }
                st.add(asks, a, h, 1);
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
        let mut per_host = std::mem::take(&mut st.by_service[a]);
        per_host.sort_unstable();
        o.per_host = per_host;
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
    out
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
            growth,
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
    fn surplus_leaves_hosts_that_are_not_ready_first() {
        let mut hosts = vec![host(4000, 4096); 2];
        hosts[0].ready = false;
        let asks = [ask(r(500, 256), 2, Growth::Priority)];
        let out = place(&asks, &hosts, &sparse(&[vec![2, 2]]));
        assert_eq!(dense(&out[0], hosts.len()), vec![0, 2]);
    }
}
