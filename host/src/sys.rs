//! What the operating system allows this process: open files, for client connections.

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
