//! Small network building blocks that the agent, the policy engine and the collector share:
//! address blocks ([`Cidr`]), host patterns ([`HostPattern`]) and a stream wrapper that notes when
//! bytes last moved ([`idle`]).
//!
//! Imports nothing of Sluice's own: everything above it may depend on it.

mod cidr;
mod host;
pub mod idle;

pub use cidr::Cidr;
pub use host::HostPattern;
