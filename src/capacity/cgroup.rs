//! The limits a container or a systemd service puts on this process through its cgroup: the
//! memory limit and the task (`pids`) limit, which the capacity preflight weighs against the
//! host's `MemAvailable` and `pid_max`.
//!
//! systemd gives every service a `TasksMax=` (by default 15% of `pid_max`, through
//! `DefaultTasksMax`), and a container runtime sets `pids.max` and a memory limit; either binds
//! long before the host's limits would. Both cgroup versions are read, because hosts still
//! mount v1 (or both, "hybrid"): the process's cgroup comes from `/proc/self/cgroup` and the
//! hierarchies' mount points from `/proc/self/mountinfo`, so no layout under `/sys/fs/cgroup`
//! is assumed. A parent's limit binds its children too, so every level from the process's
//! cgroup up to the top of the mounted hierarchy is read, and the level with the least room
//! left wins.
//!
//! Everything here is a pure function of file contents, except `limit`, which reads them.

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};

/// Values at or above this are "no limit": cgroup v1 has no `max` and reports an unlimited
/// memory limit as the largest page-aligned `i64` (9223372036854771712).
const UNLIMITED_FROM: u64 = 1 << 62;

/// The two controllers the preflight asks about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Controller {
    Memory,
    Pids,
}

impl Controller {
    /// The controller's name in `/proc/self/cgroup` and in v1 mount options.
    fn name(self) -> &'static str {
        match self {
            Controller::Memory => "memory",
            Controller::Pids => "pids",
        }
    }

    /// The files holding the limit and the current usage, for one cgroup version.
    fn files(self, version: Version) -> (&'static str, &'static str) {
        match (self, version) {
            (Controller::Memory, Version::V1) => ("memory.limit_in_bytes", "memory.usage_in_bytes"),
            (Controller::Memory, Version::V2) => ("memory.max", "memory.current"),
            (Controller::Pids, _) => ("pids.max", "pids.current"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    V1,
    V2,
}

/// The tightest limit of one controller on this process: the level of its cgroup hierarchy
/// with the least room left.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limit {
    pub controller: Controller,
    /// The limit, in bytes (memory) or tasks (pids).
    pub max: u64,
    /// What the cgroup at that level already uses: tasks, or bytes less the inactive page
    /// cache (which the kernel reclaims before it would fail an allocation, so it is room).
    pub used: u64,
    /// The limit's file, for the start-up log (`/sys/fs/cgroup/pids/roomcast/pids.max`).
    pub file: PathBuf,
}

impl Limit {
    /// What is left under the limit.
    pub fn room(&self) -> u64 {
        self.max.saturating_sub(self.used)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = self
            .file
            .file_name()
            .map_or_else(|| "?".into(), |n| n.to_string_lossy());
        match self.controller {
            Controller::Memory => write!(
                f,
                "cgroup {name} {} at {}, {} in use",
                super::human_bytes(self.max),
                self.file.display(),
                super::human_bytes(self.used)
            ),
            Controller::Pids => write!(
                f,
                "cgroup {name} {} at {}, {} in use",
                self.max,
                self.file.display(),
                self.used
            ),
        }
    }
}

/// The tightest `controller` limit on this process, or `None` when there is none (or no
/// cgroup filesystem to read it from).
pub fn limit(controller: Controller) -> Option<Limit> {
    let memberships = fs::read_to_string("/proc/self/cgroup").ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (dir, top, version) = locate(&memberships, &mounts, controller)?;
    tightest(controller, version, &dir, &top, |path| {
        fs::read_to_string(path).ok()
    })
}

/// One line of `/proc/self/cgroup`: `ID:CONTROLLERS:PATH`. Version 2's single line is
/// `0::PATH`; a version 1 line names its hierarchy's controllers (`4:memory:/docker/ab12`,
/// `3:cpu,cpuacct:/`, `1:name=systemd:/`).
#[derive(Debug, PartialEq, Eq)]
struct Membership<'a> {
    hierarchy: &'a str,
    controllers: Vec<&'a str>,
    path: &'a str,
}

