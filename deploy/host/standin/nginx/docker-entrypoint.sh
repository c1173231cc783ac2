#!/bin/sh
# The official image's entrypoint, the part the proxy uses: render templates, then run the command.
set -eu
if [ "${1:-}" = nginx ]; then
    template_dir=${NGINX_ENVSUBST_TEMPLATE_DIR:-/etc/nginx/templates}
    suffix=${NGINX_ENVSUBST_TEMPLATE_SUFFIX:-.template}
    output_dir=${NGINX_ENVSUBST_OUTPUT_DIR:-/etc/nginx/conf.d}
    # only the variables the environment defines: nginx's own $host, $remote_addr stay as they are
    # shellcheck disable=SC2016,SC2046 # a literal ${NAME} per variable, one word each
    defined_envs=$(printf '${%s} ' $(awk 'END { for (name in ENVIRON) print name }' </dev/null))
    if [ -d "$template_dir" ]; then
        if [ ! -w "$output_dir" ]; then
            echo "$0: ERROR: $output_dir is not writable, templates not rendered" >&2
        else
            find "$template_dir" -follow -type f -name "*$suffix" -print | while read -r template; do
                relative=${template#"$template_dir/"}
                output="$output_dir/${relative%"$suffix"}"
                mkdir -p "$(dirname "$output")"
                echo "$0: Running envsubst on $template to $output"
                envsubst "$defined_envs" <"$template" >"$output"
            done
        fi
    fi
    echo "$0: Configuration complete; ready for start up"
fi
exec "$@"
