#!/usr/bin/env bash
# Validates the deployment files, by schema, not by eye:
#   - infra/docker-compose.yml against the compose-spec schema;
#   - infra/k8s/*.yaml against Kubernetes' own schemas (strict: unknown
#     fields are errors);
#   - the Prometheus config and alert rules, and the Grafana dashboard, for
#     their structure; and every metric they query is one the code emits.
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/local/venv.sh
ensure_venv "check-jsonschema==0.39.0" "kubernetes-validate==1.37.0" "PyYAML==6.0.3"

echo "compose: infra/docker-compose.yml"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec infra/docker-compose.yml

echo "kubernetes: infra/k8s/*.yaml (1.31, strict)"
"$VENV/bin/kubernetes-validate" --strict --quiet -k 1.31.0 infra/k8s/*.yaml

echo "prometheus, alerts and grafana"
"$VENV/bin/python" - <<'PY'
import json, re, subprocess, sys, yaml

problems = []
config = yaml.safe_load(open("infra/prometheus/prometheus.yml"))
for job in config["scrape_configs"]:
    if not job.get("job_name") or not job.get("static_configs"):
        problems.append(f"scrape config without job_name or targets: {job}")
rules = yaml.safe_load(open("infra/prometheus/alerts.yml"))
exprs = []
for group in rules["groups"]:
    for rule in group["rules"]:
        if not {"alert", "expr", "annotations"} <= rule.keys() or "summary" not in rule["annotations"]:
            problems.append(f"alert rule missing alert/expr/summary: {rule.get('alert')}")
        exprs.append(rule.get("expr", ""))
dashboard = json.load(open("infra/grafana/dashboards/orderflow.json"))
for panel in dashboard["panels"]:
    if panel["type"] == "row":
        continue
    if not panel.get("targets"):
        problems.append(f"panel without queries: {panel['title']}")
    exprs += [t["expr"] for t in panel.get("targets", [])]

# Every orderflow metric queried must be one the Rust code records.
source = subprocess.run(["grep", "-rhoE", r'(counter|gauge|histogram)!\("[a-z_]+"', "libs", "order-service",
                         "processor-service", "outbox-relay"], capture_output=True, text=True).stdout
emitted = set(re.findall(r'"([a-z_]+)"', source))
external = re.compile(r"^(rabbitmq_|up$)")
keywords = {"and", "or", "unless", "bool"}
for expr in exprs:
    # Drop grouping clauses, label matchers, ranges and numbers; what is
    # left that is not a function call is a metric name.
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", expr)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\b\d+(\.\d+)?\b", " ", bare)
    for name in set(re.findall(r"\b([a-z_][a-z0-9_]*)\b(?!\s*\()", bare)):
        base = re.sub(r"_(bucket|sum|count)$", "", name)
        if name in keywords or external.match(name) or base in emitted or name in emitted:
            continue
        problems.append(f"{name} is queried but no code records it")
if problems:
    print("\n".join(problems), file=sys.stderr)
    sys.exit(1)
print(f"ok -- {len(exprs)} queries, every metric recorded by the code")
PY
echo "infrastructure files are valid"
