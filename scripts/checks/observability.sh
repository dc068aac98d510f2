#!/usr/bin/env bash
# Static checks of gpuq's observability configuration (issue 5): Prometheus configs and alert
# rules (promtool), the alert rules' unit tests, the Grafana provisioning and dashboards, the
# Loki and Promtail configs, and a cross-check of every metric name, label and variable that a
# dashboard or an alert uses against what gpuq defines (crates/common/src/metrics.rs), what the
# Prometheus configs attach, and what the RabbitMQ 3.10 prometheus plugin exports.
#
#   scripts/checks/observability.sh        (run by scripts/test.sh after the Rust tests)
#
# Needs promtool (Debian's `prometheus` package; installed when missing) and python3 with
# PyYAML (installed with pip, or Debian's python3-yaml, when missing). Runs nothing else and
# starts no service: the live evaluation of every expression is a separate test.
set -euo pipefail

# shellcheck source=scripts/lib.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)/lib.sh"

ROOT="$GPUQ_REPO_ROOT"
cd "$ROOT"
T0="$(now_s)"
TMP="$(mktemp -d "${TMPDIR:-/tmp}/gpuq-obs-check.XXXXXX")"
trap 'rm -rf "$TMP"' EXIT

PASSED=0
FAILED=()

# check NAME COMMAND... : runs one check, prints its result and time, keeps going on failure.
check() {
  local name="$1" t rc=0
  shift
  t="$(now_s)"
  "$@" >"$TMP/out" 2>&1 || rc=$?
  if [ "$rc" -eq 0 ]; then
    PASSED=$((PASSED + 1))
    printf '  ok    %-62s %5ss\n' "$name" "$(elapsed "$t")" >&2
  else
    FAILED+=("$name")
    printf '  FAIL  %-62s %5ss\n' "$name" "$(elapsed "$t")" >&2
    sed 's/^/        /' "$TMP/out" >&2
  fi
}

# --- tools ---------------------------------------------------------------------------------
have promtool || apt_install prometheus
have promtool || die "promtool not found after installing Debian's prometheus package"

PY=python3
if ! "$PY" -c 'import yaml' 2>/dev/null; then
  log "PyYAML is missing; installing it"
  "$PY" -m pip install --quiet pyyaml >&2 2>/dev/null || true
  if ! "$PY" -c 'import yaml' 2>/dev/null; then
    apt_install python3-yaml
    PY=/usr/bin/python3
  fi
  "$PY" -c 'import yaml' || die "cannot import yaml in python3"
fi

log "observability checks ($(promtool --version 2>&1 | head -n 1))"

# --- Prometheus ----------------------------------------------------------------------------
# rule_files are relative to each config file's directory (`alerts.yml`), so the compose config
# (mounted at /etc/prometheus) checks as it is from the checkout.
check "promtool check config deploy/prometheus/prometheus.yml" \
  promtool check config deploy/prometheus/prometheus.yml
check "promtool check config deploy/prometheus/prometheus.local.yml" \
  promtool check config deploy/prometheus/prometheus.local.yml
check "promtool check rules deploy/prometheus/alerts.yml" \
  promtool check rules deploy/prometheus/alerts.yml
check "promtool test rules deploy/prometheus/alerts_test.yml" \
  promtool test rules deploy/prometheus/alerts_test.yml

# --- static cross-checks (python) ------------------------------------------------------------
# Writes $TMP/dashboard_exprs.yml: every dashboard PromQL expression (variables substituted) as
# a recording rule, so that promtool parses each one.
cat >"$TMP/static.py" <<'PYEOF'
import json
import os
import re
import sys

import yaml

ROOT, OUT = sys.argv[1], sys.argv[2]
errors = []


def err(msg):
    errors.append(msg)


def load_yaml(rel):
    try:
        with open(os.path.join(ROOT, rel)) as f:
            return yaml.safe_load(f)
    except Exception as e:  # noqa: BLE001
        err(f"{rel}: not valid YAML: {e}")
        return None


