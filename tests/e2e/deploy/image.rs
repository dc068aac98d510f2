//! deploy/Dockerfile and .dockerignore: a multi-stage, non-root image with a healthcheck and
//! pinned bases that caches every member's dependencies and installs every binary.

use super::*;

/// The Dockerfile's instructions, continuation lines joined, comments dropped.
fn dockerfile() -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    for line in read("deploy/Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(body) = t.strip_suffix('\\') {
            cur.push_str(body);
            cur.push(' ');
        } else {
            cur.push_str(t);
            if !cur.trim().is_empty() {
                out.push(cur.trim().to_string());
            }
            cur.clear();
        }
    }
    out
}

fn workspace_members() -> Vec<String> {
    let toml = read("Cargo.toml");
    let start = toml.find("members").expect("workspace members");
    let list = &toml[start..toml[start..].find(']').map(|e| start + e).unwrap()];
    list.split('"')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

fn binaries_of(member: &str) -> Vec<String> {
    let manifest = read(&format!("{member}/Cargo.toml"));
    let mut bins = Vec::new();
    let mut in_bin = false;
    for line in manifest.lines().map(str::trim) {
        if line.starts_with('[') {
            in_bin = line == "[[bin]]";
        } else if in_bin && let Some(v) = line.strip_prefix("name") {
            bins.push(
                v.trim_start_matches([' ', '='])
                    .trim()
                    .trim_matches('"')
                    .to_string(),
            );
        }
    }
    bins
}

#[test]
fn the_dockerfile_is_multi_stage_non_root_with_a_healthcheck_and_pinned_bases() {
    let lines = dockerfile();
    let mut errors = Vec::new();
    let mut stages = Vec::new();
    let mut last_stage_start = 0;
    // The ARGs before the first FROM, with their defaults: what a user's build takes.
    let args: Vec<(String, String)> = lines
        .iter()
        .take_while(|l| !l.starts_with("FROM "))
        .filter_map(|l| l.strip_prefix("ARG ")?.split_once('='))
        .map(|(k, v)| (format!("${{{k}}}"), v.to_string()))
        .collect();
    for (i, l) in lines.iter().enumerate() {
        let Some(rest) = l.strip_prefix("FROM ") else {
            continue;
        };
        last_stage_start = i;
        let words: Vec<&str> = rest
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let image = args
            .iter()
            .fold(words[0].to_string(), |w, (k, v)| w.replace(k, v));
        let image = image.as_str();
        if image == "scratch" {
            if let Some(p) = words.iter().position(|w| w.eq_ignore_ascii_case("AS")) {
                stages.push(words[p + 1].to_string());
            }
            continue;
        }
        if let Some(alias) = words
            .iter()
            .position(|w| w.eq_ignore_ascii_case("AS"))
            .map(|p| words[p + 1])
        {
            stages.push(alias.to_string());
        }
        if stages.iter().any(|s| s == image) || image.contains('@') {
            continue;
        }
        match image.rsplit_once(':') {
            Some((_, tag)) if tag != "latest" && tag.chars().any(|c| c.is_ascii_digit()) => {}
            _ => errors.push(format!("FROM {image} is not pinned to a version")),
        }
    }
    if stages.len() < 2 {
        errors.push(format!(
            "{} named stage(s): the image is not multi-stage",
            stages.len()
        ));
    }
    let last = &lines[last_stage_start..];
    match last.iter().rev().find_map(|l| l.strip_prefix("USER ")) {
        Some(user) if !matches!(user.split(':').next().unwrap().trim(), "root" | "0") => {}
        other => errors.push(format!(
            "the runtime stage runs as {other:?}, not an unprivileged user"
        )),
    }
    match last.iter().find(|l| l.starts_with("HEALTHCHECK ")) {
        Some(h) if h.contains("/healthz") => {}
        other => errors.push(format!("the runtime stage's HEALTHCHECK is {other:?}")),
    }
    if !last
        .iter()
        .any(|l| l.starts_with("LABEL ") && l.contains("org.opencontainers.image"))
    {
        errors.push("the runtime stage has no OCI labels".into());
    }
    assert_no_errors("deploy/Dockerfile", errors);
}

#[test]
fn the_dockerfile_caches_dependencies_for_every_member_and_installs_every_binary() {
    let lines = dockerfile();
    let text = lines.join("\n");
    let mut errors = Vec::new();
    let first_run = lines
        .iter()
        .position(|l| l.starts_with("RUN "))
        .expect("a RUN");
    let dep_copies: Vec<&String> = lines[..first_run]
        .iter()
        .filter(|l| l.starts_with("COPY "))
        .collect();
    let copied = |path: &str| {
        dep_copies
            .iter()
            .any(|l| l.split_whitespace().any(|w| w == path))
    };
    for path in ["Cargo.toml", "Cargo.lock"] {
        if !copied(path) {
            errors.push(format!("the dependency layer does not copy {path}"));
        }
    }
    let mut binaries = BTreeSet::new();
    for member in workspace_members() {
        if !copied(&format!("{member}/Cargo.toml")) {
            errors.push(format!(
                "the dependency layer does not copy {member}/Cargo.toml"
            ));
        }
        binaries.extend(binaries_of(&member));
    }
    if lines[first_run..]
        .iter()
        .filter(|l| l.contains("cargo build --release --locked --bins"))
        .count()
        < 2
    {
        errors.push(
            "want `cargo build --release --locked --bins` for the dependencies and for gpuq".into(),
        );
    }
    for bin in ["gpuq-gateway", "gpuq-worker", "gpuq-manager", "gpuq"] {
        if !binaries.contains(bin) {
            errors.push(format!("no workspace member builds {bin}"));
        }
    }
    for bin in &binaries {
        if !text.contains(&format!("target/release/{bin} "))
            && !text.contains(&format!("target/release/{bin}\n"))
        {
            errors.push(format!("the image does not take {bin} from the build"));
        }
    }
    // The runtime takes /out of the `binaries` stage, which is the builder's unless
    // BINARIES=host (scripts/compose.sh) says otherwise.
    if !text.contains("COPY --from=binaries /out/ /usr/local/bin/")
        || !text.contains("ARG BINARIES=source")
        || !text.contains("FROM builder AS binaries-source")
        || !text.contains("FROM binaries-${BINARIES} AS binaries")
    {
        errors.push("the builder's binaries do not land in /usr/local/bin by default".into());
    }
    assert_no_errors("deploy/Dockerfile", errors);
}

#[test]
fn the_dockerignore_lets_in_everything_the_dockerfile_copies_and_nothing_secret() {
    let rules: Vec<String> = read(".dockerignore")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert_eq!(
        rules.first().map(String::as_str),
        Some("*"),
        ".dockerignore should start by excluding everything"
    );
    let allowed: Vec<&str> = rules.iter().filter_map(|r| r.strip_prefix('!')).collect();
    let mut errors = Vec::new();
    for l in dockerfile()
        .iter()
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from"))
    {
        let words: Vec<&str> = l
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            let ok = allowed.iter().any(|a| {
                let a = a.trim_end_matches('/');
                *src == a || src.starts_with(&format!("{a}/"))
            });
            if !ok {
                errors.push(format!(
                    "COPY {src}: .dockerignore keeps it out of the build context"
                ));
            }
        }
    }
    for a in &allowed {
        if a.contains(".env") {
            errors.push(format!(".dockerignore lets in {a}"));
        }
    }
    assert_no_errors(".dockerignore", errors);
}
