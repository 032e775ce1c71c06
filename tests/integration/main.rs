//! Integration tests: the real server on `127.0.0.1:0`, real WebSocket clients over TCP.

mod support;

#[cfg(feature = "redis")]
mod backplane;
mod binary;
mod browser;
mod burst;
mod capacity;
mod cgroup;
#[cfg(feature = "redis")]
mod cluster_moderation;
#[cfg(feature = "redis")]
mod cluster_outage;
#[cfg(feature = "redis")]
mod cluster_v1;
mod endpoints;
mod flags;
mod hostile;
mod identity;
mod limits;
mod live;
mod relay;
mod shutdown;
mod slow;
mod supervision;
mod threshold;
mod v1;
