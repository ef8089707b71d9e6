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
//!    on each ready host that lacks it;
//! 3. remainder services fill what is left, host by host, first fit.
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
    /// Per host.
    pub per_host: Vec<u32>,
    /// Short of its want because no host could take one more, even with room taken from lower
    /// priorities.
    pub blocked: bool,
    /// Replicas it took from lower priorities to make room: (their position, host, count).
    pub took: Vec<(usize, usize, u32)>,
}

/// Simulates the placement: `start[service][host]` is where the replicas are now.
pub fn place(asks: &[Ask], hosts: &[Room], start: &[Vec<u32>]) -> Vec<Placed> {
    let nh = hosts.len();
    let mut count: Vec<Vec<u32>> = start.iter().map(|c| c[..nh].to_vec()).collect();
    let mut used = vec![Resources::ZERO; nh];
    for (a, per) in asks.iter().zip(&count) {
        for (h, &n) in per.iter().enumerate() {
            used[h] = used[h].plus(a.need.times(n));
        }
    }
    let mut total: Vec<u32> = count.iter().map(|c| c.iter().sum()).collect();
    let mut out: Vec<Placed> = vec![Placed::default(); asks.len()];

    // 1. Surplus back: per-host services keep one per ready host.
    for (a, ask) in asks.iter().enumerate() {
        if ask.growth == Growth::PerHost {
            for h in 0..nh {
                let keep = u32::from(hosts[h].ready);
                while count[a][h] > keep {
                    count[a][h] -= 1;
                    total[a] -= 1;
                    used[h] = used[h].saturating_sub(ask.need);
                }
            }
            continue;
        }
        while total[a] > ask.want {
            let h = (0..nh)
                .filter(|&h| count[a][h] > 0)
                .max_by_key(|&h| (!hosts[h].ready, count[a][h], h))
                .expect("a service with replicas has them on some host");
            count[a][h] -= 1;
            total[a] -= 1;
            used[h] = used[h].saturating_sub(ask.need);
        }
    }

    let free = |used: &[Resources], h: usize| hosts[h].allocatable.saturating_sub(used[h]);
    // 2. Growth in allocation order (remainder services last: they fill what is left, the
    //    first taking from the later ones as a higher priority does).
    for a in 0..asks.len() {
        let ask = asks[a];
        let mut only: Vec<usize> = Vec::new();
        if ask.growth == Growth::PerHost {
            only = (0..nh)
                .filter(|&h| hosts[h].ready && count[a][h] == 0)
                .collect();
        }
        let mut next_host = only.into_iter();
        loop {
            let candidates: Vec<usize> = if ask.growth == Growth::PerHost {
                match next_host.next() {
                    Some(h) => vec![h],
                    None => break,
                }
            } else {
                if total[a] >= ask.want {
                    break;
                }
                (0..nh).filter(|&h| hosts[h].ready).collect()
            };
            // First fit.
            if let Some(&h) = candidates.iter().find(|&&h| ask.need.fits(&free(&used, h))) {
                count[a][h] += 1;
                total[a] += 1;
                used[h] = used[h].plus(ask.need);
                continue;
            }
            // Room taken from lower priorities, the lowest first. None goes below its floor:
            // a replica that would take it there is moved to another host where it fits, or
            // stays.
            let mut done = false;
            for &h in &candidates {
                // Tried on copies, kept only if the replica then fits.
                let (mut c2, mut t2, mut u2) = (count.clone(), total.clone(), used.clone());
                let mut took = Vec::new();
                for b in (a + 1..asks.len()).rev() {
                    if ask.need.fits(&free(&u2, h)) {
                        break;
                    }
                    let need = asks[b].need;
                    while c2[b][h] > 0 && !ask.need.fits(&free(&u2, h)) {
                        let elsewhere =
                            (0..nh).find(|&x| x != h && hosts[x].ready && need.fits(&free(&u2, x)));
                        match (t2[b] > asks[b].floor, elsewhere) {
                            (true, _) => {
                                c2[b][h] -= 1;
                                t2[b] -= 1;
                                u2[h] = u2[h].saturating_sub(need);
                                took.push((b, h, 1));
                            }
                            (false, Some(x)) => {
                                c2[b][h] -= 1;
                                c2[b][x] += 1;
                                u2[h] = u2[h].saturating_sub(need);
                                u2[x] = u2[x].plus(need);
                            }
                            (false, None) => break,
                        }
                    }
                }
                if !ask.need.fits(&free(&u2, h)) {
                    continue;
                }
                (count, total, used) = (c2, t2, u2);
                out[a].took.extend(took);
                count[a][h] += 1;
                total[a] += 1;
                used[h] = used[h].plus(ask.need);
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
        o.target = total[a];
        o.per_host = std::mem::take(&mut count[a]);
    }
    // Merge what each service took per (victim, host).
    for o in &mut out {
        o.took.sort_unstable();
        let mut merged: Vec<(usize, usize, u32)> = Vec::with_capacity(o.took.len());
        for &(b, h, n) in o.took.iter().filter(|t| t.2 > 0) {
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
        let out = place(&asks, &hosts, &[vec![0, 0], vec![1, 1]]);
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
        let out = place(&asks, &hosts, &start);
        // Host 1 cannot make room even from everyone below; host 2 can, from the remainder
        // alone (1.5 CPU: all 6 of its replicas there), mid keeps both.
        assert_eq!(out[0].target, 1, "{out:?}");
        assert_eq!(out[0].per_host, vec![0, 1]);
        assert_eq!(out[0].took, vec![(2, 1, 6)]);
        assert_eq!(out[1].target, 2);
        assert_eq!(out[2].per_host, vec![2, 0]);
    }

    #[test]
    fn per_host_services_take_one_on_every_ready_host() {
        let mut hosts = vec![host(1000, 1024); 3];
        hosts[2].ready = false;
        let asks = [
            ask(r(100, 64), 2, Growth::PerHost),
            ask(r(300, 256), 10, Growth::Remainder),
        ];
        let out = place(&asks, &hosts, &[vec![0, 2, 1], vec![3, 3, 0]]);
        assert_eq!(out[0].per_host, vec![1, 1, 0], "{out:?}");
        assert_eq!(out[1].per_host, vec![3, 3, 0]);
    }

    #[test]
    fn surplus_leaves_hosts_that_are_not_ready_first() {
        let mut hosts = vec![host(4000, 4096); 2];
        hosts[0].ready = false;
        let asks = [ask(r(500, 256), 2, Growth::Priority)];
        let out = place(&asks, &hosts, &[vec![2, 2]]);
        assert_eq!(out[0].per_host, vec![0, 2]);
    }
}
