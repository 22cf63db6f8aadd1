//! `deploy/grafana/` and `deploy/prometheus/`: the dashboard's panels and the alert rules name
//! only series the binary exports (a series that is not exported fails the test), every
//! exported series is charted or alerted on, and the provisioning points Grafana at the
//! dashboard and datasource it expects.

use std::collections::BTreeSet;

use serde_json::Value;

use crate::support::deploy::{deploy_dir, read, yaml};
use crate::support::metrics::ExportedMetrics;

/// Exported series that neither a panel nor an alert rule shows, and why.
const UNWATCHED: &[(&str, &str)] = &[
    (
        "ktd_shard_hot_tree_levels",
        "fixed at open by --hot-tree-mib; the memory it takes is charted (ktd_shard_hot_tree_bytes)",
    ),
    (
        "ktd_raft_purged_index",
        "evidence for the snapshot catch-up drill; the dashboard charts the snapshot index",
    ),
    (
        "ktd_monitor_epoch",
        "a key owner's `ktd monitor`, not a cluster process; its alarms have an alert rule",
    ),
    (
        "ktd_monitor_rounds_total",
        "a key owner's `ktd monitor`, not a cluster process; its alarms have an alert rule",
    ),
    (
        "ktd_monitor_round_failures_total",
        "a key owner's `ktd monitor`, not a cluster process; its alarms have an alert rule",
    ),
    (
        "ktd_monitor_webhook_failures_total",
        "a key owner's `ktd monitor`, not a cluster process; its alarms have an alert rule",
    ),
];

#[test]
fn dashboard_and_alert_rules_name_exported_metrics() {
    let exported = ExportedMetrics::scan();
    let grafana = deploy_dir().join("grafana");
    let dashboard: Value =
        serde_json::from_str(&read(&grafana.join("ktd-dashboard.json"))).expect("dashboard");
    let mut panels: Vec<&Value> = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        panels.push(panel);
        panels.extend(panel["panels"].as_array().into_iter().flatten());
    }
    let mut ids = BTreeSet::new();
    let mut used = BTreeSet::new();
    let mut expressions = 0;
    for panel in panels {
        assert!(ids.insert(panel["id"].as_u64().expect("id")), "{panel}");
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().expect("expr");
            let context = format!("dashboard panel {}", panel["title"]);
            used.extend(exported.check_expr(&context, expr));
            assert_eq!(target["datasource"]["uid"], "${datasource}", "{context}");
            expressions += 1;
        }
    }
    assert!(expressions >= 30, "{expressions} expressions");

    // The provisioning points Grafana at the dashboard and the datasource it expects.
    let datasources = yaml(&grafana.join("provisioning/datasources/ktd.yml"));
    assert_eq!(
        datasources["datasources"][0]["uid"],
        dashboard["templating"]["list"][0]["current"]["value"]
    );
    let providers = yaml(&grafana.join("provisioning/dashboards/ktd.yml"));
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .expect("path");
    let compose = yaml(&deploy_dir().join("compose/docker-compose.yml"));
    assert!(
        compose["services"]["grafana"]["configs"]
            .as_array()
            .expect("configs")
            .iter()
            .any(|config| config["target"] == format!("{path}/ktd-dashboard.json")),
        "compose mounts the dashboard where the provider looks"
    );

    // The alert rules: only exported series.
    let rules = yaml(&deploy_dir().join("prometheus/alerts.yml"));
    let mut alerts = 0;
    let mut alerted = BTreeSet::new();
    for group in rules["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            let expr = rule["expr"].as_str().expect("expr");
            let context = format!("alert {}", rule["alert"]);
            let names = exported.check_expr(&context, expr);
            assert!(!names.is_empty(), "{context}");
            alerted.extend(names);
            alerts += 1;
        }
    }
    assert!(alerts >= 8, "{alerts} alert rules");

    // Every exported series is watched: on a panel or in an alert rule.
    let unwatched: Vec<&String> = exported
        .names()
        .iter()
        .filter(|name| !used.contains(*name) && !alerted.contains(*name))
        .filter(|name| {
            !UNWATCHED
                .iter()
                .any(|(unwatched, _)| *unwatched == name.as_str())
        })
        .collect();
    assert!(
        unwatched.is_empty(),
        "exported but on no panel and in no alert rule (chart them, or add them to UNWATCHED \
         with the reason): {unwatched:?}"
    );
    for (name, _) in UNWATCHED {
        assert!(
            exported.contains(name),
            "UNWATCHED names {name}, which is not exported"
        );
        assert!(
            !used.contains(*name) && !alerted.contains(*name),
            "{name} is watched now: remove it from UNWATCHED"
        );
    }
}
