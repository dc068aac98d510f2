//! Which environment variables a `command` job may set. The worker builds a job's environment
//! from scratch (`worker::sandbox`): a small fixed base, then the job's `env`. Names that would
//! let a job reach into the loader, the shell, the interpreter, the sandbox's own variables or
//! the GPUs it was given are refused at submit (422), and skipped by the worker should a message
//! carry one anyway.

/// Refused names, exactly. Most are glibc's "unsecure" variables (those it drops for setuid
/// programs), plus the shell's and interpreters' startup hooks and what the sandbox sets.
const DENIED: &[&str] = &[
    "PATH",
    "HOME",
    "TMPDIR",
    "USER",
    "LOGNAME",
    "SHELL",
    "PWD",
    "IFS",
    "ENV",
    "BASH_ENV",
    "CDPATH",
    "PYTHONHOME",
    "PYTHONSTARTUP",
    "PERL5OPT",
    "RUBYOPT",
    "NODE_OPTIONS",
    "GCONV_PATH",
    "GETCONF_DIR",
    "GLIBC_TUNABLES",
    "HOSTALIASES",
    "LOCALDOMAIN",
    "LOCPATH",
    "MALLOC_TRACE",
    "NIS_PATH",
    "NLSPATH",
    "RESOLV_HOST_CONF",
    "RES_OPTIONS",
    "TZDIR",
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "NVIDIA_VISIBLE_DEVICES",
];

/// Refused prefixes: the dynamic loader's, the shell's exported functions, and gpuq's own.
const DENIED_PREFIXES: &[&str] = &["LD_", "BASH_FUNC_", "GPUQ_"];

/// Why a job may not set `name`, if it may not.
pub fn refusal(name: &str) -> Option<&'static str> {
    if name.is_empty() || name.contains(['=', '\0']) {
        return Some("is not a variable name");
    }
    if DENIED.contains(&name) {
        return Some("is set by the worker's sandbox, not by a job");
    }
    if DENIED_PREFIXES.iter().any(|p| name.starts_with(p)) {
        return Some("is reserved (the loader's LD_*, the shell's BASH_FUNC_*, gpuq's GPUQ_*)");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_loader_the_path_the_sandbox_and_gpuq_names_are_refused_and_ordinary_ones_pass() {
        for bad in [
            "LD_PRELOAD",
            "LD_LIBRARY_PATH",
            "PATH",
            "HOME",
            "GPUQ_ADMIN_TOKEN",
            "GPUQ_ARRAY_INDEX",
            "BASH_ENV",
            "BASH_FUNC_x%%",
            "PYTHONHOME",
            "CUDA_VISIBLE_DEVICES",
            "GLIBC_TUNABLES",
            "",
            "A=B",
        ] {
            assert!(refusal(bad).is_some(), "{bad:?} accepted");
        }
        for good in [
            "A",
            "WANDB_PROJECT",
            "PYTHONPATH",
            "OMP_NUM_THREADS",
            "path",
            "LD",
        ] {
            assert_eq!(refusal(good), None, "{good:?} refused");
        }
    }
}
