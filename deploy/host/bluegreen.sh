#!/usr/bin/env bash
# Blue/green on one Docker host, run there by .github/workflows/cd.yml (over SSH, from DEPLOY_PATH), rehearsed for
# real by `make deploy-test` (deploy/rehearse.py). The host needs docker, docker compose, python3 and flock.
#
# Two compose projects of docker-compose.yml's `serve`, catsdogs-blue and catsdogs-green, listen on 127.0.0.1:8001
# and 127.0.0.1:8002 only. The public port belongs to an nginx proxy (proxy.yml, host network) whose upstream file,
# proxy/upstream.conf, names the live colour: it is the one record of which colour is live. A new release starts as
# the idle colour beside the live one; traffic moves only when `switch` rewrites the upstream and nginx reloads
# (graceful: requests in flight finish on the old colour).
#
#   bluegreen.sh candidate IMAGE@DIGEST MODELS_DIR   start the idle colour; prints "colour port" once healthy
#   bluegreen.sh switch COLOUR                       point the proxy at COLOUR once it is healthy; checks the public
#                                                    port answers from COLOUR's container, else puts the old
#                                                    upstream back; interrupted, it is undone (see below)
#   bluegreen.sh retire COLOUR                       stop COLOUR once its requests finished (never the live colour)
#   bluegreen.sh reject COLOUR REASON                record a candidate that failed its checks as failed, and stop it
#   bluegreen.sh rollback                            the previous release back the same way: candidate, switch, retire
#   bluegreen.sh active                              the live colour ("none" before the first switch)
#   bluegreen.sh settle                              settle what a killed call left (below), then print the live colour
#
# Records, in DEPLOY_PATH (deploy/host/releases.py): current.json (the live release) and deployments.jsonl (one line
# per switch, rollback, revert and failed candidate: time, outcome, colour, image, image id, model sha256 and version
# as the service reports them, commit, release.json). The deploy log (timestamped) goes to stderr. Environment:
# PUBLIC_PORT (8000), BLUE_PORT (8001), GREEN_PORT (8002), PROJECT (catsdogs: the compose projects' prefix),
# PROXY_IMAGE (nginx:1.29-alpine), HEALTH_TIMEOUT (180 s for a candidate to become healthy), DRAIN_TIMEOUT (60 s,
# nginx's proxy_read_timeout: the longest retire waits for the old colour's requests), SWITCH_TIMEOUT (30 s: the
# longest switch waits for the public port to answer from the candidate), FORWARDED_ALLOW_IPS (the addresses whose
# X-Forwarded-For a colour believes; default: its network's gateway, the proxy's path), COMMIT (recorded), OUTCOME
# (what switch records: deployed; CD's switch back after failed checks: reverted).
#
# A switch is a transaction whose commit is its record: it first writes its intent (proxy/switching: its token and
# the old upstream, or that there was none), then rewrites the upstream, reloads nginx, checks the public port, and
# records the release (current.json, with the intent's token). Stopped before the record by a signal or an error,
# its trap undoes it: the old upstream copied back from the intent, nginx reloaded (stopped, when there was none),
# a "failed" line recorded; the intent is removed last, so an undo that fails (a reload refused) or is killed is
# done again, whole, by the next call. Killed outright (no trap runs), the next bluegreen.sh call on this host
# settles it first, the same way, or finishes it when its record was written. So once any call returns 0,
# upstream.conf, nginx and current.json agree.
set -euo pipefail
self=$(realpath "$0")
cd "$(dirname "$self")/../.."  # DEPLOY_PATH: docker-compose.yml, deploy/host/, models/, proxy/
mkdir -p proxy
PROJECT=${PROJECT:-catsdogs}
export PUBLIC_PORT=${PUBLIC_PORT:-8000}
releases() { python3 deploy/host/releases.py "$@"; }

