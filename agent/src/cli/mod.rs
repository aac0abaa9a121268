//! Parts of the `sluice` command that are more than a call into the library: the people's view of
//! `/status` (`sluice status`) and putting the interception CA into the host's trust stores
//! (`sluice ca trust`). They live beside `main.rs` because only the command uses them.

pub mod status;
pub mod trust_store;
