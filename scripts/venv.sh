#!/usr/bin/env bash
# Creates (or updates) the virtualenv at ./.venv with dbops and the test tools.
#
# archive_command / restore_command run dbops as the `postgres` OS user, so that user must be
# able to run the venv's dbops and read the package. When it can read this checkout, .venv is
# a normal venv with an editable install. When it cannot (a checkout under /root, say), the
# venv lives in /var/tmp with a regular install, and .venv is a symlink to it.
#
# Every package comes at the version constraints.txt pins (what the test suite passed with), so a
# fresh machine gets the same versions. After upgrading on purpose and passing `make test`:
#   scripts/venv.sh --update-constraints   (rewrites constraints.txt from the venv)
set -euo pipefail
PYTHON=${PYTHON:-/usr/bin/python3}
here=$(pwd)
extras='.[test]'
constraints="$here/constraints.txt"
if [ "${1:-}" = "--update-constraints" ]; then
  {
    echo "# The versions \`make\` (scripts/venv.sh) and the images install: what the test suite last passed with."
    echo "# Regenerate after an upgrade that passed \`make test\`: scripts/venv.sh --update-constraints"
    "$here/.venv/bin/pip" list --disable-pip-version-check --format=freeze | grep -v -E '^(dbops|pip|setuptools)=='
  } > "$constraints.tmp"
  mv "$constraints.tmp" "$constraints"
  exit 0
fi
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
  "$target/bin/pip" install -q --disable-pip-version-check -c "$constraints" -e "$extras"
  # An editable install is not byte-compiled (a regular one is): without this, and with
  # PYTHONDONTWRITEBYTECODE set, every command would compile the modules it imports from source.
  "$target/bin/python" -m compileall -q dbops >/dev/null
else
  echo "note: the postgres OS user cannot read $here; installing a copy into $target" >&2
  "$target/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps .
  "$target/bin/pip" install -q --disable-pip-version-check -c "$constraints" "$extras"
fi
chmod 755 "$target"
