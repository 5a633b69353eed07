#!/usr/bin/env bash
# Runs a long-lived command (make serve) so that stopping it with Ctrl-C or SIGTERM is a normal
# end, exit status 0, instead of make's "*** [serve] Terminated", which reads like a failure.
#
# The command runs in its own process group and gets exactly one SIGTERM, however the stop was
# asked for: Ctrl-C reaches only the terminal's foreground group (make and this script), and a
# SIGTERM sent to make reaches only its child, this script, so without it the service would
# never hear of it. SIGTERM rather than SIGINT: the service drains the same way, and Python
# prints no KeyboardInterrupt traceback. A stop it did not ask for (a crash) keeps its status.
set -uo pipefail
set -m              # job control: the command gets its own process group
exec 3>&2 2>/dev/null  # the command keeps stderr; bash's "[1]+ Terminated" job notice does not
"$@" 2>&3 &
pid=$!
trap 'kill -TERM "$pid"' INT TERM
while :; do
  wait "$pid"
  rc=$?
  kill -0 "$pid" || break  # still running: the wait was cut short by a signal
done
case $rc in
  130 | 143) exit 0 ;;  # stopped by SIGINT / SIGTERM, as asked
  *) exit "$rc" ;;
esac
