#!/bin/sh
# A small venv with a C extension (markupsafe) and a console script (pyflakes).
set -eu
dir=${1:?usage: small-venv.sh DIR}
python3 -m venv "$dir"
"$dir/bin/pip" install -q --disable-pip-version-check six markupsafe pyflakes
