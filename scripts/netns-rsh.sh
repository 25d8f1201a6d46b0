#!/usr/bin/env bash
# A remote shell for test hosts made by netns-cluster.sh: `netns-rsh.sh HOST 'command'`
# runs the command in namespace HOST, as `ssh HOST 'command'` would on a real host. Give it
# to launch.sh as `--rsh scripts/netns-rsh.sh`.
set -euo pipefail
host=${1:?usage: netns-rsh.sh NAMESPACE COMMAND}
shift
exec ip netns exec "$host" sh -c "$*"
