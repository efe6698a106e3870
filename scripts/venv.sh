#!/usr/bin/env bash
# Creates (or updates) the virtualenv at ./.venv with dbops and the test tools.
#
# archive_command / restore_command run dbops as the `postgres` OS user, so that user must be
# able to run the venv's dbops and read the package. When it can read this checkout, .venv is
# a normal venv with an editable install. When it cannot (a checkout under /root, say), the
# venv lives in /var/tmp with a regular install, and .venv is a symlink to it.
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
here=$(pwd)
extras='.[test]'
if id postgres >/dev/null 2>&1 && runuser -u postgres -- test -r "$here/pyproject.toml" 2>/dev/null; then
  target="$here/.venv"
  editable=1
else
  target="/var/tmp/dbops-venv-$(printf '%s' "$here" | sha256sum | cut -c1-12)"
  editable=0
fi
if [ "$target" != "$here/.venv" ]; then
  if [ -d "$here/.venv" ] && [ ! -L "$here/.venv" ]; then rm -rf "$here/.venv"; fi
  ln -sfn "$target" "$here/.venv"
fi
[ -x "$target/bin/python" ] || "$PYTHON" -m venv "$target"
if [ "$editable" = 1 ]; then
  "$target/bin/pip" install -q --disable-pip-version-check -e "$extras" pytest-timeout
else
  echo "note: the postgres OS user cannot read $here; installing a copy into $target" >&2
  "$target/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps .
  "$target/bin/pip" install -q --disable-pip-version-check "$extras" pytest-timeout
fi
chmod 755 "$target"
