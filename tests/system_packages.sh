#!/usr/bin/env bash
# Debian packages the tests start for real: headless Chromium + ChromeDriver
# (the dashboard's browser test) and PostgreSQL (the dashboard on PostgreSQL).
# Installs only what is missing; needs root (or sudo) and Debian's apt.
set -euo pipefail
need=()
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
compgen -G "/usr/lib/postgresql/*/bin/pg_ctl" > /dev/null || need+=(postgresql)
command -v psql > /dev/null || need+=(postgresql-client)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q "${need[@]}"
fi
