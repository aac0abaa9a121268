//! The Sluice agent: endpoint steering (eBPF), the transparent proxy, operations endpoints.
//!
//! One folder or file per concept, each owning its errors: `steer` (eBPF loading, maps, cgroups,
//! process identity), `proxy` (listener, origin claim, splice), `admin` (health, metrics, status),
//! `config` (the TOML file), `app` (task supervisor).

pub mod admin;
pub mod app;
pub mod bundle;
pub mod config;
pub mod event;
pub mod proxy;
pub mod report;
pub mod session;
pub mod steer;
