//! The capacity preflight reads the limits a container or a systemd service puts on the
//! process: the real binary, started inside a pids cgroup made for this test with a low
//! `pids.max` (what systemd's `TasksMax=` writes), must derive fewer clients than that, say
//! that the cgroup's limit binds, and refuse the client past it with `503` instead of failing
//! to spawn its thread.
//!
//! Making a cgroup needs root and a writable cgroup filesystem. Where there is none, the test
//! says why and skips, except under `ROOMCAST_REQUIRE_ALL` (scripts/test.sh), where it fails.

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tungstenite::Message;

use crate::support::*;

/// The task limit the test sets: well below the host's, and room for a few dozen clients.
const PIDS_MAX: u64 = 64;

/// A pids cgroup made for one test, removed (once empty) on drop.
struct TestCgroup {
    dir: PathBuf,
    /// With cgroup v2, the parent whose `cgroup.subtree_control` had `+pids` written for this
    /// test, to be undone afterwards.
    enabled_in: Option<PathBuf>,
}

impl TestCgroup {
    /// Makes a child of this process's own pids cgroup (so any limit above still applies),
    /// or says why it cannot.
    fn create() -> Result<TestCgroup, String> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err("not root, so no cgroup can be made".into());
        }
        let (parent, version) = own_pids_cgroup()?;
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "roomcast-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut enabled_in = None;
        if version == 2 {
            let control = parent.join("cgroup.subtree_control");
            let enabled = fs::read_to_string(&control).unwrap_or_default();
            if !enabled.split_whitespace().any(|c| c == "pids") {
                fs::write(&control, "+pids").map_err(|e| {
                    format!(
                        "cannot enable the pids controller in {}: {e}",
                        control.display()
                    )
                })?;
                enabled_in = Some(parent.clone());
            }
        }
        let dir = parent.join(name);
        if let Err(e) = fs::create_dir(&dir) {
            return Err(format!("cannot make {}: {e}", dir.display()));
        }
        let cgroup = TestCgroup { dir, enabled_in };
        fs::write(cgroup.dir.join("pids.max"), PIDS_MAX.to_string())
            .map_err(|e| format!("cannot write pids.max: {e}"))?;
        Ok(cgroup)
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    fn tasks(&self) -> u64 {
        fs::read_to_string(self.dir.join("pids.current"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        // The process in it has been killed and reaped by now; the kernel may take a moment to
        // see the cgroup empty, and rmdir fails (EBUSY) until it does.
        let removed = wait_until(Duration::from_secs(10), || {
            fs::remove_dir(&self.dir).is_ok()
        });
        if !removed {
            eprintln!("could not remove the test cgroup {}", self.dir.display());
        }
        if let Some(parent) = &self.enabled_in {
            let _ = fs::write(parent.join("cgroup.subtree_control"), "-pids");
        }
    }
}

/// This process's pids cgroup directory and its cgroup version, found through
/// `/proc/self/cgroup` and `/proc/self/mountinfo`.
fn own_pids_cgroup() -> Result<(PathBuf, u8), String> {
    let memberships = fs::read_to_string("/proc/self/cgroup").map_err(|e| e.to_string())?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").map_err(|e| e.to_string())?;
    // A v1 pids hierarchy, if the pids controller is bound to one; else the v2 hierarchy.
    let v1_mount = mounts.lines().find_map(|line| {
        let (before, after) = line.split_once(" - ")?;
        let mut after = after.split(' ');
        let is_pids =
            after.next()? == "cgroup" && after.nth(1)?.split(',').any(|option| option == "pids");
        let fields: Vec<&str> = before.split(' ').collect();
        is_pids.then(|| (fields[3].to_string(), PathBuf::from(fields[4])))
    });
    let (mount_root, point, version, controllers) = match v1_mount {
        Some((root, point)) => (root, point, 1, "pids"),
        None => {
            let v2 = mounts.lines().find_map(|line| {
                let (before, after) = line.split_once(" - ")?;
                let fields: Vec<&str> = before.split(' ').collect();
                after
                    .starts_with("cgroup2 ")
                    .then(|| (fields[3].to_string(), PathBuf::from(fields[4])))
            });
            let (root, point) = v2.ok_or("no cgroup filesystem with the pids controller")?;
            (root, point, 2, "")
        }
    };
    if mount_root != "/" {
        return Err(format!(
            "the cgroup filesystem at {} shows only a sub-tree",
            point.display()
        ));
    }
    let path = memberships
        .lines()
        .find_map(|line| {
            let mut fields = line.splitn(3, ':');
            let (_, listed, path) = (fields.next()?, fields.next()?, fields.next()?);
            let matches = match version {
                1 => listed.split(',').any(|c| c == controllers),
                _ => listed.is_empty(),
            };
            matches.then_some(path)
        })
        .ok_or("this process is in no pids cgroup")?;
    Ok((point.join(path.trim_start_matches('/')), version))
}

/// Starts the binary with its first act, before `exec`, moving itself into `cgroup`.
fn start_in(cgroup: &TestCgroup, args: &[&str]) -> Process {
    let procs = CString::new(cgroup.procs().as_os_str().as_bytes()).unwrap();
    Process::start_configured(args, move |command| {
        // SAFETY: open, write and close are async-signal-safe; writing "0" to cgroup.procs
        // moves the writing process, so nothing needs formatting between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                let written = libc::write(fd, b"0".as_ptr().cast(), 1);
                let error = std::io::Error::last_os_error();
                libc::close(fd);
                if written == 1 {
                    Ok(())
                } else {
                    Err(error)
                }
            });
        }
    })
}

