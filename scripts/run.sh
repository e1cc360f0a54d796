#!/usr/bin/env bash
# `make run`: the whole service in the foreground, for a first look. Ctrl-C stops everything
# this script started.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export DJANGO_DEBUG=${DJANGO_DEBUG:-1}
export EMAIL_HOST=${EMAIL_HOST:-127.0.0.1} EMAIL_PORT=${EMAIL_PORT:-1025}
export PYTHONUNBUFFERED=1
WEB_PORT=${WEB_PORT:-8000} FLOWER_PORT=${FLOWER_PORT:-5555}
mkdir -p var/mail/tmp var/mail/new var/mail/cur var/log  # var/mail is a Maildir

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
$BIN/python manage.py migrate --no-input
$BIN/python manage.py shell -v 0 -c "
from django.contrib.auth import get_user_model
from django.utils.crypto import get_random_string
User = get_user_model()
if not User.objects.filter(is_superuser=True).exists():
    password = get_random_string(16)
    User.objects.create_superuser('admin', 'admin@localhost', password)
    open('var/admin-password', 'w').write(password + '\n')
"
queues=$($BIN/python manage.py shell -v 0 -c "
from messengers.registry import get_registered_messenger_objects
from workers.queues import queue_for
print(' '.join(queue_for(a) for a in get_registered_messenger_objects()))
")

start() {  # name command...
  "${@:2}" >"var/log/$1.log" 2>&1 &
  pids+=($!)
}
start smtp-sink $BIN/python -m aiosmtpd -n -l "127.0.0.1:$EMAIL_PORT" -c aiosmtpd.handlers.Mailbox var/mail
start worker-default $BIN/celery -A workers worker -Q sitemessage -n default@%h -c 1 -l INFO
for queue in $queues; do
  start "worker-$queue" $BIN/celery -A workers worker -Q "$queue" -n "$queue@%h" -c 2 -l INFO
done
start beat $BIN/celery -A workers beat -s var/celerybeat-schedule -l INFO
start flower $BIN/celery -A workers flower --address=127.0.0.1 --port="$FLOWER_PORT"
start web $BIN/python manage.py runserver "127.0.0.1:$WEB_PORT" --noreload

cat <<MSG

sitemessage is running (logs in var/log/, Ctrl-C stops everything):
  admin       http://127.0.0.1:$WEB_PORT/admin/  (user admin, password in var/admin-password)
  Flower      http://127.0.0.1:$FLOWER_PORT/
  workers     sitemessage (schedule, sweep) and one per messenger queue: $queues
  e-mail      the smtp messenger delivers to a local SMTP sink on 127.0.0.1:$EMAIL_PORT;
              every message lands as a file in var/mail/new/
  try it      DJANGO_DEBUG=1 $BIN/python manage.py shell -v 0 -c "from sitemessage.toolbox import schedule_messages, recipients; schedule_messages('Hello', recipients('smtp', ['you@example.com']))"

MSG
wait -n "${pids[@]}" || true
echo "a process exited; see var/log/" >&2
exit 1
