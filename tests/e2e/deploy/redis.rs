//! Redis in compose: each gpuq service's own ACL user, gpuq's keys only and no dangerous command.

use super::*;

/// Least privilege in Redis: each gpuq service logs in as its own ACL user, which the redis
/// service defines (`--user …`) with gpuq's keys and channels only and nothing of @dangerous.
#[test]
fn redis_gives_each_service_a_user_with_gpuq_keys_only_and_no_dangerous_command() {
    let c = main_compose();
    let mut errors = Vec::new();
    let command = str_list(c.services.get("redis").expect("redis").get("command"));
    // `--user NAME RULE…`: every word up to the next `--option` (Redis reads an argument with
    // spaces as one word, so each rule is an argument of its own).
    let mut users: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut args = command.iter().peekable();
    while let Some(arg) = args.next() {
        if arg != "--user" {
            continue;
        }
        let mut words = vec![];
        while let Some(w) = args.next_if(|w| !w.starts_with("--")) {
            if w.contains(' ') {
                errors.push(format!(
                    "redis: {w:?} holds a space (Redis reads it as one word)"
                ));
            }
            words.push(w.clone());
        }
        if let Some((name, rules)) = words.split_first() {
            users.insert(name.clone(), rules.to_vec());
        }
    }
    for (name, s) in c.services.iter().filter(|(_, s)| is_gpuq(s)) {
        let settings = settings_of(s).unwrap();
        let binary = gpuq_binary(s);
        let user = user_of_url(&settings.redis_url).unwrap_or_default();
        if user != binary {
            errors.push(format!(
                "{name} logs in to Redis as {user:?}: each service has its own user, {binary}"
            ));
        }
        let Some(rules) = users.get(&user) else {
            errors.push(format!("{name}: redis defines no user {user:?}"));
            continue;
        };
        let has = |w: &str| rules.iter().any(|r| r == w);
        for want in ["on", "~gpuq:*", "resetchannels", "&gpuq:*", "-@all"] {
            if !has(want) {
                errors.push(format!("{user}: the rules lack {want}: {rules:?}"));
            }
        }
        if rules.last().map(String::as_str) != Some("-@dangerous") {
            errors.push(format!(
                "{user}: the rules must end with -@dangerous: {rules:?}"
            ));
        }
        for r in rules {
            let broad = (r.starts_with('~') || r.starts_with('%')) && !r.ends_with("gpuq:*")
                || (r.starts_with('&') && r != "&gpuq:*")
                || matches!(
                    r.as_str(),
                    "allkeys" | "allchannels" | "allcommands" | "nopass"
                )
                || (r.starts_with("+@") && r != "+@connection");
            if broad {
                errors.push(format!("{user}: {r} reaches beyond what it needs"));
            }
        }
        if !rules.iter().any(|r| r.starts_with('>')) {
            errors.push(format!("{user} has no password"));
        }
    }
    assert_no_errors("the redis service's users", errors);
}
