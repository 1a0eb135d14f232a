#!/usr/bin/env bash
# Start local PostgreSQL and Redis when they are not already answering (used by .ci/run and by
# developers). Idempotent; exits non-zero with one clear line when a service cannot be started.
set -u
PGHOST_=${VERTICALS_PG_HOST:-127.0.0.1}
PGPORT_=${VERTICALS_PG_PORT:-5432}
REDIS_PORT=${VERTICALS_REDIS_PORT:-6379}

wait_for() {  # wait_for <seconds> <command...>
  local t=$1; shift
  for _ in $(seq 1 "$t"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
  return 1
}

if ! pg_isready -q -h "$PGHOST_" -p "$PGPORT_" 2>/dev/null; then
  echo "starting PostgreSQL ..."
  if ! command -v pg_ctlcluster >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql) >/dev/null 2>&1 \
      || { echo "error: PostgreSQL is not installed and could not be installed"; exit 1; }
  fi
  ver=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
  pg_ctlcluster --skip-systemctl-redirect "$ver" main start 2>/dev/null || pg_ctlcluster "$ver" main start
  wait_for 30 pg_isready -q -h "$PGHOST_" -p "$PGPORT_" || { echo "error: PostgreSQL did not start on $PGHOST_:$PGPORT_"; exit 1; }
fi

if ! redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping 2>/dev/null | grep -q PONG; then
  echo "starting Redis ..."
  if ! command -v redis-server >/dev/null 2>&1; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >/dev/null 2>&1 \
      || { echo "error: Redis is not installed and could not be installed"; exit 1; }
  fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for 30 redis-cli -h 127.0.0.1 -p "$REDIS_PORT" ping || { echo "error: Redis did not start on port $REDIS_PORT"; exit 1; }
fi
echo "services: PostgreSQL $PGHOST_:$PGPORT_ and Redis 127.0.0.1:$REDIS_PORT are up"
