#!/bin/sh
# Writes Alertmanager's configuration to $1 from the environment, so that secrets
# stay out of files in the repository (Alertmanager 0.25 reads no variables):
#
#   TIDEMARK_ALERT_WEBHOOK_URL    a webhook receiver (Alertmanager's JSON), if set
#   TIDEMARK_TELEGRAM_BOT_TOKEN   Telegram (its native receiver) when both are set;
#   TIDEMARK_TELEGRAM_CHAT_ID       off otherwise
#   TIDEMARK_ALERT_GROUP_WAIT     how long a new group waits for more alerts (10s)
#
# Used by `cargo xtask up` (the local stack), the test suite and docker-compose.
set -eu
out=$1
case "${TIDEMARK_TELEGRAM_CHAT_ID:-}" in
    *[!0-9-]*) echo "TIDEMARK_TELEGRAM_CHAT_ID must be a number" >&2; exit 1 ;;
esac
{
    cat <<CONFIG
route:
  receiver: tidemark
  group_by: [alertname, service]
  group_wait: ${TIDEMARK_ALERT_GROUP_WAIT:-10s}
  group_interval: 1m
  repeat_interval: 4h
receivers:
  - name: tidemark
CONFIG
    if [ -n "${TIDEMARK_ALERT_WEBHOOK_URL:-}" ]; then
        cat <<CONFIG
    webhook_configs:
      - url: "${TIDEMARK_ALERT_WEBHOOK_URL}"
        send_resolved: true
CONFIG
    fi
    if [ -n "${TIDEMARK_TELEGRAM_BOT_TOKEN:-}" ] && [ -n "${TIDEMARK_TELEGRAM_CHAT_ID:-}" ]; then
        cat <<CONFIG
    telegram_configs:
      - bot_token: "${TIDEMARK_TELEGRAM_BOT_TOKEN}"
        chat_id: ${TIDEMARK_TELEGRAM_CHAT_ID}
        parse_mode: HTML
        send_resolved: true
CONFIG
    fi
} > "$out"