log() { echo "$(date -u +%FT%T.%3NZ) $*" >&2; }
port_of() {
  case "$1" in
    blue) echo "${BLUE_PORT:-8001}" ;;
    green) echo "${GREEN_PORT:-8002}" ;;
    *) echo "unknown colour '$1': blue or green" >&2; exit 2 ;;
  esac
}
switched() { # whether the switch in proxy/switching was recorded (committed)
  [ -f proxy/switching ] && releases switched "$(head -n1 proxy/switching)"
}
before_switch() { # the upstream from before the switch in proxy/switching, from its intent (status 1: there was
  # none); an intent written by an older bluegreen.sh names neither: its copy, else current.json's live colour
  case "$(sed -n 2p proxy/switching)" in
    had-upstream) sed -n '3,$p' proxy/switching ;;
    no-upstream) return 1 ;;
    *)
      if [ -f proxy/upstream.conf.old ]; then cat proxy/upstream.conf.old; return 0; fi
      local live; live=$(releases live)
      [ -n "$live" ] || return 1
      printf 'server 127.0.0.1:%s;\n' "$(port_of "$live")"
      ;;
  esac
}
active() { # the colour proxy/upstream.conf sends traffic to (the one before a switch that is not committed)
  local upstream
  if [ -f proxy/switching ] && ! switched; then upstream=$(before_switch) || upstream=""
  else upstream=$(cat proxy/upstream.conf 2>/dev/null) || upstream=""; fi
  local port; port=$(sed -n 's/^server 127\.0\.0\.1:\([0-9]*\);$/\1/p' <<< "$upstream" | head -n1 || true)
  case "$port" in
    "") echo none ;;
    "$(port_of blue)") echo blue ;;
    "$(port_of green)") echo green ;;
    *) echo "proxy/upstream.conf sends traffic to port $port, neither colour's" >&2; exit 1 ;;
  esac
}
compose() { # compose COLOUR ARGS...: the serve service as project PROJECT-COLOUR
  local colour=$1; shift
  PORT="127.0.0.1:$(port_of "$colour")" FORWARDED_ALLOW_IPS="${trusted:-127.0.0.1}" \
    docker compose -p "$PROJECT-$colour" -f docker-compose.yml "$@" 9>&-
}
# A colour listens on the host's loopback only, so what reaches its container through the published port comes from
# its network's gateway (Docker's port publishing): nginx, whose X-Forwarded-For (the client's address, set, never
# appended) the per-address rate limits believe from that one address only, not from another container on the
# network. FORWARDED_ALLOW_IPS, when set, replaces it (a daemon that publishes ports otherwise).
gateway_of() { # gateway_of COLOUR: the IPv4 gateway of its compose network, or nothing
  docker network inspect -f '{{range .IPAM.Config}}{{.Gateway}} {{end}}' "$PROJECT-${1}_default" 2>/dev/null \
    | tr ' ' '\n' | grep -m1 -E '^[0-9]+(\.[0-9]+){3}$' || true
}
proxy() { docker compose -p "$PROJECT-proxy" -f deploy/host/proxy.yml "$@" 9>&-; }  # 9: the lock, not theirs
container_of() { # container_of PROJECT SERVICE: its container's id (running or not), or nothing
  docker ps -aq --filter "label=com.docker.compose.project=$1" --filter "label=com.docker.compose.service=$2" | head -n1
}
health_of() { docker inspect -f '{{.State.Health.Status}} {{.RestartCount}} {{.State.Status}}' "$1" 2>/dev/null || echo none 0 gone; }
ready_field() { # ready_field CONTAINER FIELD: a field of the service's /ready, asked inside its container ("" when
  # it has none: an image from before the field)
  docker exec "$1" python -c "import json, sys, urllib.request
print(json.load(urllib.request.urlopen('http://127.0.0.1:8000/ready', timeout=5)).get(sys.argv[1], ''))" "$2"
}
public_field() { # public_field FIELD SECONDS: a field of the /ready the proxy's public port answers within SECONDS
  # (1 to 5), or nothing
  python3 -c "import json, sys, urllib.request
timeout = max(1.0, min(5.0, float(sys.argv[3])))
try: print(json.load(urllib.request.urlopen(f'http://127.0.0.1:{sys.argv[1]}/ready', timeout=timeout))[sys.argv[2]])
except Exception: pass" "$PUBLIC_PORT" "$1" "$2"
}
old_workers() { # nginx workers still finishing requests after a reload ("worker process is shutting down")
  docker exec "$1" sh -c 'cat /proc/[0-9]*/cmdline 2>/dev/null | tr "\0" "\n" | grep -c "is shutting dow[n]" || true' \
    2>/dev/null || echo 0  # no proxy running: nothing to wait for
}
describe() { # describe COLOUR: proxy/COLOUR.json from its running container (a colour started by an older script)
  local container; container=$(container_of "$PROJECT-$1" serve)
  [ -n "$container" ] || return 1
  IMAGE=$(docker inspect -f '{{.Config.Image}}' "$container") IMAGE_ID=$(docker inspect -f '{{.Image}}' "$container") \
    MODELS=$(docker inspect -f '{{range .Mounts}}{{if eq .Destination "/models"}}{{.Source}}{{end}}{{end}}' "$container") \
    MODEL_SHA256=$(ready_field "$container" model_sha256) MODEL_VERSION=$(ready_field "$container" model_version) \
    releases candidate "$1"
}
stop_colour() { # stop_colour COLOUR SECONDS: compose down, then make sure nothing of it is left
  compose "$1" down --timeout "$2" >&2 2>&1 || true
  if [ -n "$(container_of "$PROJECT-$1" serve)" ]; then echo "$1 did not stop: docker ps -a shows it" >&2; return 1; fi
  rm -f "proxy/$1.json"
}