fn parse_memberships(text: &str) -> Vec<Membership<'_>> {
    text.lines()
        .filter_map(|line| {
            // The path may itself contain ':', so split off only the first two fields.
            let mut fields = line.splitn(3, ':');
            let hierarchy = fields.next()?;
            let controllers = fields.next()?;
            let path = fields.next()?;
            Some(Membership {
                hierarchy,
                controllers: controllers.split(',').filter(|c| !c.is_empty()).collect(),
                path,
            })
        })
        .collect()
}

/// A mounted cgroup hierarchy from `/proc/self/mountinfo`.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    /// The cgroup the mount shows at its top (`/` unless bind-mounted from deeper down, as a
    /// container without a cgroup namespace sees it).
    root: String,
    point: PathBuf,
    /// Version 1: the controllers bound to this hierarchy. Version 2: `None`.
    v1_controllers: Option<Vec<String>>,
}

/// The cgroup mounts in `mountinfo` text. A line is `ID PARENT MAJ:MIN ROOT POINT OPTIONS
/// [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`; for cgroup v1 the super options name the
/// controllers (`rw,memory`, `rw,cpu,cpuacct`).
fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let (before, after) = line.split_once(" - ")?;
            let before: Vec<&str> = before.split(' ').collect();
            let mut after = after.split(' ');
            let fstype = after.next()?;
            let _source = after.next()?;
            let super_options = after.next().unwrap_or("");
            let (root, point) = (before.get(3)?, before.get(4)?);
            let v1_controllers = match fstype {
                "cgroup2" => None,
                "cgroup" => Some(
                    super_options
                        .split(',')
                        .filter(|o| *o != "rw" && *o != "ro")
                        .map(str::to_string)
                        .collect(),
                ),
                _ => return None,
            };
            Some(Mount {
                root: unescape(root),
                point: PathBuf::from(unescape(point)),
                v1_controllers,
            })
        })
        .collect()
}