# ---- what gpuq defines: crates/common/src/metrics.rs -----------------------------------------
src = open(os.path.join(ROOT, "crates/common/src/metrics.rs")).read()
defined = set(re.findall(r'"(gpuq_[a-z0-9_]+)"', src))
labels_of = {n: set() for n in defined}
histograms = set()
for kind, name, labels in re.findall(
        r'\b(counter|gauge_vec|int_gauge_vec|histogram)\(\s*&?r,\s*"(gpuq_[a-z0-9_]+)",\s*'
        r'"(?:[^"\\]|\\.)*",\s*&\[([^\]]*)\]', src):
    labels_of[name] = set(re.findall(r'"([a-z_]+)"', labels))
    if kind == "histogram":
        histograms.add(name)
if not defined or not histograms:
    err("crates/common/src/metrics.rs: found no metric definitions (did its layout change?)")

# Metrics not defined by gpuq that dashboards and alerts may use.
PROCESS = {  # the Rust prometheus crate's process collector (every gpuq service)
    "process_cpu_seconds_total", "process_open_fds", "process_max_fds",
    "process_virtual_memory_bytes", "process_resident_memory_bytes",
    "process_start_time_seconds", "process_threads",
}
# Verified on the /metrics endpoint (aggregated) of RabbitMQ 3.10.8's prometheus plugin.
RABBITMQ = {
    "rabbitmq_alarms_file_descriptor_limit", "rabbitmq_alarms_free_disk_space_watermark",
    "rabbitmq_alarms_memory_used_watermark", "rabbitmq_build_info", "rabbitmq_identity_info",
    "rabbitmq_channels", "rabbitmq_connections", "rabbitmq_consumers", "rabbitmq_queues",
    "rabbitmq_queue_messages", "rabbitmq_queue_messages_ready", "rabbitmq_queue_messages_unacked",
    "rabbitmq_queue_consumers", "rabbitmq_global_consumers", "rabbitmq_global_publishers",
    "rabbitmq_global_messages_received_total", "rabbitmq_global_messages_routed_total",
    "rabbitmq_global_messages_confirmed_total", "rabbitmq_global_messages_delivered_total",
    "rabbitmq_global_messages_redelivered_total", "rabbitmq_global_messages_acknowledged_total",
    "rabbitmq_global_messages_dead_lettered_delivery_limit_total",
    "rabbitmq_global_messages_dead_lettered_expired_total",
    "rabbitmq_global_messages_dead_lettered_rejected_total",
    "rabbitmq_global_messages_dead_lettered_maxlen_total",
    "rabbitmq_global_messages_unroutable_dropped_total",
    "rabbitmq_global_messages_unroutable_returned_total",
    "rabbitmq_disk_space_available_bytes", "rabbitmq_process_resident_memory_bytes",
    "rabbitmq_resident_memory_limit_bytes", "rabbitmq_raft_term_total",
    "rabbitmq_erlang_uptime_seconds",
}
OTHER = {"up"}
TARGET_LABELS = {"job", "instance", "engine"}  # attached by the Prometheus configs

