#!/usr/bin/env bash
# Flower as `make run` starts it: on 127.0.0.1 only, behind HTTP basic auth.
#
#   scripts/flower.sh credentials   create the credentials unless they exist (printed once)
#   scripts/flower.sh [PORT]        run Flower in the foreground (default: $FLOWER_PORT or 5555)
#
# The credentials (user admin, a random password) are kept in
# $SITEMESSAGE_VAR_DIR/flower-credentials (default var/), mode 0600, and reused. Flower gets them
# in FLOWER_BASIC_AUTH: its environment is private to this user, its command line is not (ps).
# Flower 2.2 has no Host header check, so it must stay on loopback; a DNS-rebinding page that
# reaches it there still has no password to send.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 077
VAR=${SITEMESSAGE_VAR_DIR:-var}
CREDENTIALS=$VAR/flower-credentials

credentials() {
  if [ -s "$CREDENTIALS" ]; then
    chmod 600 "$CREDENTIALS"  # it may predate the umask
    return
  fi
  mkdir -p "$VAR"
  local password  # letters and digits: FLOWER_BASIC_AUTH splits on ','
  password=$(.venv/bin/python -c \
    'from django.utils.crypto import get_random_string; print(get_random_string(20))')
  printf 'admin:%s\n' "$password" >"$CREDENTIALS"
  echo "Flower: user admin, password $password (shown once; kept in $CREDENTIALS)"
}

if [ "${1:-}" = credentials ]; then
  credentials
  exit
fi
credentials >&2
FLOWER_BASIC_AUTH=$(<"$CREDENTIALS")
export FLOWER_BASIC_AUTH
exec .venv/bin/celery -A workers flower --address=127.0.0.1 --port="${1:-${FLOWER_PORT:-5555}}"