/// Undoes mountinfo's octal escapes (`\040` for a space, `\011` tab, `\012` newline, `\134`
/// backslash).
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|digits| {
            let text = std::str::from_utf8(digits).ok()?;
            u8::from_str_radix(text, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The directory of this process's cgroup for `controller`, the top of that hierarchy as
/// mounted here, and the version. A controller bound to a v1 hierarchy is read there (a
/// controller lives in one hierarchy at a time); otherwise the v2 hierarchy is used, where
/// the limit files exist only if the controller is enabled.
fn locate(
    memberships: &str,
    mounts: &str,
    controller: Controller,
) -> Option<(PathBuf, PathBuf, Version)> {
    let memberships = parse_memberships(memberships);
    let mounts = parse_mounts(mounts);
    let name = controller.name();
    let v1 = memberships
        .iter()
        .find(|m| m.controllers.contains(&name))
        .and_then(|m| {
            mounts
                .iter()
                .filter(|mount| {
                    mount
                        .v1_controllers
                        .as_ref()
                        .is_some_and(|c| c.iter().any(|c| c == name))
                })
                .find_map(|mount| Some((join(mount, m.path)?, mount.point.clone(), Version::V1)))
        });
    v1.or_else(|| {
        let m = memberships
            .iter()
            .find(|m| m.hierarchy == "0" && m.controllers.is_empty())?;
        mounts
            .iter()
            .filter(|mount| mount.v1_controllers.is_none())
            .find_map(|mount| Some((join(mount, m.path)?, mount.point.clone(), Version::V2)))
    })
}

/// Where the cgroup `path` (as `/proc/self/cgroup` names it) is under `mount`, if the mount
/// shows it.
fn join(mount: &Mount, path: &str) -> Option<PathBuf> {
    let relative = if mount.root == "/" {
        path
    } else {
        let rest = path.strip_prefix(mount.root.as_str())?;
        if !(rest.is_empty() || rest.starts_with('/')) {
            return None;
        }
        rest
    };
    let relative = relative.trim_start_matches('/');
    Some(if relative.is_empty() {
        mount.point.clone()
    } else {
        mount.point.join(relative)
    })
}

/// Walks from `dir` up to `top`, reading each level's limit and usage with `read`, and
/// returns the level with the least room left. Levels without a limit file (the root cgroup
/// in v2) or without a limit (`max`) are skipped.
fn tightest(
    controller: Controller,
    version: Version,
    dir: &Path,
    top: &Path,
    read: impl Fn(&Path) -> Option<String>,
) -> Option<Limit> {
    let (limit_file, usage_file) = controller.files(version);
    let mut best: Option<Limit> = None;
    let mut level = Some(dir);
    while let Some(here) = level {
        if let Some(max) = read(&here.join(limit_file)).and_then(|t| parse_limit(&t)) {
            let usage = read(&here.join(usage_file))
                .and_then(|t| t.trim().parse::<u64>().ok())
                .unwrap_or(0);
            let used = match controller {
                Controller::Memory => {
                    let stat = read(&here.join("memory.stat")).unwrap_or_default();
                    usage.saturating_sub(inactive_file(&stat, version))
                }
                Controller::Pids => usage,
            };
            let candidate = Limit {
                controller,
                max,
                used,
                file: here.join(limit_file),
            };
            if best.as_ref().is_none_or(|b| candidate.room() < b.room()) {
                best = Some(candidate);
            }
        }
        if here == top {
            break;
        }
        level = here.parent().filter(|parent| parent.starts_with(top));
    }
    best
}

/// A limit file's value: `max` (v2, and v1 `pids.max`) or an absurdly large number (v1
/// memory) is no limit.
fn parse_limit(text: &str) -> Option<u64> {
    let text = text.trim();
    if text == "max" {
        return None;
    }
    text.parse::<u64>().ok().filter(|&n| n < UNLIMITED_FROM)
}

/// The reclaimable page cache the usage figure includes: `inactive_file` in v2's
/// `memory.stat`, `total_inactive_file` (this cgroup and its children) in v1's. The same
/// working-set figure the kubelet and `docker stats` use.
fn inactive_file(stat: &str, version: Version) -> u64 {
    let key = match version {
        Version::V1 => "total_inactive_file",
        Version::V2 => "inactive_file",
    };
    stat.lines()
        .find_map(|line| {
            let (name, value) = line.split_once(' ')?;
            (name == key).then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    /// This project's test machine: cgroup v1 controllers plus an empty v2 hierarchy
    /// ("hybrid"), the process in a nested memory cgroup.
    const HYBRID_CGROUP: &str = "\
9:name=systemd:/
8:pids:/roomcast-test-7-0
4:memory:/process_api/c3f4
3:cpu,cpuacct:/
0::/
";
    const HYBRID_MOUNTS: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime shared:9 - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    /// A systemd service on a pure v2 host.
    const V2_CGROUP: &str = "0::/system.slice/roomcast.service\n";
    const V2_MOUNTS: &str = "\
25 30 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot
30 1 254:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
";

    fn files(entries: &[(&str, &str)]) -> HashMap<PathBuf, String> {
        entries
            .iter()
            .map(|(path, text)| (PathBuf::from(path), text.to_string()))
            .collect()
    }

    fn tightest_in(
        controller: Controller,
        cgroup: &str,
        mounts: &str,
        fs: &HashMap<PathBuf, String>,
    ) -> Option<Limit> {
        let (dir, top, version) = locate(cgroup, mounts, controller)?;
        tightest(controller, version, &dir, &top, |p| fs.get(p).cloned())
    }

    #[test]
    fn memberships_of_both_versions_parse() {
        let parsed = parse_memberships(HYBRID_CGROUP);
        assert_eq!(parsed.len(), 5);
        assert_eq!(parsed[1].controllers, ["pids"]);
        assert_eq!(parsed[1].path, "/roomcast-test-7-0");
        assert_eq!(parsed[3].controllers, ["cpu", "cpuacct"]);
        assert_eq!(parsed[4].hierarchy, "0");
        assert!(parsed[4].controllers.is_empty());
        // A path with a colon in it stays whole.
        assert_eq!(parse_memberships("0::/a:b\n")[0].path, "/a:b");
    }

    #[test]
    fn mounts_name_their_version_and_controllers() {
        let mounts = parse_mounts(HYBRID_MOUNTS);
        assert_eq!(mounts.len(), 5, "tmpfs is not a cgroup mount");
        assert_eq!(
            mounts[0].v1_controllers.as_deref(),
            Some(&["cpu".to_string(), "cpuacct".to_string()][..])
        );
        assert_eq!(mounts[2].point, Path::new("/sys/fs/cgroup/pids"));
        assert_eq!(mounts[4].v1_controllers, None);
        let escaped = parse_mounts("1 0 0:1 / /mnt/with\\040space rw - cgroup2 none rw\n");
        assert_eq!(escaped[0].point, Path::new("/mnt/with space"));
    }

    #[test]
    fn a_v1_pids_limit_is_found_through_mountinfo() {
        let fs = files(&[
            ("/sys/fs/cgroup/pids/roomcast-test-7-0/pids.max", "64\n"),
            ("/sys/fs/cgroup/pids/roomcast-test-7-0/pids.current", "2\n"),
        ]);
        let limit = tightest_in(Controller::Pids, HYBRID_CGROUP, HYBRID_MOUNTS, &fs).unwrap();
        assert_eq!((limit.max, limit.used, limit.room()), (64, 2, 62));
        assert_eq!(
            limit.to_string(),
            "cgroup pids.max 64 at /sys/fs/cgroup/pids/roomcast-test-7-0/pids.max, 2 in use"
        );
    }

    #[test]
    fn v1_memory_unlimited_is_no_limit_and_a_parent_limit_binds() {
        let unlimited = "9223372036854771712\n";
        let mut fs = files(&[
            (
                "/sys/fs/cgroup/memory/process_api/c3f4/memory.limit_in_bytes",
                unlimited,
            ),
            (
                "/sys/fs/cgroup/memory/process_api/c3f4/memory.usage_in_bytes",
                "5152768\n",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                unlimited,
            ),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", unlimited),
        ]);
        assert_eq!(
            tightest_in(Controller::Memory, HYBRID_CGROUP, HYBRID_MOUNTS, &fs),
            None
        );
        // 1 GiB on the parent, 900 MiB of it used, 100 MiB of that inactive page cache.
        fs.extend(files(&[
            (
                "/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes",
                "1073741824\n",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.usage_in_bytes",
                "943718400\n",
            ),
            (
                "/sys/fs/cgroup/memory/process_api/memory.stat",
                "cache 0\ninactive_file 1\ntotal_inactive_file 104857600\n",
            ),
        ]));
        let limit = tightest_in(Controller::Memory, HYBRID_CGROUP, HYBRID_MOUNTS, &fs).unwrap();
        assert_eq!(limit.max, 1 << 30);
        assert_eq!(limit.used, 800 << 20);
        assert_eq!(
            limit.file,
            Path::new("/sys/fs/cgroup/memory/process_api/memory.limit_in_bytes")
        );
    }

    #[test]
    fn v2_limits_walk_up_to_the_mount_and_the_least_room_wins() {
        let fs = files(&[
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.max",
                "20000\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.current",
                "3\n",
            ),
            ("/sys/fs/cgroup/system.slice/pids.max", "max\n"),
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/memory.max",
                "max\n",
            ),
            ("/sys/fs/cgroup/system.slice/memory.max", "2147483648\n"),
            ("/sys/fs/cgroup/system.slice/memory.current", "1073741824\n"),
            (
                "/sys/fs/cgroup/system.slice/memory.stat",
                "anon 1\ninactive_file 0\n",
            ),
            // The v2 root has no limit files; a stray one above the mount is never read.
            ("/sys/fs/pids.max", "1\n"),
        ]);
        let pids = tightest_in(Controller::Pids, V2_CGROUP, V2_MOUNTS, &fs).unwrap();
        assert_eq!((pids.max, pids.room()), (20_000, 19_997));
        let memory = tightest_in(Controller::Memory, V2_CGROUP, V2_MOUNTS, &fs).unwrap();
        assert_eq!(memory.room(), 1 << 30);
        assert!(memory.to_string().starts_with(
            "cgroup memory.max 2 GiB at /sys/fs/cgroup/system.slice/memory.max, 1 GiB in use"
        ));
    }

    #[test]
    fn a_tighter_child_beats_a_looser_parent() {
        let fs = files(&[
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.max",
                "100\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.current",
                "90\n",
            ),
            ("/sys/fs/cgroup/system.slice/pids.max", "1000\n"),
            ("/sys/fs/cgroup/system.slice/pids.current", "500\n"),
        ]);
        let pids = tightest_in(Controller::Pids, V2_CGROUP, V2_MOUNTS, &fs).unwrap();
        assert_eq!(pids.room(), 10);
        // ...and a parent with less room left beats the child, whatever their limits.
        let fs = files(&[
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.max",
                "100\n",
            ),
            (
                "/sys/fs/cgroup/system.slice/roomcast.service/pids.current",
                "3\n",
            ),
            ("/sys/fs/cgroup/system.slice/pids.max", "1000\n"),
            ("/sys/fs/cgroup/system.slice/pids.current", "995\n"),
        ]);
        let pids = tightest_in(Controller::Pids, V2_CGROUP, V2_MOUNTS, &fs).unwrap();
        assert_eq!(pids.room(), 5);
        assert_eq!(pids.file, Path::new("/sys/fs/cgroup/system.slice/pids.max"));
    }

    #[test]
    fn a_container_sees_its_own_cgroup_at_the_mount_root() {
        // Without a cgroup namespace, /proc/self/cgroup names the full path, and the mount
        // shows that cgroup at its top.
        let cgroup = "5:pids:/docker/ab12\n";
        let mounts = "50 40 0:40 /docker/ab12 /sys/fs/cgroup/pids ro - cgroup cgroup ro,pids\n";
        let fs = files(&[
            ("/sys/fs/cgroup/pids/pids.max", "512\n"),
            ("/sys/fs/cgroup/pids/pids.current", "12\n"),
        ]);
        let pids = tightest_in(Controller::Pids, cgroup, mounts, &fs).unwrap();
        assert_eq!(pids.room(), 500);
        // A cgroup the mount does not show is not guessed at.
        assert_eq!(
            locate("5:pids:/elsewhere\n", mounts, Controller::Pids),
            None
        );
    }

    #[test]
    fn no_cgroup_filesystem_means_no_limit() {
        assert_eq!(
            locate(
                V2_CGROUP,
                "30 1 254:1 / / rw - ext4 /dev/vda1 rw\n",
                Controller::Pids
            ),
            None
        );
        assert_eq!(parse_limit("max\n"), None);
        assert_eq!(parse_limit("garbage"), None);
        assert_eq!(parse_limit("64\n"), Some(64));
    }

    #[test]
    fn this_machine_can_be_read() {
        // Whatever this machine has, reading it must not panic; a found limit has room <= max.
        for controller in [Controller::Memory, Controller::Pids] {
            if let Some(limit) = limit(controller) {
                assert!(limit.room() <= limit.max, "{limit}");
            }
        }
    }
}
