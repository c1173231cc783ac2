#!/usr/bin/env bash
# Blue/green on one Docker host, run there by .github/workflows/cd.yml (over SSH, from DEPLOY_PATH), rehearsed for
# real by `make deploy-test` (deploy/rehearse.py).
#
# Two compose projects of docker-compose.yml's `serve`, catsdogs-blue and catsdogs-green, listen on 127.0.0.1:8001
# and 127.0.0.1:8002 only. The public port belongs to an nginx proxy (proxy.yml, host network) whose upstream file
# names the active colour. A new release starts as the idle colour beside the live one; traffic moves only when
# `switch` rewrites the upstream and nginx reloads (graceful: requests in flight finish on the old colour).
#
#   bluegreen.sh candidate IMAGE@DIGEST MODELS_DIR   start the idle colour; prints "colour port" once healthy
#   bluegreen.sh switch COLOUR                       point the proxy at COLOUR (starts the proxy the first time)
#   bluegreen.sh retire COLOUR                       stop COLOUR once its requests finished (never the live colour)
#   bluegreen.sh rollback                            the previous release back the same way: candidate, switch, retire
#   bluegreen.sh active                              the live colour ("none" before the first switch)
#
# Records, in DEPLOY_PATH: current.json (the live release) and deployments.jsonl (one line per switch, rollback and
# failed candidate: time, outcome, colour, image, image id, model sha256 and version as the service reports them).
# The deploy log (timestamped) goes to stderr. Environment: PUBLIC_PORT (8000), BLUE_PORT (8001), GREEN_PORT (8002),
# PROJECT (catsdogs: the compose projects' prefix), HEALTH_TIMEOUT (180 s for a candidate to become healthy),
# DRAIN_TIMEOUT (60 s, nginx's proxy_read_timeout: the longest retire waits for the old colour's requests), COMMIT
# (recorded when set), OUTCOME (what switch records: deployed).
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../.."  # DEPLOY_PATH: docker-compose.yml, deploy/host/, models/, proxy/
mkdir -p proxy
PROJECT=${PROJECT:-catsdogs}
export PUBLIC_PORT=${PUBLIC_PORT:-8000}

