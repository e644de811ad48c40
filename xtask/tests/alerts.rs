//! The alerting rules and Alertmanager's configuration, checked with the servers'
//! own tools: `promtool check rules` and the rules' unit tests
//! (`dashboards/alerts/tidemark.rules.test.yml`), and `amtool check-config` on
//! what `render.sh` writes with and without Telegram.

use std::path::PathBuf;
use std::process::{Command, Output};

fn alerts() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dashboards/alerts")
}

fn run(command: &mut Command) -> Output {
    command
        .output()
        .unwrap_or_else(|e| panic!("{command:?} runs (installed by `cargo xtask test`): {e}"))
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn the_rules_are_valid_and_their_unit_tests_pass() {
    let check = run(Command::new("promtool")
        .args(["check", "rules", "tidemark.rules.yml"])
        .current_dir(alerts()));
    assert!(check.status.success(), "{}", text(&check));
    assert!(text(&check).contains("8 rules found"), "{}", text(&check));
    let test = run(Command::new("promtool")
        .args(["test", "rules", "tidemark.rules.test.yml"])
        .current_dir(alerts()));
    assert!(test.status.success(), "{}", text(&test));
    // Each alert is unit-tested.
    let rules = std::fs::read_to_string(alerts().join("tidemark.rules.yml")).unwrap();
    let tests = std::fs::read_to_string(alerts().join("tidemark.rules.test.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} has no unit test"
        );
    }
}

fn render(env: &[(&str, &str)]) -> (Output, String) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("alertmanager.yml");
    let mut command = Command::new("sh");
    command.arg(alerts().join("render.sh")).arg(&out);
    for var in [
        "TIDEMARK_ALERT_WEBHOOK_URL",
        "TIDEMARK_TELEGRAM_BOT_TOKEN",
        "TIDEMARK_TELEGRAM_CHAT_ID",
    ] {
        command.env_remove(var);
    }
    command.envs(env.iter().copied());
    let rendered = run(&mut command);
    if !rendered.status.success() {
        return (rendered, String::new());
    }
    let checked = run(Command::new("amtool").arg("check-config").arg(&out));
    (checked, std::fs::read_to_string(&out).unwrap())
}

#[test]
fn alertmanager_routes_to_telegram_and_a_webhook_only_when_configured() {
    let (checked, config) = render(&[]);
    assert!(checked.status.success(), "{}", text(&checked));
    assert!(!config.contains("telegram_configs") && !config.contains("webhook_configs"));

    let (checked, config) = render(&[
        ("TIDEMARK_ALERT_WEBHOOK_URL", "http://127.0.0.1:9/alerts"),
        ("TIDEMARK_TELEGRAM_BOT_TOKEN", "123456:ABC-def"),
        ("TIDEMARK_TELEGRAM_CHAT_ID", "-100200300"),
    ]);
    assert!(checked.status.success(), "{}\n{config}", text(&checked));
    assert!(config.contains("telegram_configs") && config.contains("chat_id: -100200300"));
    assert!(config.contains("url: \"http://127.0.0.1:9/alerts\""));

    // A token without a chat is no Telegram receiver; a chat that is not a number
    // is refused rather than written into a configuration Alertmanager rejects.
    let (_, config) = render(&[("TIDEMARK_TELEGRAM_BOT_TOKEN", "123456:ABC-def")]);
    assert!(!config.contains("telegram_configs"));
    let (refused, _) = render(&[
        ("TIDEMARK_TELEGRAM_BOT_TOKEN", "123456:ABC-def"),
        ("TIDEMARK_TELEGRAM_CHAT_ID", "@channel"),
    ]);
    assert!(!refused.status.success());
    assert!(
        text(&refused).contains("must be a number"),
        "{}",
        text(&refused)
    );
}