# ---- Prometheus configs ---------------------------------------------------------------------
JOBS = {"gpuq-gateway", "gpuq-manager", "gpuq-worker", "rabbitmq"}
EXPECTED_TARGETS = {
    "deploy/prometheus/prometheus.yml": {
        "gpuq-gateway": ["gateway:8080"], "gpuq-manager": ["manager:8090"],
        "gpuq-worker": ["worker1:9001", "worker2:9001", "worker3:9001"],
        "rabbitmq": ["rabbitmq1:15692", "rabbitmq2:15692", "rabbitmq3:15692"]},
    "deploy/prometheus/prometheus.local.yml": {
        "gpuq-gateway": ["127.0.0.1:8080"], "gpuq-manager": ["127.0.0.1:8090"],
        "gpuq-worker": ["127.0.0.1:9001", "127.0.0.1:9002", "127.0.0.1:9003"],
        "rabbitmq": ["127.0.0.1:15692", "127.0.0.1:15693", "127.0.0.1:15694"]},
}
engine_labels = {}
for rel, expected in EXPECTED_TARGETS.items():
    cfg = load_yaml(rel) or {}
    if cfg.get("rule_files") != ["alerts.yml"]:
        err(f"{rel}: rule_files must be [alerts.yml] (relative to the config's directory)")
    got, engines = {}, []
    for sc in cfg.get("scrape_configs") or []:
        targets = []
        for st in sc.get("static_configs") or []:
            targets += st.get("targets") or []
            if sc.get("job_name") == "gpuq-worker":
                engines.append((st.get("labels") or {}).get("engine"))
        got[sc.get("job_name")] = targets
    if got != expected:
        err(f"{rel}: scrape jobs/targets {got} differ from {expected}")
    if None in engines or len(set(engines)) != 3:
        err(f"{rel}: every gpuq-worker target needs its own `engine` label, got {engines}")
    engine_labels[rel] = engines
if len({tuple(v) for v in engine_labels.values()}) > 1:
    err(f"the Prometheus configs label workers differently: {engine_labels}")

# ---- Grafana provisioning -------------------------------------------------------------------
ds = load_yaml("grafana/provisioning/datasources/datasources.yml") or {}
uids = {d.get("uid"): d.get("type") for d in ds.get("datasources") or []}
if uids != {"prometheus": "prometheus", "loki": "loki"}:
    err(f"datasources.yml: want uids prometheus (prometheus) and loki (loki), got {uids}")
urls = {d.get("uid"): d.get("url") for d in ds.get("datasources") or []}
if urls.get("prometheus") != "http://prometheus:9090" or urls.get("loki") != "http://loki:3100":
    err(f"datasources.yml: unexpected URLs {urls}")
prov = load_yaml("grafana/provisioning/dashboards/dashboards.yml") or {}
paths = [((p.get("options") or {}).get("path")) for p in prov.get("providers") or []]
if paths != ["/var/lib/grafana/dashboards"]:
    err(f"dashboards.yml: one file provider at /var/lib/grafana/dashboards expected, got {paths}")

# ---- Loki and Promtail ----------------------------------------------------------------------
loki = load_yaml("loki/loki.yml") or {}
schemas = [c.get("store") + "/" + c.get("schema") for c in
           (loki.get("schema_config") or {}).get("configs") or []]
if not schemas or schemas[-1] != "tsdb/v13":
    err(f"loki.yml: the newest schema must be tsdb/v13, got {schemas}")
if not (loki.get("compactor") or {}).get("retention_enabled") or \
        not (loki.get("limits_config") or {}).get("retention_period"):
    err("loki.yml: retention must be enabled (compactor.retention_enabled, retention_period)")
if (loki.get("server") or {}).get("http_listen_port") != 3100:
    err("loki.yml: Loki must listen on 3100")

pt = load_yaml("loki/promtail.yml") or {}
stream_labels = set()
json_fields = set()
for sc in pt.get("scrape_configs") or []:
    for sd in sc.get("docker_sd_configs") or []:
        if sd.get("host") != "unix:///var/run/docker.sock":
            err("promtail.yml: docker_sd_configs must use unix:///var/run/docker.sock")
    for rc in sc.get("relabel_configs") or []:
        if rc.get("target_label"):
            stream_labels.add(rc["target_label"])
    for stage in sc.get("pipeline_stages") or []:
        if "json" in stage:
            json_fields |= set((stage["json"].get("expressions") or {}).keys())
        if "labels" in stage:
            stream_labels |= set((stage["labels"] or {}).keys())
if [c.get("url") for c in pt.get("clients") or []] != ["http://loki:3100/loki/api/v1/push"]:
    err("promtail.yml: the one client must push to http://loki:3100/loki/api/v1/push")