log() { echo "$(date -u +%FT%T.%3NZ) $*" >&2; }
port_of() {
  case "$1" in
    blue) echo "${BLUE_PORT:-8001}" ;;
    green) echo "${GREEN_PORT:-8002}" ;;
    *) echo "unknown colour '$1': blue or green" >&2; exit 2 ;;
  esac
}
active() { cat proxy/active 2>/dev/null || echo none; }
compose() { # compose COLOUR ARGS...: the serve service as project PROJECT-COLOUR
  local colour=$1; shift
  PORT="127.0.0.1:$(port_of "$colour")" docker compose -p "$PROJECT-$colour" -f docker-compose.yml "$@"
}
proxy() { docker compose -p "$PROJECT-proxy" -f deploy/host/proxy.yml "$@"; }
container_of() { # container_of PROJECT SERVICE: the running container's id, or nothing
  docker ps -q --filter "label=com.docker.compose.project=$1" --filter "label=com.docker.compose.service=$2" | head -n1
}
json() { local s=${1//\\/\\\\}; printf '"%s"' "${s//\"/\\\"}"; }
record() { # record OUTCOME COLOUR [REASON]: one line in deployments.jsonl (the release's fields from proxy/COLOUR.release)
  local line release
  release=$(tr -d '\n' 2>/dev/null < "${MODELS:-.}/release.json" || echo null)  # CD's record of the registered model
  line=$(printf '{"at": %s, "outcome": %s, "colour": %s, "image": %s, "image_id": %s, "model_sha256": %s, "model_version": %s, "models": %s, "commit": %s, "reason": %s, "release": %s}' \
    "$(json "$(date -u +%FT%TZ)")" "$(json "$1")" "$(json "$2")" "$(json "${IMAGE:-}")" "$(json "${IMAGE_ID:-}")" \
    "$(json "${MODEL_SHA256:-}")" "$(json "${MODEL_VERSION:-}")" "$(json "${MODELS:-}")" "$(json "${COMMIT:-}")" \
    "$(json "${3:-}")" "${release:-null}")
  printf '%s\n' "$line" >> deployments.jsonl
  [ "$1" = failed ] || { printf '%s\n' "$line" > current.json.new && mv current.json.new current.json; }
}
ready_field() { # ready_field CONTAINER FIELD: a field of the service's /ready, asked inside its container
  docker exec "$1" python -c "import json, sys, urllib.request
print(json.load(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=5))[sys.argv[1]])" "$2"
}
old_workers() { # nginx workers still finishing requests after a reload ("worker process is shutting down")
  docker exec "$(container_of "$PROJECT-proxy" proxy)" \
    sh -c 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\0" "\n" | grep -c "is shutting dow[n]" || true'
}

case "${1:-}" in
  candidate)
    image=${2:?IMAGE@DIGEST}; models=${3:?MODELS_DIR}
    test -f "$models/model.onnx" || { echo "no model.onnx in $models" >&2; exit 1; }
    live=$(active)
    colour=$([ "$live" = blue ] && echo green || echo blue)
    models=$(realpath "$models")
    export SERVE_IMAGE=$image MODELS_DIR=$models
    docker image inspect "$image" >/dev/null 2>&1 || compose "$colour" pull --quiet serve
    log "candidate $colour: starting $image on 127.0.0.1:$(port_of "$colour") with $models (live: $live)"
    reason=""
    compose "$colour" up -d --no-build --force-recreate serve >&2 || reason="docker compose up failed"
    container=$(container_of "$PROJECT-$colour" serve)
    deadline=$((SECONDS + ${HEALTH_TIMEOUT:-180}))
    while [ -z "$reason" ]; do
      read -r health restarts state <<< "$(docker inspect -f '{{.State.Health.Status}} {{.RestartCount}} {{.State.Status}}' \
        "$container" 2>/dev/null || echo none 0 gone)"
      [ "$health" = healthy ] && break
      [ "$health" = unhealthy ] && { reason="its health check failed (docker-compose.yml: GET /ready must answer 200)"; break; }
      if [ "$restarts" != 0 ] || [ "$state" = exited ] || [ "$state" = dead ] || [ "$state" = gone ]; then
        reason="it exited ($state, restarted $restarts times) before becoming healthy"; break
      fi
      [ "$SECONDS" -lt "$deadline" ] || { reason="not healthy in ${HEALTH_TIMEOUT:-180} s"; break; }
      sleep 1
    done
    IMAGE=$image MODELS=$models IMAGE_ID=$(docker inspect -f '{{.Image}}' "$container" 2>/dev/null || true)
    if [ -n "$reason" ]; then
      MODEL_SHA256=$(sha256sum "$models/model.onnx" | cut -d' ' -f1)
      if [ -n "$container" ]; then
        echo "--- the last log lines of candidate $colour ($container), health probes left out:" >&2
        docker logs "$container" 2>&1 | grep -v '"path": "/\(ready\|health\)"' | tail -n 30 >&2 || true
      fi
      compose "$colour" down --timeout 5 >&2 2>&1 || true
      record failed "$colour" "$reason"
      log "candidate $colour FAILED and is stopped: $reason; $live keeps serving"
      exit 1
    fi
    MODEL_SHA256=$(ready_field "$container" model_sha256)
    MODEL_VERSION=$(ready_field "$container" model_version)
    for name in IMAGE IMAGE_ID MODELS MODEL_SHA256 MODEL_VERSION; do printf '%s=%q\n' "$name" "${!name}"; done \
      > "proxy/$colour.release"
    log "candidate $colour: healthy, model $MODEL_VERSION sha256 $MODEL_SHA256"
    echo "$colour $(port_of "$colour")"
    ;;
  switch)
    colour=${2:?COLOUR}; port=$(port_of "$colour"); live=$(active)
    test -f "proxy/$colour.release" || { echo "$colour is not a running candidate (bluegreen.sh candidate first)" >&2; exit 1; }
    printf 'server 127.0.0.1:%s;\n' "$port" > proxy/upstream.conf.new
    mv proxy/upstream.conf.new proxy/upstream.conf
    nginx=$(container_of "$PROJECT-proxy" proxy)
    if [ -z "$nginx" ]; then
      proxy up -d proxy >&2
    else
      docker exec "$nginx" nginx -t >&2 2>&1
      docker exec "$nginx" nginx -s reload >&2 2>&1
    fi
    echo "$colour" > proxy/active
    if [ "$live" != none ] && [ "$live" != "$colour" ] && [ -f "proxy/$live.release" ]; then
      cp "proxy/$live.release" proxy/previous.release
    fi
    # shellcheck source=/dev/null
    source "proxy/$colour.release"
    record "${OUTCOME:-deployed}" "$colour"
    log "switch: traffic -> $colour (127.0.0.1:$port), model $MODEL_VERSION sha256 $MODEL_SHA256"
    echo "traffic -> $colour (127.0.0.1:$port)"
    ;;
  retire)
    colour=${2:?COLOUR}; port_of "$colour" >/dev/null
    [ "$colour" != "$(active)" ] || { echo "refusing to stop the live colour $colour" >&2; exit 1; }
    # after a reload, nginx's old workers finish the requests they hold on the old colour, then exit
    deadline=$((SECONDS + ${DRAIN_TIMEOUT:-60}))
    while [ "$(old_workers)" != 0 ] && [ "$SECONDS" -lt "$deadline" ]; do sleep 0.5; done
    log "retire $colour: the proxy holds no request on it; stopping (graceful, up to 35 s)"
    compose "$colour" down --timeout 35 >&2 2>&1
    rm -f "proxy/$colour.release"
    log "retire $colour: stopped"
    ;;
  rollback)
    test -f proxy/previous.release || { echo "no previous release to roll back to" >&2; exit 1; }
    # shellcheck source=/dev/null
    source proxy/previous.release
    live=$(active)
    log "rollback: $live -> the previous release, $IMAGE with model $MODEL_VERSION ($MODELS)"
    started=$(bash "$self" candidate "$IMAGE" "$MODELS")  # a failed candidate ends the rollback here
    colour=${started%% *}
    OUTCOME=rolled-back bash "$self" switch "$colour"
    bash "$self" retire "$live"
    ;;
  active)
    active
    ;;
  *)
    sed -n '2,22p' "$self" >&2
    exit 2
    ;;
esac
