//! The proxy's sandbox, entered once before its runtime starts (one thread, so every thread
//! created later inherits it):
//!
//! - **Landlock**: the file system is read-only, except the state directory (spool, last good
//!   bundle, risk marks) and the events file; nothing can be executed from a directory the proxy
//!   can write.
//! - **`no_new_privs`**: no set-uid binary or file capability can raise it again.
//! - **seccomp**: an allow-list of the system calls a Tokio, hyper and rustls server uses
//!   ([`allowed`]); `socket` only for Unix, IPv4, IPv6 and netlink, `clone` only for threads (no
//!   namespace flags), `ioctl` only for a few file-descriptor and terminal requests, `prctl` only
//!   for thread names, `bpf` only for element operations on maps passed to it. Anything else
//!   (`execve`, `ptrace`, loading BPF programs or making maps, `mount`, `setuid`, `unshare`,
//!   `keyctl`, `process_vm_*`, `io_uring_*`, ...) fails with `ENOSYS`, as on a kernel without it:
//!   a failure the code handles, where a kill would turn a missed call into an outage.

use std::{collections::BTreeMap, path::PathBuf};

use seccompiler::{
    SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond,
    SeccompFilter, SeccompRule,
};

/// What the sandbox could enforce.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Entered {
    /// Landlock's status (`fully enforced`, `partially enforced`, `not enforced`).
    pub landlock: String,
    /// Whether `no_new_privs` is set.
    pub no_new_privs: bool,
    /// How many system calls the seccomp filter allows.
    pub syscalls: usize,
}

/// Enters the sandbox: `writable` are the only paths the process may change.
pub fn enter(writable: &[PathBuf]) -> Result<Entered, String> {
    let landlock = landlock(writable)?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("no_new_privs: {e}"))?;
    let rules = allowed()?;
    let syscalls = rules.len();
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompAction::Allow,
        arch()?,
    )
    .map_err(|e| format!("seccomp filter: {e}"))?;
    let program: seccompiler::BpfProgram = filter
        .try_into()
        .map_err(|e: seccompiler::BackendError| format!("seccomp filter: {e}"))?;
    seccompiler::apply_filter_all_threads(&program).map_err(|e| format!("seccomp: {e}"))?;
    Ok(Entered {
        landlock,
        no_new_privs: true,
        syscalls,
    })
}

fn arch() -> Result<seccompiler::TargetArch, String> {
    if cfg!(target_arch = "x86_64") {
        Ok(seccompiler::TargetArch::x86_64)
    } else if cfg!(target_arch = "aarch64") {
        Ok(seccompiler::TargetArch::aarch64)
    } else {
        Err("the proxy's seccomp filter is written for x86_64 and aarch64".into())
    }
}

fn landlock(writable: &[PathBuf]) -> Result<String, String> {
    use landlock::{
        ABI, Access, AccessFs, Ruleset, RulesetAttr, RulesetCreatedAttr, RulesetStatus,
        path_beneath_rules,
    };
    let abi = ABI::V3;
    let write_dirs: Vec<&PathBuf> = writable.iter().filter(|p| p.is_dir()).collect();
    let write_files: Vec<&PathBuf> = writable.iter().filter(|p| p.is_file()).collect();
    let err = |e: landlock::RulesetError| format!("landlock: {e}");
    let status = Ruleset::default()
        .handle_access(AccessFs::from_all(abi))
        .map_err(err)?
        .create()
        .map_err(err)?
        .add_rules(path_beneath_rules(["/"], AccessFs::from_read(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(["/dev/null"], AccessFs::from_file(abi)))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            write_dirs,
            AccessFs::from_all(abi) & !AccessFs::Execute,
        ))
        .map_err(err)?
        .add_rules(path_beneath_rules(
            write_files,
            AccessFs::from_file(abi) & !AccessFs::Execute,
        ))
        .map_err(err)?
        .restrict_self()
        .map_err(err)?;
    Ok(match status.ruleset {
        RulesetStatus::FullyEnforced => "fully enforced",
        RulesetStatus::PartiallyEnforced => "partially enforced",
        _ => "not enforced (the kernel has no Landlock)",
    }
    .into())
}

fn cond(arg: u8, op: Op, v: u64) -> Result<Cond, String> {
    Cond::new(arg, Len::Qword, op, v).map_err(|e| e.to_string())
}

fn rule(conds: Vec<Cond>) -> Result<SeccompRule, String> {
    SeccompRule::new(conds).map_err(|e| e.to_string())
}

