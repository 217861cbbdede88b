#!/usr/bin/env bash
# Container entrypoint: `docker run ... trainer SPEC` runs the whole job;
# `docker run ... trainer validate SPEC` (or any other sub-command) passes through.
# `exec` hands PID 1 to Python so SIGTERM from the host reaches the job (it checkpoints and exits 0).
set -euo pipefail

if [ "$(id -u)" = "0" ]; then
  echo "trainer: warning: running as root (some templates force it); files in /workspace will be owned by root" >&2
fi

SUBCOMMANDS=" run validate schema init import-simpletuner preflight pull cache train upload smoke --help --version "

if [ $# -eq 0 ]; then
  if [ -n "${TRAINER_SPEC_YAML:-}" ]; then
    spec="${TRAINER_WORKSPACE:-/workspace}/.trainer-spec.yaml"
    mkdir -p "$(dirname "$spec")"
    printf '%s\n' "$TRAINER_SPEC_YAML" > "$spec"
    exec trainer run "$spec"
  fi
  if [ -n "${TRAINER_SPEC:-}" ]; then
    set -- "$TRAINER_SPEC"
  else
    echo "usage: docker run --gpus all -v /workspace:/workspace trainer SPEC.yaml" >&2
    echo "       (or set TRAINER_SPEC=path, or TRAINER_SPEC_YAML='<inline yaml>')" >&2
    echo "shipped specs:" >&2
    ls -1 /opt/trainer/specs/*.yaml 2>/dev/null >&2 || true
    exit 2
  fi
fi

case "$SUBCOMMANDS" in
  *" $1 "*) exec trainer "$@" ;;
esac

# A spec given as a URL (fetched first), a path, or a shipped spec's name.
spec="$1"
shift
case "$spec" in
  s3://*|hf://*|http://*|https://*)
    fetched="${TRAINER_WORKSPACE:-/workspace}/.trainer-spec.yaml"
    mkdir -p "$(dirname "$fetched")"
    python -m job.fetch "$spec" "$fetched"
    spec="$fetched"
    ;;
esac
if [ ! -e "$spec" ] && [ -e "/opt/trainer/specs/$spec" ]; then
  spec="/opt/trainer/specs/$spec"
fi
exec trainer run "$spec" "$@"