want_json = {"level", "service", "worker_id", "job_id", "message"}
if not want_json <= json_fields:
    err(f"promtail.yml: the json stage must extract {sorted(want_json)}, got {sorted(json_fields)}")
if not {"level", "service", "worker_id"} <= stream_labels:
    err(f"promtail.yml: level, service and worker_id must be labels, got {sorted(stream_labels)}")
for high in ("job_id", "message", "timestamp"):
    if high in stream_labels:
        err(f"promtail.yml: {high} must never be a label (one stream per value)")
# Fields of gpuq's JSON log lines (crates/common/src/telemetry.rs) that LogQL may filter on.
LOG_FIELDS = {"timestamp", "level", "service", "target", "message", "job_id", "worker_id"}

# ---- expressions ----------------------------------------------------------------------------
ALLOWED_VARS = {"__rate_interval", "__interval", "engine", "pool", "worker", "job_id"}
SUBST = {"__rate_interval": "1m", "__interval": "1m", "engine": ".*", "pool": ".*",
         "worker": ".*", "job_id": "0190a5e2-0000-7000-8000-000000000000"}
KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left",
            "group_right", "offset", "bool", "inf", "nan"}
VAR_RE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")


def variables(expr):
    return {a or b or c for a, b, c in VAR_RE.findall(expr)}


def substitute(expr):
    return VAR_RE.sub(lambda m: SUBST.get(m.group(1) or m.group(2) or m.group(3), "x"), expr)