settle() { # settle WHY [record]: a switch that did not finish (proxy/switching) is finished when it was recorded,
  # else undone: the upstream from before it copied back from its intent, nginx on it (stopped: there was none), a
  # "failed" line recorded once; the intent goes last. Repeatable from whatever a kill or a failed reload left.
  if [ -f proxy/switching ] && ! switched; then
    local token to upstream nginx; token=$(head -n1 proxy/switching); to=${token%% *}
    log "switch to $to did not finish ($1): the upstream from before it goes back"
    nginx=$(container_of "$PROJECT-proxy" proxy)
    if upstream=$(before_switch); then
      printf '%s\n' "$upstream" > proxy/upstream.conf.new
      mv -f proxy/upstream.conf.new proxy/upstream.conf
      if [ -z "$nginx" ] || [ "$(docker inspect -f '{{.State.Status}}' "$nginx" 2>/dev/null)" != running ]; then
        proxy up -d proxy >&2 2>&1 || { log "the proxy did not start: the next bluegreen.sh call tries again"; return 1; }
      else
        { docker exec "$nginx" nginx -t && docker exec "$nginx" nginx -s reload; } >&2 2>&1 \
          || { log "nginx -s reload failed: the next bluegreen.sh call tries again"; return 1; }
      fi
    else  # no live colour before this switch: no upstream, no proxy either
      rm -f proxy/upstream.conf
      if [ -n "$nginx" ]; then
        proxy stop >&2 2>&1 || { log "the proxy did not stop: the next bluegreen.sh call tries again"; return 1; }
      fi
    fi
    [ -z "${2:-}" ] || SWITCH_ID=$token releases record failed "$to" \
      "the switch to $to did not finish ($1); $(active 2>/dev/null) serves" || true
  elif [ -f proxy/switching ]; then
    releases history  # a commit killed between current.json and its deployments.jsonl line
  fi
  rm -f proxy/switching
  rm -f proxy/upstream.conf.old proxy/switching.new proxy/upstream.conf.new  # copies of a switch killed before it
}

# one deploy at a time on this host: CD's steps and an operator's rollback never interleave their halves
if [ "${1:-}" != active ] && [ -z "${BLUEGREEN_LOCKED:-}" ]; then
  exec 9>proxy/.lock
  flock -n 9 || { echo "another bluegreen.sh is running on this host (proxy/.lock); try again when it ends" >&2; exit 1; }
  export BLUEGREEN_LOCKED=1
  settle "bluegreen.sh was killed during it" record || exit 1  # what a killed call left, before anything else
fi

