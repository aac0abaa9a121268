//! The kernel splice's privileged half: loads the stream verdict program (`sluice_splice`) and
//! the two maps it uses, attaches the program to the socket map, and keeps them for the agent's
//! life. The proxy gets the maps' descriptors with its listening sockets and joins the two
//! sockets of a connection it does not inspect itself ([`crate::proxy::ksplice`]); no round trip
//! to this process per connection.
//!
//! The object's other maps are made as small as the kernel allows here: this instance only
//! needs the splice's (steering loads its own).

use std::os::fd::{AsFd as _, OwnedFd};

use aya::{
    EbpfLoader,
    maps::{MapData, SockHash},
    programs::SkSkb,
};

use super::{EBPF_OBJECT, SteerError, chain};

/// The loaded program and maps.
pub struct KernelSplice {
    _ebpf: aya::Ebpf,
    sockets: SockHash<MapData, u64>,
    peers: aya::maps::Map,
}

impl std::fmt::Debug for KernelSplice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelSplice").finish_non_exhaustive()
    }
}

impl KernelSplice {
    /// Loads and attaches; an error says why the kernel splice is not available (the proxy
    /// then copies in user space).
    pub fn load() -> Result<Self, SteerError> {
        if EBPF_OBJECT.is_empty() {
            return Err(SteerError::NoObject);
        }
        let mut loader = EbpfLoader::new();
        // No CO-RE relocation in the splice program: the kernel's BTF goes unused.
        loader.btf(None);
        loader.map_max_entries(sluice_common::MAP_ORIGINS, 1);
        loader.map_max_entries(sluice_common::MAP_DNS, 4096);
        let mut ebpf = loader
            .load(EBPF_OBJECT)
            .map_err(|e| SteerError::Load(chain(&e)))?;
        let take = |ebpf: &mut aya::Ebpf, name: &'static str| {
            ebpf.take_map(name).ok_or(SteerError::Map {
                map: name,
                message: "missing from the object".into(),
            })
        };
        let sockets: SockHash<MapData, u64> =
            SockHash::try_from(take(&mut ebpf, sluice_common::MAP_SPLICE)?).map_err(|e| {
                SteerError::Map {
                    map: sluice_common::MAP_SPLICE,
                    message: chain(&e),
                }
            })?;
        let peers = take(&mut ebpf, sluice_common::MAP_SPLICE_PEERS)?;
        let name = sluice_common::PROGRAM_SPLICE;
        let prog: &mut SkSkb = ebpf
            .program_mut(name)
            .ok_or_else(|| SteerError::Load(format!("{name} missing")))?
            .try_into()
            .map_err(|e: aya::programs::ProgramError| SteerError::Load(e.to_string()))?;
        prog.load()
            .map_err(|e| SteerError::Load(format!("{name}: {}", chain(&e))))?;
        prog.attach(sockets.fd())
            .map_err(|e| SteerError::Load(format!("attaching {name}: {}", chain(&e))))?;
        Ok(Self {
            _ebpf: ebpf,
            sockets,
            peers,
        })
    }

    /// Descriptors of the socket map and the pairs map, for the proxy.
    pub fn fds(&self) -> Result<(OwnedFd, OwnedFd), std::io::Error> {
        let sockets = self.sockets.fd().as_fd().try_clone_to_owned()?;
        let peers = match &self.peers {
            aya::maps::Map::HashMap(m) => m.fd().as_fd().try_clone_to_owned()?,
            _ => {
                return Err(std::io::Error::other(format!(
                    "{} is not a hash map",
                    sluice_common::MAP_SPLICE_PEERS
                )));
            }
        };
        Ok((sockets, peers))
    }
}
