//! What the operating system gives this process and tells it: open files for client
//! connections, memory handed back after a model unloads, per-thread CPU time.

/// The soft limit on open file descriptors (each client connection holds one).
pub fn open_file_limit() -> usize {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes only into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1024;
    }
    usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
}

/// Raises the soft open-file limit to the hard limit, as servers holding many connections
/// do (the soft default, often 1024, is for interactive shells). Returns the new limit.
pub fn raise_open_file_limit() -> std::io::Result<usize> {
    let mut limit = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit and setrlimit only read or write the struct they are given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit { rlim_cur: limit.rlim_max, rlim_max: limit.rlim_max };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(open_file_limit())
}

/// libgomp's spin count after a parallel region when the operator sets none. Its default
/// (300,000 spins, about 3 ms) keeps a core busy after every batch step, exactly when the
/// guests answered by that step need the CPU to choose their next tokens; 30,000 (~0.3 ms)
/// still covers the gaps inside a step. Measured with `flywheel bench plugin --n 16` on
/// 2 cores, five runs each: Python guests at a median 0.98x the engine and JS at 0.93x,
/// against single runs anywhere from 0.77x to 1.07x by default.
pub const OPENMP_SPIN_COUNT: &str = "30000";

/// Sets `GOMP_SPINCOUNT` for llama.cpp's OpenMP threads by re-executing this binary with it
/// in the environment: libgomp reads its settings once, when it is loaded, before `main`.
/// Does nothing when the operator set `GOMP_SPINCOUNT` or `OMP_WAIT_POLICY`; returns only
/// when nothing needed doing or the re-exec failed (the error says why).
pub fn limit_openmp_spinning() -> std::io::Result<()> {
    use std::os::unix::process::CommandExt;
    if std::env::var_os("GOMP_SPINCOUNT").is_some() || std::env::var_os("OMP_WAIT_POLICY").is_some() {
        return Ok(());
    }
    let exe = std::env::current_exe()?;
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| exe.clone().into_os_string());
    Err(std::process::Command::new(exe).arg0(arg0).args(args).env("GOMP_SPINCOUNT", OPENMP_SPIN_COUNT).exec())
}

/// Hands memory the allocator holds but no longer uses back to the system. Called after a
/// model unloads: glibc keeps freed heap (and raises its mmap threshold after large frees,
/// so later large buffers land on the heap too), and an unloaded model would otherwise not
/// shrink the process.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Memory the kernel says new allocations can get without swapping (`MemAvailable`), in
/// bytes; `None` where /proc/meminfo does not say.
pub fn available_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// CPU time the calling thread has used so far.
pub fn thread_cpu_time() -> std::time::Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes only into the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) } != 0 {
        return std::time::Duration::ZERO;
    }
    std::time::Duration::new(u64::try_from(ts.tv_sec).unwrap_or(0), u32::try_from(ts.tv_nsec).unwrap_or(0))
}
