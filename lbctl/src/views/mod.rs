//! The views lbctl shows, each built from the maps as plain serde structures: their JSON is
//! lbctl's `--output json`, whose field names are part of lbctl's interface and documented on
//! the fields. Nothing here writes a map or formats text for people (that is `render`).
//!
//! | view | function | JSON |
//! |---|---|---|
//! | `lbctl maps dump` | [`dump::dump`] | [`dump::Dump`]: one key per map name, each an array of rows |
//! | `lbctl service list` | [`services::list`] | array of [`services::ServiceListRow`] |
//! | `lbctl ct list` | [`ct::list`] | array of [`ct::FlowRow`] |
//! | `lbctl stats` | [`stats::read`] | [`stats::Stats`] |
//! | `lbctl trace` | [`trace::forward`], [`trace::reply`] | [`trace::Trace`] and its explanation (`render::trace::Explained`) |
//! | `lbctl trace-connect` | [`sock_trace::trace`] | [`sock_trace::SockTrace`] |
//!
//! Addresses are strings (`"10.0.1.2"`, or `"10.0.1.2:40000"` with a port), protocols are
//! `"tcp"`, `"udp"`, `"sctp"`, `"icmp"` or the protocol number as a string, scopes `"internal"` or
//! `"external"`, flags arrays of snake_case names (bits without a name appear as `"0x.."`), and
//! remaining lifetimes are whole seconds against `predict::coarse_now_ns()` (negative once
//! expired). Fields named `service_id` hold a backend set's id: the frontends of one Service
//! share a set, and the JSON keeps the name it always had.

pub mod ct;
pub mod dump;
pub mod rows;
pub mod services;
pub mod sock_trace;
pub mod stats;
pub mod trace;