def check_promql(where, expr):
    """Metric names, label matchers and job names of one PromQL expression."""
    # Label matchers, attributed to the metric name right before the braces.
    for metric, body in re.findall(r'([a-zA-Z_:][\w:]*)?\s*\{([^}]*)\}', expr):
        for label, op, value in re.findall(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"', body):
            if label == "job" and op in ("=", "=~"):
                pat = value if op == "=~" else re.escape(value)
                if not any(re.fullmatch(pat.replace("\\\\", "\\"), j) for j in JOBS):
                    err(f"{where}: job matcher {label}{op}\"{value}\" matches no scrape job")
            base = re.sub(r"_(bucket|sum|count)$", "", metric or "")
            if metric not in defined and base not in histograms:
                continue  # not gpuq's (or unknown: reported below)
            known = labels_of.get(metric, labels_of.get(base, set())) | TARGET_LABELS
            if metric.endswith("_bucket"):
                known = known | {"le"}
            if label not in known:
                err(f"{where}: {metric} has no label {label!r} (it has {sorted(known)})")
    # Metric names: drop strings, selectors, ranges and grouping clauses; what is left and is
    # not a function call, keyword or number is a metric name.
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    for m in re.finditer(r"(?<![\w.])([a-zA-Z_:][\w:]*)(\s*\()?", s):
        name, call = m.group(1), m.group(2)
        if call or name in KEYWORDS:
            continue
        if name.startswith("gpuq_"):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if name not in defined and not (base != name and base in histograms):
                err(f"{where}: metric {name} is not defined in crates/common/src/metrics.rs")
        elif name not in PROCESS | RABBITMQ | OTHER:
            err(f"{where}: metric {name} is neither gpuq's, process_*, up, nor a verified "
                f"RabbitMQ 3.10 plugin metric")


# Alerts
rules = load_yaml("deploy/prometheus/alerts.yml") or {}
alert_names = []
for group in rules.get("groups") or []:
    for r in group.get("rules") or []:
        name = r.get("alert") or r.get("record")
        where = f"alerts.yml {name}"
        alert_names.append(name)
        if "alert" in r:
            if not r.get("for"):
                err(f"{where}: needs a `for`")
            if (r.get("labels") or {}).get("severity") not in ("critical", "warning", "info"):
                err(f"{where}: needs a severity label (critical, warning or info)")
            ann = r.get("annotations") or {}
            if not ann.get("summary") or not ann.get("description"):
                err(f"{where}: needs summary and description annotations")
        if variables(r.get("expr", "")):
            err(f"{where}: an alert expression cannot use dashboard variables")
        check_promql(where, r.get("expr", ""))
for want in ["GpuqTargetDown", "GpuqEngineOffline", "GpuqGpuUnhealthy", "GpuqDeadLettersGrowing",
             "GpuqBacklogWithoutConsumers", "GpuqJobQueueWaitHigh", "GpuqWorkerRestarting"]:
    if want not in alert_names:
        err(f"alerts.yml: alert {want} is missing")

# Every alert has a unit test that fires it and one where it stays quiet.
tests = load_yaml("deploy/prometheus/alerts_test.yml") or {}
fires, quiet = set(), set()
for t in tests.get("tests") or []:
    for a in t.get("alert_rule_test") or []:
        (fires if a.get("exp_alerts") else quiet).add(a.get("alertname"))
for name in alert_names:
    if name not in fires:
        err(f"alerts_test.yml: no test case fires {name}")
    if name not in quiet:
        err(f"alerts_test.yml: no test case checks that {name} stays quiet")

# Dashboards
recording = []
dash_uids, dash_titles = {}, {}
files = sorted(f for f in os.listdir(os.path.join(ROOT, "grafana/dashboards"))
               if f.endswith(".json"))
for want in ("overview.json", "engines.json", "logs.json"):
    if want not in files:
        err(f"grafana/dashboards/{want} is missing")
for fname in files:
    rel = f"grafana/dashboards/{fname}"
    try:
        with open(os.path.join(ROOT, rel)) as f:
            d = json.load(f)
    except Exception as e:  # noqa: BLE001
        err(f"{rel}: not valid JSON: {e}")
        continue
    for key, seen in (("uid", dash_uids), ("title", dash_titles)):
        v = d.get(key)
        if not v:
            err(f"{rel}: has no {key}")
        elif v in seen:
            err(f"{rel}: {key} {v!r} is also used by {seen[v]}")
        else:
            seen[v] = rel
    if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
        err(f"{rel}: schemaVersion {d.get('schemaVersion')} (want 36 or later)")

    def ds_ok(where, ref):
        if not isinstance(ref, dict) or ref.get("uid") not in uids:
            err(f"{where}: datasource {ref!r} is not a provisioned uid {sorted(uids)}")
            return None
        if ref.get("type") and ref["type"] != uids[ref["uid"]]:
            err(f"{where}: datasource type {ref['type']} != provisioned {uids[ref['uid']]}")
        return ref["uid"]

    defined_vars = set()
    for v in (d.get("templating") or {}).get("list") or []:
        defined_vars.add(v.get("name"))
        if v.get("name") not in ALLOWED_VARS:
            err(f"{rel}: variable {v.get('name')!r} is not one of {sorted(ALLOWED_VARS)}")
        if v.get("type") == "query":
            vwhere = f"{rel} variable {v.get('name')}"
            vds = ds_ok(vwhere, v.get("datasource"))
            q = v.get("query")
            q = q.get("query", "") if isinstance(q, dict) else (q or "")
            m = re.fullmatch(r"\s*label_values\(\s*(.*?)\s*,\s*(\w+)\s*\)\s*", q)
            if not m:
                err(f"{vwhere}: query {q!r} is not label_values(<selector>, <label>)")
            elif vds == "prometheus":
                check_promql(vwhere, m.group(1))
                metric = re.match(r"[a-zA-Z_:][\w:]*", m.group(1))
                known = labels_of.get(metric.group(0) if metric else "", set()) | TARGET_LABELS
                if m.group(2) not in known:
                    err(f"{vwhere}: {m.group(1)} has no label {m.group(2)!r}")
            elif vds == "loki" and m.group(2) not in stream_labels:
                err(f"{vwhere}: {m.group(2)!r} is not a Promtail label")

    panels = []
    for p in d.get("panels") or []:
        panels.append(p)
        panels += p.get("panels") or []  # collapsed rows keep their panels inside
    ids, titles = set(), set()
    for p in panels:
        if p.get("id") in ids:
            err(f"{rel}: panel id {p.get('id')} is used twice")
        ids.add(p.get("id"))
        if p.get("type") == "row":
            continue
        title = p.get("title")
        where = f"{rel} panel {title!r}"
        if not title or title in titles:
            err(f"{where}: panel titles must be present and unique")
        titles.add(title)
        panel_ds = ds_ok(where, p.get("datasource"))
        targets = p.get("targets") or []
        if not targets:
            err(f"{where}: has no query")
        for t in targets:
            expr = t.get("expr") or ""
            tds = ds_ok(where, t.get("datasource", p.get("datasource"))) or panel_ds
            if not expr.strip():
                err(f"{where}: target {t.get('refId')} has no expr")
                continue
            used = variables(expr)
            for v in used - ALLOWED_VARS:
                err(f"{where}: uses variable ${v}; only {sorted(ALLOWED_VARS)} may be used")
            for v in (used & ALLOWED_VARS) - {"__rate_interval", "__interval"} - defined_vars:
                err(f"{where}: uses ${v}, which the dashboard does not define")
            if tds == "prometheus":
                check_promql(where, expr)
                recording.append({"record": f"gpuq:dashboard_expr_{len(recording)}",
                                  "expr": substitute(expr),
                                  "labels": {"source": f"{fname}: {title}"}})
            elif tds == "loki":
                for sel in re.findall(r"\{([^}]*)\}", expr):
                    for label in re.findall(r'(\w+)\s*(?:=~|!~|!=|=)\s*"', sel):
                        if label not in stream_labels:
                            err(f"{where}: stream selector label {label!r} is not a Promtail "
                                f"label {sorted(stream_labels)}")
                if "| json" in expr:
                    after = expr.split("| json", 1)[1]
                    for field in re.findall(r'\|\s*(\w+)\s*(?:=~|!~|!=|=)', after):
                        if field not in LOG_FIELDS:
                            err(f"{where}: filters on {field!r}, not a field of gpuq's log lines")
                for group in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", expr):
                    for label in re.findall(r"\w+", group):
                        if label not in stream_labels:
                            err(f"{where}: groups by {label!r}, not a Promtail label")

with open(OUT, "w") as f:
    yaml.safe_dump({"groups": [{"name": "dashboard-expressions", "rules": recording}]}, f,
                   sort_keys=False, width=1000)

if errors:
    print("\n".join(errors))
    sys.exit(1)
print(f"{len(recording)} dashboard PromQL expressions, {len(alert_names)} alert rules, "
      f"{len(files)} dashboards, {len(defined)} gpuq metric names checked")
PYEOF

check "configs, provisioning, dashboards and metric names cross-check" \
  "$PY" "$TMP/static.py" "$ROOT" "$TMP/dashboard_exprs.yml"
if [ -s "$TMP/dashboard_exprs.yml" ]; then
  check "promtool parses every dashboard PromQL expression" \
    promtool check rules "$TMP/dashboard_exprs.yml"
else
  FAILED+=("promtool parses every dashboard PromQL expression (no expressions file)")
fi

# --- summary -------------------------------------------------------------------------------
if [ "${#FAILED[@]}" -gt 0 ]; then
  failed_list="$(printf '%s; ' "${FAILED[@]}")"
  printf '[%s] observability checks FAILED (%s of %s, %ss): %s\n' "$(_ts)" "${#FAILED[@]}" \
    "$((PASSED + ${#FAILED[@]}))" "$(elapsed "$T0")" "${failed_list%; }" >&2
  exit 1
fi
log "observability checks: all $PASSED ok ($(elapsed "$T0")s)"
