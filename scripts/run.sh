#!/usr/bin/env bash
# `make run`: the whole service in the foreground, for a first look. Ctrl-C stops everything
# this script started. `scripts/run.sh prepare` does only the first steps (the private var
# directory, migrations, the admin user, the secrets) and returns.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
# What this script and its processes create (database, passwords, e-mails, logs) is readable
# by this user only.
umask 077
export SITEMESSAGE_VAR_DIR=${SITEMESSAGE_VAR_DIR:-var}
VAR=$SITEMESSAGE_VAR_DIR
export DJANGO_DEBUG=${DJANGO_DEBUG:-1}
export EMAIL_HOST=${EMAIL_HOST:-127.0.0.1} EMAIL_PORT=${EMAIL_PORT:-1025}
export PYTHONUNBUFFERED=1
WEB_PORT=${WEB_PORT:-8000} FLOWER_PORT=${FLOWER_PORT:-5555}
try_env="DJANGO_DEBUG=1"  # what the "try it" command below needs
[ "$VAR" = var ] || try_env+=" SITEMESSAGE_VAR_DIR=$VAR"

prepare() {
  mkdir -p "$VAR"/mail/tmp "$VAR"/mail/new "$VAR"/mail/cur "$VAR"/log  # var/mail is a Maildir
  # What an earlier run created under a looser umask is made private too.
  chmod 700 "$VAR" "$VAR"/mail "$VAR"/mail/tmp "$VAR"/mail/new "$VAR"/mail/cur "$VAR"/log
  for file in "$VAR"/db.sqlite3* "$VAR"/admin-password "$VAR"/secret-key; do
    [ ! -e "$file" ] || chmod 600 "$file"
  done
  # A key of this checkout's own rather than the public development key.
  if [ -z "${DJANGO_SECRET_KEY:-}" ]; then
    [ -s "$VAR/secret-key" ] ||
      $BIN/python -c 'import secrets; print(secrets.token_urlsafe(50))' >"$VAR/secret-key"
    DJANGO_SECRET_KEY=$(<"$VAR/secret-key")
    export DJANGO_SECRET_KEY
    try_env+=" DJANGO_SECRET_KEY=\"\$(cat $VAR/secret-key)\""
  fi
  $BIN/python manage.py migrate --no-input
  $BIN/python manage.py shell -v 0 -c "
import os
from django.conf import settings
from django.contrib.auth import get_user_model
from django.utils.crypto import get_random_string
User = get_user_model()
if not User.objects.filter(is_superuser=True).exists():
    password = get_random_string(16)
    User.objects.create_superuser('admin', 'admin@localhost', password)
    path = settings.VAR_DIR / 'admin-password'
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), 'w') as f:
        f.write(password + '\n')
    print(f'admin: user admin, password {password} (shown once; kept in {path})')
"
  scripts/flower.sh credentials
}

if [ "${1:-}" = prepare ]; then
  prepare
  exit
fi

pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping..."
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
  scripts/services.sh stop
}
trap 'cleanup; exit 130' INT TERM
trap cleanup EXIT

case "${CELERY_BROKER_URL:-redis://127.0.0.1:6379/0}" in
  redis://127.0.0.1:6379*|redis://localhost:6379*) scripts/services.sh start redis ;;
esac
prepare
# Per messenger: its queue and its urgent lane, "messenger.smtp,messenger.smtp.urgent".
lanes=$($BIN/python manage.py shell -v 0 -c "
from messengers.registry import get_registered_messenger_objects
from workers.queues import queue_for
print(' '.join(f'{queue_for(a)},{queue_for(a, urgent=True)}' for a in get_registered_messenger_objects()))
")

start() {  # name command...
  "${@:2}" >"$VAR/log/$1.log" 2>&1 &
  pids+=($!)
}
start smtp-sink $BIN/python -m aiosmtpd -n -l "127.0.0.1:$EMAIL_PORT" -c aiosmtpd.handlers.Mailbox "$VAR/mail"
start worker-default $BIN/celery -A workers worker -Q sitemessage -n default@%h -c 1 -l INFO
for both in $lanes; do
  queue=${both%%,*}
  start "worker-$queue" $BIN/celery -A workers worker -Q "$both" -n "$queue@%h" -c 2 -l INFO
done
start beat $BIN/celery -A workers beat -s "$VAR/celerybeat-schedule" -l INFO
start flower scripts/flower.sh "$FLOWER_PORT"
start web $BIN/python manage.py runserver "127.0.0.1:$WEB_PORT" --noreload

cat <<MSG

sitemessage is running (logs in $VAR/log/, Ctrl-C stops everything):
  admin       http://127.0.0.1:$WEB_PORT/admin/  (user admin, password in $VAR/admin-password)
  dashboard   http://127.0.0.1:$WEB_PORT/admin/sitemessage/dispatch/dashboard/
  metrics     http://127.0.0.1:$WEB_PORT/metrics  (a staff session, or SITEMESSAGE_METRICS_TOKEN)
  Flower      http://127.0.0.1:$FLOWER_PORT/  (user admin, password in $VAR/flower-credentials)
  workers     sitemessage (schedule, sweep) and one per messenger, with its urgent lane: $lanes
  e-mail      the smtp messenger delivers to a local SMTP sink on 127.0.0.1:$EMAIL_PORT;
              every message lands as a file in $VAR/mail/new/
  try it      $try_env $BIN/python manage.py shell -v 0 -c "from sitemessage.toolbox import schedule_messages, recipients; schedule_messages('Hello', recipients('smtp', ['you@example.com']))"

MSG
wait -n "${pids[@]}" || true
echo "a process exited; see $VAR/log/" >&2
exit 1
