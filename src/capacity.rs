//! The capacity preflight: how many clients this process can really hold, derived at start-up
//! from the limits that would otherwise fail one connection at a time, mid-traffic.
//!
//! Every client costs one file descriptor and one thread, and every thread costs a process id
//! and four memory mappings. Whichever runs out first sets `--max-clients` when it is `auto`;
//! the acceptor then refuses politely (503) at that count instead of meeting `EMFILE`,
//! `EAGAIN` from `clone`, or an `mmap` failure that aborts the process.

use std::fmt;
use std::fs;
use std::io;

/// File descriptors kept back for the listener, log file, stdio, and the odd `/proc` read.
const FD_RESERVE: u64 = 64;
/// Threads kept back, machine-wide, for everything that is not a roomcast connection (the
/// load generator on the same box, shells, other services).
const THREAD_RESERVE: u64 = 512;
/// Each Rust thread maps its stack and guard page, and the alternate signal stack and guard
/// page std installs to report stack overflows: four mappings.
const MAPS_PER_THREAD: u64 = 4;
/// Mappings kept back for the allocator's arenas, libraries and growth.
const MAP_RESERVE: u64 = 1024;
/// Memory budgeted per client, user and kernel side together: the touched part of the thread
/// stack, tungstenite's read buffer, the outbox when busy, and the socket's kernel buffers.
/// Deliberately generous; memory is rarely the binding limit for idle viewers.
const MEMORY_PER_CLIENT: u64 = 64 * 1024;

/// The limits that bound the client count, each already converted to "clients".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capacity {
    /// `RLIMIT_NOFILE` (after raising the soft limit) minus fds in use and a reserve.
    pub by_files: u64,
    /// `kernel.pid_max`, `kernel.threads-max` and `RLIMIT_NPROC`, minus tasks already running.
    pub by_threads: u64,
    /// `vm.max_map_count` minus current mappings, divided by mappings per thread.
    pub by_mappings: u64,
    /// `MemAvailable` divided by the per-client budget.
    pub by_memory: u64,
}

impl Capacity {
    /// The smallest limit: the number of clients the machine can actually hold.
    pub fn max_clients(&self) -> u64 {
        self.by_files
            .min(self.by_threads)
            .min(self.by_mappings)
            .min(self.by_memory)
    }

    /// Which limit binds, for the start-up log.
    pub fn binding_limit(&self) -> &'static str {
        let max = self.max_clients();
        if max == self.by_files {
            "file descriptors (RLIMIT_NOFILE)"
        } else if max == self.by_mappings {
            "memory mappings (vm.max_map_count)"
        } else if max == self.by_threads {
            "threads (pid_max / threads-max / RLIMIT_NPROC)"
        } else {
            "available memory"
        }
    }
}

impl fmt::Display for Capacity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} clients (files {}, threads {}, mappings {}, memory {}; bound by {})",
            self.max_clients(),
            self.by_files,
            self.by_threads,
            self.by_mappings,
            self.by_memory,
            self.binding_limit()
        )
    }
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns the new soft limit.
///
/// The soft limit is often 1024 for historical reasons (`select()`'s `FD_SETSIZE`), which a
/// thread-per-connection server that never calls `select` has no reason to keep.
pub fn raise_file_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct we pass.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(io::Error::last_os_error());
            }
            limit = raised;
        }
    }
    Ok(limit.rlim_cur)
}

/// Measures the machine. Missing `/proc` entries count as "no limit" from that source.
pub fn preflight() -> Capacity {
    let nofile = raise_file_limit().unwrap_or(1024);
    let open_fds = count_entries("/proc/self/fd").unwrap_or(16);
    let by_files = nofile.saturating_sub(open_fds + FD_RESERVE);

    let tasks_running = system_task_count().unwrap_or(0);
    let pid_max = read_number("/proc/sys/kernel/pid_max").unwrap_or(u64::MAX);
    let threads_max = read_number("/proc/sys/kernel/threads-max").unwrap_or(u64::MAX);
    let nproc = process_limit().unwrap_or(u64::MAX);
    let by_threads = pid_max
        .min(threads_max)
        .saturating_sub(tasks_running)
        .min(nproc)
        .saturating_sub(THREAD_RESERVE);

    let by_mappings = match read_number("/proc/sys/vm/max_map_count") {
        Some(max_maps) => {
            let maps_now = count_lines("/proc/self/maps").unwrap_or(0);
            max_maps.saturating_sub(maps_now + MAP_RESERVE) / MAPS_PER_THREAD
        }
        None => u64::MAX,
    };

    let by_memory = available_memory().map_or(u64::MAX, |bytes| bytes / MEMORY_PER_CLIENT);

    Capacity {
        by_files,
        by_threads,
        by_mappings,
        by_memory,
    }
}

fn read_number(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

fn count_entries(path: &str) -> Option<u64> {
    Some(fs::read_dir(path).ok()?.count() as u64)
}

fn count_lines(path: &str) -> Option<u64> {
    Some(fs::read_to_string(path).ok()?.lines().count() as u64)
}

/// Tasks (threads) on the whole machine: the denominator of `/proc/loadavg`'s fourth field.
fn system_task_count() -> Option<u64> {
    let loadavg = fs::read_to_string("/proc/loadavg").ok()?;
    loadavg
        .split_whitespace()
        .nth(3)?
        .split('/')
        .nth(1)?
        .parse()
        .ok()
}

/// `RLIMIT_NPROC`, unless unlimited or we are root (which the kernel exempts from it).
fn process_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct we pass; geteuid has no preconditions.
    let (ok, is_root) = unsafe {
        (
            libc::getrlimit(libc::RLIMIT_NPROC, &mut limit) == 0,
            libc::geteuid() == 0,
        )
    };
    if !ok || is_root || limit.rlim_cur == libc::RLIM_INFINITY {
        return None;
    }
    Some(limit.rlim_cur)
}

/// `MemAvailable` from `/proc/meminfo`, in bytes.
fn available_memory() -> Option<u64> {
    let meminfo = fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_limit_binds() {
        let capacity = Capacity {
            by_files: 19_000,
            by_threads: 31_000,
            by_mappings: 16_000,
            by_memory: 300_000,
        };
        assert_eq!(capacity.max_clients(), 16_000);
        assert!(capacity.binding_limit().contains("max_map_count"));
        assert!(capacity.to_string().starts_with("16000 clients"));
    }

    #[test]
    fn preflight_reads_this_machine() {
        let capacity = preflight();
        assert!(capacity.max_clients() > 0, "{capacity}");
        // The file limit was raised to the hard limit.
        let mut limit = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) };
        assert_eq!(limit.rlim_cur, limit.rlim_max);
    }
}
