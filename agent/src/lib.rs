//! The Sluice agent: endpoint steering (eBPF), the intercepting proxy, the session controls,
//! reporting, operations endpoints.
//!
//! One folder or file per concept, each owning its errors, with imports that only point down:
//! `config` (the TOML file) and `event` (the activity event) at the bottom; `steer` (eBPF loading,
//! maps, cgroups, process identity); `proxy` (listener, origin claim, interception, the request
//! lifecycle and its inspection pool, splice); `session` (the access and session controls, a flow
//! per request); `bundle` (distribution); `report` (spool, shipping, enrollment, posture events);
//! `posture` (the measured checks of a bundle's `posture.yaml`, and the device facts);
//! `admin` (health, metrics, status); `app` (task supervisor). Builds on `sluice-inspect`,
//! `sluice-policy`, `sluice-net` and `sluice-protocol`.

pub mod admin;
pub mod app;
pub mod bundle;
pub mod client;
pub mod config;
pub mod device;
pub mod event;
pub mod location;
pub mod memory;
pub mod posture;
pub mod privsep;
pub mod proxy;
pub mod redact;
pub mod report;
pub mod session;
pub mod steer;
pub mod trust;
