#!/usr/bin/env bash
# Validates the deployment files, by schema, not by eye:
#   - infra/docker-compose.yml against the compose-spec schema;
#   - infra/k8s/*.yaml against Kubernetes' own schemas (strict: unknown
#     fields are errors);
#   - the Prometheus config and alert rules with promtool (check config,
#     check rules, and `test rules`: unit tests that show every alert firing
#     on trouble and silent when healthy; every alert must have one);
#   - the Grafana dashboard for its structure (datasource and prefix
#     variables, no hard-coded prefix, stat panels with thresholds); and
#     every metric the rules and panels query is one the code emits;
#   - every metrics port in the Kubernetes manifests (the service's and the
#     relay sidecar's) is annotated for scraping.
set -euo pipefail
cd "$(dirname "$0")/../.."
source infra/local/venv.sh
ensure_venv "check-jsonschema==0.39.0" "kubernetes-validate==1.37.0" "PyYAML==6.0.3"

echo "compose: infra/docker-compose.yml"
"$VENV/bin/check-jsonschema" --builtin-schema vendor.compose-spec infra/docker-compose.yml

echo "kubernetes: infra/k8s/*.yaml (1.31, strict)"
"$VENV/bin/kubernetes-validate" --strict --quiet -k 1.31.0 infra/k8s/*.yaml

echo "kubernetes operators: infra/k8s/operators/*.yaml (custom resources: the fields orderflow relies on)"
"$VENV/bin/python" - <<'PY'
import re, sys, yaml

problems = []
docs = [d for f in ("infra/k8s/operators/rabbitmq.yaml", "infra/k8s/operators/postgres.yaml")
        for d in yaml.safe_load_all(open(f)) if d]
rabbits = [d for d in docs if d.get("kind") == "RabbitmqCluster"]
if len(rabbits) != 1 or rabbits[0].get("apiVersion") != "rabbitmq.com/v1beta1":
    problems.append("operators/rabbitmq.yaml: expected one RabbitmqCluster (rabbitmq.com/v1beta1)")
else:
    r = rabbits[0]
    name, ns, replicas = r["metadata"]["name"], r["metadata"]["namespace"], r["spec"].get("replicas", 1)
    if replicas < 3:
        problems.append(f"RabbitmqCluster {name}: {replicas} replicas; quorum queues need 3 to lose one node")
    # AMQP_URL must name every node of that cluster (the operator's pods
    # behind its headless Service).
    secret = next(d for d in yaml.safe_load_all(open("infra/k8s/10-config.yaml")) if d and d["kind"] == "Secret")
    url = secret["stringData"]["AMQP_URL"]
    hosts = [re.sub(r"^.*@", "", u.split("/")[2]).split(":")[0] for u in url.split(",")]
    wanted = [f"{name}-server-{i}.{name}-nodes.{ns}" for i in range(replicas)]
    if hosts != wanted:
        problems.append(f"AMQP_URL names {hosts}, not every node of RabbitmqCluster {name}: {wanted}")
pgs = [d for d in docs if d.get("kind") == "Cluster" and d.get("apiVersion", "").startswith("postgresql.cnpg.io/")]
secret = next(d for d in yaml.safe_load_all(open("infra/k8s/10-config.yaml")) if d and d["kind"] == "Secret")
for key, db in (("ORDER_DATABASE_URL", "orderflow_orders"), ("PROCESSOR_DATABASE_URL", "orderflow_processor")):
    url = secret["stringData"][key]
    match = [p for p in pgs if p["spec"]["bootstrap"]["initdb"]["database"] == db]
    if len(match) != 1:
        problems.append(f"operators/postgres.yaml: no CloudNativePG Cluster creating {db}")
        continue
    host = f'{match[0]["metadata"]["name"]}-rw.{match[0]["metadata"]["namespace"]}'
    if f"@{host}:" not in url or not url.endswith(f"/{db}"):
        problems.append(f"{key} does not point at {host} (the primary of {db})")
for p in problems:
    print("  " + p, file=sys.stderr)
sys.exit(1 if problems else 0)
PY

echo "prometheus: promtool check config, check rules, test rules"
if ! command -v promtool >/dev/null; then
  # Debian's prometheus package ships promtool.
  echo "installing promtool (Debian package prometheus)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
promtool check config --syntax-only infra/prometheus/prometheus.yml
promtool check rules infra/prometheus/alerts.yml
(cd infra/prometheus && promtool test rules alerts.test.yml)

echo "alert tests, grafana, and the metrics they query"
"$VENV/bin/python" - <<'PY'
import json, re, subprocess, sys, yaml

problems = []
rules = yaml.safe_load(open("infra/prometheus/alerts.yml"))
exprs = []
alerts = set()
for group in rules["groups"]:
    for rule in group["rules"]:
        if "summary" not in rule.get("annotations", {}):
            problems.append(f"alert without a summary: {rule.get('alert')}")
        alerts.add(rule["alert"])
        exprs.append(rule.get("expr", ""))
# promtool runs the tests; here: every alert has a test in which it fires.
tests = yaml.safe_load(open("infra/prometheus/alerts.test.yml"))
fired = {t["alertname"] for test in tests["tests"] for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
for name in sorted(alerts - fired):
    problems.append(f"alert {name} has no test in alerts.test.yml that shows it firing")

dashboard = json.load(open("infra/grafana/dashboards/orderflow.json"))
variables = {v["name"]: v for v in dashboard.get("templating", {}).get("list", [])}
if variables.get("datasource", {}).get("type") != "datasource":
    problems.append("dashboard: no `datasource` variable (type datasource)")
if "prefix" not in variables:
    problems.append("dashboard: no `prefix` variable for the topology prefix")
stats = 0
for panel in dashboard["panels"]:
    if panel["type"] == "row":
        continue
    if not panel.get("targets"):
        problems.append(f"panel without queries: {panel['title']}")
    if panel.get("datasource", {}).get("uid") != "${datasource}":
        problems.append(f"panel {panel['title']!r} does not use the $datasource variable")
    if panel["type"] == "stat":
        steps = panel.get("fieldConfig", {}).get("defaults", {}).get("thresholds", {}).get("steps", [])
        if len(steps) < 2:
            problems.append(f"stat panel {panel['title']!r} has no thresholds")
        stats += 1
    for t in panel.get("targets", []):
        if re.search(r"orderflow\\", t["expr"]):
            problems.append(f"panel {panel['title']!r} hard-codes the prefix: {t['expr']}")
    exprs += [t["expr"] for t in panel.get("targets", [])]
if stats < 3:
    problems.append(f"dashboard: {stats} stat panels; want backlog, dead rows and dead letters at a glance")

# Every process in the Kubernetes manifests is scraped: the pod's
# prometheus.io/port names a port of the pod, and every other metrics port
# (the relay sidecar's) is named by an annotated Service selecting the pod.
import glob
docs = [d for f in sorted(glob.glob("infra/k8s/*.yaml")) for d in yaml.safe_load_all(open(f)) if d]
services = [d for d in docs if d["kind"] == "Service"]
for deployment in (d for d in docs if d["kind"] == "Deployment"):
    pod = deployment["spec"]["template"]
    labels = pod["metadata"].get("labels", {})
    ports = {p["containerPort"]: p.get("name") for c in pod["spec"]["containers"] for p in c.get("ports", [])}
    scraped = set()
    annotations = pod["metadata"].get("annotations", {})
    if annotations.get("prometheus.io/scrape") == "true":
        scraped.add(int(annotations.get("prometheus.io/port", 0)))
    for svc in services:
        selector = svc["spec"].get("selector", {})
        notes = svc["metadata"].get("annotations", {})
        if selector and all(labels.get(k) == v for k, v in selector.items()) and notes.get("prometheus.io/scrape") == "true":
            scraped.add(int(notes.get("prometheus.io/port", 0)))
    name = deployment["metadata"]["name"]
    for port, port_name in ports.items():
        if (port_name == "http" or "metrics" in (port_name or "")) and port not in scraped:
            problems.append(f"k8s: {name}'s port {port} ({port_name}) serves /metrics but nothing annotates it for scraping")
    for port in scraped - set(ports):
        problems.append(f"k8s: {name} is annotated to be scraped on {port}, which no container exposes")

# Every orderflow metric queried must be one the Rust code records.
source = subprocess.run(["grep", "-rhoE", r'(counter|gauge|histogram)!\("[a-z_]+"', "libs", "order-service",
                         "processor-service", "outbox-relay"], capture_output=True, text=True).stdout
emitted = set(re.findall(r'"([a-z_]+)"', source))
external = re.compile(r"^(rabbitmq_|up$)")
keywords = {"and", "or", "unless", "bool"}
for expr in exprs:
    # Drop grouping clauses, label matchers, ranges and numbers; what is
    # left that is not a function call is a metric name.
    # Dashboard variables (${prefix}) would confuse the matcher's braces.
    bare = re.sub(r"\$\{\w+\}", "var", expr)
    bare = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", " ", bare)
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