case "${1:-}" in
  candidate)
    image=${2:?IMAGE@DIGEST}; models=${3:?MODELS_DIR}
    test -f "$models/model.onnx" || { echo "no model.onnx in $models" >&2; exit 1; }
    live=$(active)
    colour=$([ "$live" = blue ] && echo green || echo blue)
    MODELS=$(realpath "$models"); export IMAGE=$image MODELS
    export SERVE_IMAGE=$image MODELS_DIR=$MODELS
    reason="" healthy=""
    on_exit() { # whatever ends a candidate that is not healthy (a check, an error, an interrupt) stops and records it
      local status=$?
      [ -z "$healthy" ] || return 0
      trap - EXIT INT TERM HUP
      [ -n "$reason" ] || reason="bluegreen.sh stopped (exit status $status) before the candidate was healthy"
      local container; container=$(container_of "$PROJECT-$colour" serve)
      if [ -n "$container" ]; then
        echo "--- the last log lines of candidate $colour ($container), health probes left out:" >&2
        docker logs "$container" 2>&1 | grep -v '"path": "/\(ready\|health\)"' | tail -n 30 >&2 || true
        IMAGE_ID=$(docker inspect -f '{{.Image}}' "$container" 2>/dev/null || true)
      fi
      stop_colour "$colour" 5 || true
      MODEL_SHA256=$(sha256sum "$MODELS/model.onnx" | cut -d' ' -f1) IMAGE_ID=${IMAGE_ID:-} releases record failed "$colour" "$reason" || true
      log "candidate $colour FAILED and is stopped: $reason; $live keeps serving"
      exit 1
    }
    trap on_exit EXIT
    trap 'reason="interrupted"; exit 1' INT TERM
    trap 'exec >/dev/null 2>&1; reason="the session hung up"; exit 1' HUP  # a dropped SSH session: no terminal left
    docker image inspect "$image" >/dev/null 2>&1 || compose "$colour" pull --quiet serve
    compose "$colour" up --no-start --force-recreate serve >&2 2>&1  # its network, to trust its gateway only
    trusted=${FORWARDED_ALLOW_IPS:-$(gateway_of "$colour")}
    [ -n "$trusted" ] || log "candidate $colour: WARNING no gateway for $PROJECT-${colour}_default; X-Forwarded-For" \
      "is believed from no address (every client behind the proxy shares its rate limits): set FORWARDED_ALLOW_IPS"
    log "candidate $colour: starting $image on 127.0.0.1:$(port_of "$colour") with $MODELS (live: $live)"
    compose "$colour" up -d --no-build --force-recreate serve >&2
    container=$(container_of "$PROJECT-$colour" serve)
    deadline=$((SECONDS + ${HEALTH_TIMEOUT:-180}))
    while :; do
      read -r health restarts state <<< "$(health_of "$container")"
      [ "$health" = healthy ] && break
      [ "$health" = unhealthy ] && { reason="its health check failed (docker-compose.yml: GET /ready must answer 200)"; exit 1; }
      if [ "$restarts" != 0 ] || [ "$state" = exited ] || [ "$state" = dead ] || [ "$state" = gone ]; then
        reason="it exited ($state, restarted $restarts times) before becoming healthy"; exit 1
      fi
      [ "$SECONDS" -lt "$deadline" ] || { reason="not healthy in ${HEALTH_TIMEOUT:-180} s"; exit 1; }
      sleep 1
    done
    IMAGE_ID=$(docker inspect -f '{{.Image}}' "$container")
    MODEL_SHA256=$(ready_field "$container" model_sha256)
    MODEL_VERSION=$(ready_field "$container" model_version)
    IMAGE_ID=$IMAGE_ID MODEL_SHA256=$MODEL_SHA256 MODEL_VERSION=$MODEL_VERSION releases candidate "$colour"
    healthy=1
    log "candidate $colour: healthy, model $MODEL_VERSION sha256 $MODEL_SHA256"
    echo "$colour $(port_of "$colour")"
    ;;
  switch)
    colour=${2:?COLOUR}; port=$(port_of "$colour"); live=$(active)
    [ "$colour" != "$live" ] || { echo "$colour is live already" >&2; exit 1; }
    container=$(container_of "$PROJECT-$colour" serve)
    read -r health _ _ <<< "$(health_of "$container")"
    [ "$health" = healthy ] || { echo "$colour is not running and healthy ($health): not switching to it" >&2; exit 1; }
    [ -f "proxy/$colour.json" ] || describe "$colour"
    sha=$(releases field "$colour" model_sha256)
    instance=$(ready_field "$container" instance)  # the candidate container itself, as the public port must show
    nginx=$(container_of "$PROJECT-proxy" proxy)
    # the transaction: the intent, holding the old upstream (or that there was none), then the change; undone by
    # the trap (or the next call) until recorded
    token="$colour $(date -u +%FT%T.%NZ) $$"
    { printf '%s\n' "$token"
      if [ -f proxy/upstream.conf ]; then echo had-upstream; cat proxy/upstream.conf; else echo no-upstream; fi
    } > proxy/switching.new
    mv proxy/switching.new proxy/switching
    reason=""
    on_switch_exit() { # not recorded: undone; recorded as failed too when interrupted (a check that failed is CD's
      local status=$?  # to record, as `reject`)
      if [ -n "$reason" ]; then settle "$reason"; else settle "bluegreen.sh stopped (exit status $status)" record; fi
    }
    trap on_switch_exit EXIT
    trap 'exit 1' INT TERM  # the EXIT trap undoes it
    trap 'exec >/dev/null 2>&1; exit 1' HUP  # an SSH session dropped: no terminal to write to, and undone the same
    printf 'server 127.0.0.1:%s;\n' "$port" > proxy/upstream.conf.new
    mv proxy/upstream.conf.new proxy/upstream.conf
    log "switch: the proxy goes to $colour (127.0.0.1:$port)"
    restore() { # the old upstream back, and nginx on it (by the EXIT trap); CD's cleanup records the rejection
      reason=$1
      log "switch to $colour FAILED: $1; traffic stays on $live"
      exit 1
    }
    if [ -z "$nginx" ] || [ "$(docker inspect -f '{{.State.Status}}' "$nginx")" != running ]; then
      proxy up -d proxy >&2 || restore "the proxy did not start"
      nginx=$(container_of "$PROJECT-proxy" proxy)
    else
      docker exec "$nginx" nginx -t >&2 2>&1 || restore "nginx -t refused the configuration"
      docker exec "$nginx" nginx -s reload >&2 2>&1 || restore "nginx -s reload failed"
    fi
    # a reload is a signal: the switch is done when the public port answers from the candidate's container (an image
    # from before /ready named its instance: its model)
    field=instance expected=$instance
    [ -n "$instance" ] || field=model_sha256 expected=$sha
    since=$SECONDS bound=${SWITCH_TIMEOUT:-30}
    until [ "$(public_field "$field" $((since + bound - SECONDS)))" = "$expected" ]; do
      [ $((SECONDS - since)) -lt "$bound" ] \
        || restore "the public port does not answer from $colour ($field $expected) after $((SECONDS - since)) s"
      sleep 0.5
    done
    SWITCH_ID=$token releases record "${OUTCOME:-deployed}" "$colour"  # the commit
    settle "recorded"
    trap - EXIT INT TERM HUP
    log "switch: traffic -> $colour (127.0.0.1:$port), model $(releases field "$colour" model_version) sha256 $sha"
    echo "traffic -> $colour (127.0.0.1:$port)"
    ;;
  retire)
    colour=${2:?COLOUR}; port_of "$colour" >/dev/null
    [ "$colour" != "$(active)" ] || { echo "refusing to stop the live colour $colour" >&2; exit 1; }
    # after a reload, nginx's old workers finish the requests they hold on the old colour, then exit
    nginx=$(container_of "$PROJECT-proxy" proxy)
    if [ -n "$nginx" ]; then
      deadline=$((SECONDS + ${DRAIN_TIMEOUT:-60}))
      while [ "$(old_workers "$nginx")" != 0 ]; do
        if [ "$SECONDS" -ge "$deadline" ]; then
          log "retire $colour: WARNING nginx's old workers still hold requests after ${DRAIN_TIMEOUT:-60} s; stopping it anyway"
          break
        fi
        sleep 0.5
      done
    fi
    log "retire $colour: the proxy's old workers are done; stopping it (graceful, up to 35 s)"
    stop_colour "$colour" 35
    log "retire $colour: stopped"
    ;;
  reject)
    colour=${2:?COLOUR}; reason=${3:?REASON}; port_of "$colour" >/dev/null
    [ "$colour" != "$(active)" ] || { echo "refusing to reject the live colour $colour: switch back first" >&2; exit 1; }
    [ -f "proxy/$colour.json" ] || describe "$colour" || true
    releases record failed "$colour" "$reason"
    stop_colour "$colour" 35
    log "reject $colour: $reason; recorded as failed and stopped"
    ;;
  rollback)
    target=$(releases previous)
    image=${target%%$'\t'*}; models=${target#*$'\t'}
    live=$(active)
    log "rollback: $live -> the previous release, $image with $models"
    started=$(bash "$self" candidate "$image" "$models")  # a failed candidate ends the rollback here
    OUTCOME=rolled-back bash "$self" switch "${started%% *}"
    bash "$self" retire "$live"
    ;;
  active)
    active
    ;;
  settle)
    active  # settled on taking the lock, above
    ;;
  *)
    sed -n '2,27p' "$self" >&2
    exit 2
    ;;
esac