/// The allow-list: each system call with the conditions on its arguments (none: any).
pub fn allowed() -> Result<BTreeMap<i64, Vec<SeccompRule>>, String> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let plain: &[libc::c_long] = &[
        // Files and descriptors.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_openat,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_lseek,
        libc::SYS_fcntl,
        libc::SYS_flock,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_mkdirat,
        libc::SYS_unlinkat,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_linkat,
        libc::SYS_readlinkat,
        libc::SYS_fchmod,
        libc::SYS_fchmodat,
        libc::SYS_utimensat,
        libc::SYS_copy_file_range,
        libc::SYS_sendfile,
        libc::SYS_dup,
        libc::SYS_dup3,
        libc::SYS_pipe2,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_umask,
        // Memory.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_membarrier,
        // Threads, time, signals.
        libc::SYS_futex,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_rseq,
        libc::SYS_set_tid_address,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_getpid,
        libc::SYS_gettid,
        libc::SYS_getppid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_getrandom,
        libc::SYS_uname,
        libc::SYS_sysinfo,
        libc::SYS_getrlimit,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        // Event loop.
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_ppoll,
        libc::SYS_pselect6,
        // Sockets (created only in the families below).
        libc::SYS_connect,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_socketpair,
        // A panic's abort signals this process only.
        libc::SYS_tgkill,
    ];
    #[cfg(target_arch = "x86_64")]
    let legacy: &[libc::c_long] = &[
        libc::SYS_open,
        libc::SYS_stat,
        libc::SYS_lstat,
        libc::SYS_access,
        libc::SYS_readlink,
        libc::SYS_rename,
        libc::SYS_unlink,
        libc::SYS_mkdir,
        libc::SYS_rmdir,
        libc::SYS_pipe,
        libc::SYS_dup2,
        libc::SYS_poll,
        libc::SYS_select,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_create,
        libc::SYS_arch_prctl,
        libc::SYS_chmod,
    ];
    #[cfg(not(target_arch = "x86_64"))]
    let legacy: &[libc::c_long] = &[];
    for n in plain.iter().chain(legacy) {
        m.insert(*n, Vec::new());
    }
    // socket(domain, ...): Unix, IPv4, IPv6, netlink (the resolver's interface list, sock_diag
    // lookups of steered clients).
    m.insert(
        libc::SYS_socket,
        [
            libc::AF_UNIX,
            libc::AF_INET,
            libc::AF_INET6,
            libc::AF_NETLINK,
        ]
        .iter()
        .map(|&d| rule(vec![cond(0, Op::Eq, d as u64)?]))
        .collect::<Result<_, _>>()?,
    );
    // clone(flags, ...): threads only, never a new namespace.
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWCGROUP) as u64;
    m.insert(
        libc::SYS_clone,
        vec![rule(vec![
            cond(0, Op::MaskedEq(namespaces), 0)?,
            cond(
                0,
                Op::MaskedEq(libc::CLONE_THREAD as u64),
                libc::CLONE_THREAD as u64,
            )?,
        ])?],
    );
    // ioctl(fd, request): non-blocking and close-on-exec flags, readable bytes, terminals' size
    // and mode (never TIOCSTI).
    m.insert(
        libc::SYS_ioctl,
        [
            libc::FIONBIO,
            libc::FIOCLEX,
            libc::FIONCLEX,
            libc::FIONREAD,
            libc::TIOCOUTQ,
            libc::TCGETS,
            libc::TIOCGWINSZ,
        ]
        .iter()
        .map(|&r| rule(vec![cond(1, Op::Eq, r)?]))
        .collect::<Result<_, _>>()?,
    );
    // bpf(cmd, ...): looking up, updating and deleting elements of maps whose descriptors the
    // privileged part passed (the kernel splice's; the steering's origins map, read-only); no
    // program or map is made or loaded.
    m.insert(
        libc::SYS_bpf,
        [
            crate::proxy::ksplice::BPF_MAP_LOOKUP_ELEM,
            crate::proxy::ksplice::BPF_MAP_UPDATE_ELEM,
            crate::proxy::ksplice::BPF_MAP_DELETE_ELEM,
        ]
        .iter()
        .map(|&c| rule(vec![cond(0, Op::Eq, c)?]))
        .collect::<Result<_, _>>()?,
    );
    // prctl(option, ...): thread names only.
    m.insert(
        libc::SYS_prctl,
        [libc::PR_SET_NAME, libc::PR_GET_NAME]
            .iter()
            .map(|&o| rule(vec![cond(0, Op::Eq, o as u64)?]))
            .collect::<Result<_, _>>()?,
    );
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_allow_list_compiles_and_leaves_out_the_dangerous_calls() {
        let rules = allowed().expect("rules");
        for banned in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_mount,
            libc::SYS_setuid,
            libc::SYS_unshare,
            libc::SYS_setns,
            libc::SYS_process_vm_readv,
            libc::SYS_keyctl,
            libc::SYS_io_uring_setup,
            libc::SYS_perf_event_open,
            libc::SYS_clone3,
            libc::SYS_kill,
        ] {
            assert!(!rules.contains_key(&banned), "{banned} allowed");
        }
        let filter = SeccompFilter::new(
            rules,
            SeccompAction::Errno(libc::ENOSYS as u32),
            SeccompAction::Allow,
            arch().expect("arch"),
        )
        .expect("filter");
        let prog: Result<seccompiler::BpfProgram, _> = filter.try_into();
        assert!(prog.is_ok());
    }
}
