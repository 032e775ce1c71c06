//! The state every connection thread shares: configuration, the hub, counters, the
//! broadcaster's inbox, and what the endpoints report (draining, failures, the Redis link).
//!
//! It lives apart from the acceptor that creates it so that imports point one way: the
//! connection threads and the HTTP endpoints depend on this, not on `server`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::backplane::{self, Backplane};
use crate::config::Config;
use crate::relay::broadcaster::{Events, Message};
use crate::relay::hub::Hub;
use crate::relay::room_state::RoomStates;
use crate::relay::users::Users;
use crate::stats::Stats;
use crate::supervisor::Supervisor;
use crate::v1::codec::Presence;

/// State every connection thread needs. Shared as `Arc<Shared>`, dropped when the last
/// connection thread and the acceptor are done.
pub(crate) struct Shared {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub stats: Arc<Stats>,
    /// The broadcaster's inbox. Connection threads send; the broadcaster alone receives.
    pub events: Events,
    /// Connections per peer IP, for `--max-clients-per-ip`. Incremented by the acceptor,
    /// decremented by each connection thread as it ends; entries at zero are removed.
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Set once by the broadcaster when shutdown begins, before it sends any close frame, and
    /// never cleared. Connection threads read it: while draining, upgrades are refused and
    /// `/healthz` answers `503 draining`.
    pub draining: Arc<AtomicBool>,
    /// The Redis link shared with other instances, with `--redis`.
    pub backplane: Option<Arc<Backplane>>,
    /// Which vital thread, if any, has died (see `supervisor`); read by `/healthz`.
    pub supervisor: Arc<Supervisor>,
    /// Every room's epoch and `seq`, kept by the broadcaster, read by the rooms API.
    pub room_states: Arc<RoomStates>,
    /// Verified users across their connections: the per-user cap, rate limit and bans. Shared
    /// with the Redis subscriber, which records other instances' bans in it.
    pub users: Arc<Users>,
}

impl Shared {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Sends a message on its way to `room`: with `--redis` into the publish queue (which
    /// drops it when full), else straight to the broadcaster. See `backplane::relay`.
    pub fn relay(&self, message: Message) -> backplane::Relayed {
        backplane::relay(self.backplane.as_deref(), &self.events, message)
    }

    /// Every room with its member count: across the cluster with `--redis`, else here.
    pub fn rooms(&self) -> Vec<(String, usize)> {
        let local = self.hub.rooms();
        match &self.backplane {
            Some(backplane) => backplane.cluster_rooms(local),
            None => local,
        }
    }

    /// Clients and distinct users of one room: across the cluster with `--redis` (users
    /// summed over the instances), else here.
    pub fn presence(&self, room: &str) -> Presence {
        let local = self.hub.presence(room);
        match &self.backplane {
            Some(backplane) => backplane::cluster::add(local, backplane.remote_presence(room)),
            None => local,
        }
    }

    /// Members of one room: across the cluster with `--redis`, else here.
    pub fn room_size(&self, room: &str) -> usize {
        let local = self.hub.room_size(room);
        match &self.backplane {
            Some(backplane) => backplane.cluster_room_size(room, local),
            None => local,
        }
    }
}
