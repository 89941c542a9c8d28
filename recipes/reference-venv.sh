#!/bin/sh
# The benchmark's reference venv: numpy, scipy, pandas, matplotlib, scikit-learn, requests.
set -eu
dir=${1:?usage: reference-venv.sh DIR}
python3 -m venv "$dir"
"$dir/bin/pip" install -q --disable-pip-version-check numpy scipy pandas matplotlib scikit-learn requests