/// The number at the start of the `capacity: N clients (...)` log line.
fn derived_clients(capacity_line: &str) -> usize {
    capacity_line
        .split("capacity: ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no client count in {capacity_line:?}"))
}

/// Without the cgroup in the preflight, `max_clients` would come from the host's `pid_max`
/// (about 32,000 here): past 64 tasks `clone` fails, and clients meet a spawn failure (or,
/// on a path that spawns without checking, an abort) instead of a clean 503 at capacity.
#[test]
fn a_low_pids_max_in_the_process_cgroup_bounds_max_clients_and_is_named() {
    let cgroup = match TestCgroup::create() {
        Ok(cgroup) => cgroup,
        Err(reason) => {
            assert!(
                std::env::var_os("ROOMCAST_REQUIRE_ALL").is_none(),
                "the cgroup test cannot run (ROOMCAST_REQUIRE_ALL is set): {reason}"
            );
            eprintln!("skipping the cgroup test: {reason}");
            return;
        }
    };
    let limit_file = cgroup.dir.join("pids.max");
    let mut process = start_in(&cgroup, &[]);
    assert!(cgroup.tasks() > 0, "the server is not in the test cgroup");
    let line = process.wait_for_line("capacity: ");
    let clients = derived_clients(&line);
    assert!(
        clients > 0 && (clients as u64) < PIDS_MAX,
        "{clients} clients derived under pids.max {PIDS_MAX}: {line}"
    );
    let named = format!(
        "bound by threads (cgroup pids.max {PIDS_MAX} at {}",
        limit_file.display()
    );
    assert!(line.contains(&named), "{line}");
    process.wait_for_line(&format!("limit: cgroup pids.max {PIDS_MAX} at"));

    // Every client the preflight promised is served, each on its own thread in the cgroup...
    let mut held: Vec<Client> = (0..clients)
        .map(|i| process.connect(&format!("room-{}", i % 4)))
        .collect();
    assert!(
        cgroup.tasks() > clients as u64,
        "the connection threads are not in the cgroup"
    );
    // ...the next one is refused politely, and the server spawned nothing for it...
    match upgrade(
        std::net::TcpStream::connect(process.addr).unwrap(),
        &format!("ws://{}/ws/one-too-many", process.addr),
    ) {
        Err(tungstenite::Error::Http(response)) => assert_eq!(response.status(), 503),
        Err(other) => panic!("expected a 503, got {other}"),
        Ok(_) => panic!("expected a 503, got an upgrade past capacity"),
    }
    // ...and those already in are still served.
    held[0].send(Message::text("still relaying")).unwrap();
    for client in held.iter_mut().step_by(4) {
        assert_eq!(next_text(client), "still relaying");
    }
    assert!(
        process.child.try_wait().unwrap().is_none(),
        "the server died"
    );
    drop(held);
    drop(process);
    assert!(
        wait_until(Duration::from_secs(10), || cgroup.tasks() == 0),
        "the killed server's tasks are still in {}",
        cgroup.dir.display()
    );
}
