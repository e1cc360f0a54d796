#!/usr/bin/env bash
# Makes sure the local services the tests and `make run` need answer on loopback, installing
# (apt) and starting whatever is missing. Services it starts are listed in var/started-services
# so that `scripts/services.sh stop` stops exactly those and nothing that was already running.
#
#   scripts/services.sh start redis postgres rabbitmq prosody chromium
#   scripts/services.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p var
STARTED=var/started-services
APT_UPDATED=

say() { echo "services: $*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {  # port seconds name
  for _ in $(seq 1 $(($2 * 10))); do port_open "$1" && return 0; sleep 0.1; done
  say "$3 did not open 127.0.0.1:$1 within $2 s"; return 1
}

apt_install() {
  if [ -z "$APT_UPDATED" ]; then
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null; APT_UPDATED=1
  fi
  say "installing $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

start_redis() {
  port_open 6379 && return 0
  command -v redis-server >/dev/null || apt_install redis-server
  say "starting redis on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir "$PWD/var" --logfile "$PWD/var/redis.log" --pidfile "$PWD/var/redis.pid"
  wait_port 6379 20 redis && echo redis >>"$STARTED"
}

start_postgres() {
  port_open 5432 && return 0
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
    apt_install postgresql
    # Tests connect as postgres over TCP on loopback without a password.
    for hba in /etc/postgresql/*/main/pg_hba.conf; do
      sed -i -E 's/^(host\s+all\s+all\s+127\.0\.0\.1\/32\s+)\S+/\1trust/' "$hba"
    done
  fi
  say "starting postgresql on 127.0.0.1:5432"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  wait_port 5432 30 postgresql && echo postgres >>"$STARTED"
}

start_rabbitmq() {
  port_open 5672 && return 0
  command -v rabbitmq-server >/dev/null || apt_install rabbitmq-server
  say "starting rabbitmq on 127.0.0.1:5672"
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 rabbitmq-server -detached
  wait_port 5672 90 rabbitmq && echo rabbitmq >>"$STARTED"
}

start_prosody() {  # only the binaries: each test starts its own throw-away prosody
  command -v prosodyctl >/dev/null || apt_install prosody
  # Debian starts a system instance on install; the tests do not use it.
  if [ -n "$APT_UPDATED" ] && pgrep -x prosody >/dev/null && [ -f /run/prosody/prosody.pid ]; then
    prosodyctl stop >/dev/null 2>&1 || true
  fi
}

start_chromium() {  # only the binary: each browser test (tests/browser.py) launches its own
  [ -x /usr/bin/chromium ] && return 0
  apt_install chromium || say "chromium could not be installed: the browser tests will be skipped"
}

stop_all() {
  [ -f "$STARTED" ] || return 0
  while read -r service; do
    say "stopping $service (started by this project)"
    case "$service" in
      redis) redis-cli -h 127.0.0.1 -p 6379 shutdown nosave >/dev/null 2>&1 || true ;;
      postgres) pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main stop || true ;;
      rabbitmq) rabbitmqctl stop >/dev/null 2>&1 || true ;;
    esac
  done <"$STARTED"
  rm -f "$STARTED"
}

action=${1:-}; shift || true
case "$action" in
  start) for service in "$@"; do "start_$service"; done ;;
  stop) stop_all ;;
  *) echo "usage: $0 start SERVICE... | stop" >&2; exit 2 ;;
esac
