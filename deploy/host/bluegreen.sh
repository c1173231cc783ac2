#!/usr/bin/env bash
# Blue/green on one Docker host, run there by .github/workflows/cd.yml (over SSH, from DEPLOY_PATH).
#
# Two compose projects of docker-compose.yml's `serve`, catsdogs-blue and catsdogs-green, listen on 127.0.0.1:8001
# and 127.0.0.1:8002 only. The public port belongs to an nginx proxy (proxy.yml, host network) whose upstream file
# names the active colour. A new release starts as the idle colour beside the live one; traffic moves only when
# `switch` rewrites the upstream and nginx reloads (graceful: requests in flight finish on the old colour).
#
#   bluegreen.sh candidate IMAGE@DIGEST MODELS_DIR   start the idle colour; prints "colour port" when healthy
#   bluegreen.sh switch COLOUR                       point the proxy at COLOUR (starts the proxy the first time)
#   bluegreen.sh retire COLOUR                       stop COLOUR (the live colour is refused)
#   bluegreen.sh active                              the live colour ("none" before the first switch)
set -euo pipefail
cd "$(dirname "$0")/../.."  # DEPLOY_PATH: docker-compose.yml, deploy/host/, models/, proxy/
mkdir -p proxy

port_of() { case "$1" in blue) echo 8001 ;; green) echo 8002 ;; *) echo "unknown colour '$1': blue or green" >&2; exit 2 ;; esac; }
active() { cat proxy/active 2>/dev/null || echo none; }
compose() { # compose COLOUR ARGS...: the serve service as project catsdogs-COLOUR
  local colour=$1; shift
  PORT="127.0.0.1:$(port_of "$colour")" docker compose -p "catsdogs-$colour" -f docker-compose.yml "$@"
}

case "${1:-}" in
  candidate)
    image=${2:?IMAGE@DIGEST}; models=${3:?MODELS_DIR}
    test -f "$models/model.onnx" || { echo "no model.onnx in $models" >&2; exit 1; }
    live=$(active)
    colour=$([ "$live" = blue ] && echo green || echo blue)
    SERVE_IMAGE=$image MODELS_DIR=$(realpath "$models") compose "$colour" pull --quiet serve
    SERVE_IMAGE=$image MODELS_DIR=$(realpath "$models") compose "$colour" up -d --no-build --force-recreate serve
    container=$(compose "$colour" ps -q serve)
    for _ in $(seq 90); do
      [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" = healthy ] && break
      sleep 2
    done
    if [ "$(docker inspect -f '{{.State.Health.Status}}' "$container")" != healthy ]; then
      docker logs --tail 50 "$container" >&2
      compose "$colour" down --timeout 5
      echo "candidate $colour was not healthy and is stopped; $live keeps serving" >&2
      exit 1
    fi
    echo "$colour $(port_of "$colour")"
    ;;
  switch)
    colour=${2:?COLOUR}; port=$(port_of "$colour")
    printf 'server 127.0.0.1:%s;\n' "$port" > proxy/upstream.conf.new
    mv proxy/upstream.conf.new proxy/upstream.conf
    if [ -z "$(docker compose -p catsdogs-proxy -f deploy/host/proxy.yml ps -q proxy)" ]; then
      docker compose -p catsdogs-proxy -f deploy/host/proxy.yml up -d proxy
    else
      docker compose -p catsdogs-proxy -f deploy/host/proxy.yml exec -T proxy nginx -t
      docker compose -p catsdogs-proxy -f deploy/host/proxy.yml exec -T proxy nginx -s reload
    fi
    echo "$colour" > proxy/active
    echo "traffic -> $colour (127.0.0.1:$port)"
    ;;
  retire)
    colour=${2:?COLOUR}
    [ "$colour" != "$(active)" ] || { echo "refusing to stop the live colour $colour" >&2; exit 1; }
    compose "$colour" down --timeout 35
    ;;
  active)
    active
    ;;
  *)
    sed -n '2,13p' "$0" >&2
    exit 2
    ;;
esac
