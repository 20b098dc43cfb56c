//! The per-node agent, as a library (the `lb-agent` binary is `main.rs`): it programs the
//! datapath from Kubernetes objects and keeps it programmed.
//!
//! The pipeline, one module per stage:
//!
//! ```text
//! source (API server watches | YAML files)      objects, as Updates
//!   -> translate                                one Service + its EndpointSlices -> ServiceModel
//!   -> desired                                  every Service's model -> the node's Desired state
//!   -> reconcile                                lb_datapath's planner and writer: Desired -> maps
//! ```
//!
//! Around it: [`config`] (flags), [`run`] (the main loop), [`interfaces`] (which interfaces
//! get which programs), [`metrics`], [`http`] (/healthz, /metrics; [`port_holder`] names who
//! holds a port it cannot listen on), [`healthcheck`]
//! (healthCheckNodePort servers), [`events`] (the datapath's rare events, logged) and
//! [`sysctl`].
//!
//! May depend on `lb-datapath`, `lb-common` and the Kubernetes, HTTP and metrics crates; nothing
//! depends on it but its binary and its tests.

pub mod addr;
pub mod config;
pub mod desired;
pub mod endpoints;
pub mod events;
pub mod healthcheck;
pub mod http;
pub mod interfaces;
pub mod metrics;
pub mod node;
pub mod port_holder;
pub mod reconcile;
pub mod run;
pub mod source;
pub mod sysctl;
pub mod translate;

pub use run::run;
